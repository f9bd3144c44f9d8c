// One SELECTED relationship per pick, carrying how and why it was chosen.
UNWIND $rows AS row
MATCH (r:SelectionRun {id: $run})
MATCH (s:Sample {id: row.id})
MERGE (r)-[e:SELECTED]->(s)
SET e += row
RETURN count(e) AS written
