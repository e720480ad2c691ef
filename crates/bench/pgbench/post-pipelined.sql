-- The same post in two pipelined round trips (lock and reads; writes and COMMIT), the
-- acknowledgement as before. pgbench -n -M prepared -c 16 -j 2 -T 10 -f post-pipelined.sql <db>
\set g (:client_id * 100) + random(1, 12)
\set sq 2 * :g
\set rq 2 * :g + 1
\startpipeline
BEGIN;
SELECT epoch, posting_token_hash, recent_posts FROM groups WHERE id = int8send(:g) FOR UPDATE;
SELECT 1 FROM posted_ids WHERE group_id = int8send(:g) AND message_id = int8send(:sq);
SELECT q.id, (q.appended_bytes - COALESCE((SELECT m.start_offset FROM messages m WHERE m.queue_id = q.id ORDER BY m.seq LIMIT 1), q.appended_bytes) + 4611686018427387904) % 4611686018427387904 FROM routes r JOIN queues q ON q.id = r.queue_id WHERE r.group_id = int8send(:g);
\endpipeline
\startpipeline
WITH q AS (UPDATE queues SET next_seq = next_seq + 1, last_used_day = 1, appended_bytes = (appended_bytes + octet_length(decode(repeat('ab', 674), 'hex'))) % 4611686018427387904 WHERE id IN (SELECT queue_id FROM routes WHERE group_id = int8send(:g)) AND NOT (id = ANY(ARRAY[int8send(:sq)])) RETURNING id, next_seq - 1 AS seq, (appended_bytes - 674 + 4611686018427387904) % 4611686018427387904 AS start) INSERT INTO messages (queue_id, seq, payload, day, start_offset) SELECT id, seq, decode(repeat('ab', 674), 'hex'), 1, start FROM q RETURNING queue_id, seq;
UPDATE groups SET recent_posts = int8send(:g), last_used_day = GREATEST(last_used_day, 1) WHERE id = int8send(:g);
COMMIT;
\endpipeline
DELETE FROM messages WHERE queue_id = int8send(:rq) AND seq <= 1000000000;
