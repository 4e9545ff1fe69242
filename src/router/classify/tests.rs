// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::*;
use crate::router::cache::{ClassifyCache, MAX_CACHED_SQL_LEN};
use crate::router::functions::{is_builtin_writer, is_session_advisory_lock, VOLATILE_FUNCTIONS_QUERY};

// === Corpus ===

/// Provably read-only statements: `Class::Read`, parsed.
const READS: &[&str] = &[
    "SELECT 1",
    "select 1",
    "SeLeCt 1;",
    "SELECT 1;;",
    "  SELECT 1  ;  ",
    "SELECT * FROM t",
    "SELECT a, b FROM public.t WHERE id = $1",
    "SELECT * FROM t WHERE id = 1 LIMIT 1",
    "SELECT * FROM t ORDER BY a DESC NULLS LAST LIMIT 10 OFFSET 20",
    "SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b",
    "SELECT * FROM t FETCH FIRST 5 ROWS ONLY",
    "SELECT * FROM t LIMIT ALL",
    "VALUES (1), (2)",
    "VALUES (1, 'a') ORDER BY 1",
    "TABLE foo",
    "TABLE s.foo",
    "SHOW search_path",
    "SHOW ALL",
    "SHOW TIME ZONE",
    "SHOW TRANSACTION ISOLATION LEVEL",
    "SHOW server_version",
    "show Search_Path",
    "COPY t TO STDOUT",
    "COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER)",
    "COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH CSV HEADER",
    "COPY t TO STDOUT (FORMAT binary)",
    "EXPLAIN SELECT 1",
    "EXPLAIN VERBOSE SELECT * FROM t",
    "EXPLAIN (FORMAT JSON) SELECT 1",
    "EXPLAIN (COSTS off) SELECT * FROM t",
    "EXPLAIN INSERT INTO t VALUES (1)",
    "EXPLAIN UPDATE t SET a = 1",
    "EXPLAIN DELETE FROM t",
    "EXPLAIN SELECT nextval('s')",
    "EXPLAIN (ANALYZE false) INSERT INTO t VALUES (1)",
    "EXPLAIN (ANALYZE off) DELETE FROM t",
    "EXPLAIN (ANALYZE 0) SELECT nextval('s')",
    "EXPLAIN ANALYZE SELECT * FROM t",
    "EXPLAIN ANALYZE VERBOSE SELECT 1",
    "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t",
    "EXPLAIN (ANALYZE on) SELECT 1",
    "SELECT * FROM t JOIN u ON u.t_id = t.id",
    "SELECT * FROM t LEFT JOIN u USING (id) RIGHT JOIN v ON true",
    "SELECT t.* FROM t NATURAL JOIN u FULL OUTER JOIN v USING (id) CROSS JOIN w",
    "SELECT 1 FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id)",
    "SELECT (SELECT max(a) FROM u) FROM t",
    "SELECT x FROM t WHERE x IN (SELECT y FROM u)",
    "SELECT * FROM t WHERE a = ANY (SELECT b FROM u)",
    "SELECT * FROM (SELECT * FROM t) AS s",
    "WITH a AS (SELECT 1) SELECT * FROM a",
    "WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b",
    "WITH a AS MATERIALIZED (SELECT 1) SELECT * FROM a",
    "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t",
    "SELECT sum(a) OVER w FROM t WINDOW w AS (ORDER BY b)",
    "SELECT a FROM t UNION SELECT a FROM u",
    "SELECT a FROM t UNION ALL SELECT a FROM u EXCEPT SELECT 1 INTERSECT SELECT 2",
    "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t = t.id LIMIT 1) x",
    "SELECT * FROM t JOIN LATERAL generate_series(1, t.n) g ON true",
    "SELECT a::int, CAST(b AS text) FROM t",
    "SELECT c->>'k', d #> '{a}', e @> '{\"a\":1}'::jsonb FROM t",
    "SELECT jsonb_build_object('a', 1) || '{}'::jsonb",
    "SELECT * FROM t WHERE id = ANY($1::int[])",
    "SELECT '{1,2}'::int[] && ARRAY[1]",
    "SELECT * FROM generate_series(1, 10) g(i)",
    "SELECT * FROM unnest(ARRAY[1, 2]) WITH ORDINALITY",
    "SELECT * FROM json_to_record('{\"a\":1}') AS x(a int)",
    "SELECT * FROM pg_catalog.pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace",
    "SELECT c.relname FROM pg_class c WHERE c.relkind = ANY (ARRAY['r','p']) AND pg_catalog.pg_table_is_visible(c.oid)",
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a WHERE a.attrelid = 'x'::regclass",
    "SELECT * FROM information_schema.columns WHERE table_name = 'x'",
    "SELECT * FROM pg_stat_activity WHERE state = 'active'",
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()",
    "SELECT version()",
    "SELECT current_setting('search_path')",
    "SELECT has_table_privilege('t', 'select')",
    "SELECT now(), current_timestamp, current_date, localtime",
    "SELECT lower(name), upper(name), count(*) FROM t GROUP BY 1, 2",
    "SELECT count(*) FILTER (WHERE a > 1) FROM t",
    "SELECT a, sum(b) FROM t GROUP BY ROLLUP (a) HAVING sum(b) > 1",
    "SELECT count(*) FROM t GROUP BY GROUPING SETS ((a), (b))",
    "SELECT array_agg(x ORDER BY y) FROM t",
    "SELECT to_char(now(), 'YYYY'), md5('x'), random(), gen_random_uuid()",
    "SELECT * FROM t ORDER BY random() LIMIT 1",
    "SELECT * FROM t WHERE ts > now() - interval '1 day'",
    "SELECT EXTRACT(epoch FROM now())",
    "SELECT date_trunc('day', ts) AT TIME ZONE 'UTC' FROM t",
    "SELECT substring('abc' FROM 1 FOR 2), position('b' IN 'abc') FROM t",
    "SELECT CASE WHEN a THEN 1 ELSE 2 END FROM t",
    "SELECT COALESCE(a, b), NULLIF(a, b), GREATEST(a, b) FROM t",
    "SELECT * FROM t WHERE a ILIKE 'x%' AND b ~ '^x' AND c IS DISTINCT FROM d",
    "SELECT * FROM t WHERE tsv @@ plainto_tsquery('english', $1)",
    "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
    "SELECT * FROM ONLY t",
    "SELECT * FROM \"Users\" u WHERE u.\"Id\" = 1",
    "SELECT xmin, ctid FROM t",
    "SELECT * FROM t WHERE (a, b) IN ((1, 2), (3, 4))",
    "SELECT ARRAY(SELECT 1)",
    "SELECT row(1, 2)",
    "SELECT $1::text",
    "SELECT pg_sequence_last_value('s')",
    "SELECT pg_advisory_lock FROM t",
    "SELECT ';' AS x",
    "SELECT 'it''s; here' FROM t",
    "SELECT $$;$$",
    "SELECT $tag$ ; DELETE FROM t; $tag$",
    "SELECT E'\\';' AS x",
    "SELECT \"weird;name\" FROM t",
    "SELECT 1 /* ; DELETE FROM t */",
    "SELECT 1 -- ; DELETE FROM t",
    "/* leading comment */ SELECT 1",
    "SELECT 1; SELECT 2",
    "SELECT 1; VALUES (2); TABLE t",
    "SELECT \"t0\".\"id\" FROM \"public\".\"users\" AS \"t0\" WHERE (\"t0\".\"id\" IN ($1, $2, $3)) ORDER BY \"t0\".\"id\" ASC LIMIT $4 OFFSET $5",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
    "DECLARE c CURSOR FOR SELECT * FROM t",
    "FETCH 10 FROM c",
    "FETCH ALL IN c",
    "CLOSE c",
    "CLOSE ALL",
];

