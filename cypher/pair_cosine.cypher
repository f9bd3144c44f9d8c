// vector.similarity.cosine returns (1 + cos) / 2; the raw cosine is recovered here.
MATCH (a:Sample {id: $a}), (b:Sample {id: $b})
RETURN 2 * vector.similarity.cosine(a.gradient, b.gradient) - 1 AS cosine,
       vector.similarity.cosine(a.gradient, b.gradient) AS similarity
