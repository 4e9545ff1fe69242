//! Schema changes are global: after DDL through pgnear no session reads
//! from a replica that has not replayed it, whatever the read-your-writes
//! scope. The replica applies commits 2 s late and, with no lag limit to
//! speak of, serves reads meanwhile.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{routed, show, start, Env, ProxyConfig, PATIENCE};

const DELAY: Duration = Duration::from_secs(2);

/// The delayed replica, serving reads in scope "session" once it has
/// replayed a first table.
async fn delayed() -> Env {
    let config = ProxyConfig::default()
        .section("[consistency]\nread_your_writes = \"session\"")
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
    let messages = client.simple_query(sql).await.unwrap();
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn ddl_through_pgnear_is_seen_by_every_session() {
    let env = delayed().await;
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