/// Statements that must run on the primary and that sqlparser parses.
const WRITES: &[&str] = &[
    "INSERT INTO t VALUES (1)",
    "insert into t values (1)",
    "INSERT INTO t VALUES (1) RETURNING id",
    "INSERT INTO t DEFAULT VALUES",
    "INSERT INTO t (a) SELECT a FROM u ON CONFLICT (a) DO UPDATE SET b = excluded.b",
    "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING",
    "INSERT INTO s.t AS x (a) VALUES (1) ON CONFLICT ON CONSTRAINT c DO NOTHING RETURNING *",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP)",
    "UPDATE t SET a = 1 WHERE id = $1",
    "UPDATE t SET a = u.a FROM u WHERE t.id = u.id RETURNING t.*",
    "UPDATE pgbench_accounts SET abalance = abalance + -123 WHERE aid = 5",
    "DELETE FROM t WHERE id = 1",
    "DELETE FROM t USING u WHERE t.id = u.id RETURNING *",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)",
    "COPY t FROM STDIN",
    "COPY t (a, b) FROM STDIN WITH CSV",
    "COPY t FROM '/tmp/x'",
    "COPY t FROM PROGRAM 'cat'",
    "COPY t TO '/tmp/x'",
    "COPY t TO PROGRAM 'gzip > /tmp/x'",
    "COPY (SELECT nextval('s')) TO STDOUT",
    "COPY (DELETE FROM t RETURNING *) TO STDOUT",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR SHARE OF t NOWAIT",
    "SELECT * FROM t FOR UPDATE SKIP LOCKED",
    "SELECT * FROM t WHERE a = 1 FOR UPDATE OF t",
    "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
    "SELECT * INTO newt FROM t",
    "SELECT * INTO UNLOGGED tmp FROM t",
    "WITH d AS (DELETE FROM t WHERE x RETURNING *) SELECT * FROM d",
    "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i",
    "WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u",
    "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
    "EXPLAIN (ANALYZE) DELETE FROM t",
    "EXPLAIN (ANALYZE true, FORMAT json) UPDATE t SET a = 1",
    "EXPLAIN ANALYZE SELECT nextval('s')",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "VACUUM",
    "VACUUM FULL t",
    "ANALYZE",
    "ANALYZE t",
    "GRANT SELECT ON t TO bob",
    "REVOKE SELECT ON t FROM bob",
    "CALL p(1)",
    "CALL s.p()",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "LOCK t",
    "NOTIFY ch, 'payload'",
    "NOTIFY ch",
    "TRUNCATE t",
    "TRUNCATE TABLE t, u RESTART IDENTITY CASCADE",
    "COMMENT ON TABLE t IS 'x'",
    "CREATE TABLE t (a int)",
    "CREATE UNLOGGED TABLE t (a int)",
    "CREATE TABLE IF NOT EXISTS t (id serial PRIMARY KEY, a text NOT NULL DEFAULT 'x', b timestamptz DEFAULT now())",
    "CREATE TABLE t AS SELECT * FROM u",
    "CREATE TABLE t PARTITION OF p FOR VALUES FROM (1) TO (2)",
    "CREATE INDEX CONCURRENTLY i ON t (a)",
    "CREATE UNIQUE INDEX i ON t USING btree (lower(a)) WHERE b",
    "CREATE VIEW v AS SELECT 1",
    "CREATE OR REPLACE VIEW v AS SELECT * FROM t",
    "CREATE MATERIALIZED VIEW mv AS SELECT 1",
    "CREATE SEQUENCE s",
    "CREATE SCHEMA s",
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE TYPE mood AS ENUM ('sad', 'ok')",
    "CREATE DOMAIN posint AS int CHECK (VALUE > 0)",
    "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
    "CREATE OR REPLACE FUNCTION f(a int) RETURNS int AS $$ BEGIN RETURN a; END $$ LANGUAGE plpgsql VOLATILE",
    "CREATE ROLE bob LOGIN",
    "CREATE USER bob",
    "CREATE DATABASE db",
    "CREATE POLICY p ON t USING (true)",
    "CREATE SERVER s FOREIGN DATA WRAPPER fdw",
    "DROP TABLE t",
    "DROP TABLE IF EXISTS t CASCADE",
    "DROP FUNCTION f(int)",
    "DROP VIEW v",
    "DROP SEQUENCE s",
    "DROP SCHEMA s CASCADE",
    "DROP EXTENSION x",
    "DROP TYPE t",
    "DROP ROLE bob",
    "DROP TRIGGER tr ON t",
    "DROP MATERIALIZED VIEW mv",
    "ALTER TABLE t ADD COLUMN b int DEFAULT 0",
    "ALTER TABLE t RENAME TO u",
    "ALTER TABLE t ALTER COLUMN a TYPE bigint",
    "ALTER INDEX i RENAME TO j",
    "ALTER FUNCTION f() STABLE",
    "ALTER ROLE bob SET work_mem = '1MB'",
    "ALTER TYPE mood ADD VALUE 'happy'",
    "ALTER SCHEMA s RENAME TO t",
    "ALTER USER bob WITH PASSWORD 'x'",
    "SELECT nextval('s')",
    "SELECT setval('s', 1)",
    "SELECT currval('s')",
    "SELECT lastval()",
    "SELECT pg_catalog.nextval('s')",
    "SELECT NEXTVAL('s')",
    "SELECT * FROM t WHERE id = nextval('s')",
    "SELECT count(*) FROM (SELECT nextval('s') FROM generate_series(1, 3)) x",
    "SELECT * FROM t WHERE a = (SELECT setval('s', 10))",
    "SELECT CASE WHEN x THEN nextval('s') END FROM t",
    "SELECT * FROM t JOIN LATERAL (SELECT pg_notify('c', t.a)) n ON true",
    "SELECT * FROM t ORDER BY nextval('s')",
    "SELECT * FROM t GROUP BY a HAVING max(nextval('s')) > 0",
    "SELECT array_agg(nextval('s'))",
    "SELECT coalesce(nextval('s'), 1)",
    "SELECT nextval('s')::text",
    "SELECT * FROM nextval('s')",
    "VALUES (nextval('s'))",
    "SELECT 1 WHERE EXISTS (SELECT pg_advisory_xact_lock(1))",
    "SELECT pg_advisory_unlock(1)",
    "SELECT pg_advisory_unlock_all()",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_advisory_xact_lock_shared(1)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT pg_notify('ch', 'x')",
    "SELECT set_config('search_path', 'x', false)",
    "SELECT lo_import('/x')",
    "SELECT lo_unlink(123)",
    "SELECT lo_create(0)",
    "SELECT lo_put(1, 0, 'x')",
    "SELECT lo_from_bytea(0, 'x')",
    "SELECT loread(lo_open(1, 262144), 10)",
    "SELECT lowrite(0, 'x')",
    "SELECT txid_current()",
    "SELECT txid_current_if_assigned()",
    "SELECT pg_current_xact_id()",
    "SELECT pg_current_xact_id_if_assigned()",
    "SELECT dblink_exec('x', 'insert ...')",
    "SELECT * FROM dblink('x', 'select 1') AS t(a int)",
    "SELECT pg_switch_wal()",
    "SELECT pg_create_restore_point('x')",
    "SELECT pg_create_physical_replication_slot('x')",
    "SELECT pg_create_logical_replication_slot('x', 'pgoutput')",
    "SELECT pg_drop_replication_slot('x')",
    "SELECT pg_logical_emit_message(true, 'x', 'y')",
    "SELECT pg_terminate_backend(123)",
    "SELECT pg_cancel_backend(123)",
    "SELECT pg_stat_reset()",
    "SELECT pg_stat_reset_shared('bgwriter')",
    "SELECT setseed(0.5)",
    "SELECT * FROM t WHERE id = ANY(SELECT unnest(ARRAY[setval('s', 1)]))",
    "SELECT 1; INSERT INTO t VALUES (1)",
    "SELECT 1; DELETE FROM t; SELECT 2",
    "DECLARE c CURSOR FOR SELECT nextval('s')",
];

