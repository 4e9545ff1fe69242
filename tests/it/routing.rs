//! Where statements run, checked with `inet_server_port()` against a real
//! primary and two streaming replicas.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{run_tool, sqlstate, start, Env, ProxyConfig, PATIENCE};

/// Which node ran a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Primary,
    Replica,
}

fn ran(env: &Env, port: &str) -> Ran {
    let port: u16 = port.parse().unwrap();
    if port == env.cluster.primary().port() {
        Ran::Primary
    } else {
        assert!(env.cluster.replicas().iter().any(|r| r.port() == port), "unknown port {port}");
        Ran::Replica
    }
}

/// Runs a simple query whose first column of its last row is
/// `inet_server_port()`.
async fn where_(env: &Env, client: &Client, sql: &str) -> Ran {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let port = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .last()
        .unwrap_or_else(|| panic!("{sql}: no rows"));
    ran(env, &port)
}

/// Polls until `sql` runs on a replica: reads go back to replicas once
/// the session's earlier writes have replayed.
async fn eventually_on_replica(env: &Env, client: &Client, sql: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while where_(env, client, sql).await != Ran::Replica {
        assert!(tokio::time::Instant::now() < deadline, "{sql} never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn two_replicas(config: ProxyConfig) -> Env {
    let env = start(Cluster::builder().replica().replica(), config).await;
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items VALUES (1, 'one'), (2, 'two');
             CREATE TABLE payments (id int, amount int); INSERT INTO payments VALUES (1, 10);
             CREATE SEQUENCE seq;
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
             CREATE FUNCTION steady() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';",
        )
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    env
}

fn rules() -> ProxyConfig {
    ProxyConfig::default().section("[[rules]]\ntables = [\"payments\"]\nroute = \"primary\"")
}

#[tokio::test]
async fn reads_go_to_replicas_and_writes_to_the_primary() {
    let env = two_replicas(rules()).await;
    let c = env.client().await;
    let port = "SELECT inet_server_port()";
    eventually_on_replica(&env, &c, port).await;
    let cases = [
        ("SELECT inet_server_port() FROM items WHERE id = 1", Ran::Replica),
        ("VALUES (inet_server_port())", Ran::Replica),
        ("SELECT inet_server_port(), steady()", Ran::Replica),
        // What differs between nodes is asked of the primary (here, right
        // after a read that reached a replica: no write holds the session).
        ("SELECT inet_server_port(), pg_backend_pid()", Ran::Primary),
        ("SELECT inet_server_port()", Ran::Replica),
        ("SELECT inet_server_port() FROM pg_stat_activity LIMIT 1", Ran::Primary),
        ("SELECT inet_server_port() FROM items WHERE id = 1 FOR UPDATE", Ran::Primary),
        ("SELECT inet_server_port() FROM items WHERE id = 1 FOR NO KEY UPDATE", Ran::Primary),
        ("SELECT inet_server_port(), nextval('seq')", Ran::Primary),
        ("SELECT inet_server_port(), bump()", Ran::Primary),
        ("SELECT inet_server_port(), pg_advisory_xact_lock(7)", Ran::Primary),
        ("WITH d AS (DELETE FROM items WHERE id = 99 RETURNING *) SELECT inet_server_port()", Ran::Primary),
        ("INSERT INTO items VALUES (3, 'three') RETURNING inet_server_port()", Ran::Primary),
        ("UPDATE items SET v = 'uno' WHERE id = 1 RETURNING inet_server_port()", Ran::Primary),
        ("SELECT inet_server_port() FROM payments", Ran::Primary),
        ("/* pgnear:primary */ SELECT inet_server_port()", Ran::Primary),
        ("SELECT 1; SELECT inet_server_port()", Ran::Replica),
        (
            "SELECT 1 FROM items LIMIT 0; UPDATE items SET v = v WHERE id = 2 RETURNING inet_server_port()",
            Ran::Primary,
        ),
    ];
    for (sql, expected) in cases {
        if expected == Ran::Replica {
            eventually_on_replica(&env, &c, sql).await;
        } else {
            assert_eq!(where_(&env, &c, sql).await, expected, "{sql}");
        }
    }
}

/// On two session loops whatever the machine: the catalog's refresh loop
/// (tokio-postgres, with its own timers) must run on the service loop.
#[tokio::test]
async fn a_function_created_in_one_session_is_a_write_in_every_other() {
    let env = two_replicas(ProxyConfig::default().proxy("worker_threads = 2")).await;
    // A session open before the function exists, its catalog long loaded.
    let other = env.client().await;
    eventually_on_replica(&env, &other, "SELECT inet_server_port()").await;
    let creator = env.client().await;
    creator
        .batch_execute("CREATE FUNCTION stamp() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 2'")
        .await
        .unwrap();
    // The replicas have it too: only routing keeps the call off them.
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    assert_eq!(where_(&env, &other, "SELECT inet_server_port(), stamp()").await, Ran::Primary);
}

#[tokio::test]
async fn transactions_stay_on_one_node() {
    use crate::support::wire::{message, Wire};
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(where_(&env, &c, "SELECT inet_server_port()").await, Ran::Primary);
    assert_eq!(where_(&env, &c, "SELECT inet_server_port() FROM items").await, Ran::Primary);
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    let first = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get::<_, i32>(0);
    let second =
        c.query_one("SELECT inet_server_port() FROM items LIMIT 1", &[]).await.unwrap().get::<_, i32>(0);
    assert_eq!(first, second);
    assert_eq!(ran(&env, &first.to_string()), Ran::Replica);
    c.batch_execute("COMMIT").await.unwrap();
    let sql = "BEGIN; SELECT 1; COMMIT; SELECT inet_server_port()";
    assert_eq!(where_(&env, &c, sql).await, Ran::Primary);
    // A whole read-only transaction in one text runs on a replica.
    let sql = "BEGIN READ ONLY; SAVEPOINT s; SELECT inet_server_port(); RELEASE s; COMMIT";
    eventually_on_replica(&env, &c, sql).await;
    // And as one extended-protocol batch up to Sync, as a pipelining driver
    // sends it: its COMMIT runs where its BEGIN READ ONLY does.
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let step = |sql: &str| {
        let parse = message(b'P', format!("\0{sql}\0\0\0").as_bytes());
        [parse, message(b'B', &[0; 8]), message(b'E', &[0; 5])].concat()
    };
    let batch =
        [step("BEGIN READ ONLY"), step("SELECT inet_server_port()"), step("COMMIT"), message(b'S', b"")];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        wire.send(&batch.concat()).await;
        let msgs = wire.until_ready().await;
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
        // One text column: a count, a length, the port.
        if ran(&env, std::str::from_utf8(&row.body[6..]).unwrap()) == Ran::Replica {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a read-only batch never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The transaction ended with the batch: the session routes anew.
    let write = "UPDATE items SET v = v WHERE id = 1 RETURNING inet_server_port()";
    assert_eq!(where_(&env, &c, write).await, Ran::Primary);
    // default_transaction_read_only = on makes a plain BEGIN read-only.
    c.batch_execute("SET default_transaction_read_only = on").await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        c.batch_execute("BEGIN").await.unwrap();
        let ran_on = where_(&env, &c, "SELECT inet_server_port()").await;
        c.batch_execute("COMMIT").await.unwrap();
        if ran_on == Ran::Replica {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "read-only BEGIN never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("BEGIN READ WRITE").await.unwrap();
    assert_eq!(where_(&env, &c, "SELECT inet_server_port()").await, Ran::Primary);
    c.batch_execute("COMMIT").await.unwrap();
}

/// The rows of a simple query, as text.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<String>> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    let text = |row: &tokio_postgres::SimpleQueryRow| {
        (0..row.len()).map(|i| row.get(i).unwrap_or_default().to_string()).collect()
    };
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(text(row)),
            _ => None,
        })
        .collect()
}

