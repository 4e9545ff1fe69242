//! Reload: SIGHUP (or `Proxy::reload`) reads proxy.toml again and applies
//! it without disconnecting anyone; a file with faults changes nothing.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use pgnear::proxy::Reloaded;
use pgnear::{Config, Proxy};

use crate::support::{connect, show, ProxyConfig, PATIENCE};

/// `config`'s TOML for `cluster`, written to a file in `dir`.
fn write(dir: &std::path::Path, config: &ProxyConfig, cluster: &Cluster) -> std::path::PathBuf {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config.toml(cluster)).unwrap();
    path
}

fn base() -> ProxyConfig {
    ProxyConfig::default().proxy("admin_listen = \"127.0.0.1:0\"")
}

#[tokio::test]
async fn a_reload_applies_without_dropping_anyone_and_a_bad_file_changes_nothing() {
    let cluster = Cluster::builder().replica().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &base(), &cluster);
    let proxy = Proxy::start(Config::load(&path).unwrap()).await.unwrap();
    let conn = |user: &str| {
        let addr = proxy.addr();
        format!("host={} port={} user={user} dbname=postgres", addr.ip(), addr.port())
    };
    let idle = connect(&conn("postgres")).await.unwrap();
    idle.batch_execute("CREATE TABLE notes (id int PRIMARY KEY)").await.unwrap();
    let busy = connect(&conn("postgres")).await.unwrap();
    busy.batch_execute("BEGIN; INSERT INTO notes VALUES (1)").await.unwrap();
    assert!(connect(&conn("late")).await.is_err(), "a user not configured yet");
    // Reads reach the replica before the reload.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        idle.simple_query("SELECT 1").await.unwrap();
        if show(&idle, "pgnear.node").await != cluster.primary().name() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no read reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Users, routing, rules and limits change; so does a listener, which
    // needs a restart.
    let changed = base()
        .proxy("max_user_connections = 50")
        .user("name = \"late\"\nauth = \"trust\"\nserver_user = \"postgres\"")
        .section("[routing]\ndefault = \"primary\"\n\n[[rules]]\ntables = [\"notes\"]\nroute = \"primary\"");
    let text = changed
        .toml(&cluster)
        .replace("listen = \"127.0.0.1:0\"\nregion", "listen = \"127.0.0.1:1\"\nregion");
    std::fs::write(&path, text).unwrap();
    assert_eq!(proxy.reload().await, Reloaded::Applied { needs_restart: vec!["proxy.listen"] });
    // The transaction in flight goes on and commits; the idle client goes on.
    busy.batch_execute("INSERT INTO notes VALUES (2); COMMIT").await.unwrap();
    let count: i64 = idle.query_one("SELECT count(*) FROM notes", &[]).await.unwrap().get(0);
    assert_eq!(count, 2);
    // The new settings hold for them and for new clients.
    idle.simple_query("SELECT 1").await.unwrap();
    assert_eq!(show(&idle, "pgnear.node").await, cluster.primary().name(), "routing.default = primary");
    let late = connect(&conn("late")).await.unwrap();
    late.simple_query("SELECT 1").await.unwrap();
    // A file with faults: nothing changes, the faults are counted.
    std::fs::write(&path, "[proxy]\nbogus = 1\n").unwrap();
    let Reloaded::Refused(faults) = proxy.reload().await else { panic!("a bad file was applied") };
    assert!(faults.iter().any(|f| f.starts_with("proxy.bogus")), "{faults:?}");
    connect(&conn("late")).await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let metrics = proxy.shared().metrics.render(&proxy.shared().scrape()).unwrap();
    assert!(metrics.contains("pgnear_config_reloads_total{result=\"error\"} 1"), "{metrics}");
    assert!(metrics.contains("pgnear_config_reloads_total{result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("pgnear_config_last_reload_success_timestamp_seconds"));
    drop((idle, busy, late));
    proxy.shutdown().await;
}

/// pgnear as its own process, for signals.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn sighup_reloads(tls: bool) {
    let cluster = Cluster::builder().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ca = crate::support::certs::Ca::new("reload");
    let cert = ca.server("pgnear", &["127.0.0.1"]);
    let mut config = ProxyConfig::default();
    if tls {
        config = config.section(&crate::support::certs::tls_section("prefer", &cert));
    }
    let text = |config: &ProxyConfig| {
        config.toml(&cluster).replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
    };
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text(&config)).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgnear"))
        .args(["--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut process = Process(child);
    let conn = |user: &str| format!("host=127.0.0.1 port={port} user={user} dbname=postgres");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let client = loop {
        match connect(&conn("postgres")).await {
            Ok(client) => break client,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "pgnear did not come up: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    client.batch_execute("BEGIN").await.unwrap();
    std::fs::write(
        &path,
        text(&config.user("name = \"late\"\nauth = \"trust\"\nserver_user = \"postgres\"")),
    )
    .unwrap();
    let pid = process.0.id().to_string();
    let signalled = std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(signalled.success());
    // The new user can log in once the reload is done; nobody was dropped.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while connect(&conn("late")).await.is_err() {
        assert!(process.0.try_wait().unwrap().is_none(), "SIGHUP ended pgnear (tls: {tls})");
        assert!(tokio::time::Instant::now() < deadline, "the reload never applied (tls: {tls})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.batch_execute("SELECT 1; COMMIT").await.unwrap();
    assert!(process.0.try_wait().unwrap().is_none());
}

#[tokio::test]
async fn sighup_reloads_without_tls() {
    sighup_reloads(false).await;
}

#[tokio::test]
async fn sighup_reloads_with_tls() {
    sighup_reloads(true).await;
}
