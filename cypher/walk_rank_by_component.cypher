// Anchor and fallback ranking: nodes by cos(z, K) (Neo4j's score is (1 + cos) / 2, same order);
// the walk re-ranks the first unselected entries by exact cosine.
MATCH (z:Sample {space: $space})
WITH z, vector.similarity.cosine(z.gradient, $k) AS score
ORDER BY score DESC, z.row ASC
LIMIT $limit
RETURN z.id AS id, z.row AS row, score
