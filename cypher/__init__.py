"""Cypher text of the system, one statement per file, loaded by name through g2is_graph.graph."""
