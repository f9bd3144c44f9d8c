// One :Sample per training example. The normalised projected gradient is stored twice: as a float32 vector
// property `gradient` (for Cypher's vector functions) and as little-endian float32 bytes `gradient_f32`, which
// the walk and baselines read (Bolt moves bytes without a per-float decode: docs/benchmarks.md). A written
// vector drops its validation dot products; the build recomputes them (validation_dots_missing).
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
REMOVE s.validation_key, s.validation_dots
WITH s, row
CALL db.create.setNodeVectorProperty(s, 'gradient', row.gradient)
RETURN count(*) AS written