/// Statements sqlparser 0.63 cannot parse: `Write` with `unparsed`.
const UNPARSED: &[&str] = &[
    "SELECT * FROM t FOR NO KEY UPDATE",
    "SELECT * FROM t FOR KEY SHARE",
    "SELECT * FROM t FOR UPDATE OF t, u",
    "SELECT 1 UNION SELECT 2 FOR UPDATE",
    "SELECT INTO x 1",
    "SELECT * FROM ROWS FROM (generate_series(1, 2), generate_series(1, 3))",
    "SELECT * FROM t WHERE a BETWEEN SYMMETRIC 1 AND 2",
    "VACUUM (VERBOSE, ANALYZE) t",
    "VACUUM ANALYZE t",
    "CLUSTER t USING idx",
    "REINDEX TABLE t",
    "CHECKPOINT",
    "DO $$ BEGIN RAISE NOTICE 'x'; END $$",
    "PREPARE TRANSACTION 'foo'",
    "COMMIT PREPARED 'foo'",
    "ROLLBACK PREPARED 'foo'",
    "MOVE NEXT IN c",
    "REFRESH MATERIALIZED VIEW mv",
    "SECURITY LABEL ON TABLE t IS 'x'",
    "IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO t",
    "REASSIGN OWNED BY a TO b",
    "ALTER SYSTEM SET work_mem = '64MB'",
    "ALTER DATABASE db SET x = 1",
    "ALTER SEQUENCE s RESTART",
    "ALTER VIEW v RENAME TO w",
    "DROP INDEX CONCURRENTLY i",
    "DROP OWNED BY a",
    "CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING",
    "CREATE PUBLICATION pub FOR ALL TABLES",
    "CREATE AGGREGATE a (int) (sfunc = f, stype = int)",
    "CREATE PROCEDURE p() LANGUAGE sql AS $$ INSERT INTO t VALUES (1) $$",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END",
    "CREATE TABLE t (LIKE u INCLUDING ALL)",
    "SELECT",
    "SELEKT 1",
    "SELECT 'unterminated",
    "SELECT 1; SELECT * FROM t FOR NO KEY UPDATE",
];

/// Transaction control and its kind.
const TRANSACTIONS: &[(&str, Tx)] = &[
    ("BEGIN", Tx::Begin { read_only: false }),
    ("begin;", Tx::Begin { read_only: false }),
    ("BEGIN WORK", Tx::Begin { read_only: false }),
    ("BEGIN READ WRITE", Tx::Begin { read_only: false }),
    ("BEGIN READ ONLY", Tx::Begin { read_only: true }),
    ("BEGIN TRANSACTION READ ONLY", Tx::Begin { read_only: true }),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ", Tx::Begin { read_only: false }),
    ("START TRANSACTION", Tx::Begin { read_only: false }),
    // A hot standby refuses serializable mode: the primary runs it.
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY", Tx::Begin { read_only: false }),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY", Tx::Begin { read_only: true }),
    ("START TRANSACTION READ ONLY, READ WRITE", Tx::Begin { read_only: false }),
    ("COMMIT", Tx::Commit),
    ("COMMIT WORK", Tx::Commit),
    ("END", Tx::Commit),
    ("END TRANSACTION", Tx::Commit),
    ("ROLLBACK", Tx::Rollback),
    ("ABORT", Tx::Rollback),
    ("SAVEPOINT sp1", Tx::Savepoint),
    ("RELEASE SAVEPOINT sp1", Tx::Release),
    ("RELEASE sp1", Tx::Release),
    ("ROLLBACK TO SAVEPOINT sp1", Tx::RollbackTo),
    ("ROLLBACK TO sp1", Tx::RollbackTo),
    ("COMMIT AND CHAIN", Tx::Other),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Tx::Other),
    ("SET TRANSACTION READ ONLY", Tx::Other),
    ("BEGIN READ ONLY; SELECT 1; COMMIT", Tx::Begin { read_only: true }),
    ("SELECT 1; COMMIT", Tx::Commit),
];

/// Session-state statements: `Class::Session`.
const SESSIONS: &[&str] = &[
    "SET search_path = a, b",
    "SET search_path TO \"$user\", public",
    "SET SESSION search_path = a",
    "SET LOCAL search_path = a",
    "SET TIME ZONE 'UTC'",
    "SET TIME ZONE LOCAL",
    "SET LOCAL TIME ZONE 'UTC'",
    "SET timezone TO DEFAULT",
    "SET statement_timeout = 5000",
    "SET application_name = 'my app'",
    "SET ROLE bob",
    "SET SESSION AUTHORIZATION bob",
    "SET NAMES 'UTF8'",
    "SET datestyle = iso, mdy",
    "SET x.y = 1",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "RESET search_path",
    "RESET ALL",
    "RESET ROLE",
    "RESET SESSION AUTHORIZATION",
    "DISCARD ALL",
    "DISCARD PLANS",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
    "PREPARE foo AS SELECT 1",
    "PREPARE ins (int) AS INSERT INTO t VALUES ($1)",
    "DEALLOCATE foo",
    "DEALLOCATE PREPARE foo",
    "DEALLOCATE ALL",
    "LISTEN ch",
    "UNLISTEN ch",
    "UNLISTEN *",
    "LOAD 'auto_explain'",
    "SET x = 1; SELECT 1",
    "SET a = 1; SET b = 2",
];

#[test]
fn corpus_is_large_enough() {
    let size = READS.len() + WRITES.len() + UNPARSED.len() + TRANSACTIONS.len() + SESSIONS.len();
    assert!(size >= 200, "corpus has {size} statements");
}

#[test]
fn reads_are_read() {
    for sql in READS {
        let c = classify(sql);
        assert_eq!(c.class, Class::Read, "{sql}: {c:?}");
        assert!(!c.unparsed, "{sql}");
    }
}

#[test]
fn writes_are_write() {
    for sql in WRITES {
        let c = classify(sql);
        assert_eq!(c.class, Class::Write, "{sql}: {c:?}");
        assert!(!c.unparsed, "{sql} should parse");
        assert!(c.class.needs_primary(), "{sql}");
    }
}

#[test]
fn unparsed_statements_are_writes() {
    for sql in UNPARSED {
        let c = classify(sql);
        assert_eq!(c.class, Class::Write, "{sql}: {c:?}");
        assert!(c.unparsed, "{sql} parsed unexpectedly: {c:?}");
    }
}

#[test]
fn transaction_control() {
    for (sql, tx) in TRANSACTIONS {
        let c = classify(sql);
        assert_eq!(c.class, Class::Transaction(*tx), "{sql}: {c:?}");
    }
    assert!(classify("BEGIN").class.needs_primary());
    assert!(!classify("BEGIN READ ONLY").class.needs_primary());
    assert!(!classify("COMMIT").class.needs_primary());
}

#[test]
fn session_statements() {
    for sql in SESSIONS {
        let c = classify(sql);
        assert_eq!(c.class, Class::Session, "{sql}: {c:?}");
    }
}

