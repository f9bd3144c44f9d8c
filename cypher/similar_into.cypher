// Selected nodes of a run that list this sample among their SIMILAR neighbours (where the walk could come from).
MATCH (r:SelectionRun {id: $run})-[p:SELECTED]->(s:Sample)-[e:SIMILAR]->(z:Sample {id: $id})
RETURN s.id AS id, e.weight AS weight, p.rank AS rank, p.component AS component
ORDER BY p.rank
