"""Records and data: jsonl schemas to one record type, the builders of real pools and targets, synthetic stores."""
