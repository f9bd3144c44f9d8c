// Every node's SIMILAR targets as rows (for the in-memory reference over the same graph).
MATCH (a:Sample {space: $space})-[e:SIMILAR]->(b:Sample)
RETURN a.row AS source, collect(b.row) AS targets
