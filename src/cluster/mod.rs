//! Topology and health: what the monitor last measured about each node,
//! published as immutable snapshots that request paths read without locks.

pub mod catalog;
pub mod lsn;
pub mod monitor;
pub mod replay;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::config::{NodeConfig, RoleSetting};
pub use lsn::Lsn;

/// A node's role as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Never reached yet.
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// One node's last measurements. Replaced whole by the monitor.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// In rotation: the health check's verdict, with hysteresis.
    pub up: bool,
    pub role: Role,
    /// Smoothed probe round-trip time.
    pub rtt: Option<Duration>,
    /// The primary's `pg_current_wal_lsn()`, or a replica's replay LSN.
    pub lsn: Option<Lsn>,
    /// A replica's `pg_last_wal_receive_lsn()`.
    pub receive_lsn: Option<Lsn>,
    /// A replica's `pg_last_xact_replay_timestamp()`.
    pub replay_time: Option<SystemTime>,
    /// Wall-clock time of the probe, on the node's clock.
    pub probed_at: Option<SystemTime>,
    /// A primary's `pg_current_wal_insert_lsn()`, read by the probe sent at
    /// `probe_sent`: the read-your-writes watermark source.
    pub insert_lsn: Option<Lsn>,
    /// When the last successful probe was sent, on pgnear's clock.
    pub probe_sent: Option<Instant>,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

impl NodeStatus {
    /// In rotation and reporting the primary role.
    pub fn claims_primary(&self) -> bool {
        self.up && self.role == Role::Primary
    }
}

impl Default for NodeStatus {
    fn default() -> Self {
        NodeStatus {
            up: false,
            role: Role::Unknown,
            rtt: None,
            lsn: None,
            receive_lsn: None,
            replay_time: None,
            probed_at: None,
            insert_lsn: None,
            probe_sent: None,
            consecutive_failures: 0,
            consecutive_successes: 0,
        }
    }
}

/// Where a node's server listens: a TCP address (its host name resolved,
/// see [`Node::endpoint`]), or the path of its Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl Endpoint {
    /// An endpoint known without a lookup: a socket file for a host that
    /// is a directory, or an address literal.
    fn fixed(config: &NodeConfig) -> Option<Endpoint> {
        if config.is_unix_socket() {
            let dir = std::path::Path::new(&config.host);
            return Some(Endpoint::Unix(crate::config::unix_socket_path(dir, config.port)));
        }
        let ip: std::net::IpAddr = config.host.parse().ok()?;
        Some(Endpoint::Tcp(SocketAddr::new(ip, config.port)))
    }
}

/// A node's host name as last resolved, and when.
#[derive(Debug, Default)]
struct Resolved {
    endpoint: Option<(Endpoint, std::time::Instant)>,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => addr.fmt(f),
            Endpoint::Unix(path) => path.display().fmt(f),
        }
    }
}

/// A configured node and its published status.
#[derive(Debug)]
pub struct Node {
    pub config: NodeConfig,
    /// TLS toward the node's server, per its `sslmode`.
    pub tls: crate::tls::Connector,
    /// A Unix socket or an address literal; `None` for a host name, which
    /// is resolved for new connections (`Node::endpoint`).
    fixed: Option<Endpoint>,
    resolved: std::sync::Mutex<Resolved>,
    /// How long a resolved address is used (`proxy.dns_max_ttl_ms`).
    dns_ttl: std::time::Duration,
    /// `DISABLE` (the admin console): no new reads, as if down.
    disabled: AtomicBool,
    /// `PAUSE <node>`: units for it wait until `RESUME <node>`.
    paused: AtomicBool,
    /// Removed (or replaced) by a reload: down for good, never a primary;
    /// sessions on it move at their next unit of work.
    retired: AtomicBool,
    /// Published with [`Node::publish`].
    pub status: ArcSwap<NodeStatus>,
    /// `status.claims_primary()`, readable without loading the status:
    /// every write asks for the primary.
    primary_claim: AtomicBool,
    /// Units of work running on this node through pgnear, for spreading
    /// reads across replicas that are equally near.
    pub outstanding: Arc<AtomicU32>,
    /// Reads waiting for this replica to replay a write, and the monitor's
    /// fast polls that serve them.
    pub replay: replay::ReplayWatch,
    /// Server connections to this node inside a transaction block:
    /// `PAUSE <node>` waits for none to be left.
    pub transactions: Arc<std::sync::atomic::AtomicUsize>,
}

