// The holder's heartbeat; held = 0 tells it that another writer took the lock over.
OPTIONAL MATCH (l:GraphLock {name: $lock})
WHERE l.owner = $owner
SET l.heartbeat = datetime()
RETURN count(l) AS held
