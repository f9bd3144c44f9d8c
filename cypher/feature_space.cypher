// The feature spaces this database holds (one is allowed; see g2is_graph/space.py), with the graph state
// (id, directory, build) last written into it.
MATCH (f:FeatureSpace)
RETURN f.id AS id, f.build AS build, f.status AS status, f.n_samples AS n_samples, f.dim AS dim,
       f.description AS description, f.state_id AS state_id, f.state_dir AS state_dir,
       f.writing_build AS writing_build, f.pool_cosines AS pool_cosines
