// Nodes for the walk (candidates, anchors, fallbacks) with their vectors, their SIMILAR targets (strongest
// first) and the targets of their outgoing CONFLICT edges (at most k; the walk also keeps those of every
// selected node, which covers the other direction; it computes the cosines itself); with them the SIMILAR targets of the nodes in $expand
// (the walk's guess of where it goes next). The walk keeps what it fetched, so a step at a node whose
// neighbours were fetched before needs no query. Cost depends on the ids asked for and k, never on N.
CALL {
  UNWIND $ids AS id
  MATCH (z:Sample {id: id})
  RETURN z
  UNION
  UNWIND $expand AS id
  MATCH (:Sample {id: id})-[:SIMILAR]->(z:Sample)
  RETURN z
}
RETURN z.id AS id, z.row AS row, z.gradient_f32 AS gradient,
       COLLECT { MATCH (z)-[e:SIMILAR]->(y:Sample) RETURN y.id ORDER BY e.weight DESC, y.row } AS similar,
       [(z)-[:CONFLICT]->(x:Sample) | x.id] AS conflicts
