// Applied statement by statement (separated by semicolons), idempotently, before any write.
CREATE CONSTRAINT sample_id IF NOT EXISTS FOR (s:Sample) REQUIRE s.id IS UNIQUE;
CREATE CONSTRAINT validation_id IF NOT EXISTS FOR (v:Validation) REQUIRE v.id IS UNIQUE;
CREATE CONSTRAINT run_id IF NOT EXISTS FOR (r:SelectionRun) REQUIRE r.id IS UNIQUE;
CREATE CONSTRAINT featurespace_id IF NOT EXISTS FOR (f:FeatureSpace) REQUIRE f.id IS UNIQUE;
CREATE CONSTRAINT graphlock_name IF NOT EXISTS FOR (l:GraphLock) REQUIRE l.name IS UNIQUE;
CREATE INDEX sample_content_hash IF NOT EXISTS FOR (s:Sample) ON (s.content_hash);
CREATE INDEX sample_dataset IF NOT EXISTS FOR (s:Sample) ON (s.dataset);
CREATE INDEX sample_row IF NOT EXISTS FOR (s:Sample) ON (s.row);
CREATE INDEX validation_task IF NOT EXISTS FOR (v:Validation) ON (v.task);
CREATE INDEX run_status IF NOT EXISTS FOR (r:SelectionRun) ON (r.status);
// No index on SIMILAR/CONFLICT weights: every g2is query expands a node's own 16-32 edges and sorts them,
// which no relationship index serves, and the two indexes cost 8.5% of the store at 1024 dims (issue 19).
// Databases an older g2is wrote lose them here.
DROP INDEX similar_weight IF EXISTS;
DROP INDEX conflict_weight IF EXISTS
