// The candidates a run's walk refused, one REJECTED relationship each (a candidate refused at several steps has
// several), with the named reason, so Cypher can ask why a sample was not taken.
UNWIND $rows AS row
MATCH (r:SelectionRun {id: $run})
MATCH (s:Sample {id: row.id})
CREATE (r)-[e:REJECTED]->(s)
SET e.order = row.order, e.component = row.component, e.step = row.step, e.reason = row.reason,
    e.other = row.other, e.value = row.value
RETURN count(e) AS written
