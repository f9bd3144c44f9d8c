// The cosine of two samples, in plain Cypher. Vectors are stored once, as little-endian float32 bytes
// (`gradient_f32`); the list comprehension turns them back into the exact float32 values (sign, exponent,
// mantissa of each 4-byte word; subnormals included) so that Cypher's vector functions apply. Reuse it for
// any node: it costs ~0.2 ms per dimension, fine for a few nodes, not for scans (README: vectors in Cypher).
// vector.similarity.cosine returns (1 + cos) / 2; the raw cosine is recovered here.
MATCH (a:Sample {id: $a}), (b:Sample {id: $b})
WITH [x IN [a.gradient_f32, b.gradient_f32] |
      [i IN range(0, size(x) / 4 - 1) |
       (x[4*i] + 256) % 256 + ((x[4*i+1] + 256) % 256) * 256 + ((x[4*i+2] + 256) % 256) * 65536
       + ((x[4*i+3] + 256) % 256) * 16777216]] AS words
WITH [w IN words |
      [u IN w | CASE WHEN u >= 2147483648 THEN -1.0 ELSE 1.0 END *
                CASE WHEN (u / 8388608) % 256 = 0 THEN (u % 8388608) * 2.0 ^ -149
                     ELSE (1.0 + (u % 8388608) / 8388608.0) * 2.0 ^ ((u / 8388608) % 256 - 127) END]] AS vectors
RETURN 2 * vector.similarity.cosine(vectors[0], vectors[1]) - 1 AS cosine,
       vector.similarity.cosine(vectors[0], vectors[1]) AS similarity
