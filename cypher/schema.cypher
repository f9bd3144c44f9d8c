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
CREATE INDEX similar_weight IF NOT EXISTS FOR ()-[e:SIMILAR]-() ON (e.weight);
CREATE INDEX conflict_weight IF NOT EXISTS FOR ()-[e:CONFLICT]-() ON (e.weight)
