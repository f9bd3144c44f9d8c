UNWIND $ids AS id
MATCH (z:Sample {id: id})
RETURN z.id AS id, z.row AS row, z.gradient_f32 AS gradient
