// Nodes of any kind other than the graph's write lock: a database the offline importer may replace holds none.
MATCH (n) WHERE NOT n:GraphLock
RETURN count(n) AS n
