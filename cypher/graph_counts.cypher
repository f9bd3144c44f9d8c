CALL () { MATCH (s:Sample) RETURN count(s) AS samples }
CALL () { MATCH (v:Validation) RETURN count(v) AS validation }
CALL () { MATCH ()-[e:SIMILAR]->() RETURN count(e) AS similar }
CALL () { MATCH ()-[e:CONFLICT]->() RETURN count(e) AS conflict }
CALL () { MATCH (r:SelectionRun) RETURN count(r) AS runs }
RETURN samples, validation, similar, conflict, runs
