// One walk step: the SIMILAR neighbours of the last added node that are not selected yet, with their
// vectors (for the exact checks) and one stored CONFLICT edge to the conflict scope if there is any.
MATCH (s:Sample {id: $last})-[e:SIMILAR]->(z:Sample)
WHERE NOT z.id IN $excluded
RETURN z.id AS id, z.row AS row, e.weight AS weight, z.gradient AS gradient,
       head([(z)-[c:CONFLICT]-(x:Sample) WHERE x.id IN $scope | [x.id, c.weight]]) AS conflict
