// A run's picks in selection order, with the samples' provenance.
MATCH (r:SelectionRun {id: $id})-[e:SELECTED]->(s:Sample)
RETURN properties(e) AS pick, s.source_file AS source_file, s.line AS line, s.dataset AS dataset,
       s.preview AS preview
ORDER BY e.rank
