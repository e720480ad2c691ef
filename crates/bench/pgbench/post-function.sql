-- The post as one PL/pgSQL function call (the alternative not taken); load function.sql first.
-- pgbench -n -M prepared -c 16 -j 2 -T 10 -f post-function.sql <db>
\set g (:client_id * 100) + random(1, 12)
\set sq 2 * :g
\set rq 2 * :g + 1
SELECT * FROM bp_post(int8send(:g), int8send(:sq), decode(repeat('ab', 674), 'hex'), ARRAY[int8send(:sq)], 1);
DELETE FROM messages WHERE queue_id = int8send(:rq) AND seq <= 1000000000;
