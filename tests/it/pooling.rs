//! Transaction pooling (`proxy.pool_mode = "transaction"`): sessions share
//! server connections between transactions, and each session still sees
//! only its own settings, prepared statements and temp objects.

use std::collections::HashSet;
use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::wire::{message, Wire};
use crate::support::{connect, sqlstate, start, Env, ProxyConfig, PATIENCE};

fn pooled(size: usize) -> ProxyConfig {
    pooled_waiting(size, 30_000)
}

/// Pooling with `pool_timeout_ms` of `timeout`, on two session loops
/// whatever the machine (their pool waits are timed by the service loop).
fn pooled_waiting(size: usize, timeout: u64) -> ProxyConfig {
    pooled_on(size, timeout, 2)
}

fn pooled_on(size: usize, timeout: u64, loops: usize) -> ProxyConfig {
    ProxyConfig::default()
        .proxy(&format!(
            "pool_mode = \"transaction\"\npool_size = {size}\npool_timeout_ms = {timeout}\nworker_threads = {loops}"
        ))
        .section("[routing]\ndefault = \"primary\"")
}

/// The first column of the first row of a simple query.
async fn value(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no rows"))
}

async fn pid(client: &Client) -> String {
    value(client, "SELECT pg_backend_pid()").await
}

#[tokio::test]
async fn sessions_take_turns_on_few_server_connections() {
    // One loop: a session gives its connection back in the same loop turn
    // that relays its ReadyForQuery, before the loop reads the next
    // client. Across two loops the next client's query can arrive first
    // and open the pool's second connection (see the next test).
    let env = start(Cluster::builder(), pooled_on(2, 30_000, 1)).await;
    let clients = six_clients(&env).await;
    // One after another: the most recently used connection serves all.
    let mut pids = HashSet::new();
    for _ in 0..3 {
        for client in &clients {
            pids.insert(pid(client).await);
        }
    }
    assert_eq!(pids.len(), 1, "sequential work should reuse one connection: {pids:?}");
    at_most_two_at_once(&env, &clients).await;
}

#[tokio::test]
async fn loops_share_the_pool_size() {
    let env = start(Cluster::builder(), pooled(2)).await;
    let clients = six_clients(&env).await;
    at_most_two_at_once(&env, &clients).await;
}

async fn six_clients(env: &Env) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(env.client().await);
    }
    clients
}

/// All at once: never more than the pool's two server connections.
async fn at_most_two_at_once(env: &Env, clients: &[Client]) {
    let mut all = HashSet::new();
    for _ in 0..5 {
        let round = futures_util::future::join_all(clients.iter().map(pid)).await;
        all.extend(round);
    }
    assert!(all.len() <= 2, "more server connections than pool_size: {all:?}");
    let primary = connect(&env.cluster.primary().conn_string("postgres", "postgres")).await.unwrap();
    let open: i64 = primary
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND query = 'SELECT pg_backend_pid()'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(open <= 2, "{open} server connections for 6 clients with pool_size 2");
}

#[tokio::test]
async fn settings_stay_with_their_session() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("SET statement_timeout = '1234ms'; SET search_path = pg_catalog").await.unwrap();
    for _ in 0..3 {
        assert_eq!(value(&b, "SHOW statement_timeout").await, "0");
        assert_eq!(value(&b, "SHOW search_path").await, "\"$user\", public");
        assert_eq!(value(&a, "SHOW statement_timeout").await, "1234ms");
        assert_eq!(value(&a, "SHOW search_path").await, "pg_catalog");
    }
    // A SET inside a transaction that rolls back leaves nothing behind.
    b.batch_execute("BEGIN; SET work_mem = '7MB'; ROLLBACK").await.unwrap();
    assert_eq!(value(&a, "SHOW work_mem").await, "4MB");
    assert_eq!(value(&b, "SHOW work_mem").await, "4MB");
    // Both sessions used the one pooled connection.
    assert_eq!(pid(&a).await, pid(&b).await);
}

