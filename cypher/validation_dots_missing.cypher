// Nodes whose validation dot products are absent or were computed against another validation set.
MATCH (z:Sample {space: $space})
WHERE z.validation_key IS NULL OR z.validation_key <> $key
RETURN collect(z.id) AS ids
