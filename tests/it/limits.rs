//! Limits and timeouts: the startup timeout, the idle client timeout, the
//! server connect timeout, PostgreSQL's own statement_timeout, and 10,000
//! connections that never speak.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::support::certs::{tls_section, Ca};
use crate::support::wire::{startup_packet, Wire};
use crate::support::{sqlstate, start, Env, ProxyConfig, PATIENCE};
use pgnear::lab::cluster::Cluster;

#[tokio::test]
async fn startup_timeout_drops_clients_that_stall() {
    let ca = Ca::new("ca");
    let cert = ca.server("pgnear", &["127.0.0.1"]);
    let config = ProxyConfig::default()
        .proxy("startup_timeout_ms = 300")
        .user("name = \"app\"\npassword = \"secret\"\nserver_user = \"postgres\"")
        .section(&tls_section("prefer", &cert));
    let env = start(Cluster::builder(), config).await;
    let bystander = env.client().await;
    // Half a startup packet, then nothing.
    let mut half = Wire::connect(env.proxy.addr()).await;
    half.send(&startup_packet(&[("user", "postgres")])[..10]).await;
    // Not a byte.
    let mut silent = Wire::connect(env.proxy.addr()).await;
    // Asked for the password, never answers.
    let mut mute = Wire::connect(env.proxy.addr()).await;
    mute.send(&startup_packet(&[("user", "app")])).await;
    assert_eq!(mute.recv().await.map(|m| m.tag), Some(b'R'));
    for wire in [&mut half, &mut silent, &mut mute] {
        assert_eq!(wire.expect_fatal().await, "08P01");
    }
    // Asked for TLS, then never starts the handshake: only a close is
    // possible.
    let mut stalled = Wire::connect(env.proxy.addr()).await;
    stalled.send(&[0, 0, 0, 8, 4, 210, 22, 47]).await;
    let mut answer = [0u8; 1];
    stalled.stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    stalled.expect_closed().await;
    assert_eq!(bystander.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

/// On two session loops whatever the machine: their idle timers are
/// served by the service loop.
#[tokio::test]
async fn idle_clients_are_closed_with_57p05() {
    let config = ProxyConfig::default().proxy("idle_client_timeout_ms = 300\nworker_threads = 2");
    let env = start(Cluster::builder(), config).await;
    let (mut idle, _) = Wire::login(env.proxy.addr(), "postgres").await;
    // A query that runs longer than the timeout is not idleness, and
    // neither is a client that keeps asking within it.
    let busy = env.client().await;
    let chatty = env.client().await;
    let chatter = async {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            chatty.batch_execute("SELECT 1").await.unwrap();
        }
    };
    let (slept, ()) = tokio::join!(busy.batch_execute("SELECT pg_sleep(0.8)"), chatter);
    slept.unwrap();
    assert_eq!(idle.expect_fatal().await, "57P05");
    assert_eq!(chatty.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn statement_timeout_stays_postgresqls_own() {
    let env = start(Cluster::builder(), ProxyConfig::default()).await;
    let client = env.client_with("postgres", "options='-c statement_timeout=200'").await;
    assert_eq!(sqlstate(client.batch_execute("SELECT pg_sleep(5)").await), "57014");
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    client.batch_execute("SET statement_timeout = 100").await.unwrap();
    assert_eq!(sqlstate(client.query("SELECT pg_sleep(5)", &[]).await), "57014");
    assert_eq!(client.query_one("SHOW statement_timeout", &[]).await.unwrap().get::<_, &str>(0), "100ms");
}

/// A TCP forwarder that can go silent: from then on it accepts new
/// connections and holds them without a byte, like a partitioned link that
/// still completes TCP handshakes. Connections already forwarded go on.
struct Gate {
    addr: SocketAddr,
    silent: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Gate {
    async fn start(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = Arc::new(AtomicBool::new(false));
        let flag = silent.clone();
        let task = tokio::spawn(async move {
            let mut forwarded = JoinSet::new();
            let mut held = Vec::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    held.push(inbound);
                    continue;
                }
                forwarded.spawn(async move {
                    let mut outbound = TcpStream::connect(target).await?;
                    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                });
            }
        });
        Gate { addr, silent, task }
    }

    fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn server_connect_timeout() {
    let cluster = Cluster::builder().start().await.unwrap();
    let gate = Gate::start(cluster.primary().addr()).await;
    let nodes = format!("[[nodes]]\nname = \"primary\"\nhost = \"127.0.0.1\"\nport = {}\n", gate.addr.port());
    let config = ProxyConfig::default().nodes(&nodes).proxy("connect_timeout_ms = 500");
    let proxy = pgnear::Proxy::start(config.build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let bystander = env.client().await;
    gate.silence();
    let started = Instant::now();
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("user", "postgres"), ("database", "postgres")])).await;
    let error = loop {
        let msg = wire.recv().await.expect("closed without an error");
        if msg.tag == b'E' {
            break msg;
        }
    };
    assert_eq!(error.sqlstate().as_deref(), Some("08001"), "{error:?}");
    let text = error.field(b'M').unwrap_or_default();
    assert!(text.contains("timed out connecting"), "{text}");
    assert!(wire.recv().await.is_none());
    assert!(started.elapsed() < PATIENCE);
    // The session whose server connection was already open is unaffected.
    assert_eq!(bystander.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

const SILENT_CLIENTS: usize = 10_000;
/// Descriptors pgnear opens and closes by itself meanwhile.
const FD_SLACK: usize = 10;
/// Long enough to open them all even on a loaded machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary with one event loop (the default on two cores: half the
/// cores) and with two, in session mode and in transaction pooling (where a pooled
/// connection opened on one loop serves a session on the other): each
/// serves concurrent clients, the extended protocol and a cancel. Each is a
/// session loop beside the service loop, even one (without time drivers:
/// the cancel's connect timeout and the pool's wait use the service
/// loop's), and each really carries sessions.
#[tokio::test]
async fn the_binary_serves_on_one_or_several_event_loops() {
    let cluster = Cluster::builder().start().await.unwrap();
    for (threads, extra) in [(1, ""), (2, ""), (2, "pool_mode = \"transaction\"\npool_size = 3")] {
        let what = format!("worker_threads = {threads} {extra}");
        let toml =
            ProxyConfig::default().proxy(&format!("worker_threads = {threads}\n{extra}")).toml(&cluster);
        let proxy = Process::spawn(env!("CARGO_BIN_EXE_pgnear"), &toml, "pgnear=info").await;
        let addr = proxy.addr;
        let started = std::fs::read_to_string(&proxy.log).unwrap();
        assert!(started.contains(&format!("\"worker_threads\":{threads}")), "{started}");
        let conn = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", addr.port());
        let clients = futures_util::future::join_all((0..8).map(|_| connect_once(&conn))).await;
        let sums = clients.iter().enumerate().map(|(i, client)| async move {
            let mut sum = 0i64;
            for n in 0..50i64 {
                let row = client.query_one("SELECT $1::int8 + $2::int8", &[&n, &(i as i64)]).await.unwrap();
                sum += row.get::<_, i64>(0);
            }
            sum
        });
        let sums = futures_util::future::join_all(sums).await;
        let expected: Vec<i64> = (0..8).map(|i| (0..50).sum::<i64>() + 50 * i).collect();
        assert_eq!(sums, expected, "{what}");
        let loops = loop_threads(proxy.child.id().unwrap());
        assert_eq!(loops.len(), threads, "{what}: {loops:?}");
        for (name, switches) in loops {
            // An idle loop parks once; one carrying four of the clients
            // parks between most of their 200 round trips.
            assert!(switches > 50, "{what}: {name} parked only {switches} times");
        }
        let sleeper = &clients[0];
        let cancel = sleeper.cancel_token();
        let (slept, ()) = tokio::join!(sleeper.batch_execute("SELECT pg_sleep(30)"), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
        });
        assert_eq!(sqlstate(slept), "57014", "{what}");
    }
}

/// SIGTERM (or Ctrl-C) stops new clients and lets the connected ones
/// finish, as PgBouncer does on SIGTERM; a second signal closes them at
/// once, each client told with FATAL 57P01. Without clients the process exits by itself.
#[tokio::test]
async fn a_signal_drains_and_a_second_one_closes_the_sessions() {
    let cluster = Cluster::builder().start().await.unwrap();
    let toml = ProxyConfig::default().toml(&cluster);
    let signal = |child: &tokio::process::Child, name: &str| {
        let pid = child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args([name, &pid]).status().unwrap().success());
    };
    let mut proxy = Process::spawn(env!("CARGO_BIN_EXE_pgnear"), &toml, "pgnear=info").await;
    let conn = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", proxy.addr.port());
    let client = connect_once(&conn).await;
    let (mut idle, _) = Wire::login(proxy.addr, "postgres").await;
    let (mut busy, _) = Wire::login(proxy.addr, "postgres").await;
    signal(&proxy.child, "-TERM");
    // The log says it is draining once the listener has closed.
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&proxy.log).unwrap().contains("draining client sessions") {
        assert!(Instant::now() < deadline, "no drain began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(TcpStream::connect(proxy.addr).await.is_err(), "a new client got in while draining");
    for i in 0..20 {
        let row = client.query_one("SELECT $1::int", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    assert!(proxy.child.try_wait().unwrap().is_none(), "pgnear left before its client did");
    busy.send(&crate::support::wire::query("SELECT pg_sleep(30)")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&proxy.child, "-INT");
    // Idle or running a query, each client is told, as by PostgreSQL's
    // own fast shutdown.
    assert_eq!(idle.expect_fatal().await, "57P01");
    assert_eq!(busy.expect_fatal().await, "57P01");
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait()).await.expect("a second signal").unwrap();
    assert!(status.success(), "{status}");
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "the session outlived pgnear");
    let log = std::fs::read_to_string(&proxy.log).unwrap();
    assert!(log.contains("closing the remaining client sessions"), "{log}");

    // A drain with no client left ends by itself.
    let mut proxy = Process::spawn(env!("CARGO_BIN_EXE_pgnear"), &toml, "pgnear=info").await;
    let conn = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", proxy.addr.port());
    let client = connect_once(&conn).await;
    client.batch_execute("SELECT 1").await.unwrap();
    signal(&proxy.child, "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "pgnear left before its client did");
    drop(client);
    let status = tokio::time::timeout(PATIENCE, proxy.child.wait()).await.expect("the drain to end").unwrap();
    assert!(status.success(), "{status}");
}

/// The extra event-loop threads of process `pid`, each with its count of
/// voluntary context switches (how often it parked waiting for events).
fn loop_threads(pid: u32) -> Vec<(String, u64)> {
    let mut loops = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("pgnear-loop") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        loops.push((comm.trim().to_string(), switches));
    }
    loops
}

/// pgnear runs as its own process here: 10,000 connections are 20,000
/// descriptors in one process, over this machine's limit of 20,000 open
/// files. This also makes the RSS figure pgnear's alone.
///
/// Reproduce the figure with
/// `cargo test --test it limits::ten_thousand -- --nocapture`, and for a
/// release build with `cargo build --release` and `PGNEAR_BIN=target/release/pgnear`.
#[tokio::test]
async fn ten_thousand_connections_that_never_speak() {
    let cluster = Cluster::builder().start().await.unwrap();
    let toml = ProxyConfig::default()
        .proxy(&format!(
            "max_client_connections = 10100\nstartup_timeout_ms = {}",
            STARTUP_TIMEOUT.as_millis()
        ))
        .toml(&cluster);
    // PGNEAR_BIN measures another build, e.g. target/release/pgnear.
    let bin = std::env::var("PGNEAR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pgnear").to_string());
    let mut proxy = Process::spawn(&bin, &toml, "pgnear::proxy=info").await;
    let (pid, addr) = (proxy.child.id().unwrap(), proxy.addr);
    let conn = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", addr.port());
    let client = connect_once(&conn).await;
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let (rss_before, fds_before) = (rss_kib(pid), open_fds(pid));

    let opened = Instant::now();
    let mut silent = Vec::with_capacity(SILENT_CLIENTS);
    // The monitor's and the catalog's own connections come and go.
    let accepted = || open_fds(pid).saturating_sub(fds_before);
    // In batches, each accepted before the next: a full accept queue drops
    // handshakes that the client already counts as connected.
    while silent.len() < SILENT_CLIENTS {
        let batch = (0..100).map(|_| TcpStream::connect(addr));
        silent.extend(futures_util::future::join_all(batch).await.into_iter().map(Result::unwrap));
        let deadline = Instant::now() + PATIENCE;
        while accepted() + FD_SLACK < silent.len() {
            assert!(Instant::now() < deadline, "pgnear accepted {} of {}", accepted(), silent.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let opening = opened.elapsed();
    let (rss_idle, idle) = (rss_kib(pid), accepted());
    // The listener still serves, and so does the open session.
    let fresh = connect_once(&conn).await;
    assert_eq!(fresh.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    assert_eq!(client.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);

    // Each is dropped once the startup timeout passes.
    let closes = silent.into_iter().map(|mut stream| async move {
        let mut sink = Vec::new();
        tokio::time::timeout(STARTUP_TIMEOUT + PATIENCE, stream.read_to_end(&mut sink)).await.is_ok()
    });
    let closed = futures_util::future::join_all(closes).await.into_iter().filter(|&c| c).count();
    assert_eq!(closed, SILENT_CLIENTS);
    let rss_after = rss_kib(pid);
    eprintln!(
        "silent connections: pgnear RSS {rss_before} KiB before, {rss_idle} KiB with {idle} open \
         ({:.2} KiB each), {rss_after} KiB after they were dropped; opened in {opening:?}",
        (rss_idle.saturating_sub(rss_before)) as f64 / idle.max(1) as f64
    );
    assert_eq!(client.query_one("SELECT 4", &[]).await.unwrap().get::<_, i32>(0), 4);
    proxy.child.start_kill().unwrap();
    let _ = proxy.child.wait().await;
}

/// pgnear as a process of its own, with a config file and a JSON log in
/// a temporary directory; killed when dropped.
struct Process {
    child: tokio::process::Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Starts `bin` on `toml` and waits until it listens.
    async fn spawn(bin: &str, toml: &str, rust_log: &str) -> Process {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("proxy.toml"), toml).unwrap();
        let log = dir.path().join("pgnear.log");
        let child = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(dir.path().join("proxy.toml"))
            .args(["--log-format", "json"])
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr = listening_addr(&log).await;
        Process { child, addr, log, _dir: dir }
    }
}

async fn connect_once(conn: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The address a pgnear process logged that it listens on.
async fn listening_addr(log: &std::path::Path) -> SocketAddr {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let line = text.lines().find(|l| l.contains("pgnear is listening"));
        if let Some(line) = line {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            return event["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "pgnear did not start listening:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closing at once (`Proxy::close_now`, what a second signal does) tells
/// idle and busy clients alike, and counts each close under the error
/// class `shutdown`.
#[tokio::test]
async fn closing_now_counts_each_session_it_closes() {
    let env = start(Cluster::builder(), ProxyConfig::default()).await;
    let (mut idle, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let (mut busy, _) = Wire::login(env.proxy.addr(), "postgres").await;
    busy.send(&crate::support::wire::query("SELECT pg_sleep(30)")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    env.proxy.close_now();
    assert_eq!(idle.expect_fatal().await, "57P01");
    assert_eq!(busy.expect_fatal().await, "57P01");
    let shared = env.proxy.shared();
    let counted = "pgnear_errors_total{class=\"shutdown\"} 2";
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = shared.metrics.render(&shared.scrape()).unwrap();
        if metrics.lines().any(|line| line == counted) {
            break;
        }
        assert!(Instant::now() < deadline, "no {counted} in:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
