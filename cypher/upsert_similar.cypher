// SIMILAR edges: weight is the raw cosine, rank the position in the source's top-k list.
UNWIND $rows AS row
MATCH (a:Sample {id: row.source})
MATCH (b:Sample {id: row.target})
MERGE (a)-[e:SIMILAR]->(b)
SET e.weight = row.weight, e.rank = row.rank
RETURN count(*) AS written