#[tokio::test]
async fn clients_with_different_application_names_share_connections() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let a = env.client_with("postgres", "application_name=alpha").await;
    let b = env.client_with("postgres", "application_name='it\\'s beta'").await;
    let c = env.client().await;
    for _ in 0..3 {
        assert_eq!(value(&a, "SHOW application_name").await, "alpha");
        assert_eq!(
            value(&b, "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").await,
            "it's beta"
        );
        assert_eq!(value(&c, "SHOW application_name").await, "");
    }
    assert_eq!(pid(&a).await, pid(&b).await, "one pool for both names");
    assert_eq!(pid(&b).await, pid(&c).await);
    // A client's own SET wins until it resets, then its startup name is back.
    a.batch_execute("SET application_name = 'renamed'").await.unwrap();
    assert_eq!(value(&b, "SHOW application_name").await, "it's beta");
    assert_eq!(value(&a, "SHOW application_name").await, "renamed");
    a.batch_execute("RESET application_name").await.unwrap();
    assert_eq!(value(&a, "SHOW application_name").await, "alpha");
    b.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(value(&b, "SHOW application_name").await, "it's beta");
}

#[tokio::test]
async fn currval_reads_the_sessions_own_nextval_or_fails() {
    // One loop: the pool hands out the most recently used connection, so
    // b's insert lands on the connection a wrote on. With two loops each
    // session prefers a connection of its own loop, and whether b takes
    // a's depends on whether a second one was opened meanwhile.
    let env = start(Cluster::builder(), pooled_on(2, 30_000, 1)).await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("CREATE TABLE seq_items (id serial PRIMARY KEY, v text)").await.unwrap();
    let currval = "SELECT currval('seq_items_id_seq')";
    // Its own connection, taken back from the pool: the right value.
    a.batch_execute("INSERT INTO seq_items (v) VALUES ('a1')").await.unwrap();
    assert_eq!(value(&a, currval).await, "1");
    assert_eq!(value(&a, "SELECT lastval()").await, "1");
    // Kept across the session's own later transactions.
    a.batch_execute("BEGIN").await.unwrap();
    assert_eq!(value(&a, currval).await, "1");
    let written_on = pid(&a).await;
    a.batch_execute("COMMIT").await.unwrap();
    // The connection goes back to the pool once the watermark probe behind
    // a commit is answered. A read of a's, which has no probe, runs on it
    // (still held, or the most recently used) and gives it back at once:
    // then it is the most recently used for b.
    assert_eq!(pid(&a).await, written_on);
    // Another client writes on that connection: a's value is gone from
    // it, and pgnear says so instead of answering with b's.
    b.batch_execute("INSERT INTO seq_items (v) VALUES ('b1')").await.unwrap();
    assert_eq!(value(&b, currval).await, "2");
    assert_eq!(sqlstate(a.simple_query(currval).await), "55000");
    assert_eq!(sqlstate(a.simple_query("SELECT lastval()").await), "55000");
    // In the same text or transaction as the insert it always works.
    let messages =
        a.simple_query("INSERT INTO seq_items (v) VALUES ('a2'); SELECT currval('seq_items_id_seq')").await;
    let rows: Vec<_> = messages
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, ["3"]);
    a.batch_execute("BEGIN; INSERT INTO seq_items (v) VALUES ('a3')").await.unwrap();
    assert_eq!(value(&b, "SELECT count(*) FROM seq_items").await, "3", "b ran beside a's transaction");
    assert_eq!(value(&a, currval).await, "4");
    a.batch_execute("COMMIT").await.unwrap();
    // A session that never wrote reads nothing of another's.
    let c = env.client().await;
    assert_eq!(sqlstate(c.simple_query(currval).await), "55000");
}

