//! `pgnear demo`: the first thing a newcomer runs. It starts a primary and
//! two streaming replicas on loopback with PostgreSQL's own tools, puts
//! the primary "in us-east" and one replica "in ap-northeast" behind the
//! WAN relay, keeps one replica local "in eu-west" (which receives its WAL
//! across the same WAN link as a real transatlantic replica does), starts
//! pgnear in front, prints a connection string and shows each node live,
//! and how the reads right after a write were served.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::lab::cluster::Cluster;
use crate::lab::relay::Relay;
use crate::Proxy;

/// One-way delay to the primary, as from eu-west to us-east.
const US_EAST_DELAY: Duration = Duration::from_millis(40);
/// One-way delay to the far replica, as from eu-west to ap-northeast.
const AP_DELAY: Duration = Duration::from_millis(110);
/// How often the node table is printed.
const REFRESH: Duration = Duration::from_secs(2);

/// Runs the demo until Ctrl-C, then stops everything it started.
pub async fn run(port: u16) -> ExitCode {
    match demo(port).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pgnear demo: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(port: u16) -> Result<(), Box<dyn std::error::Error>> {
    println!("pgnear demo: starting a primary and two streaming replicas (PostgreSQL 15)...");
    let cluster = Cluster::builder().replica().delayed_replica(Duration::from_millis(500)).start().await?;
    let to_us = Relay::start(cluster.primary().addr(), US_EAST_DELAY).await?;
    let to_ap = Relay::start(cluster.replica(1).addr(), AP_DELAY).await?;
    // The eu replica's WAL crosses the ocean too.
    let eu_wal = Relay::start(cluster.primary().addr(), US_EAST_DELAY).await?;
    cluster.replica(0).stream_from(eu_wal.addr()).await?;
    let config = Config::parse(&demo_config(port, &cluster, &to_us, &to_ap), &|_| None)
        .map_err(|e| format!("demo config: {e}"))?;
    let proxy = Proxy::start(config).await?;
    let addr = proxy.addr();
    println!();
    println!("pgnear is listening on {addr}. Connect with:");
    println!();
    println!("    psql \"host={} port={} user=postgres dbname=postgres\"", addr.ip(), addr.port());
    println!();
    println!(
        "us-primary is {}ms away each way, ap-replica {}ms and applies commits 500ms late;",
        US_EAST_DELAY.as_millis(),
        AP_DELAY.as_millis()
    );
    println!(
        "eu-replica is local and receives its WAL across the same link. Press Ctrl-C to stop and clean up."
    );
    println!();
    let shared = proxy.shared().clone();
    #[allow(clippy::disallowed_methods)] // the demo's own loop has a time driver
    let mut ticker = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = ticker.tick() => print_nodes(&shared),
            () = crate::proxy::shutdown_signal() => break,
        }
    }
    println!("\nstopping pgnear and the cluster...");
    // A demo stops at once, even with a psql still connected.
    proxy.shutdown_now().await;
    drop(to_us);
    drop(to_ap);
    drop(eu_wal);
    drop(cluster);
    Ok(())
}

fn demo_config(port: u16, cluster: &Cluster, to_us: &Relay, to_ap: &Relay) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:0"
region = "eu-west"

[[nodes]]
name = "us-primary"
host = "127.0.0.1"
port = {us}
region = "us-east"

[[nodes]]
name = "eu-replica"
host = "127.0.0.1"
port = {eu}
region = "eu-west"

[[nodes]]
name = "ap-replica"
host = "127.0.0.1"
port = {ap}
region = "ap-northeast"

[[users]]
name = "postgres"
auth = "trust"

[monitor]
interval_ms = 100
"#,
        us = to_us.port(),
        eu = cluster.replica(0).port(),
        ap = to_ap.port(),
    )
}

/// Prints one line per node from the monitor's published status and the
/// routing metrics: role, region, RTT, lag, and the share of queries.
fn print_nodes(shared: &crate::frontend::Shared) {
    let view = crate::router::ClusterView::capture(&shared.topology);
    let routed = shared.metrics.routed_by_node();
    let total: u64 = routed.iter().map(|(_, n)| n).sum();
    println!(
        "{:<12} {:<8} {:<13} {:<5} {:>8} {:>10} {:>8} {:>7}",
        "node", "role", "region", "up", "rtt_ms", "lag_bytes", "lag_ms", "queries"
    );
    for node in &view.nodes {
        let s = &node.status;
        let rtt = s.rtt.map(|r| format!("{:.1}", r.as_secs_f64() * 1000.0)).unwrap_or_else(|| "-".into());
        let lag_bytes = node.lag_bytes.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
        let lag_ms = node.lag.map(|l| l.as_millis().to_string()).unwrap_or_else(|| "-".into());
        let count = routed.iter().find(|(n, _)| *n == node.config.name).map_or(0, |(_, c)| *c);
        let share = (count * 100).checked_div(total).map_or_else(|| "-".to_string(), |p| format!("{p}%"));
        println!(
            "{:<12} {:<8} {:<13} {:<5} {:>8} {:>10} {:>8} {:>7}",
            node.config.name,
            s.role.as_str(),
            node.config.region,
            s.up,
            rtt,
            lag_bytes,
            lag_ms,
            share
        );
    }
    let (caught_up, timed_out) = shared.metrics.replica_waits();
    println!(
        "reads right after a write: {caught_up} served by a replica that caught up, {timed_out} sent to the primary"
    );
    println!();
}
