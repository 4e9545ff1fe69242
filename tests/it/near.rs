//! Read-after-write at local speed: the primary across a WAN link, and the
//! local replica receiving its WAL over a link of the same delay, as a real
//! transatlantic replica does. Each write's commit LSN comes back in the
//! same flight as the write (a probe pipelined behind it), and the read
//! right after it waits on the local replica instead of crossing the
//! ocean. What is asserted is where each read ran (`inet_server_port()`)
//! and that it saw the write, never how long it took.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use pgnear::lab::relay::Relay;
use pgnear::Proxy;
use tokio_postgres::Client;

use crate::support::{connect, run_tool, show, ProxyConfig, PATIENCE};

/// One-way delay of both WAN links: enough to tell a local read from one
/// that crossed, short enough for CI.
const WAN: Duration = Duration::from_millis(20);

/// The primary behind one relay, the replica streaming through another.
struct Near {
    // Field order is drop order: the proxy goes before what it uses.
    proxy: Proxy,
    _to_primary: Relay,
    wal: Relay,
    cluster: Cluster,
}

fn node(name: &str, port: u16, region: &str) -> String {
    format!("[[nodes]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\nregion = \"{region}\"\n\n")
}

async fn near(extra: ProxyConfig) -> Near {
    let cluster = Cluster::builder().replica().start().await.unwrap();
    let to_primary = Relay::start(cluster.primary().addr(), WAN).await.unwrap();
    let wal = Relay::start(cluster.primary().addr(), WAN).await.unwrap();
    cluster.replica(0).stream_from(wal.addr()).await.unwrap();
    let primary = cluster.primary().connect().await.unwrap();
    primary
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v int); INSERT INTO kv SELECT g, 0 FROM generate_series(0, 15) g")
        .await
        .unwrap();
    cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let nodes = node("us-primary", to_primary.port(), "us-east")
        + &node("eu-replica", cluster.replica(0).port(), "eu-west");
    // The default monitor interval (50 ms), as a user runs it.
    let config = extra.nodes(&nodes).monitor("interval_ms = 50");
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    let near = Near { proxy, _to_primary: to_primary, wal, cluster };
    near.wait_until_known().await;
    near
}

impl Near {
    async fn client(&self, extra: &str) -> Client {
        let addr = self.proxy.addr();
        connect(&format!("host={} port={} user=postgres dbname=postgres {extra}", addr.ip(), addr.port()))
            .await
            .unwrap()
    }

    fn replica_port(&self) -> i32 {
        i32::from(self.cluster.replica(0).port())
    }

