// Take the graph's write lock when it is free, already ours, held by $steal (a holder whose process is gone)
// or stale (no heartbeat for $stale_s seconds). Setting a property first takes the node's write lock, so the
// read that follows sees the last committed owner and two writers never both find the lock free.
MERGE (l:GraphLock {name: $lock})
SET l.taking = true
REMOVE l.taking
WITH l, l.owner AS owner, l.holder AS holder, l.heartbeat AS heartbeat
WITH l, owner, holder, heartbeat,
     owner IS NULL OR owner = $owner OR owner = $steal
     OR heartbeat < datetime() - duration({milliseconds: toInteger($stale_s * 1000)}) AS free
CALL (l, free) {
  WITH l WHERE free
  SET l.owner = $owner, l.holder = $holder, l.since = datetime(), l.heartbeat = datetime()
}
RETURN free AS acquired, owner, holder,
       CASE WHEN heartbeat IS NULL THEN null ELSE duration.inSeconds(heartbeat, datetime()).seconds END AS silent_s
