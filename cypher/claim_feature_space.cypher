// A graph written completely by an older g2is from this very state: record the state it belongs to.
MATCH (f:FeatureSpace {id: $id})
SET f.state_id = $state_id, f.state_dir = $state_dir
RETURN f.id AS id
