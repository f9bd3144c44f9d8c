MATCH (z:Sample {space: $space})
RETURN z.id AS id
ORDER BY z.row
