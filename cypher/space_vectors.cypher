// Node vectors in row order, one page at a time (baselines and the in-memory reference).
MATCH (z:Sample {space: $space})
WHERE z.row >= $start AND z.row < $stop
RETURN z.id AS id, z.row AS row, z.gradient_f32 AS gradient, z.source_file AS source_file, z.line AS line,
       z.dataset AS dataset
ORDER BY z.row
