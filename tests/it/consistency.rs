//! Read-your-writes against a replica that applies WAL 300 ms late.

use std::time::Duration;

use pgnear::cluster::Lsn;
use pgnear::lab::cluster::Cluster;
use pgnear::router::ClusterView;

use crate::support::{connect, show, start, Env, ProxyConfig, PATIENCE};

const DELAY: Duration = Duration::from_millis(300);

async fn delayed(consistency: &str) -> Env {
    let config = ProxyConfig::default().section(&format!("[consistency]\n{consistency}"));
    let env = start(Cluster::builder().delayed_replica(DELAY), config).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v int); INSERT INTO kv SELECT g, 0 FROM generate_series(0, 15) g")
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    env
}

/// Runs `sessions` concurrent write-then-read loops; returns (stale reads,
/// reads served by the replica).
async fn checker(env: &Env, sessions: i32, rounds: i32) -> (u32, u32) {
    let replica_port = env.cluster.replica(0).port() as i32;
    let mut tasks = Vec::new();
    for k in 0..sessions {
        let client = env.client().await;
        tasks.push(tokio::spawn(async move {
            let (mut stale, mut on_replica) = (0, 0);
            for i in 1..=rounds {
                client.execute("UPDATE kv SET v = $1 WHERE k = $2", &[&i, &k]).await.unwrap();
                let row = client
                    .query_one("SELECT v, inet_server_port() FROM kv WHERE k = $1", &[&k])
                    .await
                    .unwrap();
                stale += u32::from(row.get::<_, i32>(0) != i);
                on_replica += u32::from(row.get::<_, i32>(1) == replica_port);
            }
            (stale, on_replica)
        }));
    }
    let mut totals = (0, 0);
    for task in tasks {
        let (stale, on_replica) = task.await.unwrap();
        totals = (totals.0 + stale, totals.1 + on_replica);
    }
    totals
}

