UNWIND $ids AS id
MATCH (s:Sample {id: id})
RETURN s.id AS id, s.gradient AS gradient
