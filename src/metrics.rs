//! pgnear's metrics, on its own prometheus Registry. Labels are node
//! names and enums only: never SQL text, never client addresses.
//!
//! Two kinds live here:
//! - event metrics (routed units, latency, connections, errors, bytes,
//!   read-your-writes pins), updated on the request path and kept in
//!   [`Metrics`]' registry;
//! - state metrics (node up, role, RTT, replica lag, the classification
//!   cache), read from the topology and the cache when `/metrics` is
//!   scraped, so they are never stale and never outlive a node's role.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cluster::Role;
use crate::router::{ClusterView, Reason};

/// One pool's state, as the metrics report it.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub node: usize,
    /// Connections idle in the pool.
    pub idle: usize,
    /// Connections lent to sessions.
    pub active: usize,
    /// Units waiting for a connection.
    pub waiting: usize,
    /// Units that gave up waiting.
    pub timeouts: u64,
}

/// What a scrape reads of the proxy's state now, beside the event
/// metrics: nodes, pools and the classification cache.
pub struct Scrape<'a> {
    pub topology: &'a crate::cluster::Topology,
    pub pools: Vec<PoolStats>,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Query latency buckets: 100 µs (a loopback replica) to 10 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Read-your-writes pin buckets: a replica catching up in a millisecond to
/// a minute behind.
const PIN_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Replica wait buckets: a replica a fraction of a millisecond behind to
/// a wait as long as a far primary's round trip.
const WAIT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// The error classes of `ProxyError::class`; anything else counts as
/// `other`, so the label set stays bounded.
const ERROR_CLASSES: [&str; 8] = [
    "client_protocol",
    "client_gone",
    "auth",
    "limit",
    "timeout",
    "backend_connect",
    "backend_error",
    "shutdown",
];

/// Now, in Unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The role label of a routed query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleLabel {
    Primary,
    Replica,
}

impl RoleLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            RoleLabel::Primary => "primary",
            RoleLabel::Replica => "replica",
        }
    }
}

/// Client connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Startup and authentication.
    Handshake,
    /// Authenticated, with a session running.
    Active,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Handshake => "handshake",
            ClientState::Active => "active",
        }
    }
}

/// Direction of relayed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToServer => "client_to_server",
            Direction::ServerToClient => "server_to_client",
        }
    }
}

/// What became of a transaction run optimistically on a replica (a plain
/// BEGIN whose first statement reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimistic {
    /// It ended on the replica having only read.
    Replica,
    /// Its opening statement led to a write lately: it went straight to
    /// the primary.
    Learned,
    /// It needed the primary; the replay there returned what the client
    /// had received, and it went on there.
    Matched,
    /// The replay returned something else: the client got 40001.
    Mismatched,
    /// It read more than pgnear keeps to replay: the client got 40001.
    TooLarge,
}

impl Optimistic {
    const ALL: [Optimistic; 5] = [
        Optimistic::Replica,
        Optimistic::Learned,
        Optimistic::Matched,
        Optimistic::Mismatched,
        Optimistic::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Optimistic::Replica => "replica",
            Optimistic::Learned => "learned_primary",
            Optimistic::Matched => "replay_matched",
            Optimistic::Mismatched => "replay_mismatched",
            Optimistic::TooLarge => "replay_too_large",
        }
    }
}

/// Every metric pgnear exports. Children whose labels are known up front
/// are resolved once here, so the hot path does no label lookup for them;
/// per-node children are resolved once per server connection ([`NodeMetrics`]).
#[derive(Debug)]
pub struct Metrics {
    /// Only pgnear's own collectors: embedding pgnear never mixes in the
    /// process-global default registry.
    registry: Registry,
    routed: IntCounterVec,
    latency: HistogramVec,
    /// Handshake and active, in [`ClientState`] order.
    clients: [IntGauge; 2],
    backends: IntGaugeVec,
    /// One per entry of [`ERROR_CLASSES`], then `other`.
    errors: Box<[IntCounter]>,
    /// Client-to-server and server-to-client, in [`Direction`] order.
    bytes: [IntCounter; 2],
    pins: IntCounter,
    pin_seconds: Histogram,
    /// Watermark probes answered with an LSN, then failed ones.
    probes: [IntCounter; 2],
    /// Reads that waited for a replica: caught up, then timed out.
    waits: [IntCounter; 2],
    optimistic: [IntCounter; 5],
    reloads: [IntCounter; 2],
    last_reload: prometheus::Gauge,
    wait_seconds: Histogram,
    client_limit: IntGauge,
    /// The console's `SHOW STATS`, by node name.
    stats: std::sync::Mutex<std::collections::BTreeMap<String, Arc<NodeStats>>>,
}

