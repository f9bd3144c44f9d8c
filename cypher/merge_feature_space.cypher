// Record the space before any node of it is written; status says whether the last build finished.
MERGE (f:FeatureSpace {id: $props.id})
SET f += $props, f.status = $status, f.updated = datetime()
RETURN f.id AS id
