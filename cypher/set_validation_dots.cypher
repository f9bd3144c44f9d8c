// Each node's dot products with the validation vectors (little-endian float64 bytes, in the order of
// validation_vectors with no task filter) and the key of that validation set.
UNWIND $rows AS row
MATCH (z:Sample {id: row.id})
SET z.validation_dots = row.dots, z.validation_key = $key
RETURN count(*) AS written