// === Multi-statement texts ===

#[test]
fn begin_with_reads_is_a_write() {
    assert_eq!(classify("BEGIN; SELECT 1; COMMIT").class, Class::Write);
    assert_eq!(classify("BEGIN; SELECT 1").class, Class::Write);
}

#[test]
fn pgnear_commands_mixed_with_others_are_writes() {
    assert_eq!(classify("SET pgnear.route = primary; SELECT 1").class, Class::Write);
}

#[test]
fn semicolons_inside_literals_do_not_split() {
    let c = classify("SELECT 'a;b'; SET search_path = 'x;y'");
    assert_eq!(c.class, Class::Session);
    let statement = "SET search_path = 'x;y'".to_owned();
    let name = "search_path".to_owned();
    assert_eq!(c.effects, vec![SessionEffect::Set { name, statement }]);
}

#[test]
fn dollar_quotes_do_not_split() {
    let c = classify("SELECT $x$ ; INSERT INTO t VALUES (1); $x$; SET a = 1");
    assert_eq!(c.class, Class::Session);
    assert_eq!(c.effects.len(), 1);
}

#[test]
fn empty_text_is_a_read_with_nothing() {
    for sql in ["", "   ", "\n\t", ";", " ;; ", "-- only a comment", "/* c */"] {
        let c = classify(sql);
        assert_eq!(c.class, Class::Read, "{sql:?}");
        assert!(c.effects.is_empty() && c.tables.is_empty() && !c.unparsed, "{sql:?}");
    }
}

#[test]
fn deep_nesting_is_an_unparsed_write() {
    let depth = 10_000;
    let sql = format!("SELECT {}1{}", "(".repeat(depth), ")".repeat(depth));
    let c = classify(&sql);
    assert_eq!(c.class, Class::Write);
    assert!(c.unparsed);
    let subqueries = format!("SELECT * FROM {}t{}", "(SELECT * FROM ".repeat(200), ")".repeat(200));
    assert!(classify(&subqueries).unparsed);
}

#[test]
fn long_operator_chains_are_unparsed_writes() {
    let chains = [
        format!("SELECT 1{}", " + 1".repeat(100_000)),
        format!("SELECT 1{}", " UNION SELECT 1".repeat(20_000)),
        format!("SELECT a{}", "[1]".repeat(50_000)),
        format!("SELECT 'a'{}", " || 'a'".repeat(50_000)),
    ];
    for sql in chains {
        let c = classify(&sql);
        assert_eq!((c.class, c.unparsed), (Class::Write, true));
    }
    let c = classify(&format!("SELECT 1{}", " + 1".repeat(2_000)));
    assert_eq!((c.class, c.unparsed), (Class::Read, false));
}

#[test]
fn long_in_lists_and_and_chains_parse() {
    let placeholders = (1..=30_000).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
    let c = classify(&format!("SELECT * FROM t WHERE id IN ({placeholders})"));
    assert_eq!(c.class, Class::Read);
    let list = (1..=2000).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let c = classify(&format!("SELECT * FROM t WHERE id IN ({list})"));
    assert_eq!(c.class, Class::Read);
    let chain = (1..=300).map(|i| format!("c{i} = ${i}")).collect::<Vec<_>>().join(" AND ");
    let c = classify(&format!("SELECT * FROM t WHERE {chain}"));
    assert_eq!(c.class, Class::Read, "{c:?}");
}

// === Hints ===

#[test]
fn leading_comment_hints() {
    let cases = [
        ("/* pgnear:primary */ SELECT 1", Some(Hint::Primary)),
        ("/*pgnear:replica*/SELECT 1", Some(Hint::Replica)),
        ("/*  PgNear : Replica  */ SELECT 1", Some(Hint::Replica)),
        ("-- pgnear:primary\nSELECT 1", Some(Hint::Primary)),
        ("  \n /* app */ /* pgnear:replica */ SELECT 1", Some(Hint::Replica)),
        ("SELECT 1 /* pgnear:primary */", None),
        ("SELECT /* pgnear:primary */ 1", None),
        ("/* pgnear:elsewhere */ SELECT 1", None),
        ("/* pgnear:primary, app */ SELECT 1", None),
        ("SELECT 1", None),
    ];
    for (sql, hint) in cases {
        assert_eq!(classify(sql).hint, hint, "{sql}");
    }
    let c = classify("/* pgnear:replica */ INSERT INTO t VALUES (1)");
    assert_eq!((c.class, c.hint), (Class::Write, Some(Hint::Replica)));
}

#[test]
fn staleness_hints() {
    use std::time::Duration;
    let bound = |ms: u64, read_your_writes: Option<bool>| {
        Some(Hint::Staleness(StalenessHint { max: Some(Duration::from_millis(ms)), read_your_writes }))
    };
    let cases = [
        ("/* pgnear:max_staleness_ms=5000 */ SELECT 1", bound(5000, None)),
        ("/* PgNear: Max_Staleness_Ms = 5 000 */ SELECT 1", bound(5000, None)),
        ("-- pgnear:max_staleness_ms=0\nSELECT 1", bound(0, None)),
        ("/* pgnear:max_staleness_ms=5000,read_your_writes=off */ SELECT 1", bound(5000, Some(false))),
        ("/* pgnear:read_your_writes=on, max_staleness_ms=10 */ SELECT 1", bound(10, Some(true))),
        (
            "/* pgnear:read_your_writes=false */ SELECT 1",
            Some(Hint::Staleness(StalenessHint { max: None, read_your_writes: Some(false) })),
        ),
        // Malformed: an ordinary comment, as for the other hints.
        ("/* pgnear:max_staleness_ms=-5 */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms=5s */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms=1.5 */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms= */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms=99999999999999999999999 */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms=5,max_staleness_ms=6 */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms=5,read_your_writes=maybe */ SELECT 1", None),
        ("/* pgnear:max_staleness_ms=5, */ SELECT 1", None),
        ("/* pgnear:replica,max_staleness_ms=5 */ SELECT 1", None),
        ("/* pgnear:staleness=5 */ SELECT 1", None),
        ("SELECT 1 /* pgnear:max_staleness_ms=5000 */", None),
    ];
    for (sql, hint) in cases {
        assert_eq!(classify(sql).hint, hint, "{sql}");
    }
    // The bound is part of the cached text: two bounds never share an entry.
    let cache = ClassifyCache::new(16);
    let a = cache.classify(b"/* pgnear:max_staleness_ms=100 */ SELECT * FROM t WHERE id = 1");
    let b = cache.classify(b"/* pgnear:max_staleness_ms=900 */ SELECT * FROM t WHERE id = 2");
    assert_eq!(a.hint, bound(100, None));
    assert_eq!(b.hint, bound(900, None));
}

// === Proxy-local commands ===

fn proxy(sql: &str) -> ProxyCommand {
    match classify(sql).class {
        Class::ProxyLocal(command) => command,
        other => panic!("{sql}: {other:?}"),
    }
}

fn proxy_set(name: &str, value: &str) -> ProxyCommand {
    ProxyCommand::Set { name: name.to_owned(), value: value.to_owned() }
}

