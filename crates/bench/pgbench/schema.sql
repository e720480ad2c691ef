-- A model of blindpostd's PostgreSQL tables for pgbench (BENCHMARKS.md, "PostgreSQL round
-- trips"): 1,600 1:1 groups, each routing to its sender's queue 2g and receiver's queue 2g+1.
-- psql -d <db> -f schema.sql
CREATE TABLE queues (id BYTEA PRIMARY KEY, receive_secret_hash BYTEA NOT NULL, send_token_hash BYTEA NOT NULL,
  next_seq BIGINT NOT NULL, created_day BIGINT NOT NULL, last_used_day BIGINT NOT NULL, appended_bytes BIGINT NOT NULL DEFAULT 0);
CREATE TABLE messages (queue_id BYTEA NOT NULL, seq BIGINT NOT NULL, payload BYTEA NOT NULL, day BIGINT NOT NULL,
  shared BIGINT, start_offset BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (queue_id, seq));
CREATE INDEX messages_by_day ON messages (day);
CREATE TABLE groups (id BYTEA PRIMARY KEY, epoch BIGINT NOT NULL, posting_token_hash BYTEA NOT NULL,
  created_day BIGINT NOT NULL, last_used_day BIGINT NOT NULL, recent_posts BYTEA NOT NULL DEFAULT ''::bytea);
CREATE TABLE routes (group_id BYTEA NOT NULL, queue_id BYTEA NOT NULL, PRIMARY KEY (group_id, queue_id));
CREATE INDEX routes_by_queue ON routes (queue_id);
CREATE TABLE posted_ids (group_id BYTEA NOT NULL, message_id BYTEA NOT NULL, day BIGINT NOT NULL, PRIMARY KEY (group_id, message_id));
CREATE INDEX posted_ids_by_day ON posted_ids (day);
INSERT INTO groups SELECT int8send(g), 1, sha256(int8send(g)), 1, 1, '' FROM generate_series(1,1600) g;
INSERT INTO queues SELECT int8send(q), sha256(int8send(q)), sha256(int8send(q)), 0, 1, 1, 0 FROM generate_series(2,3201) q;
INSERT INTO routes SELECT int8send(g), int8send(2*g) FROM generate_series(1,1600) g;
INSERT INTO routes SELECT int8send(g), int8send(2*g+1) FROM generate_series(1,1600) g;
VACUUM ANALYZE;
