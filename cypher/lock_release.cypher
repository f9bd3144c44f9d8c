OPTIONAL MATCH (l:GraphLock {name: $lock})
WHERE l.owner = $owner
SET l.owner = null, l.holder = null, l.released = datetime()
RETURN count(l) AS released
