// One page of a walk step over every unselected node (the paper's candidate set), by cos(z, s); outgoing
// CONFLICT edges only, as in walk_nodes.
MATCH (z:Sample {space: $space})
WHERE NOT z.id IN $excluded
WITH z, vector.similarity.cosine(z.gradient, $vector) AS score
ORDER BY score DESC, z.row ASC
SKIP $skip LIMIT $limit
RETURN z.id AS id, z.row AS row, score AS weight, z.gradient_f32 AS gradient,
       [(z)-[:CONFLICT]->(x:Sample) | x.id] AS conflicts
