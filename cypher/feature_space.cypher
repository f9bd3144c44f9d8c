// The feature spaces this database holds (one is allowed; see g2is_graph/space.py).
MATCH (f:FeatureSpace)
RETURN f.id AS id, f.build AS build, f.status AS status, f.n_samples AS n_samples, f.dim AS dim,
       f.description AS description, f.pool_cosines AS pool_cosines
