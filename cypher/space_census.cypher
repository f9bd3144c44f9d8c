// What the database holds of a feature space, as a build checks it against its state: the nodes, how many
// distinct rows they carry and their range, the nodes of any other space, and the edges (count store).
CALL () {
  MATCH (s:Sample {space: $space})
  RETURN count(s) AS n, count(DISTINCT s.row) AS rows, min(s.row) AS min_row, max(s.row) AS max_row
}
CALL () { MATCH (s:Sample) WHERE s.space IS NULL OR s.space <> $space RETURN count(s) AS foreign }
CALL () { MATCH ()-[e:SIMILAR]->() RETURN count(e) AS similar }
CALL () { MATCH ()-[e:CONFLICT]->() RETURN count(e) AS conflict }
RETURN n, rows, min_row, max_row, foreign, similar, conflict
