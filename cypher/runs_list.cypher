MATCH (r:SelectionRun)
OPTIONAL MATCH (r)-[:SELECTED]->(s:Sample)
WITH r, count(s) AS n
RETURN r.id AS id, r.method AS method, r.status AS status, r.n_requested AS requested, n AS selected,
       toString(r.started) AS started, r.space AS space
ORDER BY r.started DESC