#[tokio::test]
async fn a_reset_custom_setting_stays_defined_on_the_next_connection() {
    // One loop: there the pool hands out the most recently used idle
    // connection. With two, a session prefers one its own loop watches,
    // so which connection a gets would depend on which loop opened each.
    let env = start(Cluster::builder(), pooled_on(2, 30_000, 1)).await;
    let a = env.client().await;
    let c = env.client().await;
    // c holds one connection in a transaction, so a uses the other ...
    c.batch_execute("BEGIN").await.unwrap();
    let held = pid(&c).await;
    a.batch_execute("SET custom.flag = 'on'; RESET custom.flag").await.unwrap();
    assert_ne!(pid(&a).await, held);
    // ... and, once c gives its connection back, a gets that one next.
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&a, "SHOW custom.flag").await, "");
    assert_eq!(pid(&a).await, held, "a did not move to the other connection");
}

#[tokio::test]
async fn a_rollback_to_savepoint_undoes_the_settings_after_it() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let a = env.client().await;
    let b = env.client().await;
    // Each block runs, then `a` takes the one connection, so `b`'s next
    // statement gets `b`'s recorded settings replayed.
    let blocks = [
        "BEGIN; SAVEPOINT s; SET work_mem = '7MB'; ROLLBACK TO s; COMMIT",
        "BEGIN; SET work_mem = '5MB'; SAVEPOINT s; SET work_mem = '7MB'; ROLLBACK TO SAVEPOINT s; COMMIT",
        "BEGIN; SAVEPOINT s; SAVEPOINT t; SET work_mem = '7MB'; RELEASE t; ROLLBACK TO s; RELEASE s; COMMIT",
        "BEGIN; SAVEPOINT \"S\"; SET work_mem = '6MB'; RELEASE SAVEPOINT \"S\"; COMMIT",
    ];
    let expected = ["4MB", "5MB", "5MB", "6MB"];
    for (block, expected) in blocks.iter().zip(expected) {
        b.batch_execute(block).await.unwrap_or_else(|e| panic!("{block}: {e}"));
        a.batch_execute("SET statement_timeout = '1234ms'").await.unwrap();
        assert_eq!(value(&b, "SHOW work_mem").await, expected, "after {block}");
    }
    // One statement at a time, with an error undone by the savepoint.
    b.batch_execute("RESET work_mem").await.unwrap();
    for statement in ["BEGIN", "SET search_path = pg_catalog", "SAVEPOINT s", "SET work_mem = '7MB'"] {
        b.batch_execute(statement).await.unwrap();
    }
    assert_eq!(sqlstate(b.simple_query("SELECT 1/0").await), "22012");
    for statement in ["ROLLBACK TO s", "SET lock_timeout = '3s'", "COMMIT"] {
        b.batch_execute(statement).await.unwrap();
    }
    a.batch_execute("SET statement_timeout = '1234ms'").await.unwrap();
    assert_eq!(value(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(value(&b, "SHOW search_path").await, "pg_catalog");
    assert_eq!(value(&b, "SHOW lock_timeout").await, "3s");
    assert_eq!(value(&a, "SHOW search_path").await, "\"$user\", public");
}

#[tokio::test]
async fn prepared_statements_of_the_same_name_in_two_sessions() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let a = env.client().await;
    let b = env.client().await;
    // tokio-postgres names its statements s0, s1 ... in every connection.
    let sa = a.prepare("SELECT 1::int + $1").await.unwrap();
    let sb = b.prepare("SELECT 'b'::text || $1::text").await.unwrap();
    for i in 0..5i32 {
        let x: i32 = a.query_one(&sa, &[&i]).await.unwrap().get(0);
        assert_eq!(x, 1 + i);
        let y: String = b.query_one(&sb, &[&i.to_string()]).await.unwrap().get(0);
        assert_eq!(y, format!("b{i}"));
    }
    // A session re-preparing a name it has gets PostgreSQL's error, even
    // when the pooled connection held another session's statement.
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let parse = |name: &str, sql: &str| {
        let mut body = format!("{name}\0{sql}\0").into_bytes();
        body.extend_from_slice(&0i16.to_be_bytes());
        message(b'P', &body)
    };
    wire.send(&[parse("s0", "SELECT 3"), message(b'S', &[])].concat()).await;
    let msgs = wire.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    let _ = a.query_one(&sa, &[&0i32]).await.unwrap();
    wire.send(&[parse("s0", "SELECT 4"), message(b'S', &[])].concat()).await;
    let msgs = wire.until_ready().await;
    let error = msgs.iter().find(|m| m.tag == b'E').expect("duplicate statement accepted");
    assert_eq!(error.sqlstate().as_deref(), Some("42P05"));
    // Binding a name the session never prepared fails, though the pooled
    // connection has a statement of that name.
    let mut bind = b"\0s1\0".to_vec();
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let _ = b.prepare("SELECT 5").await.unwrap(); // b's s1
    wire.send(&[message(b'B', &bind), message(b'E', b"\0\0\0\0\0"), message(b'S', &[])].concat()).await;
    let msgs = wire.until_ready().await;
    let error = msgs.iter().find(|m| m.tag == b'E').expect("another session's statement ran");
    assert_eq!(error.sqlstate().as_deref(), Some("26000"));
}