#[test]
fn pgnear_settings_are_proxy_local() {
    assert_eq!(proxy("SET pgnear.route = primary"), proxy_set("route", "primary"));
    assert_eq!(proxy("SET pgnear.route TO 'replica'"), proxy_set("route", "replica"));
    assert_eq!(proxy("set PGNEAR.ROUTE = Auto;"), proxy_set("route", "auto"));
    assert_eq!(proxy("SET pgnear.route = 'Primary'"), proxy_set("route", "Primary"));
    assert_eq!(proxy("SET SESSION pgnear.route = replica"), proxy_set("route", "replica"));
    assert_eq!(proxy("SET LOCAL pgnear.route = replica"), proxy_set("route", "replica"));
    assert_eq!(proxy("SET \"pgnear.route\" = primary"), proxy_set("route", "primary"));
    assert_eq!(proxy("SET pgnear.min_lsn = '0/16B3748'"), proxy_set("min_lsn", "0/16B3748"));
    assert_eq!(proxy("SET pgnear.min_lsn TO '0/16B3748'"), proxy_set("min_lsn", "0/16B3748"));
    assert_eq!(proxy("SET pgnear.replica_wait_ms = 50"), proxy_set("replica_wait_ms", "50"));
    assert_eq!(proxy("RESET pgnear.route"), ProxyCommand::Reset { name: "route".to_owned() });
    let show = |name: &str| ProxyCommand::Show { name: name.to_owned() };
    assert_eq!(proxy("SHOW pgnear.write_lsn"), show("write_lsn"));
    assert_eq!(proxy("SHOW pgnear.all"), show("all"));
    assert_eq!(proxy("show PGNEAR.Route"), show("route"));
    assert_eq!(proxy("/* pgnear:primary */ SHOW pgnear.route"), show("route"));
    assert!(classify("SHOW pgnear.route").effects.is_empty());
}

// === Session effects ===

fn set(name: &str, statement: &str) -> SessionEffect {
    SessionEffect::Set { name: name.to_owned(), statement: statement.to_owned() }
}

fn effects(sql: &str) -> Vec<SessionEffect> {
    classify(sql).effects
}

#[test]
fn set_effects_keep_the_client_text() {
    assert_eq!(effects("SET search_path = a, b;"), [set("search_path", "SET search_path = a, b")]);
    assert_eq!(effects("  set Search_Path TO x  ; "), [set("search_path", "set Search_Path TO x")]);
    assert_eq!(effects("SET SESSION work_mem = '64MB'"), [set("work_mem", "SET SESSION work_mem = '64MB'")]);
    assert_eq!(effects("SET TIME ZONE 'UTC'"), [set("timezone", "SET TIME ZONE 'UTC'")]);
    assert_eq!(effects("SET timezone TO DEFAULT"), [set("timezone", "SET timezone TO DEFAULT")]);
    assert_eq!(effects("SET ROLE bob"), [set("role", "SET ROLE bob")]);
    assert_eq!(effects("SET NAMES 'UTF8'"), [set("client_encoding", "SET NAMES 'UTF8'")]);
    assert_eq!(effects("SET myapp.user_id = 7"), [set("myapp.user_id", "SET myapp.user_id = 7")]);
    let auth = "SET SESSION AUTHORIZATION bob";
    assert_eq!(effects(auth), [set("session_authorization", auth)]);
}

#[test]
fn set_effect_text_survives_newlines_comments_and_unicode() {
    let sql = "/* pgnear:primary */\nSELECT 'é;ü';\n  SET application_name\n  = 'café' -- trailing\n;";
    let c = classify(sql);
    assert_eq!(c.hint, Some(Hint::Primary));
    assert_eq!(c.effects, [set("application_name", "SET application_name\n  = 'café'")]);
}

#[test]
fn transaction_control_is_placed_among_effects_only_beside_them() {
    use SessionEffect::Transaction as T;
    let sql = "BEGIN; SET work_mem = '7MB'; ROLLBACK; SET a.b = 1";
    let expected = [
        T(Tx::Begin { read_only: false }),
        set("work_mem", "SET work_mem = '7MB'"),
        T(Tx::Rollback),
        set("a.b", "SET a.b = 1"),
    ];
    assert_eq!(effects(sql), expected);
    for sql in ["BEGIN", "COMMIT", "BEGIN; SELECT 1; COMMIT", "ROLLBACK"] {
        assert!(effects(sql).is_empty(), "{sql}");
    }
}

#[test]
fn savepoints_are_effects_with_folded_names() {
    use SavepointOp::*;
    let savepoint = |op, name: &str| SessionEffect::Savepoint { op, name: name.to_owned() };
    assert_eq!(effects("SAVEPOINT Sp1"), [savepoint(Define, "sp1")]);
    assert_eq!(effects("RELEASE \"Sp1\""), [savepoint(Release, "Sp1")]);
    assert_eq!(effects("RELEASE SAVEPOINT sp1"), [savepoint(Release, "sp1")]);
    assert_eq!(effects("ROLLBACK TO sp1"), [savepoint(RollbackTo, "sp1")]);
    assert_eq!(effects("ROLLBACK TO SAVEPOINT sp1"), [savepoint(RollbackTo, "sp1")]);
    let sql = "SAVEPOINT a; SET work_mem = '7MB'; ROLLBACK TO a";
    let expected =
        [savepoint(Define, "a"), set("work_mem", "SET work_mem = '7MB'"), savepoint(RollbackTo, "a")];
    assert_eq!(effects(sql), expected);
    assert_eq!(classify("SAVEPOINT a").class, Class::Transaction(Tx::Savepoint));
    assert_eq!(classify("ROLLBACK TO a").class, Class::Transaction(Tx::RollbackTo));
}

#[test]
fn a_plain_session_wide_set_config_is_a_setting() {
    for sql in [
        "SELECT set_config('Search_Path', 'a', false)",
        "select pg_catalog.set_config('search_path', 'a', FALSE) AS sp;",
    ] {
        let c = classify(sql);
        assert_eq!(c.class, Class::Write, "{sql}");
        assert_eq!(c.effects, [set("search_path", sql.trim_end_matches(';'))], "{sql}");
        assert!(c.pins().next().is_none(), "{sql}");
    }
}

#[test]
fn set_local_has_no_effect() {
    for sql in ["SET LOCAL search_path = a", "SET LOCAL TIME ZONE 'UTC'", "SET LOCAL ROLE bob"] {
        let c = classify(sql);
        assert_eq!(c.class, Class::Session, "{sql}");
        assert!(c.effects.is_empty(), "{sql}: {c:?}");
    }
}

#[test]
fn session_characteristics_set_the_defaults() {
    let sql = "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY";
    let expected = [set("default_transaction_isolation", sql), set("default_transaction_read_only", sql)];
    assert_eq!(effects(sql), expected);
}

#[test]
fn reset_discard_prepare_deallocate_effects() {
    let reset = |name: &str, statement: &str| SessionEffect::Reset {
        name: name.to_owned(),
        statement: statement.to_owned(),
    };
    assert_eq!(effects("RESET search_path"), [reset("search_path", "RESET search_path")]);
    assert_eq!(effects("RESET ROLE"), [reset("role", "RESET ROLE")]);
    assert_eq!(effects("RESET ALL"), [SessionEffect::ResetAll]);
    assert_eq!(effects("DISCARD ALL"), [SessionEffect::DiscardAll]);
    let discard = SessionEffect::Discard { statement: "DISCARD PLANS".to_owned() };
    assert_eq!(effects("DISCARD PLANS;"), [discard]);
    let prepare = SessionEffect::Prepare {
        name: "foo".to_owned(),
        statement: "PREPARE Foo (int) AS SELECT $1".to_owned(),
        body: Arc::new(classify("SELECT $1")),
    };
    assert_eq!(effects("PREPARE Foo (int) AS SELECT $1"), [prepare]);
    let deallocate = |name: Option<&str>| SessionEffect::Deallocate { name: name.map(str::to_owned) };
    assert_eq!(effects("DEALLOCATE foo"), [deallocate(Some("foo"))]);
    assert_eq!(effects("DEALLOCATE PREPARE \"Foo\""), [deallocate(Some("Foo"))]);
    assert_eq!(effects("DEALLOCATE ALL"), [deallocate(None)]);
    assert_eq!(effects("DEALLOCATE PREPARE ALL"), [deallocate(None)]);
}

