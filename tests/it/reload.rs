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
    // Users, routing, rules, consistency, tenants, the monitor and limits
    // change; so does a listener, which needs a restart.
    let changed = base()
        .proxy("max_user_connections = 50")
        .user("name = \"late\"\nauth = \"trust\"\nserver_user = \"postgres\"")
        .section("[routing]\ndefault = \"primary\"\n\n[[rules]]\ntables = [\"notes\"]\nroute = \"primary\"")
        .section("[consistency]\nread_your_writes = \"proxy\"")
        .section("[[tenants]]\ndatabase = \"postgres\"\ncluster = \"default\"")
        .monitor("interval_ms = 35\nsuccesses_before_up = 2");
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

/// `[[nodes]]` TOML: the primary in us-east (or `primary_region`), and
/// the named replicas in eu-west.
fn nodes_toml(cluster: &Cluster, primary_region: &str, replicas: &[usize]) -> String {
    let primary = cluster.primary();
    let mut text = format!(
        "[[nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nregion = \"{primary_region}\"\n\n",
        primary.name(),
        primary.port()
    );
    for &i in replicas {
        let replica = &cluster.replicas()[i];
        text.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nregion = \"eu-west\"\n\n",
            replica.name(),
            replica.port()
        ));
    }
    text
}

/// Reads `client` until one runs on `node`.
async fn read_until_on(client: &tokio_postgres::Client, node: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.simple_query("SELECT 1").await.unwrap();
        if show(client, "pgnear.node").await == node {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no read reached {node}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reload_adds_a_replica_retires_one_and_relabels_the_primary_without_dropping_anyone() {
    nodes_change_live("session").await;
}

#[tokio::test]
async fn a_reload_changes_nodes_without_dropping_anyone_in_transaction_pooling() {
    nodes_change_live("transaction").await;
}

/// A reload removes a replica, adds one and relabels the primary under
/// clients in each state, in `pool_mode`.
async fn nodes_change_live(pool_mode: &str) {
    let base = || base().proxy(&format!("pool_mode = \"{pool_mode}\""));
    let cluster = Cluster::builder().replica().replica().start().await.unwrap();
    let (old, new) = (cluster.replicas()[0].name().to_string(), cluster.replicas()[1].name().to_string());
    let primary = cluster.primary().name().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &base().nodes(&nodes_toml(&cluster, "us-east", &[0])), &cluster);
    let proxy = Proxy::start(Config::load(&path).unwrap()).await.unwrap();
    let addr = proxy.addr();
    let conn = format!("host={} port={} user=postgres dbname=postgres", addr.ip(), addr.port());
    let idle = connect(&conn).await.unwrap();
    read_until_on(&idle, &old).await;
    // One client inside a read-only transaction on the replica to be
    // removed, one holding a temporary table (pinned to the primary).
    let reading = connect(&conn).await.unwrap();
    read_until_on(&reading, &old).await;
    reading.batch_execute("BEGIN READ ONLY").await.unwrap();
    reading.simple_query("SELECT 1").await.unwrap();
    assert_eq!(show(&reading, "pgnear.node").await, old);
    let pinned = connect(&conn).await.unwrap();
    pinned.batch_execute("CREATE TEMP TABLE mine (v int); INSERT INTO mine VALUES (1)").await.unwrap();

    // The first replica goes, the second comes, the primary moves region
    // (the same server: a new label, nothing to move).
    let changed = base().nodes(&nodes_toml(&cluster, "us-east-2", &[1]));
    write(dir.path(), &changed, &cluster);
    assert_eq!(proxy.reload().await, Reloaded::Applied { needs_restart: vec![] });

    // The transaction in flight finishes where it started.
    reading.simple_query("SELECT 2").await.unwrap();
    assert_eq!(show(&reading, "pgnear.node").await, old, "a transaction stays on its node");
    reading.batch_execute("COMMIT").await.unwrap();
    // Then no read goes to the retired replica, and the new one serves
    // reads once the monitor has it in rotation.
    for client in [&idle, &reading] {
        client.simple_query("SELECT 1").await.unwrap();
        assert_ne!(show(client, "pgnear.node").await, old, "a read went to a removed node");
        read_until_on(client, &new).await;
    }
    // No server connection to the removed node is left open.
    let shared = proxy.shared();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while shared.limits.servers().iter().any(|s| shared.topology.node(s.node).config.name == old) {
        assert!(tokio::time::Instant::now() < deadline, "a connection to the removed node stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pinned session keeps its temporary table on the relabelled
    // primary.
    pinned.batch_execute("INSERT INTO mine VALUES (2)").await.unwrap();
    let rows: i64 = pinned.query_one("SELECT count(*) FROM mine", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2);
    assert_eq!(show(&pinned, "pgnear.node").await, primary);
    assert_eq!(show(&pinned, "pgnear.region").await, "us-east-2");
    // The scrape knows the new node and not the removed one.
    let metrics = proxy.shared().metrics.render(&proxy.shared().scrape()).unwrap();
    let up: Vec<&str> = metrics.lines().filter(|l| l.starts_with("pgnear_node_up{")).collect();
    assert!(up.iter().any(|l| l.contains(&format!("node=\"{new}\""))), "{up:?}");
    assert!(!up.iter().any(|l| l.contains(&format!("node=\"{old}\""))), "{up:?}");
    assert!(up.iter().any(|l| l.contains("region=\"us-east-2\"")), "{up:?}");

    // Back again: the removed replica returns under a new id and serves.
    write(dir.path(), &base().nodes(&nodes_toml(&cluster, "us-east-2", &[0])), &cluster);
    assert_eq!(proxy.reload().await, Reloaded::Applied { needs_restart: vec![] });
    read_until_on(&idle, &old).await;
    drop((idle, reading, pinned));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reload_whose_new_node_has_bad_tls_settings_changes_nothing() {
    let cluster = Cluster::builder().replica().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &base(), &cluster);
    let proxy = Proxy::start(Config::load(&path).unwrap()).await.unwrap();
    let addr = proxy.addr();
    let conn = format!("host={} port={} user=postgres dbname=postgres", addr.ip(), addr.port());
    let client = connect(&conn).await.unwrap();
    let replica = cluster.replicas()[0].name().to_string();
    read_until_on(&client, &replica).await;
    // A root certificate file that does not exist: found only when the
    // node's TLS is built.
    let bad = format!(
        "{}[[nodes]]\nname = \"extra\"\nhost = \"127.0.0.1\"\nport = {}\nregion = \"eu-west\"\n\
         sslmode = \"verify-ca\"\nsslrootcert = \"{}\"\n\n",
        nodes_toml(&cluster, "us-east", &[]),
        cluster.replicas()[0].port(),
        dir.path().join("missing.pem").display()
    );
    write(dir.path(), &base().nodes(&bad), &cluster);
    let outcome = proxy.reload().await;
    let Reloaded::Refused(faults) = outcome else { panic!("applied: {outcome:?}") };
    assert!(faults.iter().any(|f| f.contains("sslrootcert")), "{faults:?}");
    // The replica the bad file left out still serves.
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(show(&client, "pgnear.node").await, replica);
    drop(client);
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
