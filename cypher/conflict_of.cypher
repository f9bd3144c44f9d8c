// A sample's CONFLICT targets with both vectors (little-endian float32 bytes): CONFLICT edges carry no weight,
// so Graph.conflicts_of computes the exact cosines and their order from these.
MATCH (a:Sample {id: $id})-[:CONFLICT]->(b:Sample)
RETURN b.id AS id, a.gradient_f32 AS source, b.gradient_f32 AS gradient
