MATCH (r:SelectionRun {id: $id})
SET r += $props, r.status = $status, r.finished = datetime()
RETURN r.id AS id
