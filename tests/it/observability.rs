//! The admin listener against real servers: `/metrics` counts what was
//! sent, `/health` follows a paused and a stopped replica, `/ready` waits
//! for a primary, the scrape passes `promtool check metrics`, and no
//! password or secret reaches the logs or the metrics.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgnear::lab::cluster::{AuthMethod, Cluster};
use pgnear::Proxy;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{connect, sqlstate, start, Env, ProxyConfig, PATIENCE};

fn with_admin() -> ProxyConfig {
    ProxyConfig::default().proxy("admin_listen = \"127.0.0.1:0\"")
}

/// An HTTP answer: status, headers (lower-cased names) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection, read to its close.
async fn request(addr: SocketAddr, method: &str, path: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {raw:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer { status, headers, body: body.to_string() }
}

async fn get(env: &Env, path: &str) -> Answer {
    request(env.proxy.admin_addr().expect("admin_listen is set"), "GET", path).await
}

async fn scrape(env: &Env) -> String {
    let answer = get(env, "/metrics").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

/// The sum of every sample of `name` whose labels include `labels`
/// (0 when there is none).
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

/// The port of the server that ran `SELECT inet_server_port()`.
async fn server_port(client: &Client) -> u16 {
    let messages = client.simple_query("SELECT inet_server_port()").await.unwrap();
    let port = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    });
    port.unwrap().parse().unwrap()
}

