// A run's rejections in the order the walk made them; all of them, or one sample's ($id).
MATCH (r:SelectionRun {id: $run})-[e:REJECTED]->(s:Sample)
WHERE $id IS NULL OR s.id = $id
RETURN s.id AS id, e.component AS component, e.step AS step, e.reason AS reason, e.other AS other,
       e.value AS value
ORDER BY e.order
