// Who holds the graph's write lock (no row, or owner null, when nobody).
MATCH (l:GraphLock {name: $lock})
RETURN l.owner AS owner, l.holder AS holder,
       CASE WHEN l.heartbeat IS NULL THEN null ELSE duration.inSeconds(l.heartbeat, datetime()).seconds END AS silent_s
