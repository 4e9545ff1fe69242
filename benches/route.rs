//! The routing decision with a realistic cluster snapshot: a primary in
//! us-east, a replica in this pgnear's region (eu-west) and one in
//! us-east, the monitor having probed all three; plus the cost of taking
//! the snapshot from a live `Topology`, which every unit pays
//! (`Session::decide` captures one, and `Session::refresh_watermark` another
//! through `Topology::primary`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use pgnear::cluster::{Lsn, NodeStatus, Role, Topology};
use pgnear::router::cache::ClassifyCache;
use pgnear::router::classify::Classification;
use pgnear::router::functions::VolatileFunctions;
use pgnear::router::{route, ClusterView, Freshness, NodeView, Policy, RouteSetting, SessionView, Staleness};
use pgnear::Config;

/// Shared with the router's unit tests.
const CONFIG: &str = include_str!("fixtures/three_regions.toml");

const PRIMARY_LSN: u64 = 0x3_0000_4000;

fn config() -> Config {
    Config::parse(CONFIG, &|_| None).expect("bench config is valid")
}

/// What the monitor publishes after a few probes.
fn statuses() -> Vec<NodeStatus> {
    let now = SystemTime::now();
    let sent = Instant::now();
    let primary = NodeStatus {
        up: true,
        role: Role::Primary,
        rtt: Some(Duration::from_micros(80_400)),
        lsn: Some(Lsn(PRIMARY_LSN)),
        probed_at: Some(now),
        insert_lsn: Some(Lsn(PRIMARY_LSN)),
        probe_sent: Some(sent),
        consecutive_successes: 40,
        ..NodeStatus::default()
    };
    let replica = |rtt_us: u64, behind: u64| NodeStatus {
        up: true,
        role: Role::Replica,
        rtt: Some(Duration::from_micros(rtt_us)),
        lsn: Some(Lsn(PRIMARY_LSN - behind)),
        receive_lsn: Some(Lsn(PRIMARY_LSN)),
        replay_time: Some(now - Duration::from_millis(3)),
        probed_at: Some(now),
        consecutive_successes: 40,
        ..NodeStatus::default()
    };
    vec![primary, replica(400, 0), replica(81_000, 512)]
}

fn views(config: &Config) -> Vec<NodeView<'_>> {
    config.nodes.iter().zip(statuses()).map(|(config, status)| NodeView::new(config, status)).collect()
}

fn session(freshness: Freshness) -> SessionView<'static> {
    SessionView {
        cluster: "default",
        setting: RouteSetting::Auto,
        pinned: false,
        freshness,
        schema: Freshness::Any,
        staleness: Staleness::DEFAULT,
    }
}

fn unit(cache: &ClassifyCache, sql: &str) -> Vec<Arc<Classification>> {
    vec![cache.classify(sql)]
}

fn routing(c: &mut Criterion) {
    let config = config();
    let policy = Policy { routing: &config.routing, rules: &config.rules, region: &config.proxy.region };
    let volatile = VolatileFunctions::new(["audit_touch".to_string(), "next_invoice_no".to_string()]);
    let view = ClusterView::with_lag(views(&config));
    let cache = ClassifyCache::new(1_000);
    let read = unit(&cache, "SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
    let write = unit(&cache, "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;");
    let rule_read = unit(&cache, "SELECT p.id, p.sku, p.price FROM products p WHERE p.id = $1");
    let rule_primary = unit(&cache, "SELECT id, amount FROM payments WHERE customer_id = $1");
    let fresh = session(Freshness::Any);
    let after_write = session(Freshness::AtLeast(Lsn(PRIMARY_LSN - 100)));

    // Sanity: the snapshot routes the way the names below claim.
    let reason = |u: &[Arc<Classification>], s: &SessionView| {
        route(u, s, &view, &policy, &volatile).expect("a primary exists").reason.as_str()
    };
    assert_eq!(reason(&read, &fresh), "read");
    assert_eq!(reason(&write, &fresh), "write");
    assert_eq!(reason(&rule_read, &fresh), "read");
    assert_eq!(reason(&rule_primary, &fresh), "rule");
    assert_eq!(reason(&read, &after_write), "read");

    let mut group = c.benchmark_group("route");
    let cases: [(&str, &[Arc<Classification>], &SessionView); 5] = [
        ("read", &read, &fresh),
        ("write", &write, &fresh),
        ("rule_max_staleness_read", &rule_read, &fresh),
        ("rule_primary_read", &rule_primary, &fresh),
        ("read_with_watermark", &read, &after_write),
    ];
    for (name, unit, session) in cases {
        group.bench_function(name, |b| {
            b.iter(|| route(black_box(unit), black_box(session), black_box(&view), &policy, &volatile))
        });
    }
    group.finish();
}

fn snapshots(c: &mut Criterion) {
    let config = config();
    let topology = Topology::new(&config.nodes, config.proxy.dns_max_ttl).expect("loopback resolves");
    for ((_, node), status) in topology.nodes().zip(statuses()) {
        node.publish(status);
    }
    let policy = Policy { routing: &config.routing, rules: &config.rules, region: &config.proxy.region };
    let volatile = VolatileFunctions::new(Vec::new());
    let cache = ClassifyCache::new(1_000);
    let read = unit(&cache, "SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
    let fresh = session(Freshness::Any);

    let mut group = c.benchmark_group("snapshot");
    group.bench_function("with_lag_3_nodes", |b| {
        b.iter_batched(|| views(&config), ClusterView::with_lag, criterion::BatchSize::SmallInput)
    });
    group.bench_function("capture_3_nodes", |b| b.iter(|| ClusterView::capture(black_box(&topology))));
    group.bench_function("topology_primary", |b| b.iter(|| topology.primary(black_box("default"))));
    // What a session pays per unit today: `refresh_watermark` (through
    // `Topology::primary`), then `decide` (capture + route).
    group.bench_function("per_unit_capture_route", |b| {
        b.iter(|| {
            black_box(topology.primary("default").ok());
            let view = ClusterView::capture(&topology);
            route(black_box(&read), &fresh, &view, &policy, &volatile)
        })
    });
    group.finish();
}

criterion_group!(benches, routing, snapshots);
criterion_main!(benches);
