// One page of rows (in row order) with each node's dot products with the validation vectors, when they were
// computed against the validation set identified by $key; n counts every node of the page, so rows without
// current dots are detected (the walk then scans full vectors and says why).
MATCH (z:Sample {space: $space})
WHERE z.row >= $start AND z.row < $stop
WITH z ORDER BY z.row
WITH collect(z) AS nodes
RETURN size(nodes) AS n,
       [z IN nodes WHERE z.validation_key = $key | z.id] AS ids,
       [z IN nodes WHERE z.validation_key = $key | z.row] AS rows,
       [z IN nodes WHERE z.validation_key = $key | z.validation_dots] AS dots
