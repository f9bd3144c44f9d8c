// One walk step: the SIMILAR neighbours of the last added node with their vectors (for the exact checks)
// and their CONFLICT partners; the walk drops selected ones and prefilters conflicts in Python, with sets,
// so the query's cost depends on k and node degree only, never on how many samples are selected.
MATCH (s:Sample {id: $last})-[e:SIMILAR]->(z:Sample)
RETURN z.id AS id, z.row AS row, e.weight AS weight, z.gradient_f32 AS gradient,
       [(z)-[c:CONFLICT]-(x:Sample) | [x.id, c.weight]] AS conflicts