/// Runs `sql`, which gives a port and a label, until a replica runs it;
/// every run must give `label`.
async fn executes_on_a_replica(env: &Env, client: &Client, sql: &str, label: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got = rows(client, sql).await;
        assert_eq!(got[0][1], label, "{sql}");
        if ran(env, &got[0][0]) == Ran::Replica {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sql} never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Begins read-only transactions until one runs on a replica, and leaves
/// that one open; gives the replica's port.
async fn begin_read_only_on_a_replica(env: &Env, client: &Client) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        let port = rows(client, "SELECT inet_server_port()").await[0][0].clone();
        if ran(env, &port) == Ran::Replica {
            return port;
        }
        client.batch_execute("COMMIT").await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "a read-only transaction never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SQL-level PREPARE and EXECUTE: an EXECUTE goes where what it runs
/// belongs, and the statement is prepared there first, as the client last
/// prepared it, inside a read-only transaction too.
#[tokio::test]
async fn sql_prepared_statements_follow_the_session() {
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    c.batch_execute(
        "PREPARE here AS SELECT inet_server_port(), 'first';
         PREPARE ins (int) AS INSERT INTO items VALUES ($1, 'x') RETURNING inet_server_port()",
    )
    .await
    .unwrap();
    eventually_on_replica(&env, &c, "EXECUTE here").await;
    assert_eq!(where_(&env, &c, "EXECUTE ins(10)").await, Ran::Primary);
    eventually_on_replica(&env, &c, "EXECUTE here").await;

    // In a read-only transaction on a replica, a statement not run there yet.
    c.batch_execute("PREPARE later (int) AS SELECT inet_server_port(), v FROM items WHERE id = $1")
        .await
        .unwrap();
    let port = begin_read_only_on_a_replica(&env, &c).await;
    let got = rows(&c, "EXECUTE later(1)").await;
    assert_eq!(got, [[port, "one".to_string()]], "run in the transaction, on its replica");
    c.batch_execute("COMMIT").await.unwrap();

    // Prepared again as something else: the replica, which has the old
    // one, replaces it.
    c.batch_execute("DEALLOCATE here; PREPARE here AS SELECT inet_server_port(), 'second'").await.unwrap();
    executes_on_a_replica(&env, &c, "EXECUTE here", "second").await;
    // Through the extended protocol too (tokio-postgres parses the text).
    let row = c.query_one("EXECUTE here", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(1), "second");

    // A PREPARE outlasts the transaction block it ran in, even rolled back.
    c.batch_execute("BEGIN; PREPARE in_block AS SELECT inet_server_port(), 'kept'; ROLLBACK").await.unwrap();
    eventually_on_replica(&env, &c, "EXECUTE in_block").await;

    // Prepared in a read-only transaction on a replica, executed on the
    // primary: prepared there first.
    begin_read_only_on_a_replica(&env, &c).await;
    c.batch_execute("PREPARE from_replica AS SELECT inet_server_port(), 'kept'; COMMIT").await.unwrap();
    let got = rows(&c, "/* pgnear:primary */ EXECUTE from_replica").await;
    assert_eq!((ran(&env, &got[0][0]), got[0][1].as_str()), (Ran::Primary, "kept"));

    // Names the session does not have fail as they would directly.
    assert_eq!(sqlstate(c.batch_execute("EXECUTE nothing").await), "26000");
    c.batch_execute("DEALLOCATE ALL").await.unwrap();
    assert_eq!(sqlstate(c.batch_execute("EXECUTE here").await), "26000");
    assert_eq!(sqlstate(c.batch_execute("EXECUTE later(1)").await), "26000");
    c.batch_execute("PREPARE here AS SELECT inet_server_port(), 'third'").await.unwrap();
    executes_on_a_replica(&env, &c, "EXECUTE here", "third").await;
    // Pipelined behind a query still running on that replica, the EXECUTE
    // waits for it before its statement is prepared anywhere (it is then
    // routed afresh, so it may run on the other replica).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for attempt in 0.. {
        let name = format!("fourth{attempt}");
        c.batch_execute(&format!("PREPARE {name} AS SELECT inet_server_port(), 'fourth'")).await.unwrap();
        let slow = rows(&c, "SELECT inet_server_port(), pg_sleep(0.2)");
        let execute = format!("EXECUTE {name}");
        let (slow, fourth) = tokio::join!(slow, rows(&c, &execute));
        assert_eq!(fourth[0][1], "fourth");
        if ran(&env, &slow[0][0]) == Ran::Replica {
            // And through the extended protocol, with a name the replica
            // has not seen: its Parse, Describe and Sync wait the same way.
            let name = format!("fifth{attempt}");
            c.batch_execute(&format!("PREPARE {name} AS SELECT inet_server_port()::text, 'fifth'"))
                .await
                .unwrap();
            let execute = format!("EXECUTE {name}");
            let slow = c.query_one("SELECT inet_server_port()::text, pg_sleep(0.2)::text", &[]);
            let (slow, fifth) = tokio::join!(slow, c.query_one(&execute, &[]));
            let (slow, fifth) = (slow.unwrap(), fifth.unwrap());
            assert_eq!(slow.get::<_, String>(1), "");
            assert_eq!(fifth.get::<_, String>(1), "fifth");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slow read never ran on a replica");
    }
}

/// A replica that cannot prepare what the session prepared (its table has
/// not replayed there yet) is passed over for the primary.
#[tokio::test]
async fn an_execute_a_replica_cannot_prepare_runs_on_the_primary() {
    // Stale reads allowed, and no lag limit: the replica serves reads while
    // it applies commits 5 s late.
    let config = ProxyConfig::default()
        .section("[consistency]\nread_your_writes = \"off\"")
        .section("[routing]\nmax_replica_lag_ms = 3600000");
    let env = start(Cluster::builder().delayed_replica(Duration::from_secs(5)), config).await;
    let c = env.client().await;
    // A commit the replica has applied: until it has one, a replica that
    // is behind has no measured lag, and serves no reads.
    c.batch_execute("CREATE TABLE warm (a int)").await.unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    // Made on the primary directly: DDL through pgnear would hold every
    // read until the replica has it (schema changes are global).
    let direct = env.cluster.primary().connect().await.unwrap();
    direct.batch_execute("CREATE TABLE fresh (a int); INSERT INTO fresh VALUES (5)").await.unwrap();
    c.batch_execute(
        "PREPARE port AS SELECT inet_server_port();
         PREPARE from_fresh AS SELECT inet_server_port(), a FROM fresh",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        // The replica serves reads ...
        eventually_on_replica(&env, &c, "EXECUTE port").await;
        // ... but cannot prepare this one.
        let got = rows(&c, "EXECUTE from_fresh").await;
        assert_eq!(ran(&env, &got[0][0]), Ran::Primary);
        assert_eq!(got[0][1], "5");
    }
    let absent = "SELECT (to_regclass('fresh') IS NULL)::text";
    let absent = env.cluster.replica(0).query_scalar(absent).await.unwrap();
    assert_eq!(absent, "true", "the replica applied the table within the test: nothing was shown");
}

#[tokio::test]
async fn extended_protocol_batches_and_prepared_statements_follow_their_route() {
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let read = c.prepare("SELECT inet_server_port(), v FROM items WHERE id = $1").await.unwrap();
    let write =
        c.prepare("UPDATE items SET v = $2 WHERE id = $1 RETURNING inet_server_port()").await.unwrap();
    for i in 0..20 {
        let row = c.query_one(&write, &[&2i32, &format!("v{i}")]).await.unwrap();
        assert_eq!(ran(&env, &row.get::<_, i32>(0).to_string()), Ran::Primary);
        // Read-your-writes: the read sees the write, wherever it runs.
        let row = c.query_one(&read, &[&2i32]).await.unwrap();
        assert_eq!(row.get::<_, &str>(1), format!("v{i}"));
    }
    // Once replicated, the same prepared read runs on a replica, where
    // pgnear prepared it transparently.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let row = c.query_one(&read, &[&1i32]).await.unwrap();
        if ran(&env, &row.get::<_, i32>(0).to_string()) == Ran::Replica {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "prepared read never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn settings_follow_the_session_to_every_backend() {
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    c.batch_execute("CREATE SCHEMA app; CREATE TABLE app.items (id int); INSERT INTO app.items VALUES (42)")
        .await
        .unwrap();
    c.batch_execute("SET search_path = app, public; SET TIME ZONE 'Asia/Tokyo'").await.unwrap();
    // A SET the server refuses is not replayed anywhere.
    let refused = c.batch_execute("SET work_mem = 'lots'").await.unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "22023");
    let sql = "SELECT inet_server_port(), current_setting('TimeZone'), (SELECT id FROM items)";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let row = c.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(1), "Asia/Tokyo");
        assert_eq!(row.get::<_, i32>(2), 42, "search_path applies");
        if ran(&env, &row.get::<_, i32>(0).to_string()) == Ran::Replica {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = c
        .query_one(
            "INSERT INTO items VALUES (7) RETURNING inet_server_port(), current_setting('TimeZone')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ran(&env, &row.get::<_, i32>(0).to_string()), Ran::Primary);
    assert_eq!(row.get::<_, String>(1), "Asia/Tokyo");
    c.batch_execute("RESET TIME ZONE").await.unwrap();
    let tz = c.query_one("SELECT current_setting('TimeZone')", &[]).await.unwrap().get::<_, String>(0);
    assert_ne!(tz, "Asia/Tokyo");
}

#[tokio::test]
async fn set_config_runs_on_the_primary_and_follows_the_session_or_pins_it() {
    let env = two_replicas(ProxyConfig::default()).await;
    let d = env.client().await;
    let set = d.simple_query("SELECT set_config('app.tenant', 'acme', false)").await.unwrap();
    assert!(matches!(&set[1], SimpleQueryMessage::Row(r) if r.get(0) == Some("acme")));
    // The plain call is replayed: reads on a replica see it.
    let sql = "SELECT inet_server_port(), current_setting('app.tenant')";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let row = d.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(1), "acme");
        if ran(&env, &row.get::<_, i32>(0).to_string()) == Ran::Replica {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "reads never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A computed one cannot be replayed: the session stays on the primary.
    let e = env.client().await;
    eventually_on_replica(&env, &e, "SELECT inet_server_port()").await;
    let computed = "SELECT set_config('app.tenant', v, false) FROM (VALUES ('beta')) AS t (v)";
    e.batch_execute(computed).await.unwrap();
    for _ in 0..20 {
        let row = e.query_one(sql, &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(1), "beta");
        assert_eq!(ran(&env, &row.get::<_, i32>(0).to_string()), Ran::Primary);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn session_hints_pins_and_primary_default() {
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    c.batch_execute("SET pgnear.route = primary").await.unwrap();
    let route = c.query_one("SHOW pgnear.route", &[]).await;
    // SHOW through the extended protocol is not a pgnear command there;
    // check it through the simple protocol.
    drop(route);
    let shown = c.simple_query("SHOW pgnear.route").await.unwrap();
    assert!(matches!(&shown[1], SimpleQueryMessage::Row(r) if r.get(0) == Some("primary")));
    assert_eq!(where_(&env, &c, "SELECT inet_server_port()").await, Ran::Primary);
    c.batch_execute("SET pgnear.route = auto").await.unwrap();
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    c.batch_execute("LISTEN jobs").await.unwrap();
    assert_eq!(where_(&env, &c, "SELECT inet_server_port()").await, Ran::Primary);
    c.batch_execute("DISCARD ALL").await.unwrap();
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let error = c.simple_query("SET pgnear.route = sideways").await.unwrap_err();
    assert_eq!(error.code().unwrap().code(), "22023");

    let primary_only = ProxyConfig::default().section("[routing]\ndefault = \"primary\"");
    let env2 = start(Cluster::builder().replica(), primary_only).await;
    let c2 = env2.client().await;
    for _ in 0..5 {
        assert_eq!(where_(&env2, &c2, "SELECT inet_server_port()").await, Ran::Primary);
    }
}

#[tokio::test]
async fn pgbench_prepared_with_reads_on_replicas() {
    let env = two_replicas(ProxyConfig::default()).await;
    let port = env.proxy.addr().port().to_string();
    let common = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let mut init = common.to_vec();
    init.extend(["-i", "-s", "1", "-q", "postgres"]);
    run_tool("pgbench", &init).await;
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    for (mode, select_only) in
        [("prepared", true), ("prepared", false), ("extended", true), ("simple", false)]
    {
        let mut args = common.to_vec();
        args.extend(["-c", "4", "-j", "2", "-T", "3", "-M", mode]);
        if select_only {
            args.push("-S");
        }
        args.push("postgres");
        let out = run_tool("pgbench", &args).await;
        let failed = out.lines().find(|l| l.contains("number of failed transactions")).unwrap_or("");
        assert!(failed.contains(": 0 "), "mode {mode} -S {select_only}: {out}");
    }
    // The select-only runs really used the replicas.
    let on_replicas: i64 = {
        let mut total = 0;
        for replica in env.cluster.replicas() {
            let calls = replica
                .query_scalar(
                    "SELECT coalesce(sum(xact_commit), 0) FROM pg_stat_database WHERE datname = 'postgres'",
                )
                .await
                .unwrap();
            total += calls.parse::<i64>().unwrap();
        }
        total
    };
    assert!(on_replicas > 100, "replicas served only {on_replicas} transactions");
}

#[tokio::test]
async fn pgnear_settings_through_the_extended_protocol() {
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    // tokio-postgres sends these as Parse/Describe/Sync + Bind/Execute/Sync.
    c.execute("SET pgnear.route = primary", &[]).await.unwrap();
    let row = c.query_one("SHOW pgnear.route", &[]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "primary");
    for _ in 0..5 {
        assert_eq!(where_(&env, &c, "SELECT inet_server_port()").await, Ran::Primary);
    }
    let stmt = c.prepare("SET pgnear.route = auto").await.unwrap();
    c.execute(&stmt, &[]).await.unwrap();
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let error = c.execute("SET pgnear.nonsense = 1", &[]).await.unwrap_err();
    assert_eq!(error.code().unwrap().code(), "42704");
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn flushed_prepares_do_not_hold_the_session_on_a_replica() {
    use crate::support::wire::{message, query, Wire};
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let parse = |name: &str, sql: &str| message(b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
    let describe = |name: &str| message(b'D', format!("S{name}\0").as_bytes());
    let bind = |name: &str| message(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
    let execute = message(b'E', b"\0\0\0\0\0");
    let (flush, sync) = (message(b'H', b""), message(b'S', b""));
    // asyncpg's pattern: Parse/Describe/Flush, then Bind/Execute/Sync.
    for round in 0..5 {
        let read = format!("r{round}");
        wire.send(&[parse(&read, "SELECT inet_server_port()"), describe(&read), flush.clone()].concat())
            .await;
        let mut got = Vec::new();
        while got.len() < 3 {
            // ParameterStatus may come at any time: pgnear reports a
            // resolved write watermark (`pgnear.write_lsn`) that way.
            let tag = wire.recv().await.unwrap().tag;
            if tag != b'S' {
                got.push(tag);
            }
        }
        assert_eq!(got, b"1tT");
        wire.send(&[bind(&read), execute.clone(), sync.clone()].concat()).await;
        let msgs = wire.until_ready().await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
        let write = format!("w{round}");
        let sql = format!("INSERT INTO items VALUES ({}, 'x') RETURNING inet_server_port()", 100 + round);
        wire.send(&[parse(&write, &sql), describe(&write), flush.clone()].concat()).await;
        wire.send(&[bind(&write), execute.clone(), sync.clone()].concat()).await;
        let msgs = wire.until_ready().await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "the write failed: {msgs:?}");
        // A prepare never run, then a simple-protocol write.
        let idle = format!("i{round}");
        wire.send(&[parse(&idle, "SELECT 1"), describe(&idle), flush.clone()].concat()).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(wire.recv().await.unwrap().tag);
        }
        wire.send(&query(&format!("UPDATE items SET v = 'y' WHERE id = {}", 100 + round))).await;
        let msgs = wire.until_ready().await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "the simple write failed: {msgs:?}");
    }
}

/// A client whose `client_encoding` is LATIN1 sends texts that are not
/// UTF-8. They are relayed byte for byte and classified (reads still go to
/// replicas, whose connections follow the session's encoding); a session
/// statement in such a text pins the session, since pgnear could not
/// replay the client's bytes; statement names must be UTF-8.
#[tokio::test]
async fn texts_in_another_client_encoding() {
    use crate::support::wire::{message, query_bytes, Msg, Wire};
    async fn ask(wire: &mut Wire, sql: &[u8]) -> Vec<Msg> {
        wire.send(&query_bytes(sql)).await;
        wire.until_ready().await
    }
    fn row(msgs: &[Msg]) -> Vec<Vec<u8>> {
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
        row.columns().into_iter().map(|c| c.unwrap_or_default()).collect()
    }
    let env = two_replicas(ProxyConfig::default()).await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    ask(&mut wire, b"SET client_encoding = 'LATIN1'").await;
    // 'café' in LATIN1 is not UTF-8. A read runs on a replica, which must
    // have been told the encoding to take and return these bytes.
    let columns = read_on_a_replica(&env, &mut wire, b"SELECT 'caf\xe9', inet_server_port()").await;
    assert_eq!(columns[0], b"caf\xe9");
    // An error quoting the text is relayed, and the session goes on.
    let msgs = ask(&mut wire, b"SELECT 'caf\xe9'::int").await;
    let error = msgs.iter().find(|m| m.tag == b'E').unwrap_or_else(|| panic!("no error: {msgs:?}"));
    assert_eq!(error.sqlstate().as_deref(), Some("22P02"));
    assert_eq!(error.field(b'V').as_deref(), Some("ERROR"));
    // A write, and reading it back (the session's own write).
    let msgs = ask(&mut wire, b"INSERT INTO items VALUES (3, 'na\xefve') RETURNING inet_server_port()").await;
    assert_eq!(ran(&env, std::str::from_utf8(&row(&msgs)[0]).unwrap()), Ran::Primary);
    let msgs = ask(&mut wire, b"SELECT v FROM items WHERE id = 3").await;
    assert_eq!(row(&msgs)[0], b"na\xefve");
    // The extended protocol.
    let parse = message(b'P', b"\0SELECT 'caf\xe9' || v FROM items WHERE id = 3\0\0\0");
    wire.send(&[parse, message(b'B', &[0; 8]), message(b'E', &[0; 5]), message(b'S', b"")].concat()).await;
    assert_eq!(row(&wire.until_ready().await)[0], b"caf\xe9na\xefve");
    // A function whose name is not UTF-8 cannot be looked up among the
    // volatile ones: calling it is a write.
    ask(&mut wire, b"CREATE TABLE hits (n int)").await;
    let define = b"CREATE FUNCTION bump\xe9() RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO hits VALUES (1) RETURNING n'";
    assert!(ask(&mut wire, define).await.iter().all(|m| m.tag != b'E'));
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    for _ in 0..5 {
        let msgs = ask(&mut wire, b"SELECT bump\xe9(), inet_server_port()").await;
        assert_eq!(ran(&env, std::str::from_utf8(&row(&msgs)[1]).unwrap()), Ran::Primary, "{msgs:?}");
    }
    // A SET in such a text is applied as sent, and keeps the session on
    // the primary.
    read_on_a_replica(&env, &mut wire, b"SELECT inet_server_port()").await;
    assert!(ask(&mut wire, b"SET myapp.label = 'caf\xe9'").await.iter().all(|m| m.tag != b'E'));
    for _ in 0..5 {
        let msgs = ask(&mut wire, b"SELECT current_setting('myapp.label'), inet_server_port()").await;
        let columns = row(&msgs);
        assert_eq!(columns[0], b"caf\xe9");
        assert_eq!(ran(&env, std::str::from_utf8(&columns[1]).unwrap()), Ran::Primary);
    }
    // Statement names are tracked, and must be UTF-8.
    wire.send(&[message(b'P', b"s\xe9\0SELECT 1\0\0\0"), message(b'S', b"")].concat()).await;
    let msgs = wire.until_ready().await;
    let fatal = msgs.iter().find(|m| m.tag == b'E').unwrap_or_else(|| panic!("no error: {msgs:?}"));
    assert_eq!(fatal.sqlstate().as_deref(), Some("08P01"));
    assert!(fatal.field(b'M').unwrap().contains("not UTF-8"), "{fatal:?}");
}

/// Polls until `sql`, whose last column is `inet_server_port()`, runs on a
/// replica through the raw client; returns that row's columns.
async fn read_on_a_replica(env: &Env, wire: &mut crate::support::wire::Wire, sql: &[u8]) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        wire.send(&crate::support::wire::query_bytes(sql)).await;
        let msgs = wire.until_ready().await;
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
        let columns: Vec<Vec<u8>> = row.columns().into_iter().map(Option::unwrap_or_default).collect();
        let port = columns.last().map(|p| std::str::from_utf8(p).unwrap().to_string()).unwrap_or_default();
        if ran(env, &port) == Ran::Replica {
            return columns;
        }
        let text = String::from_utf8_lossy(sql);
        assert!(tokio::time::Instant::now() < deadline, "{text} never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A hot standby refuses serializable mode ("cannot use serializable mode
/// in a hot standby"): a read-only transaction that is serializable, by
/// its own words or by the session's default (a SET, or the startup
/// options), runs on the primary; other read-only ones still reach a
/// replica.
#[tokio::test]
async fn serializable_read_only_transactions_run_on_the_primary() {
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let serializable = "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY; SELECT inet_server_port(); COMMIT";
    assert_eq!(where_(&env, &c, serializable).await, Ran::Primary);
    let start =
        "START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE; SELECT inet_server_port(); COMMIT";
    assert_eq!(where_(&env, &c, start).await, Ran::Primary);
    begin_read_only_on_a_replica(&env, &c).await;
    c.batch_execute("COMMIT").await.unwrap();

    c.batch_execute("SET default_transaction_isolation = serializable").await.unwrap();
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(where_(&env, &c, "SELECT inet_server_port()").await, Ran::Primary);
    c.batch_execute("COMMIT").await.unwrap();
    // Its own isolation level wins over the default.
    let committed = "BEGIN READ ONLY ISOLATION LEVEL READ COMMITTED; SELECT inet_server_port(); COMMIT";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while where_(&env, &c, committed).await != Ran::Replica {
        assert!(tokio::time::Instant::now() < deadline, "a read committed one never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("RESET default_transaction_isolation").await.unwrap();
    begin_read_only_on_a_replica(&env, &c).await;
    c.batch_execute("COMMIT").await.unwrap();

    let opts = env.client_with("postgres", "options='-c default_transaction_isolation=serializable'").await;
    opts.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(where_(&env, &opts, "SELECT inet_server_port()").await, Ran::Primary);
    opts.batch_execute("COMMIT").await.unwrap();
}

/// asyncpg prepares a named statement through the protocol and may then run
/// `EXECUTE name` in SQL: that statement must be found wherever the SQL
/// runs, not only on the node that parsed it; `DEALLOCATE name` too.
#[tokio::test]
async fn sql_execute_finds_a_statement_prepared_through_the_protocol() {
    use crate::support::wire::{bind, execute, parse, query, sync, Msg, Wire};
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let port = |msgs: &[Msg]| -> String {
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
        String::from_utf8(row.columns()[0].clone().unwrap()).unwrap()
    };
    // Parsed (and run once) on a replica.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let prepare = parse("foobar", "SELECT inet_server_port()::text");
        wire.send(&[prepare, bind("", "foobar"), execute(""), sync()].concat()).await;
        let msgs = wire.until_ready().await;
        if ran(&env, &port(&msgs)) == Ran::Replica {
            break;
        }
        wire.send(&query("DEALLOCATE foobar")).await;
        wire.until_ready().await;
        assert!(tokio::time::Instant::now() < deadline, "the Parse never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // EXECUTE in SQL, as a read and inside a transaction on the primary.
    wire.send(&query("EXECUTE foobar")).await;
    let msgs = wire.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    port(&msgs);
    wire.send(&query("BEGIN; EXECUTE foobar")).await;
    let msgs = wire.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(ran(&env, &port(&msgs)), Ran::Primary);
    wire.send(&query("COMMIT")).await;
    wire.until_ready().await;
    // DEALLOCATE runs on the primary, which never parsed it before.
    wire.send(&query("DEALLOCATE foobar")).await;
    let msgs = wire.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    wire.send(&query("EXECUTE foobar")).await;
    let msgs = wire.until_ready().await;
    let error = msgs.iter().find(|m| m.tag == b'E').expect("EXECUTE after DEALLOCATE must fail");
    assert_eq!(error.sqlstate().as_deref(), Some("26000"));
}

/// `SHOW pgnear.node` and `pgnear.region` tell where the session's last
/// statement ran, over both protocols; ParameterStatus `pgnear.node` is
/// sent only to a session that asked (`pgnear.report_node`), and only when
/// the node changes.
#[tokio::test]
async fn where_a_statement_ran_is_shown_and_reported_only_when_asked() {
    use crate::support::wire::{bind, execute, parse, query, sync, Msg, Wire};
    let env = two_replicas(ProxyConfig::default()).await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT inet_server_port()").await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let reported = |msgs: &[Msg]| -> Vec<String> {
        let status = msgs.iter().filter(|m| m.tag == b'S' && m.body.starts_with(b"pgnear.node\0"));
        status.map(|m| String::from_utf8_lossy(&m.body[12..m.body.len() - 1]).into_owned()).collect()
    };
    let value = |msgs: &[Msg]| -> String {
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
        String::from_utf8(row.columns()[0].clone().unwrap_or_default()).unwrap()
    };
    let mut run = async |sql: &str| {
        wire.send(&query(sql)).await;
        wire.until_ready().await
    };
    assert_eq!(value(&run("SHOW pgnear.node").await), "", "nothing ran yet");
    let msgs = run("INSERT INTO items VALUES (10, 'ten')").await;
    assert!(reported(&msgs).is_empty(), "reported unasked: {msgs:?}");
    assert_eq!(value(&run("SHOW pgnear.node").await), env.cluster.primary().name());
    assert_eq!(value(&run("SHOW pgnear.region").await), "us-east");
    let set = run("SET pgnear.report_node = on").await;
    assert_eq!(reported(&set), [env.cluster.primary().name()], "where it is, once asked");
    assert!(reported(&run("INSERT INTO items VALUES (11, 'eleven')").await).is_empty(), "unchanged");
    // Reads reach a replica again once it has replayed the write.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let msgs = loop {
        let msgs = run("SELECT inet_server_port()::text").await;
        if ran(&env, &value(&msgs)) == Ran::Replica {
            break msgs;
        }
        assert!(tokio::time::Instant::now() < deadline, "reads never reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let port: u16 = value(&msgs).parse().unwrap();
    let replica = env.cluster.replicas().iter().find(|r| r.port() == port).unwrap().name().to_string();
    assert_eq!(reported(&msgs), [replica]);
    assert!(run("SET pgnear.node = 'x'").await.iter().any(|m| m.tag == b'E'), "read-only");
    wire.send(&[parse("", "SHOW pgnear.region"), bind("", ""), execute(""), sync()].concat()).await;
    assert_eq!(value(&wire.until_ready().await), "eu-west");
    wire.send(&query("RESET pgnear.report_node")).await;
    wire.until_ready().await;
    wire.send(&query("INSERT INTO items VALUES (12, 'twelve')")).await;
    let msgs = wire.until_ready().await;
    assert!(reported(&msgs).is_empty(), "reported after RESET: {msgs:?}");
}

/// `pgnear.prefer_region` makes that region's replicas the session's first
/// choice for reads (the proxy itself is in eu-west); RESET and DISCARD ALL
/// clear it; a region no node is in is an error, at SET and at startup.
#[tokio::test]
async fn a_session_can_prefer_a_region_for_its_reads() {
    let cluster = Cluster::builder().replica().replica().start().await.unwrap();
    let node = |name: &str, port: u16, region: &str| {
        format!(
            "[[nodes]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\nregion = \"{region}\"\n\n"
        )
    };
    let nodes = node("us-primary", cluster.primary().port(), "us-east")
        + &node("eu-replica", cluster.replica(0).port(), "eu-west")
        + &node("ap-replica", cluster.replica(1).port(), "ap-northeast");
    let proxy = pgnear::Proxy::start(ProxyConfig::default().nodes(&nodes).build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let (eu, ap) = (env.cluster.replica(0).port().to_string(), env.cluster.replica(1).port().to_string());
    let c = env.client().await;
    let port = async |c: &Client| rows(c, "SELECT inet_server_port()").await[0][0].clone();
    // Until both replicas are up to date and known, reads may go elsewhere.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while port(&c).await != eu {
        assert!(tokio::time::Instant::now() < deadline, "reads never reached the eu replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("SET pgnear.prefer_region = 'ap-northeast'").await.unwrap();
    assert_eq!(rows(&c, "SHOW pgnear.prefer_region").await[0][0], "ap-northeast");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while port(&c).await != ap {
        assert!(tokio::time::Instant::now() < deadline, "reads never reached the preferred region");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        assert_eq!(port(&c).await, ap, "the preferred region stays first");
    }
    c.batch_execute("RESET pgnear.prefer_region").await.unwrap();
    assert_eq!(port(&c).await, eu);
    c.batch_execute("SET pgnear.prefer_region = 'ap-northeast'").await.unwrap();
    assert_eq!(port(&c).await, ap);
    c.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(rows(&c, "SHOW pgnear.prefer_region").await[0][0], "");
    assert_eq!(port(&c).await, eu);
    let unknown = c.batch_execute("SET pgnear.prefer_region = 'mars'").await;
    assert_eq!(sqlstate(unknown), "22023");
    let at_startup = env.client_with("postgres", "options='-c pgnear.prefer_region=ap-northeast'").await;
    assert_eq!(port(&at_startup).await, ap);
    let refused =
        crate::support::connect(&env.conn_string("postgres", "options='-c pgnear.prefer_region=mars'")).await;
    assert_eq!(sqlstate(refused), "22023");
}
