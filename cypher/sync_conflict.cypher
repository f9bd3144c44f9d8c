// Make each source's outgoing CONFLICT edges exactly row.targets (its k most negative cosines, only those below 0):
// edges to nodes that left the list are deleted, the rest merged, so re-running changes nothing. CONFLICT edges
// carry no properties: the walk only asks whether an edge exists, and a weight would cost a 41-byte property
// record per edge (8% of a 1M x 1024 store); conflict_of recomputes the cosines from the vectors.
UNWIND $rows AS row
MATCH (a:Sample {id: row.source})
CALL (a, row) {
  OPTIONAL MATCH (a)-[old:CONFLICT]->(b:Sample)
  WHERE NOT b.id IN row.targets
  DELETE old
}
CALL (a, row) {
  UNWIND row.targets AS target
  MATCH (b:Sample {id: target})
  MERGE (a)-[e:CONFLICT]->(b)
  RETURN count(e) AS merged
}
RETURN sum(merged) AS written