#[tokio::test]
async fn the_unnamed_statement_survives_a_turn_of_the_connection() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let (mut a, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let (mut b, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let mut parse = b"\0SELECT 42\0".to_vec();
    parse.extend_from_slice(&0i16.to_be_bytes());
    a.send(&[message(b'P', &parse), message(b'S', &[])].concat()).await;
    assert!(a.until_ready().await.iter().all(|m| m.tag != b'E'));
    // Another session runs its own unnamed statement on the connection.
    let bind = [0u8, 0, 0, 0, 0, 0, 0, 0];
    let mut other = b"\0SELECT 7\0".to_vec();
    other.extend_from_slice(&0i16.to_be_bytes());
    let execute = message(b'E', b"\0\0\0\0\0");
    b.send(&[message(b'P', &other), message(b'B', &bind), execute, message(b'S', &[])].concat()).await;
    assert!(b.until_ready().await.iter().any(|m| m.tag == b'D'));
    a.send(&[message(b'B', &bind), message(b'E', b"\0\0\0\0\0"), message(b'S', &[])].concat()).await;
    let msgs = a.until_ready().await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
    assert!(row.body.ends_with(b"42"), "{row:?}");
}

#[tokio::test]
async fn a_session_wide_set_config_keeps_its_connection_and_does_not_leak() {
    // One loop: a and b, one after the other, share the connection just
    // given back (see `sessions_take_turns_on_few_server_connections`).
    let env = start(Cluster::builder(), pooled_on(2, 30_000, 1)).await;
    let a = env.client().await;
    let b = env.client().await;
    // Transaction-local: nothing outlives the statement, nothing is pinned.
    assert_eq!(value(&a, "SELECT set_config('app.user', 'local', true)").await, "local");
    // (b may run on another connection: a's goes back to the pool once the
    // watermark probe behind its write is answered.)
    assert_eq!(value(&b, "SELECT coalesce(current_setting('app.user', true), '')").await, "");
    // Session-wide with literals: replayed like SET, on any connection.
    assert_eq!(value(&a, "SELECT set_config('app.role', 'admin', false)").await, "admin");
    for _ in 0..3 {
        assert_eq!(value(&b, "SELECT coalesce(current_setting('app.role', true), '')").await, "");
        assert_eq!(value(&a, "SELECT current_setting('app.role')").await, "admin");
    }
    assert_eq!(pid(&a).await, pid(&b).await, "a plain set_config does not pin");
    // Any other session-wide set_config: it stays with a, on a's
    // connection only.
    let computed = "SELECT set_config('app.user', v, false) FROM (VALUES ('alice')) AS t (v)";
    assert_eq!(value(&a, computed).await, "alice");
    let pinned = pid(&a).await;
    for _ in 0..3 {
        assert_ne!(pid(&b).await, pinned, "another session ran on a's pinned connection");
        assert_eq!(value(&b, "SELECT coalesce(current_setting('app.user', true), '')").await, "");
        assert_eq!(value(&a, "SELECT current_setting('app.user')").await, "alice");
    }
    // DISCARD ALL clears the settings and the pin.
    a.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(value(&a, "SELECT coalesce(current_setting('app.user', true), '')").await, "");
    assert_eq!(value(&a, "SELECT coalesce(current_setting('app.role', true), '')").await, "");
}

#[tokio::test]
async fn transactions_and_temp_tables_keep_their_connection() {
    let env = start(Cluster::builder(), pooled(2)).await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    let in_tx = pid(&a).await;
    for _ in 0..3 {
        assert_ne!(pid(&b).await, in_tx, "another session ran inside a's transaction");
    }
    assert_eq!(pid(&a).await, in_tx);
    a.batch_execute("COMMIT").await.unwrap();
    // A temp table pins its session to one connection.
    a.batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1)").await.unwrap();
    for _ in 0..3 {
        b.batch_execute("SELECT 1").await.unwrap();
        assert_eq!(value(&a, "SELECT count(*) FROM mine").await, "1");
    }
    let error = b.simple_query("SELECT count(*) FROM mine").await;
    assert_eq!(sqlstate(error), "42P01");
}

