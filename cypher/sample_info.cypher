MATCH (z:Sample {id: $id})
RETURN z.id AS id, z.row AS row, z.source_file AS source_file, z.line AS line, z.dataset AS dataset,
       z.preview AS preview, z.gradient_f32 AS gradient
