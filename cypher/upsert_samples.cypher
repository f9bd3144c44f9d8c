// One :Sample per training example. The normalised projected gradient is stored once, as little-endian float32
// bytes `gradient_f32`, which the walk and baselines read (Bolt moves bytes without a per-float decode:
// docs/decisions.md); Cypher decodes them as cypher/pair_cosine.cypher shows. A `gradient` float[] written by
// an older g2is is removed. A written vector drops its validation dot products; the build recomputes them
// (validation_dots_missing). The offline import (db/bulk.py) writes these same properties.
UNWIND $rows AS row
MERGE (s:Sample {id: row.id})
SET s.source_file = row.source_file,
    s.line = row.line,
    s.dataset = row.dataset,
    s.content_hash = row.content_hash,
    s.n_tokens = row.n_tokens,
    s.n_loss_tokens = row.n_loss_tokens,
    s.preview = row.preview,
    s.row = row.row,
    s.space = $space,
    s.gradient_f32 = row.gradient_f32
REMOVE s.validation_key, s.validation_dots, s.gradient
RETURN count(*) AS written
