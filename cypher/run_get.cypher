MATCH (r:SelectionRun {id: $id})
RETURN properties(r) AS run