impl Node {
    fn new(config: NodeConfig, tls: crate::tls::Connector, dns_ttl: Duration) -> Node {
        Node {
            fixed: Endpoint::fixed(&config),
            resolved: std::sync::Mutex::new(Resolved::default()),
            dns_ttl,
            disabled: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            config,
            tls,
            status: ArcSwap::from_pointee(NodeStatus::default()),
            primary_claim: AtomicBool::new(false),
            outstanding: Arc::new(AtomicU32::new(0)),
            replay: replay::ReplayWatch::default(),
            transactions: Arc::default(),
        }
    }

    /// Where to open a new connection now. A host name is looked up again
    /// once its last answer is older than `proxy.dns_max_ttl_ms`, so an
    /// address that moves (a DNS-based failover) is followed; a name that
    /// does not resolve is an error naming the node.
    pub async fn endpoint(&self) -> std::io::Result<Endpoint> {
        if let Some(endpoint) = &self.fixed {
            return Ok(endpoint.clone());
        }
        let cached = self.resolved.lock().map(|r| r.endpoint.clone()).unwrap_or_default();
        if let Some((endpoint, _)) = cached.filter(|(_, at)| at.elapsed() < self.dns_ttl) {
            return Ok(endpoint);
        }
        let name = &self.config.name;
        let host = self.config.host.as_str();
        let found = tokio::net::lookup_host((host, self.config.port)).await;
        let address = match found.map(|mut addresses| addresses.next()) {
            Ok(Some(address)) => address,
            Ok(None) => {
                return Err(std::io::Error::other(format!("node {name}: {host} resolves to no address")))
            }
            Err(error) => {
                return Err(std::io::Error::other(format!("node {name}: cannot resolve {host}: {error}")))
            }
        };
        let endpoint = Endpoint::Tcp(address);
        if let Ok(mut resolved) = self.resolved.lock() {
            if resolved.endpoint.as_ref().is_some_and(|(old, _)| *old != endpoint) {
                tracing::info!(node = name.as_str(), host, %address, "node's host name now resolves elsewhere");
            }
            resolved.endpoint = Some((endpoint.clone(), std::time::Instant::now()));
        }
        Ok(endpoint)
    }

    /// The address last resolved, if any, without a lookup (for a cancel
    /// request, which must reach the server the session already uses).
    pub fn last_endpoint(&self) -> Option<Endpoint> {
        self.fixed.clone().or_else(|| self.resolved.lock().ok()?.endpoint.clone().map(|(e, _)| e))
    }

    /// `DISABLE` (true) or `ENABLE` the node for new reads.
    pub fn disable(&self, disabled: bool) {
        self.disabled.store(disabled, Ordering::Relaxed);
    }

    /// `PAUSE <node>` (true) or `RESUME <node>`.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Whether units for the node wait.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Whether the node is disabled for new reads.
    pub fn disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    /// Whether a reload removed or replaced the node.
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Whether the node takes writes for its cluster now (lock-free).
    fn claims_primary(&self) -> bool {
        self.primary_claim.load(Ordering::Relaxed) && !self.retired()
    }

    /// Makes `status` the node's current status. A retired node stays
    /// down whatever a probe still in flight found.
    pub fn publish(&self, mut status: NodeStatus) {
        if self.retired() {
            status.up = false;
        }
        self.primary_claim.store(status.claims_primary(), Ordering::Relaxed);
        self.status.store(Arc::new(status));
    }
}

