//! Schema changes are global: after DDL through pgnear no session reads
//! from a replica that has not replayed it, whatever the read-your-writes
//! scope; and a read a replica behind fails with an undefined table,
//! column or function runs again on the primary when that is safe. The
//! replica applies commits 2 s late (or not at all while its replay is
//! paused) and, with no lag limit to speak of, serves reads meanwhile.

use std::time::Duration;

use pgnear::cluster::Lsn;
use pgnear::lab::cluster::Cluster;
use pgnear::router::ClusterView;
use tokio_postgres::Client;

use crate::support::{first_value, routed, show, sqlstate, start, Env, ProxyConfig, PATIENCE};

const DELAY: Duration = Duration::from_secs(2);

/// The delayed replica, serving reads with `read_your_writes = scope`
/// once it has replayed a first table.
async fn delayed_with(scope: &str) -> Env {
    let config = ProxyConfig::default()
        .section(&format!("[consistency]\nread_your_writes = \"{scope}\""))
        .section("[routing]\nmax_replica_lag_ms = 3600000");
    let env = start(Cluster::builder().delayed_replica(DELAY), config).await;
    env.client()
        .await
        .batch_execute("CREATE TABLE warm (id int); INSERT INTO warm VALUES (1)")
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    env
}

/// The delayed replica, in scope "session".
async fn delayed() -> Env {
    delayed_with("session").await
}

async fn on_primary(env: &Env, client: &Client) -> bool {
    show(client, "pgnear.node").await == env.cluster.primary().name()
}

/// Reads `sql` until a replica serves it.
async fn eventually_on_replica(env: &Env, client: &Client, sql: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.simple_query(sql).await.unwrap();
        if !on_primary(env, client).await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sql} never reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the replica lacks relation `name` now.
async fn absent_on_replica(env: &Env, name: &str) -> bool {
    let sql = format!("SELECT (to_regclass('{name}') IS NULL)::text");
    env.cluster.replica(0).query_scalar(&sql).await.unwrap() == "true"
}

/// The first column of the first row of a simple query.
async fn first(client: &Client, sql: &str) -> String {
    first_value(client, sql).await.unwrap()
}

#[tokio::test]
async fn ddl_through_pgnear_is_seen_by_every_session() {
    ddl_is_seen_by_every_session("session").await;
}

#[tokio::test]
async fn ddl_through_pgnear_is_seen_by_every_session_with_read_your_writes_off() {
    ddl_is_seen_by_every_session("off").await;
}

