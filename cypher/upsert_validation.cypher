// One :Validation per validation example, with its plain-gradient vector in the graph's feature space
// (float32 bytes, like a :Sample's).
UNWIND $rows AS row
MERGE (v:Validation {id: row.id})
SET v.task = row.task,
    v.subtask = row.subtask,
    v.dataset = row.dataset,
    v.source_file = row.source_file,
    v.line = row.line,
    v.content_hash = row.content_hash,
    v.preview = row.preview,
    v.space = $space,
    v.gradient_f32 = row.gradient_f32
REMOVE v.gradient
RETURN count(*) AS written