#[test]
fn prepare_classifies_its_body_and_execute_names_it() {
    let body = |sql: &str| match &classify(sql).effects[..] {
        [SessionEffect::Prepare { body, .. }] => body.clone(),
        other => panic!("{sql}: {other:?}"),
    };
    let read = body("PREPARE r AS SELECT * FROM items WHERE id = $1");
    assert_eq!((&read.class, &read.tables[..]), (&Class::Read, &["items".to_owned()][..]));
    assert_eq!(body("PREPARE w (int) AS INSERT INTO t VALUES ($1)").class, Class::Write);
    assert_eq!(body("PREPARE n AS SELECT nextval('s')").class, Class::Write);
    let pinned = body("PREPARE l AS SELECT pg_advisory_lock(1)");
    assert!(pinned.needs_primary(), "{pinned:?}");
    // The PREPARE itself is session state, whatever it prepares.
    assert_eq!(classify("PREPARE w AS DELETE FROM t").class, Class::Session);

    // EXECUTE is classed by its arguments; the session adds the body.
    let execute = classify("EXECUTE Foo(1, 'a')");
    assert_eq!((&execute.class, &execute.executes[..]), (&Class::Read, &["foo".to_owned()][..]));
    assert_eq!(classify("EXECUTE \"Foo\"").executes, ["Foo"]);
    assert_eq!(classify("EXECUTE foo(nextval('s'))").class, Class::Write);
    let both = classify("EXECUTE a; EXECUTE b; EXECUTE a");
    assert_eq!(both.executes, ["a", "b"]);
    let explained = classify("EXPLAIN EXECUTE a(1)");
    assert_eq!((&explained.class, &explained.executes[..]), (&Class::Read, &["a".to_owned()][..]));
    assert_eq!(classify("EXPLAIN ANALYZE EXECUTE a").executes, ["a"]);
    assert!(classify("SELECT 1").executes.is_empty());
}

#[test]
fn effects_are_in_statement_order() {
    let sql = "SET a = 1; DISCARD ALL; SET b = 2";
    assert_eq!(effects(sql), [set("a", "SET a = 1"), SessionEffect::DiscardAll, set("b", "SET b = 2")]);
}

#[test]
fn unparsed_settings_are_still_tracked() {
    let c = classify("SET SCHEMA 'app'");
    assert!(c.unparsed);
    assert_eq!(c.effects, [set("search_path", "SET SCHEMA 'app'")]);
    assert_eq!(effects("SET XML OPTION DOCUMENT"), [set("xmloption", "SET XML OPTION DOCUMENT")]);
    let reset = SessionEffect::Reset { name: "timezone".to_owned(), statement: "RESET TIME ZONE".to_owned() };
    assert_eq!(effects("RESET TIME ZONE"), [reset]);
    assert!(effects("SET CONSTRAINTS ALL DEFERRED").is_empty());
    assert!(effects("SET LOCAL SESSION AUTHORIZATION bob").is_empty());
}

// === Pins ===

fn pins(sql: &str) -> Vec<PinReason> {
    classify(sql).pins().collect()
}

#[test]
fn pinning_statements() {
    use PinReason::*;
    let cases: &[(&str, &[PinReason])] = &[
        ("LISTEN ch", &[Listen]),
        ("UNLISTEN ch", &[]),
        ("CREATE TEMP TABLE tt (a int)", &[TempObject]),
        ("CREATE TEMPORARY TABLE tt AS SELECT 1", &[TempObject]),
        ("CREATE TEMP TABLE t2 ON COMMIT DROP AS SELECT 1", &[TempObject]),
        ("CREATE LOCAL TEMP TABLE tt (a int)", &[TempObject]),
        ("CREATE TEMP VIEW v AS SELECT 1", &[TempObject]),
        ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", &[TempObject]),
        ("CREATE TEMP SEQUENCE s", &[TempObject]),
        ("CREATE TEMP TABLE x (LIKE t INCLUDING ALL)", &[TempObject]),
        ("SELECT * INTO TEMP tmp FROM t", &[TempObject]),
        ("SELECT * INTO TEMPORARY tmp FROM t", &[TempObject]),
        ("CREATE TABLE tt (a int)", &[]),
        ("SELECT pg_advisory_lock(1)", &[AdvisoryLock]),
        ("SELECT pg_advisory_lock_shared(1)", &[AdvisoryLock]),
        ("SELECT pg_try_advisory_lock(1, 2)", &[AdvisoryLock]),
        ("SELECT pg_try_advisory_lock_shared(1)", &[AdvisoryLock]),
        ("SELECT * FROM t WHERE pg_try_advisory_lock(t.id)", &[AdvisoryLock]),
        ("SELECT pg_advisory_lock(1) FOR NO KEY UPDATE", &[AdvisoryLock]),
        ("SELECT pg_advisory_xact_lock(1)", &[]),
        ("SELECT pg_try_advisory_xact_lock_shared(1)", &[]),
        ("SELECT pg_advisory_unlock(1)", &[]),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", &[HoldCursor]),
        ("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t", &[HoldCursor]),
        ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", &[]),
        ("LISTEN a; SELECT pg_advisory_lock(1)", &[Listen, AdvisoryLock]),
        ("SELECT set_config('search_path', 'a', false), 1", &[SessionConfig]),
        ("SELECT pg_catalog.SET_CONFIG('a.b', 'c', FALSE) FROM t", &[SessionConfig]),
        ("SELECT set_config('a.b', $1, false)", &[SessionConfig]),
        ("SELECT set_config('a.b', 'c', $1)", &[SessionConfig]),
        ("SELECT x.set_config('a.b', 'c', false)", &[SessionConfig]),
        ("SELECT set_config('a.b', 'c', 't')", &[SessionConfig]),
        ("SELECT * FROM t WHERE set_config('a.b', t.x, 1 = 1) IS NOT NULL", &[SessionConfig]),
        ("SELECT set_config('request.jwt.claims', $1, true)", &[]),
        ("SELECT set_config('a.b', 'c', TRUE), current_setting('a.b')", &[]),
        ("EXPLAIN SELECT set_config('a.b', 'c', false)", &[]),
        ("SELECT current_setting('search_path')", &[]),
        // Unparsed text is scanned for the name.
        ("SELECT set_config('a.b', 'c', false) FROM (", &[SessionConfig]),
    ];
    for (sql, expected) in cases {
        assert_eq!(pins(sql), *expected, "{sql}");
    }
}

#[test]
fn pins_need_the_primary() {
    let c = classify("SELECT pg_advisory_lock(1)");
    assert_eq!(c.class, Class::Write);
    assert!(c.needs_primary());
    let c = classify("LISTEN ch");
    assert_eq!(c.class, Class::Session);
    assert!(!c.class.needs_primary() && c.needs_primary());
    assert_eq!(classify("DECLARE c CURSOR WITH HOLD FOR SELECT 1").class, Class::Write);
    assert!(!classify("SELECT 1").needs_primary());
}

// === Tables and functions ===

fn tables(sql: &str) -> Vec<String> {
    classify(sql).tables
}

fn functions_of(sql: &str) -> Vec<String> {
    classify(sql).functions
}

