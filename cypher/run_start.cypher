// A run is visible from its start with status 'running'; only run_finish marks it 'complete'.
CREATE (r:SelectionRun {id: $id})
SET r += $props, r.status = 'running', r.started = datetime()
RETURN r.id AS id
