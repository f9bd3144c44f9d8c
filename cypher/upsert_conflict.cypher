// CONFLICT edges: weight is the raw (negative) cosine, rank the position in the most-negative list.
UNWIND $rows AS row
MATCH (a:Sample {id: row.source})
MATCH (b:Sample {id: row.target})
MERGE (a)-[e:CONFLICT]->(b)
SET e.weight = row.weight, e.rank = row.rank
RETURN count(*) AS written