#[test]
fn tables_are_collected_everywhere() {
    let cases: &[(&str, &[&str])] = &[
        ("SELECT * FROM t", &["t"]),
        ("SELECT * FROM Public.Users u JOIN \"Orders\" o ON o.uid = u.id", &["users", "orders"]),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u) AND EXISTS (SELECT 1 FROM v)", &["t", "u", "v"]),
        ("SELECT * FROM t, LATERAL (SELECT * FROM u) x", &["t", "u"]),
        ("SELECT * FROM t t1 JOIN t t2 ON true", &["t"]),
        ("SELECT (SELECT max(a) FROM u) FROM t", &["u", "t"]),
        ("SELECT a FROM t UNION SELECT a FROM u", &["t", "u"]),
        ("WITH a AS (SELECT * FROM t) SELECT * FROM a JOIN u ON true", &["t", "u"]),
        ("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT n FROM r JOIN e ON true) SELECT * FROM r", &["e"]),
        ("WITH payments AS (SELECT * FROM payments) SELECT * FROM payments", &["payments"]),
        ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b", &["b"]),
        ("WITH a AS (SELECT 1) SELECT * FROM (WITH a AS (SELECT * FROM a) SELECT * FROM a) s", &[]),
        ("WITH a AS (SELECT 1) SELECT * FROM s.a", &["a"]),
        ("INSERT INTO t (a) SELECT a FROM u", &["t", "u"]),
        ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id", &["t", "u"]),
        ("DELETE FROM t USING u WHERE t.id = u.id", &["t", "u"]),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", &["t", "s"]),
        ("WITH d AS (DELETE FROM t RETURNING *) INSERT INTO h SELECT * FROM d", &["t", "h"]),
        ("SELECT * FROM generate_series(1, 3) g, t", &["t"]),
        ("TABLE Foo", &["foo"]),
        ("COPY t TO STDOUT", &["t"]),
        ("COPY (SELECT * FROM u) TO STDOUT", &["u"]),
        ("EXPLAIN SELECT * FROM t", &["t"]),
        ("SELECT 1; SELECT * FROM t; SELECT * FROM u, t", &["t", "u"]),
        ("SELECT now()", &[]),
    ];
    for (sql, expected) in cases {
        assert_eq!(tables(sql), *expected, "{sql}");
    }
}

#[test]
fn functions_are_collected_everywhere() {
    let cases: &[(&str, &[&str])] = &[
        ("SELECT now(), lower(name), count(*) FROM t", &["now", "lower", "count"]),
        ("SELECT my_schema.My_Func(1)", &["my_func"]),
        ("SELECT * FROM t WHERE a = f(g(1))", &["f", "g"]),
        ("SELECT * FROM generate_series(1, 3)", &["generate_series"]),
        ("SELECT * FROM t WHERE id IN (SELECT h(id) FROM u)", &["h"]),
        ("SELECT row_number() OVER () FROM t", &["row_number"]),
        ("SELECT f(1), f(2)", &["f"]),
        ("CALL p(1)", &[]),
        ("EXPLAIN SELECT f(1)", &[]),
        ("EXPLAIN ANALYZE SELECT f(1)", &["f"]),
        ("INSERT INTO t VALUES (f(1))", &["f"]),
    ];
    for (sql, expected) in cases {
        assert_eq!(functions_of(sql), *expected, "{sql}");
    }
}

#[test]
fn volatile_functions_are_detected() {
    let volatile = VolatileFunctions::new(["Audit_Log".to_owned(), "bump".to_owned()]);
    assert!(volatile.contains("audit_log"));
    assert!(classify("SELECT public.audit_log('x')").calls_volatile(&volatile));
    assert!(classify("SELECT * FROM t WHERE id = (SELECT bump())").calls_volatile(&volatile));
    assert!(!classify("SELECT lower('x')").calls_volatile(&volatile));
    assert!(!classify("SELECT audit_log('x')").calls_volatile(&VolatileFunctions::default()));
    assert!(VOLATILE_FUNCTIONS_QUERY.contains("provolatile = 'v'"));
    assert!(classify(VOLATILE_FUNCTIONS_QUERY).class == Class::Read);
}

#[test]
fn builtin_writers() {
    for name in ["nextval", "setval", "currval", "lastval", "pg_advisory_lock", "pg_advisory_xact_lock"] {
        assert!(is_builtin_writer(name), "{name}");
    }
    for name in ["pg_try_advisory_lock", "pg_notify", "set_config", "lo_import", "lo_truncate", "loread"] {
        assert!(is_builtin_writer(name), "{name}");
    }
    for name in ["txid_current", "pg_current_xact_id", "dblink", "pg_switch_wal", "setseed"] {
        assert!(is_builtin_writer(name), "{name}");
    }
    for name in ["now", "count", "lower", "random", "pg_sequence_last_value", "txid_current_snapshot"] {
        assert!(!is_builtin_writer(name), "{name}");
    }
    assert!(is_session_advisory_lock("pg_advisory_lock_shared"));
    assert!(!is_session_advisory_lock("pg_advisory_xact_lock"));
}

// === DDL flag ===

#[test]
fn ddl_flag() {
    let ddl = [
        "CREATE TABLE t (a int)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "CREATE OR REPLACE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN END $$",
        "ALTER FUNCTION f() VOLATILE",
        "ALTER EXTENSION e UPDATE",
        "DROP FUNCTION f(int)",
        "DROP SCHEMA s CASCADE",
        "CREATE EXTENSION pgcrypto",
        "CREATE TEMP TABLE x (a int)",
        "SELECT 1; DROP TABLE t",
        "DO $$ BEGIN CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql; END $$",
    ];
    for sql in ddl {
        assert!(classify(sql).ddl, "{sql}");
    }
    let not_ddl =
        ["SELECT 1", "INSERT INTO t VALUES (1)", "TRUNCATE t", "EXPLAIN SELECT 1", "GRANT SELECT ON t TO b"];
    for sql in not_ddl {
        assert!(!classify(sql).ddl, "{sql}");
    }
}

#[test]
fn schema_changes_are_ddl_but_temporary_objects_and_grants_and_revokes() {
    let changes = [
        "CREATE TABLE t (a int)",
        "ALTER TABLE t ADD COLUMN b int",
        "DROP TABLE t",
        "CREATE OR REPLACE VIEW v AS SELECT 1",
        "CREATE UNLOGGED TABLE u (a int)",
        "CREATE INDEX ON t (a)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "DO $$ BEGIN END $$",
        "GRANT SELECT ON t TO b",
        "REVOKE SELECT ON t FROM b",
        "CREATE TEMP TABLE x (a int); CREATE TABLE y (a int)",
        "DROP TABLE temp_x",
        "CREATE TABLE temp (a int)",
    ];
    for sql in changes {
        assert!(classify(sql).schema_change, "{sql}");
    }
    let not_changes = [
        "SELECT 1",
        "INSERT INTO t VALUES (1)",
        "TRUNCATE t",
        "CREATE TEMP TABLE x (a int)",
        "CREATE TEMPORARY TABLE x AS SELECT 1",
        "CREATE LOCAL TEMP TABLE x (a int)",
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        "create temp sequence s",
    ];
    for sql in not_changes {
        assert!(!classify(sql).schema_change, "{sql}");
    }
}

// === Cache ===

#[test]
fn cache_counts_hits_and_misses() {
    let cache = ClassifyCache::new(100);
    let first = cache.classify("SELECT 1");
    let second = cache.classify("SELECT 1");
    assert!(Arc::ptr_eq(&first, &second));
    assert_eq!((cache.hits(), cache.misses()), (1, 1));
    assert_eq!(cache.classify("INSERT INTO t VALUES (1)").class, Class::Write);
    assert_eq!((cache.hits(), cache.misses()), (1, 2));
    assert_eq!(cache.classify("select 1").class, Class::Read);
    assert_eq!(cache.misses(), 3, "the key is the exact text");
}

