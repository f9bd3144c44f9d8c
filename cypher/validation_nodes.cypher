// Validation provenance (no vectors), in the same order as validation_vectors.
MATCH (v:Validation {space: $space})
WHERE $tasks IS NULL OR v.task IN $tasks
RETURN v.id AS id, v.task AS task, v.subtask AS subtask, v.source_file AS source_file, v.line AS line
ORDER BY v.task, v.id