/// Polls until a read runs on the replica: a session's writes keep its
/// reads on the primary until they have replayed.
async fn until_reads_reach_the_replica(env: &Env, client: &Client) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server_port(client).await != env.cluster.replica(0).port() {
        assert!(tokio::time::Instant::now() < deadline, "reads never reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/health` until `check` holds for the named node; returns the
/// whole document.
async fn until_node(env: &Env, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let health = get(env, "/health").await.json();
        let node = health["nodes"].as_array().unwrap().iter().find(|n| n["name"] == name).cloned();
        if check(&node.unwrap_or_else(|| panic!("{name} missing from {health}"))) {
            return health;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} never became {what}: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a path until it answers `status`.
async fn until_status(env: &Env, path: &str, status: u16) -> Answer {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = get(env, path).await;
        if answer.status == status {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {status}; last {} {}",
            answer.status,
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pipes a scrape into `promtool check metrics`. Without promtool the check
/// is skipped, unless `PGNEAR_REQUIRE_PROMTOOL=1` (set by `.ci/run`, which
/// installs it).
fn promtool_check(scrape: &str) {
    let required = std::env::var("PGNEAR_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            eprintln!("note: promtool is not installed; skipping `promtool check metrics`");
            return;
        }
        Err(e) => panic!("cannot run promtool (PGNEAR_REQUIRE_PROMTOOL={required}): {e}"),
    };
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{scrape}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn metrics_count_routed_units_by_node_and_reason() {
    let env = start(Cluster::builder().replica(), with_admin()).await;
    let (primary, replica) = (env.cluster.primary().name(), env.cluster.replica(0).name());
    let client = env.client().await;
    client.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    until_reads_reach_the_replica(&env, &client).await;

    // Extended protocol: a prepare unit executes nothing and is not
    // counted. The statement lives until the end, so no Close unit races
    // the writes below.
    let statement = client.prepare("SELECT inet_server_port()").await.unwrap();

    let before = scrape(&env).await;
    for _ in 0..8 {
        assert_eq!(server_port(&client).await, env.cluster.replica(0).port());
    }
    for _ in 0..2 {
        let port: i32 = client.query_one(&statement, &[]).await.unwrap().get(0);
        assert_eq!(port, i32::from(env.cluster.replica(0).port()));
    }
    for i in 0..3 {
        client.simple_query(&format!("INSERT INTO t VALUES ({i})")).await.unwrap();
    }
    let after = scrape(&env).await;

    let delta =
        |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    let routed = "pgnear_queries_routed_total";
    assert_eq!(delta(routed, &[("node", replica), ("role", "replica"), ("reason", "read")]), 10.0, "{after}");
    assert_eq!(delta(routed, &[("node", primary), ("role", "primary"), ("reason", "write")]), 3.0, "{after}");
    assert_eq!(delta(routed, &[]), 13.0, "nothing else was routed:\n{after}");
    assert!(delta("pgnear_query_duration_seconds_count", &[("node", replica)]) >= 10.0, "{after}");
    assert!(delta("pgnear_query_duration_seconds_count", &[("node", primary)]) >= 3.0, "{after}");
    assert!(delta("pgnear_bytes_total", &[("direction", "client_to_server")]) > 0.0);
    assert!(delta("pgnear_bytes_total", &[("direction", "server_to_client")]) > 0.0);
    assert!(
        delta("pgnear_classify_cache_hits_total", &[]) + delta("pgnear_classify_cache_misses_total", &[])
            > 0.0
    );
    assert_eq!(value(&after, "pgnear_client_connections", &[("state", "active")]), 1.0, "{after}");
    assert!(value(&after, "pgnear_backend_connections", &[("node", replica)]) >= 1.0, "{after}");
    assert!(value(&after, "pgnear_read_your_writes_pins_total", &[]) >= 1.0, "{after}");
    let up = [("node", primary), ("role", "primary"), ("region", "us-east"), ("cluster", "default")];
    assert_eq!(value(&after, "pgnear_node_up", &up), 1.0, "{after}");
    assert_eq!(value(&after, "pgnear_node_role", &[("node", replica), ("role", "replica")]), 1.0);
    assert_eq!(value(&after, "pgnear_node_role", &[("node", replica), ("role", "primary")]), 0.0);
    assert!(after.contains(&format!("pgnear_node_rtt_seconds{{node=\"{replica}\"}}")), "{after}");
    assert!(after.contains(&format!("pgnear_replica_lag_bytes{{node=\"{replica}\"}}")), "{after}");
    assert!(after.contains(&format!("pgnear_replica_lag_seconds{{node=\"{replica}\"}}")), "{after}");
    promtool_check(&after);

    // The connection gauges are guards: a closed client stops counting.
    drop((statement, client));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while value(&scrape(&env).await, "pgnear_client_connections", &[("state", "active")]) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the active client gauge never went back to 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn health_follows_replica_lag_and_a_stopped_replica() {
    let env = start(Cluster::builder().replica(), with_admin()).await;
    let (primary, replica) = (env.cluster.primary().name(), env.cluster.replica(0).name());
    let client = env.client().await;
    client.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (0)").await.unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();

    let health =
        until_node(&env, replica, "caught up", |n| n["lag_bytes"] == 0 && n["lag_ms"].is_number()).await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["region"], "eu-west");
    let nodes = health["nodes"].as_array().unwrap();
    let p = nodes.iter().find(|n| n["name"] == primary).unwrap();
    assert_eq!(
        (p["role"].as_str(), p["region"].as_str(), p["cluster"].as_str()),
        (Some("primary"), Some("us-east"), Some("default"))
    );
    assert_eq!(p["up"], true);
    assert!(p["rtt_ms"].as_f64().unwrap() > 0.0, "{health}");
    until_status(&env, "/health?max_lag_ms=60000", 200).await;

    // Paused replay: the replica falls behind in bytes, then in time.
    let replica_conn = env.cluster.replica(0).connect().await.unwrap();
    replica_conn.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    for i in 1..=3 {
        client.simple_query(&format!("INSERT INTO t VALUES ({i})")).await.unwrap();
    }
    until_node(&env, replica, "lagging in bytes", |n| n["lag_bytes"].as_u64().is_some_and(|b| b > 0)).await;
    let lagging = until_status(&env, "/health?max_lag_ms=100", 503).await.json();
    let node = lagging["nodes"].as_array().unwrap().iter().find(|n| n["name"] == replica).unwrap().clone();
    assert!(node["lag_ms"].as_f64().unwrap() > 100.0, "{lagging}");
    assert_eq!(node["up"], true, "a lagging replica is still up: {lagging}");
    replica_conn.batch_execute("SELECT pg_wal_replay_resume()").await.unwrap();
    until_node(&env, replica, "caught up again", |n| n["lag_bytes"] == 0).await;
    until_status(&env, "/health?max_lag_ms=60000", 200).await;

    // A stopped replica goes down after failures_before_down probes.
    drop(replica_conn);
    env.cluster.replica(0).stop().unwrap();
    let health = until_node(&env, replica, "down", |n| n["up"] == false).await;
    assert_eq!(health["status"], "degraded", "{health}");
    let down = get(&env, "/health?max_lag_ms=60000").await;
    assert_eq!(down.status, 503, "no replica in eu-west is up: {}", down.body);
    let metrics = scrape(&env).await;
    let up = [("node", replica), ("role", "replica"), ("region", "eu-west"), ("cluster", "default")];
    assert_eq!(value(&metrics, "pgnear_node_up", &up), 0.0, "{metrics}");
    promtool_check(&metrics);
}

#[tokio::test]
async fn ready_waits_for_a_primary_and_unknown_paths_are_404() {
    let cluster = Cluster::builder().start().await.unwrap();
    let config = with_admin().build(&cluster);
    cluster.primary().stop().unwrap();
    let env = Env { proxy: Proxy::start(config).await.unwrap(), cluster };
    let waiting = get(&env, "/ready").await;
    assert_eq!(waiting.status, 503, "{}", waiting.body);
    let health = get(&env, "/health").await;
    assert_eq!((health.status, health.json()["status"].as_str()), (200, Some("degraded")));
    env.cluster.primary().start().await.unwrap();
    let ready = until_status(&env, "/ready", 200).await;
    assert_eq!(ready.body, "ready\n");

    let metrics = get(&env, "/metrics").await;
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    let health = get(&env, "/health").await;
    assert_eq!(health.header("content-type"), Some("application/json"));
    assert_eq!(health.json()["status"], "ok", "{}", health.body);
    assert_eq!(get(&env, "/nope").await.status, 404);
    assert_eq!(get(&env, "/metrics/extra").await.status, 404);
    assert_eq!(get(&env, "/health?max_lag_ms=soon").await.status, 400);
    let post = request(env.proxy.admin_addr().unwrap(), "POST", "/metrics").await;
    assert_eq!((post.status, post.header("allow")), (405, Some("GET, HEAD")));

    // The listener stops with the proxy.
    let admin = env.proxy.admin_addr().unwrap();
    env.proxy.shutdown().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while TcpStream::connect(admin).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the admin listener outlived the proxy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const CLIENT_PW: &str = "client-pw-Lm77q";
const SERVER_PW: &str = "server-pw-Xr55k";
const WRONG_PW: &str = "wrong-pw-Qa19z";
const MD5_PW: &str = "md5-pw-Kd02j";
const BAD_SERVER_PW: &str = "bad-server-pw-Tt63w";
const PARAM: &str = "param-secret-Vb42h";

/// The subscriber is the test thread's own (scoped, not global). pgnear
/// starts on that thread, and its session loops, two here, log through
/// the starting thread's subscriber, so the capture sees every task.
#[tokio::test]
async fn no_secret_reaches_the_logs_or_the_metrics() {
    let cluster = Cluster::builder().auth(AuthMethod::Scram).user("app", SERVER_PW).start().await.unwrap();
    let config = with_admin()
        .proxy("worker_threads = 2")
        .user(&format!("name = \"app\"\npassword = \"{CLIENT_PW}\"\nserver_password = \"{SERVER_PW}\""))
        .user(&format!("name = \"md5_user\"\npassword = \"{MD5_PW}\"\nauth = \"md5\"\nserver_user = \"app\"\nserver_password = \"{SERVER_PW}\""))
        .user(&format!("name = \"misconfigured\"\npassword = \"{CLIENT_PW}\"\nserver_user = \"app\"\nserver_password = \"{BAD_SERVER_PW}\""))
        .monitor(&format!("interval_ms = 20\nuser = \"app\"\npassword = \"{SERVER_PW}\""));
    let capture = Capture::default();
    let subscriber = {
        let capture = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace,pgnear::lab=off"))
            .with_ansi(false)
            .with_writer(move || capture.clone())
            .finish()
    };
    let _guard = tracing::subscriber::set_default(subscriber);
    let env = Env { proxy: Proxy::start(config.build(&cluster)).await.unwrap(), cluster };

    // A full SCRAM exchange with the client, and one with the server.
    let app = connect(&env.conn_string("app", &format!("password={CLIENT_PW}"))).await.unwrap();
    let row = app.query_one("SELECT $1::text", &[&PARAM]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), PARAM);
    // Wrong passwords, SCRAM and md5, and a server that refuses pgnear.
    assert_eq!(sqlstate(connect(&env.conn_string("app", &format!("password={WRONG_PW}"))).await), "28P01");
    let wrong_md5 = connect(&env.conn_string("md5_user", &format!("password={WRONG_PW}"))).await;
    assert_eq!(sqlstate(wrong_md5), "28P01");
    let md5 = connect(&env.conn_string("md5_user", &format!("password={MD5_PW}"))).await.unwrap();
    md5.simple_query("SELECT 1").await.unwrap();
    let refused = connect(&env.conn_string("misconfigured", &format!("password={CLIENT_PW}"))).await;
    assert_eq!(sqlstate(refused), "28P01");
    let metrics = scrape(&env).await;
    assert!(value(&metrics, "pgnear_errors_total", &[("class", "auth")]) >= 2.0, "{metrics}");
    drop((app, md5));
    env.proxy.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("auth"), "the capture saw the refused logins:\n{logs}");
    for secret in [CLIENT_PW, SERVER_PW, WRONG_PW, MD5_PW, BAD_SERVER_PW, PARAM] {
        assert!(!logs.contains(secret), "{secret} appears in the logs:\n{logs}");
        assert!(!metrics.contains(secret), "{secret} appears in the metrics:\n{metrics}");
    }
}