/// One node's totals for the console's `SHOW STATS` that no Prometheus
/// metric has (units and their time come from `routed` and `latency`).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// ReadyForQuery back to idle: a transaction (explicit or not) ended.
    pub transactions: AtomicU64,
    /// Bytes of client messages sent to the node.
    pub received: AtomicU64,
    /// Bytes the node's servers sent.
    pub sent: AtomicU64,
}

/// How a read's wait for a replica ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The replica replayed the watermark in time: it serves the read.
    CaughtUp = 0,
    /// It did not: the read goes to the primary.
    TimedOut = 1,
}

/// One server connection's metric children: its node's latency histogram,
/// the routed counters it has used so far (usually one or two), and its
/// place in the open-connections gauge.
#[derive(Debug)]
pub struct NodeMetrics {
    /// This node's totals for `SHOW STATS`.
    pub stats: Arc<NodeStats>,
    name: Box<str>,
    routed: IntCounterVec,
    by_reason: Vec<(RoleLabel, Reason, IntCounter)>,
    latency: Histogram,
    _connection: GaugeGuard,
}

impl NodeMetrics {
    /// A unit of work routed to this node.
    pub fn routed(&mut self, role: RoleLabel, reason: Reason) {
        if let Some((_, _, counter)) = self.by_reason.iter().find(|(r, why, _)| *r == role && *why == reason)
        {
            return counter.inc();
        }
        let counter = self.routed.with_label_values(&[&self.name, role.as_str(), reason.as_str()]);
        counter.inc();
        self.by_reason.push((role, reason, counter));
    }

