// Validation examples of the given tasks (all when $tasks is null), in a stable order.
MATCH (v:Validation {space: $space})
WHERE $tasks IS NULL OR v.task IN $tasks
RETURN v.id AS id, v.task AS task, v.subtask AS subtask, v.gradient_f32 AS gradient
ORDER BY v.task, v.id
