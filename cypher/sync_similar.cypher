// Make each source's outgoing SIMILAR edges exactly row.targets (top-k neighbours, weight = raw cosine (descending)):
// edges to nodes that left the list are deleted, the rest merged, so re-running changes nothing.
UNWIND $rows AS row
MATCH (a:Sample {id: row.source})
CALL (a, row) {
  OPTIONAL MATCH (a)-[old:SIMILAR]->(b:Sample)
  WHERE NOT b.id IN row.targets
  DELETE old
}
CALL (a, row) {
  UNWIND range(0, size(row.targets) - 1) AS i
  MATCH (b:Sample {id: row.targets[i]})
  MERGE (a)-[e:SIMILAR]->(b)
  SET e.weight = row.weights[i], e.rank = i
  RETURN count(e) AS merged
}
RETURN sum(merged) AS written