    /// A unit's time from dispatch to its ReadyForQuery.
    pub fn query_latency(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// A ReadyForQuery back to idle, having read `read` bytes from the
    /// server since the last one.
    pub fn transaction_ended(&self, read: u64) {
        self.stats.transactions.fetch_add(1, Ordering::Relaxed);
        self.stats.sent.fetch_add(read, Ordering::Relaxed);
    }

    /// Client messages of `bytes` sent to the node.
    pub fn received(&self, bytes: usize) {
        self.stats.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard {
    gauge: IntGauge,
}

impl GaugeGuard {
    fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard { gauge }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Metrics {
        // The definitions are constants and a unit test builds them: this
        // fails only on a programming error.
        Metrics::build().expect("pgnear's metric definitions are valid")
    }

    fn build() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let routed = IntCounterVec::new(
            Opts::new("pgnear_queries_routed_total", "Units of work routed, by node, role and reason."),
            &["node", "role", "reason"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "pgnear_query_duration_seconds",
                "Time from dispatching a unit to its ReadyForQuery, by node.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["node"],
        )?;
        let clients = IntGaugeVec::new(
            Opts::new("pgnear_client_connections", "Client connections, by state."),
            &["state"],
        )?;
        let backends = IntGaugeVec::new(
            Opts::new("pgnear_backend_connections", "Open server connections, by node."),
            &["node"],
        )?;
        let errors =
            IntCounterVec::new(Opts::new("pgnear_errors_total", "Proxy errors, by class."), &["class"])?;
        let bytes = IntCounterVec::new(
            Opts::new("pgnear_bytes_total", "Bytes relayed between clients and servers, by direction."),
            &["direction"],
        )?;
        let pins = IntCounter::new(
            "pgnear_read_your_writes_pins_total",
            "Sessions held on the primary after a write until a replica catches up.",
        )?;
        let pin_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "pgnear_read_your_writes_pin_seconds",
                "How long a session stayed held on the primary after a write.",
            )
            .buckets(PIN_BUCKETS.to_vec()),
        )?;
        let probes = IntCounterVec::new(
            Opts::new(
                "pgnear_watermark_probes_total",
                "Hidden insert-LSN probes pipelined behind commits, by result (lsn, failed).",
            ),
            &["result"],
        )?;
        let waits = IntCounterVec::new(
            Opts::new(
                "pgnear_replica_waits_total",
                "Reads after a write that waited for a replica to replay it, by outcome \
                 (caught_up: the replica served it; timed_out: the primary did).",
            ),
            &["outcome"],
        )?;
        let wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "pgnear_replica_wait_seconds",
                "How long a read after a write waited for a replica to replay it.",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
        )?;
        let optimistic = IntCounterVec::new(
            Opts::new(
                "pgnear_optimistic_transactions_total",
                "Transactions opened with a plain BEGIN and run optimistically, by outcome \
                 (replica: ended there; learned_primary: sent to the primary, their opening \
                 statement having led to a write lately; replay_matched, replay_mismatched, \
                 replay_too_large: moved to the primary to write).",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(optimistic.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "pgnear_config_reloads_total",
                "Configuration reloads (SIGHUP), by result (ok, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        let last_reload = prometheus::Gauge::new(
            "pgnear_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (at start, or by a reload), in Unix seconds.",
        )?;
        registry.register(Box::new(last_reload.clone()))?;
        last_reload.set(unix_now());
        let client_limit = IntGauge::new(
            "pgnear_client_connections_limit",
            "proxy.max_client_connections: clients past it get 53300.",
        )?;
        registry.register(Box::new(client_limit.clone()))?;
        registry.register(Box::new(probes.clone()))?;
        registry.register(Box::new(waits.clone()))?;
        registry.register(Box::new(wait_seconds.clone()))?;
        registry.register(Box::new(routed.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(clients.clone()))?;
        registry.register(Box::new(backends.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(pins.clone()))?;
        registry.register(Box::new(pin_seconds.clone()))?;
        let state = |s: ClientState| clients.get_metric_with_label_values(&[s.as_str()]);
        let direction = |d: Direction| bytes.get_metric_with_label_values(&[d.as_str()]);
        Ok(Metrics {
            clients: [state(ClientState::Handshake)?, state(ClientState::Active)?],
            errors: ERROR_CLASSES
                .iter()
                .chain(&["other"])
                .map(|class| errors.get_metric_with_label_values(&[class]))
                .collect::<prometheus::Result<_>>()?,
            bytes: [direction(Direction::ClientToServer)?, direction(Direction::ServerToClient)?],
            registry,
            routed,
            latency,
            backends,
            pins,
            pin_seconds,
            probes: [probes.with_label_values(&["lsn"]), probes.with_label_values(&["failed"])],
            waits: [waits.with_label_values(&["caught_up"]), waits.with_label_values(&["timed_out"])],
            wait_seconds,
            optimistic: Optimistic::ALL.map(|o| optimistic.with_label_values(&[o.as_str()])),
            reloads: [reloads.with_label_values(&["ok"]), reloads.with_label_values(&["error"])],
            last_reload,
            client_limit,
            stats: Default::default(),
        })
    }

    /// `node`'s children, for one server connection to it: the request
    /// path then counts without hashing label values.
    pub fn node(&self, node: &str) -> NodeMetrics {
        let stats = {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.entry(node.to_string()).or_default().clone()
        };
        NodeMetrics {
            stats,
            name: node.into(),
            routed: self.routed.clone(),
            by_reason: Vec::new(),
            latency: self.latency.with_label_values(&[node]),
            _connection: self.backend_connection(node),
        }
    }

    /// `proxy.max_client_connections`, set once the listener applies it.
    pub fn client_limit(&self, limit: usize) {
        self.client_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// A client connection in `state`, counted until the guard drops.
    pub fn client_connection(&self, state: ClientState) -> GaugeGuard {
        GaugeGuard::new(self.clients[state as usize].clone())
    }

    /// A server connection to `node`, counted until the guard drops.
    fn backend_connection(&self, node: &str) -> GaugeGuard {
        GaugeGuard::new(self.backends.with_label_values(&[node]))
    }

    /// An error of `class` (see `ProxyError::class`).
    pub fn error(&self, class: &str) {
        let i = ERROR_CLASSES.iter().position(|c| *c == class).unwrap_or(ERROR_CLASSES.len());
        self.errors[i].inc();
    }

    /// Bytes relayed.
    pub fn bytes(&self, direction: Direction, count: usize) {
        self.bytes[direction as usize].inc_by(count as u64);
    }

    /// The relayed-bytes counter of one direction, for a caller that adds
    /// up a batch before counting it.
    pub fn bytes_counter(&self, direction: Direction) -> IntCounter {
        self.bytes[direction as usize].clone()
    }

    /// A session started being held on the primary after a write.
    pub fn pin_started(&self) {
        self.pins.inc();
    }

    /// A watermark probe came back, with an LSN or not.
    pub fn probe(&self, answered: bool) {
        self.probes[usize::from(!answered)].inc();
    }

    /// A read waited `waited` for a replica, with `outcome`.
    pub fn replica_wait(&self, outcome: WaitOutcome, waited: Duration) {
        self.waits[outcome as usize].inc();
        self.wait_seconds.observe(waited.as_secs_f64());
    }

    /// Reads that waited for a replica so far: caught up, timed out.
    pub fn replica_waits(&self) -> (u64, u64) {
        (self.waits[0].get(), self.waits[1].get())
    }

    /// A configuration reload succeeded or was refused.
    pub fn config_reloaded(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
        if ok {
            self.last_reload.set(unix_now());
        }
    }

    /// An optimistic transaction came to `outcome`.
    pub fn optimistic(&self, outcome: Optimistic) {
        self.optimistic[outcome as usize].inc();
    }

    /// A session's read-your-writes pin ended after `held`.
    pub fn pin_ended(&self, held: Duration) {
        self.pin_seconds.observe(held.as_secs_f64());
    }

    /// Units routed to each node so far, summed over roles and reasons,
    /// by node name (for the demo's node table).
    /// Every node's `SHOW STATS` totals, by name.
    pub fn node_stats(&self) -> Vec<(String, Arc<NodeStats>)> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.iter().map(|(name, stats)| (name.clone(), stats.clone())).collect()
    }

    /// Units routed to `node`, by reason (summed over roles).
    pub fn routed_by_reason(&self, node: &str) -> Vec<(String, u64)> {
        self.routed_totals(|on, reason| (on == node).then_some(reason))
    }

    /// Units routed, by node.
    pub fn routed_by_node(&self) -> Vec<(String, u64)> {
        self.routed_totals(|node, _| Some(node))
    }

    /// `node`'s units timed to their ReadyForQuery: how many, and their
    /// total time.
    pub fn latency_of(&self, node: &str) -> (u64, Duration) {
        let histogram = self.latency.with_label_values(&[node]);
        (histogram.get_sample_count(), Duration::from_secs_f64(histogram.get_sample_sum().max(0.0)))
    }

    /// The routed counters summed by what `key` picks from each one's
    /// node and reason (`None`: left out), sorted.
    fn routed_totals(&self, key: impl for<'a> Fn(&'a str, &'a str) -> Option<&'a str>) -> Vec<(String, u64)> {
        let mut totals: Vec<(String, u64)> = Vec::new();
        for metric in self.routed.collect().iter().flat_map(|family| family.get_metric()) {
            let label = |name: &str| metric.get_label().iter().find(|l| l.name() == name).map(|l| l.value());
            let (Some(node), Some(reason)) = (label("node"), label("reason")) else { continue };
            let Some(key) = key(node, reason) else { continue };
            let count = metric.get_counter().get_value() as u64;
            match totals.iter_mut().find(|(k, _)| k == key) {
                Some((_, total)) => *total += count,
                None => totals.push((key.to_owned(), count)),
            }
        }
        totals.sort();
        totals
    }

    /// Every metric in the Prometheus text format ([`CONTENT_TYPE`]): the
    /// event metrics plus node, pool and cache state read now.
    pub fn render(&self, shared: &Scrape) -> prometheus::Result<String> {
        let mut families = self.registry.gather();
        families.extend(state_families(shared)?);
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Node and cache state as metric families, gathered through a registry
/// built for this one scrape: a node that changed role leaves no stale
/// series behind.
fn state_families(shared: &Scrape) -> prometheus::Result<Vec<MetricFamily>> {
    let view = ClusterView::capture(shared.topology);
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
        let vec = GaugeVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(vec.clone()))?;
        Ok(vec)
    };
    let up = gauge(
        "pgnear_node_up",
        "1 while the health check has the node in rotation.",
        &["node", "role", "region", "cluster"],
    )?;
    let role = gauge("pgnear_node_role", "1 for the node's last observed role.", &["node", "role"])?;
    let rtt =
        gauge("pgnear_node_rtt_seconds", "Smoothed round-trip time of the monitor's probe.", &["node"])?;
    let lag_bytes = gauge(
        "pgnear_replica_lag_bytes",
        "WAL bytes the primary has that the replica has not replayed.",
        &["node"],
    )?;
    let lag_seconds = gauge(
        "pgnear_replica_lag_seconds",
        "How far the replica's replay is behind the primary.",
        &["node"],
    )?;
    // Nodes a reload removed (or replaced) leave no series behind.
    let live = view.nodes.iter().enumerate().filter(|(id, _)| !shared.topology.node(*id).retired());
    for (_, node) in live {
        let (name, status) = (node.config.name.as_str(), &node.status);
        let config = node.config;
        up.get_metric_with_label_values(&[
            name,
            status.role.as_str(),
            config.region.as_str(),
            config.cluster.as_str(),
        ])?
        .set(f64::from(u8::from(status.up)));
        for r in [Role::Primary, Role::Replica, Role::Unknown] {
            role.get_metric_with_label_values(&[name, r.as_str()])?
                .set(f64::from(u8::from(status.role == r)));
        }
        if let Some(value) = status.rtt {
            rtt.get_metric_with_label_values(&[name])?.set(value.as_secs_f64());
        }
        if let Some(bytes) = node.lag_bytes {
            lag_bytes.get_metric_with_label_values(&[name])?.set(bytes as f64);
        }
        if let Some(lag) = node.lag {
            lag_seconds.get_metric_with_label_values(&[name])?.set(lag.as_secs_f64());
        }
    }
    let pooled = gauge(
        "pgnear_pool_server_connections",
        "Transaction pooling: pooled server connections by node and state (active: lent to a session).",
        &["node", "state"],
    )?;
    let waiting = gauge(
        "pgnear_pool_waiting_units",
        "Transaction pooling: units of work waiting for a server connection.",
        &["node"],
    )?;
    let timeouts = IntCounterVec::new(
        Opts::new(
            "pgnear_pool_timeouts_total",
            "Transaction pooling: units that got no server connection within proxy.pool_timeout.",
        ),
        &["node"],
    )?;
    registry.register(Box::new(timeouts.clone()))?;
    // Summed over the node's pools (one per user and startup parameters):
    // labels stay node names only.
    for pool in &shared.pools {
        let node = shared.topology.node(pool.node).config.name.as_str();
        pooled.get_metric_with_label_values(&[node, "idle"])?.add(pool.idle as f64);
        pooled.get_metric_with_label_values(&[node, "active"])?.add(pool.active as f64);
        waiting.get_metric_with_label_values(&[node])?.add(pool.waiting as f64);
        timeouts.get_metric_with_label_values(&[node])?.inc_by(pool.timeouts);
    }
    let counter = |name: &str, help: &str, value: u64| -> prometheus::Result<()> {
        let counter = IntCounter::new(name, help)?;
        counter.inc_by(value);
        registry.register(Box::new(counter))
    };
    counter(
        "pgnear_classify_cache_hits_total",
        "Statement classifications answered from the cache.",
        shared.cache_hits,
    )?;
    counter(
        "pgnear_classify_cache_misses_total",
        "Statement classifications that parsed the SQL.",
        shared.cache_misses,
    )?;
    Ok(registry.gather())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    fn sample(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let families = metrics.registry.gather();
        let family = families.iter().find(|f| f.name() == name)?;
        let metric = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
        })?;
        Some(match family.get_field_type() {
            prometheus::proto::MetricType::COUNTER => metric.get_counter().get_value(),
            prometheus::proto::MetricType::GAUGE => metric.get_gauge().get_value(),
            _ => metric.get_histogram().get_sample_count() as f64,
        })
    }

    #[test]
    fn the_definitions_build_and_known_series_start_at_zero() {
        let metrics = Metrics::new();
        assert_eq!(sample(&metrics, "pgnear_errors_total", &[("class", "auth")]), Some(0.0));
        assert_eq!(sample(&metrics, "pgnear_errors_total", &[("class", "other")]), Some(0.0));
        assert_eq!(sample(&metrics, "pgnear_client_connections", &[("state", "active")]), Some(0.0));
        assert_eq!(sample(&metrics, "pgnear_bytes_total", &[("direction", "client_to_server")]), Some(0.0));
    }

    #[test]
    fn gauge_guards_count_while_alive() {
        let metrics = Metrics::new();
        let a = metrics.backend_connection("n1");
        let b = metrics.backend_connection("n1");
        let c = metrics.client_connection(ClientState::Handshake);
        assert_eq!(sample(&metrics, "pgnear_backend_connections", &[("node", "n1")]), Some(2.0));
        assert_eq!(sample(&metrics, "pgnear_client_connections", &[("state", "handshake")]), Some(1.0));
        drop((a, c));
        assert_eq!(sample(&metrics, "pgnear_backend_connections", &[("node", "n1")]), Some(1.0));
        assert_eq!(sample(&metrics, "pgnear_client_connections", &[("state", "handshake")]), Some(0.0));
        drop(b);
        assert_eq!(sample(&metrics, "pgnear_backend_connections", &[("node", "n1")]), Some(0.0));
    }

    #[test]
    fn unknown_error_classes_count_as_other() {
        let metrics = Metrics::new();
        metrics.error("auth");
        metrics.error("SELECT secret FROM t");
        assert_eq!(sample(&metrics, "pgnear_errors_total", &[("class", "auth")]), Some(1.0));
        assert_eq!(sample(&metrics, "pgnear_errors_total", &[("class", "other")]), Some(1.0));
        let families = metrics.registry.gather();
        let errors = families.iter().find(|f| f.name() == "pgnear_errors_total").unwrap();
        assert_eq!(errors.get_metric().len(), ERROR_CLASSES.len() + 1);
    }

    #[test]
    fn routed_units_latency_bytes_and_pins_are_counted() {
        let metrics = Metrics::new();
        let mut r1 = metrics.node("r1");
        let mut also_r1 = metrics.node("r1");
        let mut p = metrics.node("p");
        assert_eq!(sample(&metrics, "pgnear_backend_connections", &[("node", "r1")]), Some(2.0));
        r1.routed(RoleLabel::Replica, Reason::Read);
        also_r1.routed(RoleLabel::Replica, Reason::Read);
        r1.routed(RoleLabel::Replica, Reason::Rule);
        p.routed(RoleLabel::Primary, Reason::Write);
        let read = [("node", "r1"), ("role", "replica"), ("reason", "read")];
        assert_eq!(sample(&metrics, "pgnear_queries_routed_total", &read), Some(2.0));
        let rule = [("node", "r1"), ("role", "replica"), ("reason", "rule")];
        assert_eq!(sample(&metrics, "pgnear_queries_routed_total", &rule), Some(1.0));
        assert_eq!(metrics.routed_by_node(), vec![("p".to_string(), 1), ("r1".to_string(), 3)]);
        r1.query_latency(Duration::from_micros(300));
        assert_eq!(sample(&metrics, "pgnear_query_duration_seconds", &[("node", "r1")]), Some(1.0));
        drop((r1, also_r1));
        assert_eq!(sample(&metrics, "pgnear_backend_connections", &[("node", "r1")]), Some(0.0));
        metrics.bytes(Direction::ServerToClient, 42);
        assert_eq!(sample(&metrics, "pgnear_bytes_total", &[("direction", "server_to_client")]), Some(42.0));
        metrics.pin_started();
        metrics.pin_ended(Duration::from_millis(5));
        assert_eq!(sample(&metrics, "pgnear_read_your_writes_pins_total", &[]), Some(1.0));
        assert_eq!(sample(&metrics, "pgnear_read_your_writes_pin_seconds", &[]), Some(1.0));
    }
}
