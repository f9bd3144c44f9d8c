// Mark a run failed, unless it completed meanwhile (its own process writes `complete` last).
MATCH (r:SelectionRun {id: $id})
WHERE r.status = 'running'
SET r.status = 'failed', r.reason = $reason, r.finished = datetime()
RETURN r.id AS id
