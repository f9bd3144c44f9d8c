// A sample's vector and its CONFLICT targets with theirs (little-endian float32 bytes), the sample's sent once:
// CONFLICT edges carry no weight, so Graph.conflicts_of computes the exact cosines and their order from these.
MATCH (a:Sample {id: $id})
RETURN a.gradient_f32 AS source, [(a)-[:CONFLICT]->(b:Sample) | {id: b.id, gradient: b.gradient_f32}] AS targets