/// Every node pgnear has known since it started; indexes are node ids.
/// Nodes are only ever added: a reload that removes or replaces one
/// retires it, so every id a session or a pool holds stays valid.
#[derive(Debug)]
pub struct Topology {
    nodes: boxcar::Vec<Node>,
    /// How long a resolved address is used (`proxy.dns_max_ttl_ms`).
    dns_ttl: Duration,
    /// Reloads change the nodes one at a time.
    changing: std::sync::Mutex<()>,
}

/// What a reload changed in the topology.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeChanges {
    /// Ids of nodes new to the topology (added, or replacing a changed one).
    pub added: Vec<usize>,
    /// Ids of nodes retired (removed, or replaced by a changed one).
    pub retired: Vec<usize>,
}

impl NodeChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.retired.is_empty()
    }
}

impl Topology {
    /// The nodes, none of them resolved yet: a host name that does not
    /// resolve makes its node down (the monitor cannot reach it), never a
    /// failed start. `dns_ttl` is how long a resolved address is used.
    pub fn new(configs: &[NodeConfig], dns_ttl: Duration) -> Result<Arc<Topology>, crate::tls::TlsError> {
        let topology = Topology { nodes: boxcar::Vec::new(), dns_ttl, changing: Default::default() };
        for (i, config) in configs.iter().enumerate() {
            let tls = crate::tls::Connector::for_node(config, &format!("nodes[{i}]"))?;
            topology.nodes.push(Node::new(config.clone(), tls, dns_ttl));
        }
        Ok(Arc::new(topology))
    }

    /// The node with id `id`. Ids come from this topology, which never
    /// forgets a node.
    pub fn node(&self, id: usize) -> &Node {
        &self.nodes[id]
    }

