//! A bound on the staleness of reads (`/* pgnear:max_staleness_ms=N */`,
//! `pgnear.max_staleness_ms`) against a replica that applies WAL 2 s late
//! while the primary keeps writing: the replica is steadily about 2 s
//! behind.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use pgnear::router::ClusterView;
use tokio_postgres::Client;

use crate::support::{connect, first_value, routed, show, sqlstate, start, Env, ProxyConfig, PATIENCE};

const DELAY: Duration = Duration::from_secs(2);

/// Writes on the primary every 20 ms until dropped, so that the delayed
/// replica's lag stays about `DELAY`.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The delayed replica, a table, and the heartbeat; returns once the
/// monitor measures the replica more than a second behind.
async fn lagging() -> (Env, Heartbeat) {
    let config = ProxyConfig::default()
        .section("[consistency]\nread_your_writes = \"session\"")
        .section("[routing]\nmax_replica_lag_ms = 600000");
    let env = start(Cluster::builder().delayed_replica(DELAY), config).await;
    // Made on the primary directly: no session of pgnear wrote.
    let primary = env.cluster.primary().connect().await.unwrap();
    primary
        .batch_execute(
            "CREATE TABLE kv (k int PRIMARY KEY, v int); INSERT INTO kv VALUES (1, 0);
             CREATE TABLE beat (at timestamptz)",
        )
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let heartbeat = Heartbeat(tokio::spawn(async move {
        loop {
            if primary.batch_execute("INSERT INTO beat VALUES (now())").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = ClusterView::capture(&env.proxy.shared().topology);
        if view.nodes[1].lag.is_some_and(|lag| lag > Duration::from_secs(1)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the replica never lagged: {:?}", view.nodes[1].lag);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (env, heartbeat)
}

/// The node that served the session's last statement.
async fn node(client: &Client) -> String {
    show(client, "pgnear.node").await
}

/// Runs `sql` over the simple protocol; returns the first column of its
/// first row.
async fn simple(client: &Client, sql: &str) -> String {
    first_value(client, sql).await.unwrap_or_default()
}

#[tokio::test]
async fn a_hinted_bound_keeps_read_your_writes_unless_it_opts_out() {
    let (env, _heartbeat) = lagging().await;
    let (primary, replica) = (env.cluster.primary().name(), env.cluster.replica(0).name());
    let c = env.client().await;
    // Connected before `c` writes: a new session starts from the writes
    // of every session.
    let other = env.client().await;
    // tokio-postgres's `query` uses the extended protocol.
    let read = |hint: &'static str| {
        let c = &c;
        async move {
            let sql = format!("/* {hint} */ SELECT v FROM kv WHERE k = 1");
            c.query_one(sql.as_str(), &[]).await.unwrap().get::<_, i32>(0)
        }
    };
    // Without a write, a bound over the lag lets the replica serve.
    read("pgnear:max_staleness_ms=60000").await;
    assert_eq!(node(&c).await, replica);
    // Right after a write, the bound alone still reads the write: the
    // replica, 2 s late, has not replayed it.
    c.execute("UPDATE kv SET v = 1 WHERE k = 1", &[]).await.unwrap();
    assert_eq!(read("pgnear:max_staleness_ms=60000").await, 1);
    assert_eq!(node(&c).await, primary);
    // With the explicit opt-out, the replica within the bound serves it.
    c.execute("UPDATE kv SET v = 2 WHERE k = 1", &[]).await.unwrap();
    read("pgnear: max_staleness_ms = 60000, read_your_writes = off").await;
    assert_eq!(node(&c).await, replica);
    // A bound under the replica's lag keeps the read on the primary, opted
    // out or not, counted as a rule's.
    let rules = routed(&env, "rule");
    for hint in ["pgnear:max_staleness_ms=300", "pgnear:max_staleness_ms=300,read_your_writes=off"] {
        read(hint).await;
        assert_eq!(node(&c).await, primary, "{hint}");
    }
    assert_eq!(routed(&env, "rule") - rules, 2);
    // A malformed hint is an ordinary comment: a read of a session that
    // did not write routes as without it.
    let sql = "/* pgnear:max_staleness_ms=-300 */ SELECT v FROM kv WHERE k = 1";
    other.query_one(sql, &[]).await.unwrap();
    assert_eq!(node(&other).await, replica);
}

#[tokio::test]
async fn the_session_bound_is_set_shown_reset_and_discarded() {
    let (env, _heartbeat) = lagging().await;
    let (primary, replica) = (env.cluster.primary().name(), env.cluster.replica(0).name());
    let c = env.client().await;
    let read = "SELECT v FROM kv WHERE k = 1";
    assert_eq!(show(&c, "pgnear.max_staleness_ms").await, "");
    assert_eq!(show(&c, "pgnear.read_your_writes").await, "on");
    simple(&c, read).await;
    assert_eq!(node(&c).await, replica);
    // Over the simple protocol: SET, SHOW, and the bound at work.
    c.simple_query("SET pgnear.max_staleness_ms = 300").await.unwrap();
    assert_eq!(show(&c, "pgnear.max_staleness_ms").await, "300");
    simple(&c, read).await;
    assert_eq!(node(&c).await, primary);
    // A hint overrides the session's bound for its statement.
    simple(&c, "/* pgnear:max_staleness_ms=60000 */ SELECT v FROM kv WHERE k = 1").await;
    assert_eq!(node(&c).await, replica);
    for bad in ["-5", "'soon'", "1.5"] {
        let error = c.simple_query(&format!("SET pgnear.max_staleness_ms = {bad}")).await;
        assert_eq!(sqlstate(error), "22023", "{bad}");
    }
    assert_eq!(show(&c, "pgnear.max_staleness_ms").await, "300", "a bad value changed the setting");
    c.simple_query("RESET pgnear.max_staleness_ms").await.unwrap();
    assert_eq!(show(&c, "pgnear.max_staleness_ms").await, "");
    simple(&c, read).await;
    assert_eq!(node(&c).await, replica);
    // The session's opt-out: a replica within the bound right after a write.
    c.simple_query("SET pgnear.max_staleness_ms = 60000").await.unwrap();
    c.simple_query("UPDATE kv SET v = 3 WHERE k = 1").await.unwrap();
    assert_eq!(simple(&c, read).await, "3");
    assert_eq!(node(&c).await, primary, "read-your-writes holds by default");
    c.simple_query("SET pgnear.read_your_writes = off").await.unwrap();
    assert_eq!(show(&c, "pgnear.read_your_writes").await, "off");
    c.simple_query("UPDATE kv SET v = 4 WHERE k = 1").await.unwrap();
    simple(&c, read).await;
    assert_eq!(node(&c).await, replica);
    // ... which a hint can turn back on for one statement.
    c.simple_query("UPDATE kv SET v = 5 WHERE k = 1").await.unwrap();
    assert_eq!(simple(&c, "/* pgnear:read_your_writes=on */ SELECT v FROM kv WHERE k = 1").await, "5");
    assert_eq!(node(&c).await, primary);
    // DISCARD ALL forgets both.
    c.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(show(&c, "pgnear.max_staleness_ms").await, "");
    assert_eq!(show(&c, "pgnear.read_your_writes").await, "on");
    // From the startup options.
    let bounded = connect(&env.conn_string("postgres", "options='-c pgnear.max_staleness_ms=300'")).await;
    let bounded = bounded.unwrap();
    assert_eq!(show(&bounded, "pgnear.max_staleness_ms").await, "300");
    simple(&bounded, read).await;
    assert_eq!(node(&bounded).await, primary);
    let refused = connect(&env.conn_string("postgres", "options='-c pgnear.max_staleness_ms=never'")).await;
    assert_eq!(sqlstate(refused), "22023");
}
