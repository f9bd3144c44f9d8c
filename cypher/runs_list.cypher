MATCH (r:SelectionRun)
OPTIONAL MATCH (r)-[:SELECTED]->(s:Sample)
WITH r, count(s) AS n
RETURN r.id AS id, r.method AS method, r.status AS status, r.n_requested AS requested, n AS selected,
       toString(r.started) AS started, r.space AS space, r.reason AS reason, r.process AS process, r.out_dir AS out_dir
ORDER BY r.started DESC