#[tokio::test]
async fn a_busy_pool_fails_the_statement_not_the_session() {
    let env = start(Cluster::builder(), pooled_waiting(1, 300)).await;
    let a = env.client().await;
    let b = env.client().await;
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // b waits pool_timeout_ms for the one connection, then gets 53300.
    assert_eq!(sqlstate(b.simple_query("SELECT 2").await), "53300");
    let shared = env.proxy.shared();
    let metrics = shared.metrics.render(&shared.scrape()).unwrap();
    let series = |name: &str| {
        let (name, label) = name.split_once(' ').unwrap_or((name, ""));
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(label))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(series("pgnear_pool_timeouts_total{"), "1");
    assert_eq!(series("pgnear_pool_waiting_units{"), "0");
    assert_eq!(series("pgnear_pool_server_connections{ state=\"active\""), "1");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&b, "SELECT 2").await, "2");
}

#[tokio::test]
async fn a_late_cancel_does_not_reach_the_next_session() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let a = env.client().await;
    let b = env.client().await;
    let _ = pid(&a).await;
    let token = a.cancel_token();
    let sleeping = tokio::spawn(async move { b.simple_query("SELECT pg_sleep(0.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(150)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let done = tokio::time::timeout(PATIENCE, sleeping).await.unwrap().unwrap();
    assert!(done.is_ok(), "a's cancel stopped b's query: {done:?}");
    // A cancel while a's own query runs still works.
    let token = a.cancel_token();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    assert_eq!(sqlstate(a.simple_query("SELECT pg_sleep(20)").await), "57014");
    cancel.await.unwrap().unwrap();
}

#[tokio::test]
async fn idle_pooled_connections_do_not_block_drop_database_or_outlive_their_server() {
    let env = start(Cluster::builder(), pooled(2)).await;
    let admin = env.client().await;
    admin.batch_execute("CREATE DATABASE pooled_db").await.unwrap();
    {
        let other = connect(&env.conn_string("postgres", "").replace("dbname=postgres", "dbname=pooled_db"))
            .await
            .unwrap();
        other.batch_execute("SELECT 1").await.unwrap();
        // Dropped: its connection stays in the pool, idle.
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin.batch_execute("DROP DATABASE pooled_db").await.unwrap();

    // A pooled connection terminated while idle is not handed out.
    let idle_pid = pid(&admin).await;
    let primary = connect(&env.cluster.primary().conn_string("postgres", "postgres")).await.unwrap();
    primary.query("SELECT pg_terminate_backend($1::text::int)", &[&idle_pid]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fresh = env.client().await;
    assert_ne!(pid(&fresh).await, idle_pid);
    assert_eq!(value(&admin, "SELECT 1").await, "1");
}

#[tokio::test]
async fn pgbench_prepared_through_the_pool() {
    let env = start(Cluster::builder(), pooled(3)).await;
    let addr = env.proxy.addr();
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let base = ["-h", host.as_str(), "-p", port.as_str(), "-U", "postgres"];
    crate::support::run_tool("pgbench", &[&base[..], &["-i", "-s", "1", "-q", "postgres"]].concat()).await;
    // A thread per client: pgbench prepares with a blocking call, and a
    // thread whose client waits for the pool would stall the clients that
    // hold the pool's connections in their transactions (as through any
    // transaction pooler).
    for mode in ["simple", "extended", "prepared"] {
        let out = crate::support::run_tool(
            "pgbench",
            &[&base[..], &["-n", "-M", mode, "-c", "8", "-j", "8", "-t", "200", "postgres"]].concat(),
        )
        .await;
        assert!(out.contains("number of failed transactions: 0"), "{mode}: {out}");
        assert!(out.contains("number of transactions actually processed: 1600/1600"), "{mode}: {out}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_transaction_leaves_nothing_behind() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let setup = env.client().await;
    setup.batch_execute("CREATE TABLE left_behind (v int)").await.unwrap();
    {
        let leaver = env.client().await;
        leaver.batch_execute("BEGIN; INSERT INTO left_behind VALUES (1)").await.unwrap();
        // Dropped inside its transaction.
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = env.client().await;
    // The one pooled connection is free again, outside any transaction,
    // and the insert never committed.
    assert_eq!(value(&next, "SELECT count(*) FROM left_behind").await, "0");
    next.batch_execute("BEGIN").await.unwrap();
    next.batch_execute("COMMIT").await.unwrap();
    assert_eq!(value(&setup, "SELECT count(*) FROM left_behind").await, "0");
}

#[tokio::test]
async fn pooled_reads_use_replicas_and_still_see_their_writes() {
    let config = ProxyConfig::default().proxy("pool_mode = \"transaction\"\npool_size = 2");
    let env = start(Cluster::builder().replica(), config).await;
    let setup = env.client().await;
    setup.batch_execute("CREATE TABLE seen (v int)").await.unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let replica_port = env.cluster.replicas()[0].port().to_string();
    let primary_port = env.cluster.primary().port().to_string();
    let clients = [env.client().await, env.client().await, env.client().await];
    // Reads reach the replica through its pool.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while value(&clients[0], "SELECT inet_server_port()").await != replica_port {
        assert!(tokio::time::Instant::now() < deadline, "reads never reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each client reads its own write at once, whichever connections it gets.
    for (i, client) in clients.iter().enumerate() {
        client.batch_execute(&format!("INSERT INTO seen VALUES ({i})")).await.unwrap();
        let count = value(client, &format!("SELECT count(*) FROM seen WHERE v = {i}")).await;
        assert_eq!(count, "1", "client {i} missed its own write");
    }
    assert_eq!(
        value(&clients[1], "SELECT inet_server_port() FROM seen LIMIT 1 FOR UPDATE").await,
        primary_port
    );
}

#[tokio::test]
async fn a_connection_full_of_statements_closes_the_least_recently_used() {
    let env = start(Cluster::builder(), pooled(1)).await;
    let client = env.client().await;
    let first = client.prepare("SELECT 1::int AS first").await.unwrap();
    let hot = client.prepare("SELECT 2::int AS hot").await.unwrap();
    let before = pid(&client).await;
    // tokio-postgres names each statement anew (s1, s2 ...) and closes it
    // when dropped: keep them.
    let mut kept = Vec::new();
    for i in 0..1000 {
        kept.push(client.prepare(&format!("SELECT {i}::int")).await.unwrap());
        if i % 100 == 0 {
            client.query_one(&hot, &[]).await.unwrap();
        }
    }
    // The last unit closed the evicted statements on the server.
    let last: i32 = client.query_one(&kept[999], &[]).await.unwrap().get(0);
    assert_eq!(last, 999);
    assert_eq!(pid(&client).await, before, "the connection went on being pooled");
    let count = value(&client, "SELECT count(*) FROM pg_prepared_statements").await;
    let count: usize = count.parse().unwrap();
    assert!((900..=1000).contains(&count), "{count} statements left on the connection");
    // The hot statement stayed; the session prepares evicted ones again.
    let text = |sql: &str| format!("SELECT count(*) FROM pg_prepared_statements WHERE statement = '{sql}'");
    assert_eq!(value(&client, &text("SELECT 2::int AS hot")).await, "1");
    assert_eq!(value(&client, &text("SELECT 1::int AS first")).await, "0");
    let one: i32 = client.query_one(&first, &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let two: i32 = client.query_one(&hot, &[]).await.unwrap().get(0);
    assert_eq!(two, 2);
}

#[tokio::test]
async fn idle_pooled_connections_close_after_server_idle_timeout() {
    let env = start(Cluster::builder(), pooled(1).proxy("server_idle_timeout_ms = 200")).await;
    let client = env.client().await;
    let before = pid(&client).await;
    let primary = connect(&env.cluster.primary().conn_string("postgres", "postgres")).await.unwrap();
    let alive = |pid: String| {
        let primary = &primary;
        async move {
            let found: i64 = primary
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1::text::int", &[&pid])
                .await
                .unwrap()
                .get(0);
            found == 1
        }
    };
    assert!(alive(before.clone()).await);
    // The reaper runs every 100 ms here; the backend exits once closed.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while alive(before.clone()).await {
        assert!(tokio::time::Instant::now() < deadline, "the idle pooled connection was never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(pid(&client).await, before, "the session still had the closed connection");
}

/// A LATIN1 client and a UTF8 client on one pooled connection: each gets
/// its text in its own encoding, so neither reads the other's bytes.
#[tokio::test]
async fn client_encodings_stay_with_their_session() {
    use crate::support::wire::query_bytes;
    let env = start(Cluster::builder(), pooled(1)).await;
    let utf8 = env.client().await;
    // The startup tokio-postgres sends, for one pool.
    let mut latin1 = Wire::connect(env.proxy.addr()).await;
    let startup = [("user", "postgres"), ("database", "postgres"), ("client_encoding", "UTF8")];
    latin1.send(&crate::support::wire::startup_packet(&startup)).await;
    latin1.until_ready().await;
    latin1.send(&query_bytes(b"SET client_encoding = 'LATIN1'")).await;
    latin1.until_ready().await;
    for _ in 0..3 {
        latin1
            .send(&query_bytes(b"SELECT 'caf\xe9', current_setting('client_encoding'), pg_backend_pid()"))
            .await;
        let msgs = latin1.until_ready().await;
        let row = msgs.iter().find(|m| m.tag == b'D').unwrap_or_else(|| panic!("no row: {msgs:?}"));
        let columns: Vec<Vec<u8>> = row.columns().into_iter().map(Option::unwrap).collect();
        assert_eq!(columns[0], b"caf\xe9");
        assert_eq!(columns[1], b"LATIN1");
        assert_eq!(value(&utf8, "SELECT 'café'").await, "café");
        assert_eq!(value(&utf8, "SHOW client_encoding").await, "UTF8");
        assert_eq!(pid(&utf8).await.as_bytes(), columns[2], "the two sessions did not share the connection");
    }
}
