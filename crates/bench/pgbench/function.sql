-- The post as a PL/pgSQL function, for post-function.sql. psql -d <db> -f function.sql
CREATE OR REPLACE FUNCTION bp_post(gid BYTEA, mid BYTEA, payload BYTEA, skip BYTEA[], dayv BIGINT)
RETURNS TABLE (queue_id BYTEA, seq BIGINT) LANGUAGE plpgsql AS $$
DECLARE e BIGINT; h BYTEA; r BYTEA;
BEGIN
  SELECT epoch, posting_token_hash, recent_posts INTO e, h, r FROM groups WHERE id = gid FOR UPDATE;
  PERFORM 1 FROM posted_ids p WHERE p.group_id = gid AND p.message_id = mid;
  PERFORM q.id, (q.appended_bytes - COALESCE((SELECT m.start_offset FROM messages m WHERE m.queue_id = q.id ORDER BY m.seq LIMIT 1), q.appended_bytes) + 4611686018427387904) % 4611686018427387904 FROM routes rt JOIN queues q ON q.id = rt.queue_id WHERE rt.group_id = gid;
  RETURN QUERY WITH q AS (UPDATE queues SET next_seq = next_seq + 1, last_used_day = dayv, appended_bytes = (appended_bytes + octet_length(payload)) % 4611686018427387904 WHERE id IN (SELECT rr.queue_id FROM routes rr WHERE rr.group_id = gid) AND NOT (id = ANY(skip)) RETURNING id, next_seq - 1 AS s, (appended_bytes - octet_length(payload) + 4611686018427387904) % 4611686018427387904 AS start) INSERT INTO messages AS mm (queue_id, seq, payload, day, start_offset) SELECT id, s, payload, dayv, start FROM q RETURNING mm.queue_id, mm.seq;
  UPDATE groups SET recent_posts = gid, last_used_day = GREATEST(last_used_day, dayv) WHERE id = gid;
END $$;
