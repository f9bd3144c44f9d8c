// Node provenance in row order (no vectors): for baselines that read the original records.
MATCH (z:Sample {space: $space})
RETURN z.id AS id, z.row AS row, z.source_file AS source_file, z.line AS line, z.dataset AS dataset
ORDER BY z.row
