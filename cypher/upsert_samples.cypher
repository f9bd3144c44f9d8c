// One :Sample per training example; the normalised projected gradient is stored as float32.
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
    s.space = $space
WITH s, row
CALL db.create.setNodeVectorProperty(s, 'gradient', row.gradient)
RETURN count(*) AS written
