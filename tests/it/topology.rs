//! Multi-region topology against real servers: nearest replica by measured
//! RTT (the WAN relay in between), health, partitions, failover and
//! promotion, and tenant data residency.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use pgnear::lab::relay::Relay;
use pgnear::Proxy;
use tokio_postgres::Client;

use crate::support::{connect, run_tool, Env, ProxyConfig, PATIENCE};

fn node(name: &str, port: u16, region: &str, cluster: &str) -> String {
    format!("[[nodes]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\nregion = \"{region}\"\ncluster = \"{cluster}\"\n\n")
}

async fn port_of(client: &Client, sql: &str) -> u16 {
    client.query_one(sql, &[]).await.unwrap().get::<_, i32>(0) as u16
}

/// Polls until a plain read runs on the server listening on `port`.
async fn reads_reach(client: &Client, port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while port_of(client, "SELECT inet_server_port()").await != port {
        assert!(tokio::time::Instant::now() < deadline, "reads never reached {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A cluster whose replicas sit behind delay relays.
struct Wan {
    proxy: Proxy,
    relays: Vec<Relay>,
    cluster: Cluster,
}

async fn wan(delays: &[u64], monitor: &str) -> Wan {
    let mut builder = Cluster::builder();
    for _ in delays {
        builder = builder.replica();
    }
    let cluster = builder.start().await.unwrap();
    let mut relays = Vec::new();
    let mut nodes = node("primary", cluster.primary().port(), "us-east", "default");
    for (i, delay) in delays.iter().enumerate() {
        let relay = Relay::start(cluster.replica(i).addr(), Duration::from_millis(*delay)).await.unwrap();
        nodes.push_str(&node(&format!("replica{i}"), relay.port(), "eu-west", "default"));
        relays.push(relay);
    }
    let config = ProxyConfig::default().nodes(&nodes).monitor(monitor);
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    Wan { proxy, relays, cluster }
}

impl Wan {
    async fn client(&self) -> Client {
        let addr = self.proxy.addr();
        connect(&format!("host={} port={} user=postgres dbname=postgres", addr.ip(), addr.port()))
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn reads_follow_the_lowest_rtt() {
    let wan = wan(&[2, 60], "interval_ms = 20").await;
    let c = wan.client().await;
    let (near, far) = (wan.cluster.replica(0).port(), wan.cluster.replica(1).port());
    reads_reach(&c, near, "the near replica").await;
    for _ in 0..10 {
        assert_eq!(port_of(&c, "SELECT inet_server_port()").await, near);
    }
    wan.relays[0].set_delay(Duration::from_millis(150));
    reads_reach(&c, far, "the far replica after the near one slowed down").await;
}

#[tokio::test]
async fn a_partitioned_replica_leaves_rotation_and_returns() {
    let wan = wan(&[1, 1], "interval_ms = 20\nfailures_before_down = 2\nsuccesses_before_up = 2").await;
    let c = wan.client().await;
    let (a, b) = (wan.cluster.replica(0).port(), wan.cluster.replica(1).port());
    reads_reach(&c, a, "replica a").await;
    reads_reach(&c, b, "replica b").await;
    wan.relays[0].partition();
    // Every read succeeds during the partition; soon none goes to a.
    reads_reach(&c, b, "replica b during the partition").await;
    for _ in 0..20 {
        assert_ne!(port_of(&c, "SELECT inet_server_port()").await, a);
    }
    wan.relays[0].heal();
    reads_reach(&c, a, "replica a after healing").await;
}

#[tokio::test]
async fn killing_a_replica_under_load_fails_nothing() {
    let wan = wan(&[0, 0], "interval_ms = 20").await;
    let port = wan.proxy.addr().port().to_string();
    let common = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let mut init = common.to_vec();
    init.extend(["-i", "-s", "1", "-q", "postgres"]);
    run_tool("pgbench", &init).await;
    wan.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let mut args: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    args.extend(["-S", "-c", "4", "-j", "2", "-T", "6", "-M", "prepared", "postgres"].map(String::from));
    let load = tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool("pgbench", &args).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    wan.cluster.replica(0).kill().unwrap();
    let out = load.await.unwrap();
    let failed = out.lines().find(|l| l.contains("number of failed transactions")).unwrap_or("");
    assert!(failed.contains(": 0 "), "reads failed when a replica died:\n{out}");
    // Restarted, it comes back into rotation.
    wan.cluster.replica(0).start().await.unwrap();
    let c = wan.client().await;
    reads_reach(&c, wan.cluster.replica(0).port(), "the restarted replica").await;
}

#[tokio::test]
async fn writes_follow_a_promoted_replica() {
    let config = ProxyConfig::default().monitor("interval_ms = 20\nfailures_before_down = 2");
    let cluster = Cluster::builder().replica().start().await.unwrap();
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let old = env.client().await;
    old.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").await.unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    env.cluster.primary().kill().unwrap();
    // The old session gets a clean error, not a hang.
    let error = tokio::time::timeout(PATIENCE, old.simple_query("INSERT INTO t VALUES (2)")).await.unwrap();
    assert!(error.is_err());
    // While no primary is reachable, reads work and writes fail fast.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let reader = loop {
        match env.client_result().await {
            Ok(c) if c.query_one("SELECT count(*) FROM t", &[]).await.is_ok() => break c,
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "no reads while the primary is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused =
        tokio::time::timeout(PATIENCE, reader.simple_query("INSERT INTO t VALUES (3)")).await.unwrap();
    assert_eq!(refused.unwrap_err().code().map(|c| c.code().to_string()), Some("08006".into()));
    env.cluster.replica(0).promote().await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(c) = env.client_result().await {
            if c.simple_query("INSERT INTO t VALUES (4)").await.is_ok() {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "writes never followed the promoted replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The session that started without a primary writes too, now.
    reader.simple_query("INSERT INTO t VALUES (5)").await.unwrap();
}

#[tokio::test]
async fn tenants_never_leave_their_cluster() {
    let eu = Cluster::builder().replica().start().await.unwrap();
    let us = Cluster::builder().start().await.unwrap();
    let mut nodes = node("eu-primary", eu.primary().port(), "eu-west", "eu");
    nodes.push_str(&node("eu-replica", eu.replica(0).port(), "eu-west", "eu"));
    nodes.push_str(&node("us-primary", us.primary().port(), "us-east", "us"));
    let config = ProxyConfig::default()
        .nodes(&nodes)
        .user("name = \"eu_app\"\nauth = \"trust\"\nserver_user = \"postgres\"")
        .user("name = \"us_app\"\nauth = \"trust\"\nserver_user = \"postgres\"")
        .section("[[tenants]]\nuser = \"eu_app\"\ncluster = \"eu\"")
        .section("[[tenants]]\nuser = \"us_app\"\ncluster = \"us\"")
        .proxy("require_tenant = true\ndefault_cluster = \"us\"")
        .monitor("interval_ms = 20\nfailures_before_down = 2");
    let proxy = Proxy::start(config.build(&eu)).await.unwrap();
    let addr = proxy.addr();
    let conn = |user: &str| format!("host={} port={} user={user} dbname=postgres", addr.ip(), addr.port());
    let eu_ports = [eu.primary().port(), eu.replica(0).port()];
    let c = connect(&conn("eu_app")).await.unwrap();
    for sql in [
        "SELECT inet_server_port()",
        "/* pgnear:primary */ SELECT inet_server_port()",
        "/* pgnear:replica */ SELECT inet_server_port()",
    ] {
        for _ in 0..5 {
            assert!(eu_ports.contains(&port_of(&c, sql).await), "{sql} left the eu cluster");
        }
    }
    let u = connect(&conn("us_app")).await.unwrap();
    assert_eq!(port_of(&u, "SELECT inet_server_port()").await, us.primary().port());
    // An unmapped user is refused.
    let refused = connect(&conn("postgres")).await.unwrap_err();
    assert_eq!(refused.code().map(|c| c.code().to_string()), Some("28000".into()));
    // Failover never crosses clusters: with the eu primary gone, eu writes
    // fail instead of reaching the us primary.
    eu.primary().kill().unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let fresh = connect(&conn("eu_app")).await;
        if let Ok(fresh) = fresh {
            let r = fresh.simple_query("CREATE TABLE leak (x int)").await;
            if let Err(e) = r {
                assert_eq!(e.code().map(|c| c.code().to_string()), Some("08006".into()), "{e}");
                break;
            }
            panic!("an eu write succeeded after the eu primary died: it went to another cluster");
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tables =
        us.primary().query_scalar("SELECT count(*) FROM pg_class WHERE relname = 'leak'").await.unwrap();
    assert_eq!(tables, "0");
    drop(proxy);
}

/// A line in /etc/hosts for the life of the guard (the tests run as root
/// in CI; the file is rewritten in place, as a container bind-mounts it).
struct HostsEntry(String);

impl HostsEntry {
    fn add(name: &str, address: &str) -> HostsEntry {
        use std::io::Write;
        let mut hosts = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .unwrap_or_else(|e| panic!("this test adds a name to /etc/hosts and needs to write it: {e}"));
        writeln!(hosts, "{address} {name}").unwrap();
        HostsEntry(name.to_string())
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
            let kept: String = text
                .lines()
                .filter(|l| !l.split_whitespace().skip(1).any(|n| n == self.0))
                .map(|l| format!("{l}\n"))
                .collect();
            let _ = std::fs::write("/etc/hosts", kept);
        }
    }
}

#[tokio::test]
async fn a_node_whose_name_does_not_resolve_yet_is_down_not_fatal_and_followed_once_it_does() {
    let cluster = Cluster::builder().replica().start().await.unwrap();
    let (primary, replica) = (cluster.primary(), cluster.replica(0));
    let name = format!("pgnear-later-{}-{}.test", std::process::id(), replica.port());
    let nodes = format!(
        "{}[[nodes]]\nname = \"{}\"\nhost = \"{name}\"\nport = {}\nregion = \"eu-west\"\n\n",
        node(primary.name(), primary.port(), "us-east", "default"),
        replica.name(),
        replica.port()
    );
    let config = ProxyConfig::default().nodes(&nodes).proxy("dns_max_ttl_ms = 100");
    // `pgnear check` warns, and names the node.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config.toml(&cluster)).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_pgnear"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(said.contains(&format!("node {:?}: {name} does not resolve", replica.name())), "{said}");
    // pgnear starts; the node is down, reads go to the primary.
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let client = env.client().await;
    assert_eq!(port_of(&client, "SELECT inet_server_port()").await, env.cluster.primary().port());
    // Once the name resolves, the monitor finds the node and reads reach it.
    let _entry = HostsEntry::add(&name, "127.0.0.1");
    reads_reach(&client, env.cluster.replica(0).port(), "the replica once its name resolved").await;
}

#[tokio::test]
async fn a_name_that_moves_to_another_server_is_followed() {
    let cluster = Cluster::builder().replica().replica().start().await.unwrap();
    let (first, second) = (cluster.replica(0).port(), cluster.replica(1).port());
    // The same port on two loopback addresses, each in front of a replica:
    // one name, two servers, as after a DNS-based failover.
    let old = Relay::start_on("127.0.0.2:0".parse().unwrap(), cluster.replica(0).addr(), Duration::ZERO)
        .await
        .unwrap();
    let port = old.port();
    let new_addr = std::net::SocketAddr::from(([127, 0, 0, 3], port));
    let _new = Relay::start_on(new_addr, cluster.replica(1).addr(), Duration::ZERO).await.unwrap();
    let name = format!("pgnear-moves-{}-{port}.test", std::process::id());
    let primary = cluster.primary();
    let nodes = format!(
        "{}[[nodes]]\nname = \"moving\"\nhost = \"{name}\"\nport = {port}\nregion = \"eu-west\"\n\n",
        node(primary.name(), primary.port(), "us-east", "default"),
    );
    let entry = HostsEntry::add(&name, "127.0.0.2");
    let config = ProxyConfig::default().nodes(&nodes).proxy("dns_max_ttl_ms = 100");
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let client = env.client().await;
    reads_reach(&client, first, "the server the name first resolved to").await;
    // The name moves, and the old server goes away: the monitor and the
    // session reconnect, and the name's new answer is used.
    drop(entry);
    let _entry = HostsEntry::add(&name, "127.0.0.3");
    drop(old);
    reads_reach(&client, second, "the server the name moved to").await;
}
