//! Reads a replica refuses are run again on the primary, unnoticed, when
//! that is safe; and never inside a transaction or after rows were sent.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use tokio_postgres::Client;

use crate::support::{routed, show, sqlstate, start, Env, ProxyConfig, PATIENCE};

async fn on_replica(env: &Env, client: &Client) -> bool {
    show(client, "pgnear.node").await != env.cluster.primary().name()
}

#[tokio::test]
async fn a_read_a_replica_refuses_runs_on_the_primary_and_is_remembered() {
    let env = start(Cluster::builder().replica(), ProxyConfig::default()).await;
    let client = env.client().await;
    // Views the classifier cannot see through: they call nextval().
    client
        .batch_execute(
            "CREATE SEQUENCE s;
             CREATE VIEW next_id AS SELECT nextval('s') AS n;
             CREATE VIEW late_write AS
                 SELECT x, CASE WHEN x = 3 THEN nextval('s') END AS n FROM generate_series(1, 3) x;",
        )
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    // Reads reach the replica again once it has replayed the DDL.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.simple_query("SELECT 1").await.unwrap();
        if on_replica(&env, &client).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no read reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Rows came before the error: the client has them, no retry.
    assert_eq!(sqlstate(client.simple_query("SELECT * FROM late_write").await), "25006");
    // Inside a transaction: no retry either.
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let in_replica_tx = on_replica(&env, &client).await;
    let refused = client.query("SELECT n FROM next_id", &[]).await;
    client.batch_execute("ROLLBACK").await.unwrap();
    if in_replica_tx {
        assert_eq!(sqlstate(refused), "25006", "retried inside a transaction");
    }
    // The refused read, alone: it runs on the primary, with no error.
    let retried = routed(&env, "retried_on_primary");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let n: i64 = client.query_one("SELECT n FROM next_id", &[]).await.unwrap().get(0);
        assert!(n >= 1);
        if routed(&env, "retried_on_primary") > retried {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the read was never refused and retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!on_replica(&env, &client).await, "the retry ran on a replica");
    // Remembered: the next runs go straight to the primary.
    let remembered = routed(&env, "replica_refused");
    for _ in 0..3 {
        client.query_one("SELECT n FROM next_id", &[]).await.unwrap();
    }
    assert_eq!(routed(&env, "replica_refused") - remembered, 3);
    // Through the simple protocol too.
    let rows = client.simple_query("SELECT n FROM next_id").await.unwrap();
    assert!(rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
}

#[tokio::test]
async fn a_read_a_recovery_conflict_cancels_on_the_replica_runs_again_on_the_primary() {
    // No grace for queries in the way of replay, and no feedback that
    // would keep the primary from removing what they see: a conflict
    // cancels them.
    let builder = Cluster::builder()
        .replica()
        .setting("max_standby_streaming_delay", "0")
        .setting("hot_standby_feedback", "off");
    let env = start(builder, ProxyConfig::default()).await;
    let client = env.client().await;
    client
        .batch_execute("CREATE TABLE doomed (x int); INSERT INTO doomed SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.simple_query("SELECT count(*) FROM doomed").await.unwrap();
        if on_replica(&env, &client).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no read reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let retried = routed(&env, "retried_on_primary");
    // A read holding its snapshot on the replica for two seconds ...
    let reading = tokio::spawn(async move {
        let row = client.query_one("SELECT count(*) FROM doomed, pg_sleep(2)", &[]).await;
        row.map(|r| (r.get::<_, i64>(0), client))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ... while the primary removes the rows it can see: replaying the
    // VACUUM cancels it there with 40001.
    let direct = env.cluster.primary().connect().await.unwrap();
    direct.batch_execute("DELETE FROM doomed").await.unwrap();
    direct.batch_execute("VACUUM doomed").await.unwrap();
    let (count, client) = tokio::time::timeout(PATIENCE, reading).await.unwrap().unwrap().unwrap();
    // The client saw no error: the read ran again on the primary, after
    // the delete.
    assert_eq!(count, 0, "node {}", show(&client, "pgnear.node").await);
    assert!(!on_replica(&env, &client).await, "the retry ran on a replica");
    assert!(routed(&env, "retried_on_primary") > retried);
    let log = std::fs::read_to_string(env.cluster.replica(0).log_file()).unwrap();
    assert!(log.contains("conflict with recovery"), "the replica saw no conflict");
}