    /// Every node with its id, retired ones included.
    pub fn nodes(&self) -> impl Iterator<Item = (usize, &Node)> + '_ {
        self.nodes.iter()
    }

    /// The nodes in the running configuration, with their ids.
    pub fn live(&self) -> impl Iterator<Item = (usize, &Node)> + '_ {
        self.nodes.iter().filter(|(_, n)| !n.retired())
    }

    /// The live node named `name` (case-insensitively).
    pub fn find(&self, name: &str) -> Option<(usize, &Node)> {
        self.live().find(|(_, n)| n.config.name.eq_ignore_ascii_case(name))
    }

    /// How many nodes there have been.
    pub fn len(&self) -> usize {
        self.nodes.count()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Makes the live nodes those of `configs`, matched by name: a new name
    /// is added, a missing one retired, a changed one retired and added
    /// again under a new id. A changed node that is still the same server
    /// (same host, port, cluster and TLS; a new region or role) starts
    /// from its predecessor's status, so a primary stays writable
    /// throughout. Every TLS setting is checked before anything changes.
    pub fn apply(&self, configs: &[NodeConfig]) -> Result<NodeChanges, crate::tls::TlsError> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let mut new = Vec::new();
        for (i, config) in configs.iter().enumerate() {
            let old = self.find_exact(&config.name);
            if old.is_some_and(|(_, node)| node.config == *config) {
                continue;
            }
            let tls = crate::tls::Connector::for_node(config, &format!("nodes[{i}]"))?;
            new.push((config.clone(), tls, old.map(|(id, _)| id)));
        }
        let mut changes = NodeChanges::default();
        for (id, node) in self.live() {
            let kept = configs.iter().any(|c| c.name == node.config.name);
            if !kept {
                self.retire(id);
                changes.retired.push(id);
            }
        }
        for (config, tls, old) in new {
            let node = Node::new(config, tls, self.dns_ttl);
            let same = old.map(|id| self.node(id)).filter(|old| same_server(&old.config, &node.config));
            if let Some(old) = same {
                // Stored without the primary claim: `primary()` keeps
                // answering the old id until it is retired just below.
                node.status.store(old.status.load_full());
                if let (Ok(from), Ok(mut to)) = (old.resolved.lock(), node.resolved.lock()) {
                    to.endpoint = from.endpoint.clone();
                }
                node.disabled.store(old.disabled(), Ordering::Relaxed);
            }
            let id = self.nodes.push(node);
            if let Some(old) = old {
                self.retire(old);
                changes.retired.push(old);
            }
            if same.is_some() {
                let node = self.node(id);
                node.publish((**node.status.load()).clone());
            }
            changes.added.push(id);
        }
        Ok(changes)
    }

    /// The live node named exactly `name`.
    fn find_exact(&self, name: &str) -> Option<(usize, &Node)> {
        self.live().find(|(_, n)| n.config.name == name)
    }

    /// Takes a node out for good: down, never a primary.
    fn retire(&self, id: usize) {
        let node = self.node(id);
        node.retired.store(true, Ordering::Release);
        node.publish((**node.status.load()).clone());
        tracing::info!(node = node.config.name.as_str(), "node retired by a reload");
    }

    /// Whether nodes `a` and `b` are the same server under two
    /// configurations (one replaced the other in a reload).
    pub fn same_server(&self, a: usize, b: usize) -> bool {
        same_server(&self.node(a).config, &self.node(b).config)
    }

    /// Takes a node out of rotation at once after a connection error on the
    /// data path; the monitor brings it back after enough good probes.
    pub fn suspect(&self, node: usize) {
        let Some(node) = self.nodes.get(node) else { return };
        let old = node.status.load();
        if old.up {
            tracing::warn!(node = node.config.name.as_str(), "node is suspect after a connection error");
            node.publish(NodeStatus { up: false, consecutive_successes: 0, ..(**old).clone() });
        }
    }

    /// The one verified primary of `cluster`, if exactly one node is up and
    /// claims the role (or the config names it).
    pub fn primary(&self, cluster: &str) -> Result<usize, NoPrimary> {
        // The common case, one claimant, without capturing a whole view;
        // anything else (none, a conflict) is settled by the view.
        let mut claims = self.nodes.iter().filter(|(_, n)| n.claims_primary() && n.config.cluster == cluster);
        match (claims.next(), claims.next()) {
            (Some((one, _)), None) => Ok(one),
            _ => {
                let nodes = self.nodes.iter().map(|(_, n)| {
                    let claims = n.status.load().claims_primary() && !n.retired();
                    (&n.config, claims)
                });
                elect_primary(nodes, cluster)
            }
        }
    }
}

/// Same host, port, cluster and TLS: the same server, whatever its region
/// or role setting says.
fn same_server(a: &NodeConfig, b: &NodeConfig) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.cluster == b.cluster
        && a.sslmode == b.sslmode
        && a.sslrootcert == b.sslrootcert
}

/// The primary of `cluster` among nodes (each with whether it is up and
/// claims the role): the one claimant, or among several the one the config
/// names primary; none or a conflict otherwise.
pub fn elect_primary<'a>(
    nodes: impl Iterator<Item = (&'a NodeConfig, bool)>,
    cluster: &str,
) -> Result<usize, NoPrimary> {
    let claims: smallvec::SmallVec<[(usize, &NodeConfig); 2]> = nodes
        .enumerate()
        .filter(|(_, (config, claims))| *claims && config.cluster == cluster)
        .map(|(i, (config, _))| (i, config))
        .collect();
    match claims.as_slice() {
        [] => Err(NoPrimary::Unreachable),
        [(one, _)] => Ok(*one),
        many => {
            let mut named = many.iter().filter(|(_, config)| config.role == RoleSetting::Primary);
            match (named.next(), named.next()) {
                (Some((one, _)), None) => Ok(*one),
                _ => Err(NoPrimary::Conflict(many.iter().map(|(_, config)| config.name.clone()).collect())),
            }
        }
    }
}

/// Why no primary can take writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPrimary {
    #[error("no primary is reachable")]
    Unreachable,
    #[error("more than one node claims to be the primary: {}", .0.join(", "))]
    Conflict(Vec<String>),
}
