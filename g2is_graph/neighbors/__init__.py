"""Top-k SIMILAR and CONFLICT neighbour lists: exact search and hnswlib."""