#[test]
fn cache_does_not_store_long_texts() {
    let cache = ClassifyCache::new(100);
    let long = format!("SELECT 1 /* {} */", "x".repeat(MAX_CACHED_SQL_LEN));
    assert_eq!(cache.classify(&long).class, Class::Read);
    assert_eq!(cache.classify(&long).class, Class::Read);
    assert_eq!((cache.hits(), cache.misses()), (0, 2));
    assert!(cache.is_empty());
}

#[test]
fn cache_is_bounded_and_shared() {
    let cache = Arc::new(ClassifyCache::new(10));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for i in 0..100 {
                    let sql = format!("SELECT {}", (i + t) % 50);
                    assert_eq!(cache.classify(&sql).class, Class::Read);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(cache.len() <= 20, "len {}", cache.len());
    assert_eq!(cache.hits() + cache.misses(), 400);
}

// === Texts in another client_encoding ===

#[test]
fn texts_that_are_not_utf8_are_classified_from_a_lossy_copy() {
    let cache = ClassifyCache::new(64);
    // 'café' and the identifier bumpé in LATIN1.
    let read = cache.classify(b"SELECT 'caf\xe9' FROM t WHERE v = 'na\xefve'");
    assert_eq!(read.class, Class::Read);
    assert!(read.effects.is_empty() && !read.unparsed);
    assert_eq!(read.tables, ["t"]);
    assert_eq!(cache.classify(b"INSERT INTO t VALUES ('caf\xe9')").class, Class::Write);
    // A function whose name is not UTF-8 cannot be found among the
    // volatile ones.
    assert_eq!(cache.classify(b"SELECT bump\xe9()").class, Class::Write);
    assert_eq!(cache.classify(b"SELECT lower('caf\xe9')").class, Class::Read);
    // Session statements could not be replayed byte for byte: they pin.
    for sql in [
        &b"SET myapp.label = 'caf\xe9'"[..],
        b"PREPARE p\xe9 AS SELECT 1",
        b"BEGIN; SET search_path = caf\xe9; COMMIT",
        b"DEALLOCATE p\xe9",
    ] {
        let c = cache.classify(sql);
        assert_eq!(c.pins().collect::<Vec<_>>(), [PinReason::NotUtf8], "{}", String::from_utf8_lossy(sql));
        assert_eq!(c.effects.len(), 1);
    }
    let listen = cache.classify(b"LISTEN ch; SET myapp.label = 'caf\xe9'");
    assert_eq!(listen.pins().collect::<Vec<_>>(), [PinReason::Listen, PinReason::NotUtf8]);
    // UTF-8 texts are untouched; one holding U+FFFD itself is treated the
    // same way, as it may be such a copy.
    let utf8 = cache.classify("SET myapp.label = 'café'");
    assert!(matches!(utf8.effects[..], [SessionEffect::Set { .. }]));
    assert_eq!(pins("SET myapp.label = '\u{FFFD}'"), [PinReason::NotUtf8]);
}

#[test]
fn where_a_text_leaves_the_transaction_block() {
    let cases: &[(&str, Block)] = &[
        ("SELECT 1", Block::Same),
        ("UPDATE t SET v = 1", Block::Same),
        ("UPDATE t SET v = 1; UPDATE t SET v = 2", Block::Same),
        ("BEGIN", Block::Opens),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", Block::Opens),
        ("BEGIN; UPDATE t SET v = 1", Block::Opens),
        ("COMMIT; BEGIN", Block::Opens),
        ("COMMIT", Block::Closes),
        ("END", Block::Closes),
        ("ROLLBACK", Block::Closes),
        ("UPDATE t SET v = 1; COMMIT", Block::Closes),
        ("BEGIN; UPDATE t SET v = 1; COMMIT", Block::Closes),
        ("BEGIN; SET search_path = a; ROLLBACK", Block::Closes),
        ("SAVEPOINT a", Block::Same),
        ("ROLLBACK TO SAVEPOINT a", Block::Same),
        ("COMMIT AND CHAIN", Block::Unknown),
        ("ROLLBACK AND CHAIN", Block::Unknown),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", Block::Unknown),
        ("COMMIT; UPDATE t SET v = 1 +", Block::Unknown),
        ("PREPARE TRANSACTION 'x'", Block::Unknown),
    ];
    for (sql, block) in cases {
        assert_eq!(classify(sql).block, *block, "{sql}");
    }
    assert_eq!(Block::Closes.after(Some(true)), Some(false));
    assert_eq!(Block::Same.after(Some(true)), Some(true));
    assert_eq!(Block::Same.after(None), None);
    assert_eq!(Block::Unknown.after(Some(false)), None);
}

#[test]
fn copies_from_stdin_are_counted() {
    let cases: &[(&str, u8)] = &[
        ("COPY t FROM STDIN", 1),
        ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", 1),
        // PostgreSQL's synonym, which its own regression suite uses.
        ("copy t from stdout", 1),
        ("select 0; copy t from stdin; copy t from stdin; select 1", 2),
        ("COPY t TO STDOUT", 0),
        ("COPY (SELECT 1) TO STDOUT", 0),
        ("COPY t FROM '/tmp/x'", 0),
        ("INSERT INTO t VALUES (1)", 0),
    ];
    for (sql, copies) in cases {
        assert_eq!(classify(sql).copies_in, *copies, "{sql}");
    }
}

#[test]
fn ddl_that_defines_functions_or_names_databases_and_loads() {
    let defines = [
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS $$ SELECT 1 $$",
        "CREATE EXTENSION pgcrypto",
        "DO $$ BEGIN PERFORM 1; END $$",
        "ALTER FUNCTION f() VOLATILE",
        "CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)",
        "CREATE TABLE t (a int); CREATE FUNCTION g() RETURNS int AS 'SELECT 1' LANGUAGE sql",
    ];
    for sql in defines {
        assert!(classify(sql).defines_functions, "{sql}");
    }
    let not_defining =
        ["CREATE TABLE functions (a int)", "SELECT 'CREATE FUNCTION'", "DROP TABLE t", "SELECT 1"];
    for sql in not_defining {
        assert!(!classify(sql).defines_functions, "{sql}");
    }
    for sql in ["CREATE DATABASE d TEMPLATE t", "DROP DATABASE IF EXISTS d", "ALTER DATABASE d SET x = 1"] {
        assert!(classify(sql).names_databases, "{sql}");
    }
    for sql in ["CREATE TABLE database_log (a int)", "SELECT 'database'", "COMMENT ON TABLE t IS 'database'"]
    {
        assert!(!classify(sql).names_databases, "{sql}");
    }
    assert_eq!(classify("LOAD 'auto_explain'").loads.as_deref(), Some("auto_explain"));
    assert_eq!(classify("load '$libdir/plugins/Auto_Explain.so'").loads.as_deref(), Some("auto_explain"));
    assert_eq!(classify("SELECT 'LOAD'").loads, None);
}

#[test]
fn a_load_is_never_answered_by_the_shape_of_another() {
    let cache = ClassifyCache::new(100);
    let mut recent = crate::router::cache::RecentlyClassified::default();
    for library in ["auto_explain", "pg_stat_statements", "auto_explain"] {
        let sql = format!("LOAD '{library}'");
        assert_eq!(cache.classify(&sql).loads.as_deref(), Some(library));
        assert_eq!(recent.classify(&cache, sql.as_bytes()).loads.as_deref(), Some(library));
    }
}