#[tokio::test]
async fn session_scope_never_reads_stale_and_off_does() {
    let env = delayed("read_your_writes = \"session\"").await;
    let (stale, _) = checker(&env, 4, 25).await;
    assert_eq!(stale, 0, "stale reads with read_your_writes = session");
    // After a pause longer than the delay, reads go back to the replica.
    let c = env.client().await;
    let replica = env.cluster.replica(0).port() as i32;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get::<_, i32>(0) != replica {
        assert!(tokio::time::Instant::now() < deadline, "reads never returned to the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let off = delayed("read_your_writes = \"off\"").await;
    let (stale, on_replica) = checker(&off, 4, 10).await;
    assert!(
        stale > 0,
        "with read_your_writes = off the checker must see stale reads (replica served {on_replica})"
    );
}

#[tokio::test]
async fn proxy_scope_covers_other_connections() {
    let env = delayed("read_your_writes = \"proxy\"").await;
    let writer = env.client().await;
    let reader = env.client().await;
    for i in 1..=20 {
        writer.execute("UPDATE kv SET v = $1 WHERE k = 0", &[&i]).await.unwrap();
        let v: i32 = reader.query_one("SELECT v FROM kv WHERE k = 0", &[]).await.unwrap().get(0);
        assert_eq!(v, i, "connection B read a stale value");
    }
}

#[tokio::test]
async fn causal_token_carries_to_a_new_connection() {
    let env = delayed("read_your_writes = \"session\"").await;
    let a = env.client().await;
    for i in 1..=5 {
        a.execute("UPDATE kv SET v = $1 WHERE k = 3", &[&(100 + i)]).await.unwrap();
        let token = show(&a, "pgnear.write_lsn").await;
        assert!(token.contains('/'), "token {token:?}");
        let c = connect(&env.conn_string("postgres", &format!("options='-c pgnear.min_lsn={token}'")))
            .await
            .unwrap();
        assert_eq!(show(&c, "pgnear.min_lsn").await, token);
        let v: i32 = c.query_one("SELECT v FROM kv WHERE k = 3", &[]).await.unwrap().get(0);
        assert_eq!(v, 100 + i, "a connection holding the token read a stale value");
        // The same through SET on an existing connection.
        let d = env.client().await;
        d.simple_query(&format!("SET pgnear.min_lsn = '{token}'")).await.unwrap();
        let v: i32 = d.query_one("SELECT v FROM kv WHERE k = 3", &[]).await.unwrap().get(0);
        assert_eq!(v, 100 + i);
    }
}

#[tokio::test]
async fn replica_wait_serves_the_read_from_the_replica() {
    let env = delayed("read_your_writes = \"session\"\nreplica_wait_ms = 3000").await;
    let c = env.client().await;
    let replica = env.cluster.replica(0).port() as i32;
    let mut on_replica = 0;
    for i in 1..=5 {
        c.execute("UPDATE kv SET v = $1 WHERE k = 5", &[&i]).await.unwrap();
        let row = c.query_one("SELECT v, inet_server_port() FROM kv WHERE k = 5", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
        on_replica += i32::from(row.get::<_, i32>(1) == replica);
    }
    assert_eq!(on_replica, 5, "reads should wait for the replica rather than go to the primary");
}

#[tokio::test]
async fn lagging_replica_leaves_rotation_and_returns() {
    let config = ProxyConfig::default().section("[routing]\nmax_replica_lag_ms = 500");
    let env = start(Cluster::builder().replica(), config).await;
    let c = env.client().await;
    let replica_port = env.cluster.replica(0).port() as i32;
    let port = || async { c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get::<_, i32>(0) };
    let until = |want_replica: bool| async move {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let on_replica = port().await == replica_port;
            if on_replica == want_replica {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "reads never moved (want replica: {want_replica})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    until(true).await;
    let replica = env.cluster.replica(0).connect().await.unwrap();
    replica.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    let primary = env.cluster.primary().connect().await.unwrap();
    primary.batch_execute("CREATE TABLE lag_probe (x int)").await.unwrap();
    // Keep writing so the replica falls behind in time, not only bytes.
    let writer = tokio::spawn(async move {
        for i in 0..200 {
            primary.execute("INSERT INTO lag_probe VALUES ($1)", &[&i]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        primary
    });
    until(false).await;
    // Lag accuracy: with replay paused and writes stopped, the monitor's
    // byte lag settles on what pg_stat_replication reports.
    let primary = writer.await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let expected: i64 = primary
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::int8 FROM pg_stat_replication",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let view = ClusterView::capture(&env.proxy.shared().topology);
        let measured = view.nodes[1].lag_bytes.unwrap_or(0) as i64;
        if measured == expected && expected > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "monitor lag {measured} never matched {expected}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replica.batch_execute("SELECT pg_wal_replay_resume()").await.unwrap();
    until(true).await;
}

/// A client that wrote and then went quiet still receives, unasked, a
/// ParameterStatus `pgnear.write_lsn` at or past its last write, also
/// after a run of writes long enough for pgnear's re-checks to find the
/// session busy and back off.
#[tokio::test]
async fn a_quiet_client_receives_its_write_lsn_unasked() {
    use crate::support::wire::{query, Wire};
    let env = delayed("read_your_writes = \"session\"").await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let busy_until = tokio::time::Instant::now() + Duration::from_millis(400);
    let mut written = Lsn(0);
    let mut round = 0;
    while round < 10 || tokio::time::Instant::now() < busy_until {
        round += 1;
        let sql =
            format!("UPDATE kv SET v = {round} WHERE k = 7 RETURNING pg_current_wal_insert_lsn()::text");
        wire.send(&query(&sql)).await;
        let msgs = wire.until_ready().await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "the write failed: {msgs:?}");
        let row = msgs.iter().find(|m| m.tag == b'D').expect("the write returned no row");
        let column = row.columns()[0].clone().expect("no LSN");
        written = std::str::from_utf8(&column).unwrap().parse().unwrap();
    }
    // Quiet from here: only pgnear speaks. Reports of earlier writes may
    // come first; the one covering the last write must follow.
    loop {
        let msg = wire.recv().await.expect("pgnear closed the connection");
        assert_eq!(msg.tag, b'S', "only ParameterStatus may arrive unasked: {msg:?}");
        let mut fields = msg.body.split(|&b| b == 0);
        if fields.next() != Some(b"pgnear.write_lsn".as_slice()) {
            continue;
        }
        let value: Lsn = std::str::from_utf8(fields.next().unwrap_or_default()).unwrap().parse().unwrap();
        if value >= written {
            break;
        }
    }
}

/// A session starts from the proxy-wide watermark, so that a reconnecting
/// client reads what it wrote; but `pgnear.write_lsn` reports the session's
/// own writes. One that never wrote is sent nothing unasked while it
/// waits (PgJDBC, waiting for notifications, fails on a ParameterStatus),
/// even when it starts while another session's write is still unresolved.
#[tokio::test]
async fn a_session_that_never_wrote_is_not_sent_write_lsn() {
    use crate::support::wire::{query, Wire};
    // A probe a second: the write stays unresolved for up to that long.
    let config = ProxyConfig::default()
        .section("[consistency]\nread_your_writes = \"session\"")
        .monitor("interval_ms = 1000");
    let env = start(Cluster::builder().delayed_replica(DELAY), config).await;
    env.client().await.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v int)").await.unwrap();
    let (mut writer, _) = Wire::login(env.proxy.addr(), "postgres").await;
    writer.send(&query("INSERT INTO kv VALUES (1, 1)")).await;
    let msgs = writer.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "the write failed: {msgs:?}");
    // Logged in while the write's watermark is pending, and quiet.
    let (mut reader, _) = Wire::login(env.proxy.addr(), "postgres").await;
    // The writer is told once the watermark resolves (a probe after the
    // write, and the re-check half a probe interval later)...
    let report = tokio::time::timeout(Duration::from_secs(10), writer.recv()).await;
    let report = report.expect("the writer was not sent its write_lsn").expect("pgnear closed the writer");
    assert_eq!(report.tag, b'S', "only ParameterStatus may arrive unasked: {report:?}");
    assert!(report.body.starts_with(b"pgnear.write_lsn\0"), "{report:?}");
    // ... and the reader, whose re-check would have come as soon, is not.
    let unasked = tokio::time::timeout(Duration::from_millis(1500), reader.recv()).await;
    assert!(unasked.is_err(), "a session that never wrote was sent {unasked:?}");
    // It still reads the write: routing uses the watermark it started from.
    reader.send(&query("SELECT v FROM kv WHERE k = 1")).await;
    let msgs = reader.until_ready().await;
    let row = msgs.iter().find(|m| m.tag == b'D').expect("the reader did not see the write");
    assert_eq!(row.columns()[0].as_deref(), Some(b"1".as_slice()));
}