async fn ddl_is_seen_by_every_session(scope: &str) {
    let env = delayed_with(scope).await;
    let a = env.client().await;
    // Another connection, connected before the migration, that never wrote:
    // scope "session" gives it no part in A's writes.
    let b = env.client().await;
    eventually_on_replica(&env, &b, "SELECT id FROM warm").await;
    let retried = routed(&env, "retried_on_primary");

    a.batch_execute("CREATE TABLE fresh (id int); INSERT INTO fresh VALUES (7)").await.unwrap();
    // Extended protocol, then simple, then inside a transaction block
    // (where nothing would be retried): never 42P01.
    let row = b.query_one("SELECT id FROM fresh", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(first(&b, "SELECT id FROM fresh").await, "7");
    assert!(on_primary(&env, &b).await);
    b.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(first(&b, "SELECT id FROM fresh").await, "7");
    b.batch_execute("COMMIT").await.unwrap();
    // A plain BEGIN opens optimistically where a read would go.
    b.batch_execute("BEGIN").await.unwrap();
    assert_eq!(first(&b, "SELECT count(*) FROM fresh").await, "1");
    b.batch_execute("COMMIT").await.unwrap();
    assert!(absent_on_replica(&env, "fresh").await, "the replica replayed the table within the test");

    // A column added to a table the replica has.
    a.batch_execute("ALTER TABLE warm ADD COLUMN extra int DEFAULT 5").await.unwrap();
    let row = b.query_one("SELECT extra FROM warm", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 5);
    b.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(first(&b, "SELECT extra FROM warm").await, "5");
    b.batch_execute("COMMIT").await.unwrap();

    // DDL in a transaction block counts when the block commits.
    a.batch_execute("BEGIN; CREATE TABLE later (id int); INSERT INTO later VALUES (9)").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(first(&b, "SELECT id FROM later").await, "9");
    b.batch_execute("COMMIT").await.unwrap();
    assert_eq!(routed(&env, "retried_on_primary"), retried, "the reads were routed, not retried");

    // Once the replica has replayed it all, reads return there.
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    eventually_on_replica(&env, &b, "SELECT warm.extra, later.id FROM warm, later").await;
}

/// Waits until the monitor has seen the primary at or past its current
/// WAL position, so that pgnear knows the replica is behind it.
async fn monitor_sees_primary(env: &Env) {
    let primary = env.cluster.primary();
    let now: Lsn = primary.query_scalar("SELECT pg_current_wal_lsn()::text").await.unwrap().parse().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = ClusterView::capture(&env.proxy.shared().topology);
        if view.nodes[0].status.lsn.is_some_and(|lsn| lsn >= now) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the monitor never saw the primary at {now}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_read_of_what_a_replica_behind_lacks_runs_again_on_the_primary() {
    let env = delayed().await;
    let c = env.client().await;
    eventually_on_replica(&env, &c, "SELECT id FROM warm").await;
    // Replay paused: the apply delay alone holds back commits, not the
    // locks of an ALTER TABLE, under which the replica's reads would wait.
    let replica = env.cluster.replica(0).connect().await.unwrap();
    replica.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    // Schema changes pgnear does not see: made on the primary directly.
    let primary = env.cluster.primary().connect().await.unwrap();
    primary
        .batch_execute(
            "CREATE TABLE direct (id int); INSERT INTO direct VALUES (3);
             ALTER TABLE warm ADD COLUMN added int DEFAULT 4;
             CREATE FUNCTION direct_f() RETURNS int LANGUAGE sql STABLE AS 'SELECT 6';
             CREATE TABLE direct_tx (id int)",
        )
        .await
        .unwrap();
    monitor_sees_primary(&env).await;
    let retried = routed(&env, "retried_on_primary");
    let remembered = routed(&env, "replica_refused");

    // Simple protocol: an undefined table, column, function.
    assert_eq!(first(&c, "SELECT id FROM direct").await, "3");
    assert!(on_primary(&env, &c).await);
    assert_eq!(first(&c, "SELECT added FROM warm").await, "4");
    assert_eq!(first(&c, "SELECT direct_f()").await, "6");
    // Extended protocol, a named statement (tokio-postgres prepares one):
    // its Parse fails on the replica, and runs again on the primary.
    let row = c.query_one("SELECT id, 1 AS named FROM direct", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    let prepared = c.prepare("SELECT added FROM warm WHERE id = $1").await.unwrap();
    for _ in 0..3 {
        // Bound to a replica that cannot parse it: again on the primary.
        assert_eq!(c.query_one(&prepared, &[&1i32]).await.unwrap().get::<_, i32>(0), 4);
    }
    assert!(routed(&env, "retried_on_primary") >= retried + 5);

    // Inside a transaction block on the replica: the error stands.
    c.batch_execute("BEGIN READ ONLY").await.unwrap();
    c.simple_query("SELECT 1").await.unwrap();
    assert!(!on_primary(&env, &c).await, "the transaction did not open on the replica");
    assert_eq!(sqlstate(c.simple_query("SELECT id FROM direct_tx").await), "42P01");
    c.batch_execute("ROLLBACK").await.unwrap();

    // Not remembered: once replayed, the same reads run on the replica.
    assert_eq!(routed(&env, "replica_refused"), remembered);
    replica.batch_execute("SELECT pg_wal_replay_resume()").await.unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    eventually_on_replica(&env, &c, "SELECT id FROM direct").await;
    assert_eq!(c.query_one(&prepared, &[&1i32]).await.unwrap().get::<_, i32>(0), 4);
}
