// Vectors of the given samples, as stored (little-endian float32 bytes; decode_vectors).
UNWIND $ids AS id
MATCH (s:Sample {id: id})
RETURN s.id AS id, s.gradient_f32 AS gradient
