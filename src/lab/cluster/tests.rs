#![allow(clippy::unwrap_used)] // tests fail loudly

use std::time::Duration;

use tokio::time::Instant;

use tokio_postgres::NoTls;

use super::{AuthMethod, Cluster, LabError};
use crate::lab::relay::Relay;

const CATCHUP: Duration = Duration::from_secs(30);
const DELAY: Duration = Duration::from_millis(300);

#[tokio::test]
async fn primary_streams_to_replicas_which_restart_and_promote() {
    let started = Instant::now();
    let cluster = Cluster::builder().replica().delayed_replica(DELAY).start().await.expect("cluster starts");
    eprintln!("primary + 2 replicas started in {:?}", started.elapsed());
    let (primary, standby, delayed) = (cluster.primary(), cluster.replica(0), cluster.replica(1));
    assert_eq!(cluster.replicas().len(), 2);
    assert_eq!(primary.query_scalar("SELECT pg_is_in_recovery()").await.unwrap(), "f");
    for replica in cluster.replicas() {
        let in_recovery = replica.query_scalar("SELECT pg_is_in_recovery()").await;
        assert_eq!(in_recovery.unwrap(), "t", "{}", replica.name());
    }
    let senders = primary
        .query_scalar(
            "SELECT string_agg(application_name, ',' ORDER BY application_name) FROM pg_stat_replication",
        )
        .await
        .unwrap();
    assert_eq!(senders, "standby1,standby2");

    // A commit reaches the delayed replica no sooner than its delay after it was sent.
    let client = primary.connect().await.unwrap();
    let sent = Instant::now();
    client.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();
    cluster.wait_for_catchup(CATCHUP).await.unwrap();
    assert!(sent.elapsed() >= DELAY, "caught up after {:?}", sent.elapsed());
    for replica in cluster.replicas() {
        let count = replica.query_scalar("SELECT count(*) FROM t").await;
        assert_eq!(count.unwrap(), "1", "{}", replica.name());
    }

    // A stopped replica misses nothing once restarted.
    standby.stop().unwrap();
    assert!(standby.query_scalar("SELECT 1").await.is_err());
    client.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    standby.start().await.unwrap();
    cluster.wait_for_catchup(CATCHUP).await.unwrap();
    assert_eq!(standby.query_scalar("SELECT count(*) FROM t").await.unwrap(), "2");

    // Promotion makes a replica writable; wait_for_catchup then skips it.
    standby.promote().await.unwrap();
    standby.query_scalar("INSERT INTO t VALUES (3) RETURNING id").await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    cluster.wait_for_catchup(CATCHUP).await.unwrap();
    assert_eq!(delayed.query_scalar("SELECT max(id) FROM t").await.unwrap(), "4");

    // A crashed node recovers.
    delayed.kill().unwrap();
    delayed.start().await.unwrap();

    let logs = cluster.dump_logs();
    assert!(logs.contains("=== standby2") && logs.contains("database system is ready"), "{logs}");
    let dir = cluster.base_dir().to_owned();
    assert!(dir.join("primary/data/PG_VERSION").exists());
    drop(cluster);
    assert!(!dir.exists(), "{} survived drop", dir.display());
}

#[tokio::test]
async fn passwords_guard_tcp_but_not_the_lab_socket() {
    for (method, stored_as) in [(AuthMethod::Md5, "md5"), (AuthMethod::Scram, "SCRAM-SHA-256$")] {
        let cluster = Cluster::builder()
            .auth(method)
            .user("app", "s3cret'")
            .setting("max_connections", "50")
            .start()
            .await
            .expect("cluster starts");
        let primary = cluster.primary();
        assert_eq!(primary.query_scalar("SHOW max_connections").await.unwrap(), "50");
        let hash = primary.query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").await;
        assert!(hash.unwrap().starts_with(stored_as), "{method:?}");

        let conn = primary.conn_string("app", "postgres");
        let with_password = format!("{conn} password='s3cret\\''");
        let (client, connection) =
            tokio_postgres::connect(&with_password, NoTls).await.expect("password login");
        tokio::spawn(connection);
        let row = client.query_one("SELECT current_user", &[]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), "app");

        let without = tokio_postgres::connect(&conn, NoTls).await;
        assert!(without.is_err(), "{method:?}: password-less TCP login succeeded");
    }
}

#[tokio::test]
async fn a_node_that_cannot_start_reports_its_log() {
    let error = Cluster::builder()
        .setting("shared_buffers", "not-a-size")
        .start()
        .await
        .expect_err("bad setting must fail");
    let LabError::Start { node, log_tail, .. } = &error else {
        panic!("unexpected error: {error}");
    };
    assert_eq!(node, "primary");
    assert!(log_tail.contains("shared_buffers"), "{error}");
}

#[tokio::test]
async fn a_replica_streams_through_a_relay_and_back() {
    let cluster = Cluster::builder().replica().start().await.expect("cluster starts");
    let (primary, replica) = (cluster.primary(), cluster.replica(0));
    let relay = Relay::start(primary.addr(), DELAY).await.unwrap();
    replica.stream_from(relay.addr()).await.unwrap();
    let port = replica.query_scalar("SELECT sender_port FROM pg_stat_wal_receiver").await.unwrap();
    assert_eq!(port, relay.port().to_string());

    // WAL now crosses the relay: a commit reaches the replica its delay late.
    let client = primary.connect().await.unwrap();
    let sent = Instant::now();
    client.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await.unwrap();
    cluster.wait_for_catchup(CATCHUP).await.unwrap();
    assert!(sent.elapsed() >= DELAY, "caught up after {:?}", sent.elapsed());
    assert_eq!(replica.query_scalar("SELECT count(*) FROM t").await.unwrap(), "1");

    // And back to the primary directly, which outlives the relay.
    replica.stream_from(primary.addr()).await.unwrap();
    drop(relay);
    client.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    cluster.wait_for_catchup(CATCHUP).await.unwrap();
    assert_eq!(replica.query_scalar("SELECT count(*) FROM t").await.unwrap(), "2");
}
