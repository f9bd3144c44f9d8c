MATCH (a:Sample {id: $id})-[e:CONFLICT]->(b:Sample)
RETURN b.id AS id, e.weight AS weight, e.rank AS rank
ORDER BY e.weight ASC