    /// Waits until plain reads reach the replica: the monitor knows both
    /// nodes, their roles and the primary's round trip.
    async fn wait_until_known(&self) {
        let client = self.client("").await;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while read(&client, 0).await.1 != self.replica_port() {
            assert!(tokio::time::Instant::now() < deadline, "reads never reached the replica");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.proxy.shared().metrics.render(&self.proxy.shared().scrape()).unwrap();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// `v` of row `k`, and the port of the server that answered.
async fn read(client: &Client, k: i32) -> (i32, i32) {
    let row = client.query_one("SELECT v, inet_server_port() FROM kv WHERE k = $1", &[&k]).await.unwrap();
    (row.get(0), row.get(1))
}

/// Counts of reads that were stale and that the replica served.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    stale: u32,
    local: u32,
    reads: u32,
}

impl Tally {
    fn add(&mut self, (v, port): (i32, i32), expected: i32, replica: i32) {
        self.reads += 1;
        self.stale += u32::from(v != expected);
        self.local += u32::from(port == replica);
    }

    /// No stale read, and (nearly) every one served by the replica: a read
    /// sent to the primary here would have crossed the WAN twice.
    #[track_caller]
    fn assert_local(&self, what: &str) {
        assert_eq!(self.stale, 0, "{what}: stale reads in {self:?}");
        assert!(
            self.local * 10 >= self.reads * 9,
            "{what}: reads right after a write left the region: {self:?}"
        );
    }
}

const ROUNDS: i32 = 20;

#[tokio::test]
async fn the_read_right_after_a_write_is_served_by_the_local_replica() {
    let near = near(ProxyConfig::default()).await;
    let client = near.client("").await;
    let replica = near.replica_port();
    let (mut now, mut later) = (Tally::default(), Tally::default());
    for i in 1..=ROUNDS {
        // Extended protocol: Parse, Bind, Execute, Sync.
        client.execute("UPDATE kv SET v = $1 WHERE k = 1", &[&i]).await.unwrap();
        now.add(read(&client, 1).await, i, replica);
        tokio::time::sleep(Duration::from_millis(50)).await;
        later.add(read(&client, 1).await, i, replica);
    }
    now.assert_local("extended protocol, at once");
    later.assert_local("extended protocol, 50 ms later");
    // Simple protocol, and a transaction block that commits.
    let mut simple = Tally::default();
    for i in 1..=ROUNDS {
        client.batch_execute(&format!("UPDATE kv SET v = {i} WHERE k = 2")).await.unwrap();
        simple.add(read(&client, 2).await, i, replica);
        client.batch_execute(&format!("BEGIN; UPDATE kv SET v = {} WHERE k = 2", -i)).await.unwrap();
        client.batch_execute("COMMIT").await.unwrap();
        simple.add(read(&client, 2).await, -i, replica);
    }
    simple.assert_local("simple protocol and transactions");
    assert!(near.metric("pgnear_watermark_probes_total{result=\"lsn\"}").await >= f64::from(3 * ROUNDS));
    assert!(near.metric("pgnear_replica_waits_total{outcome=\"caught_up\"}").await > 0.0);
}

#[tokio::test]
async fn other_connections_and_causal_tokens_read_the_write_locally() {
    let near = near(ProxyConfig::default().section("[consistency]\nread_your_writes = \"proxy\"")).await;
    let writer = near.client("").await;
    let reader = near.client("").await;
    let replica = near.replica_port();
    let (mut proxy, mut token) = (Tally::default(), Tally::default());
    for i in 1..=ROUNDS {
        writer.execute("UPDATE kv SET v = $1 WHERE k = 3", &[&i]).await.unwrap();
        // The token is the write's exact LSN, known as soon as the write's
        // reply: SHOW answers at once.
        let lsn = show(&writer, "pgnear.write_lsn").await;
        proxy.add(read(&reader, 3).await, i, replica);
        let carrier = near.client(&format!("options='-c pgnear.min_lsn={lsn}'")).await;
        token.add(read(&carrier, 3).await, i, replica);
    }
    proxy.assert_local("proxy scope");
    token.assert_local("causal token");
}

#[tokio::test]
async fn transaction_pooling_consumes_the_probe_before_giving_the_connection_back() {
    let config = ProxyConfig::default().proxy("pool_mode = \"transaction\"\npool_size = 2");
    let near = near(config).await;
    let replica = near.replica_port();
    let mut tally = Tally::default();
    let clients = [near.client("").await, near.client("").await, near.client("").await];
    for i in 1..=ROUNDS {
        for (k, client) in (4..).zip(&clients) {
            client.execute("UPDATE kv SET v = $1 WHERE k = $2", &[&i, &k]).await.unwrap();
            tally.add(read(client, k).await, i, replica);
            // The pooled connection answers this client's next statement
            // with nothing of the probe left on it.
            let one: i32 = client.query_one("SELECT 1 + $1", &[&0i32]).await.unwrap().get(0);
            assert_eq!(one, 1);
        }
    }
    tally.assert_local("transaction pooling");
}

#[tokio::test]
async fn a_commit_that_never_comes_leaves_nothing_behind() {
    let near = near(ProxyConfig::default()).await;
    let client = near.client("").await;
    client.batch_execute("BEGIN; UPDATE kv SET v = 7 WHERE k = 9").await.unwrap();
    // The COMMIT is skipped by the failed statement before it: the block is
    // left failed, not closed. The probe pipelined behind it fails too,
    // unseen: the client sees its own error only.
    let error = client.batch_execute("UPDATE kv SET v = 1 / 0 WHERE k = 9; COMMIT").await.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("22012"), "{error}");
    let aborted = client.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(aborted.code().map(|c| c.code()), Some("25P02"), "{aborted}");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(read(&client, 9).await.0, 0, "the rolled-back write is gone");
    // COPY FROM STDIN: in the extended protocol (tokio-postgres) the probe
    // follows the Sync after CopyDone; in the simple protocol (psql's
    // \copy) it follows the CopyDone itself, never the COPY's Query.
    let sink = client.copy_in("COPY kv FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    futures_util::SinkExt::send(&mut sink, bytes::Bytes::from_static(b"100\t1\n101\t2\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    assert_eq!(read(&client, 101).await.0, 2);
    let file = std::env::temp_dir().join(format!("pgnear-near-copy-{}.tsv", std::process::id()));
    std::fs::write(&file, "102\t3\n103\t4\n").unwrap();
    let addr = near.proxy.addr();
    let conn = format!("host={} port={} user=postgres dbname=postgres", addr.ip(), addr.port());
    let copy = format!("\\copy kv FROM '{}'", file.display());
    let out =
        run_tool("psql", &["-X", "-d", &conn, "-c", &copy, "-c", "SELECT v FROM kv WHERE k = 103"]).await;
    std::fs::remove_file(&file).unwrap();
    assert!(out.contains("COPY 2") && out.contains(" 4\n"), "{out}");
    // Two COPYs in one Query (its probe follows the second's CopyDone, not
    // the first's), and COPY FROM STDOUT, PostgreSQL's synonym for STDIN.
    let two = "COPY kv FROM STDIN; COPY kv FROM STDOUT";
    let out = run_tool("psql", &["-X", "-d", &conn, "-c", two, "-c", "SELECT 40 + 2"]).await;
    assert!(out.matches("COPY 0").count() == 2 && out.contains("42"), "{out}");
    assert_eq!(near.metric("pgnear_watermark_probes_total{result=\"failed\"}").await, 1.0);
    assert!(near.metric("pgnear_watermark_probes_total{result=\"lsn\"}").await >= 3.0);
}

#[tokio::test]
async fn no_probe_runs_inside_a_block_the_client_left_open() {
    let near = near(ProxyConfig::default()).await;
    let a = near.client("").await;
    let b = near.client("").await;
    // A write that commits, then a REPEATABLE READ block left open, in one
    // Query: a probe behind it would be the block's first statement and
    // take its snapshot now.
    let sql = "UPDATE kv SET v = 1 WHERE k = 10; COMMIT; BEGIN ISOLATION LEVEL REPEATABLE READ";
    a.batch_execute(sql).await.unwrap();
    b.execute("UPDATE kv SET v = 2 WHERE k = 10", &[]).await.unwrap();
    // The snapshot is taken by a's first statement in the block: after
    // b's commit.
    assert_eq!(read(&a, 10).await.0, 2, "the block's snapshot was taken before its first statement");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(read(&a, 10).await.0, 2);
}

#[tokio::test]
async fn a_replica_that_does_not_catch_up_in_time_leaves_the_read_to_the_primary() {
    let near = near(ProxyConfig::default()).await;
    let client = near.client("").await;
    // The replica stops receiving WAL: it has replayed all it has, so a read
    // waits on it, for at most the primary's round trip, and then goes to
    // the primary with no error.
    near.wal.partition();
    let primary = i32::from(near.cluster.primary().port());
    for i in 1..=3 {
        client.execute("UPDATE kv SET v = $1 WHERE k = 12", &[&i]).await.unwrap();
        assert_eq!(read(&client, 12).await, (i, primary), "the read must see the write, on the primary");
    }
    assert!(near.metric("pgnear_replica_waits_total{outcome=\"timed_out\"}").await >= 1.0);
    near.wal.heal();
}
