"""Neo4j: the one driver owner (named Cypher, batched writes) and the project-managed local server."""
