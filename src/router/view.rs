//! A point-in-time view of the cluster for one routing decision: each
//! node's published status plus the lag derived from it.

use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use super::{Freshness, Policy, Reason};
use crate::cluster::{NoPrimary, NodeStatus, Role, Topology};
use crate::config::{NodeConfig, RoleSetting};

/// One node as the router sees it.
#[derive(Debug, Clone)]
pub struct NodeView<'a> {
    pub config: &'a NodeConfig,
    pub status: Arc<NodeStatus>,
    /// Bytes of WAL the primary has that this replica has not replayed.
    pub lag_bytes: Option<u64>,
    /// How far behind in time; zero when everything is replayed.
    pub lag: Option<Duration>,
    /// Units of work running there through this pgnear.
    pub outstanding: u32,
}

impl<'a> NodeView<'a> {
    /// A node with the given status, before [`ClusterView::with_lag`]
    /// derives its lag, and nothing running there.
    pub fn new(config: &'a NodeConfig, status: NodeStatus) -> NodeView<'a> {
        NodeView { config, status: Arc::new(status), lag_bytes: None, lag: None, outstanding: 0 }
    }
}

/// Every node's status at one moment. Captured for every routing
/// decision, so a typical topology (a primary and a few replicas) lives on
/// the stack.
#[derive(Debug, Clone)]
pub struct ClusterView<'a> {
    pub nodes: Nodes<'a>,
}

/// A view's nodes, inline up to four.
pub type Nodes<'a> = SmallVec<[NodeView<'a>; 4]>;

/// What makes a replica eligible for one read.
pub(super) struct Limits<'a> {
    pub policy: &'a Policy<'a>,
    pub freshness: Freshness,
    pub max_staleness: Option<Duration>,
}

impl<'a> ClusterView<'a> {
    /// Loads every node's latest status (lock-free) and derives lag.
    pub fn capture(topology: &'a Topology) -> ClusterView<'a> {
        // Every node, retired ones too, so that a position in the view is
        // a node id.
        let nodes: Nodes<'a> = topology
            .nodes()
            .map(|(_, n)| NodeView {
                config: &n.config,
                status: match n.disabled() || n.retired() {
                    // Disabled for maintenance (or gone from the config):
                    // no new reads, as if down.
                    true => {
                        Arc::new(crate::cluster::NodeStatus { up: false, ..(*n.status.load_full()).clone() })
                    }
                    false => n.status.load_full(),
                },
                lag_bytes: None,
                lag: None,
                outstanding: n.outstanding.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        Self::with_lag(nodes)
    }

    /// Fills in each replica's lag against its cluster's primary.
    pub fn with_lag(nodes: impl Into<Nodes<'a>>) -> ClusterView<'a> {
        let mut nodes = nodes.into();
        let primaries: SmallVec<[(&'a str, Option<crate::cluster::Lsn>); 2]> = nodes
            .iter()
            .filter(|n| n.status.claims_primary())
            .map(|n| (n.config.cluster.as_str(), n.status.lsn))
            .collect();
        for node in nodes.iter_mut().filter(|n| n.status.role == Role::Replica) {
            let primary_lsn = primaries.iter().find(|(c, _)| *c == node.config.cluster).and_then(|(_, l)| *l);
            let (Some(primary), Some(replayed)) = (primary_lsn, node.status.lsn) else { continue };
            node.lag_bytes = Some(primary.0.saturating_sub(replayed.0));
            node.lag = if replayed >= primary {
                Some(Duration::ZERO)
            } else {
                match (node.status.probed_at, node.status.replay_time) {
                    (Some(now), Some(replay)) => Some(now.duration_since(replay).unwrap_or_default()),
                    _ => None,
                }
            };
        }
        ClusterView { nodes }
    }

    /// The one verified primary of `cluster`. A node the config names as
    /// primary wins a conflict; otherwise two claimants refuse writes.
    pub fn primary(&self, cluster: &str) -> Result<usize, NoPrimary> {
        crate::cluster::elect_primary(
            self.nodes.iter().map(|n| (n.config, n.status.claims_primary())),
            cluster,
        )
    }

    /// The nearest replica that may serve the read, or why none may.
    pub(super) fn nearest_replica(
        &self,
        cluster: &str,
        region: &str,
        limits: &Limits,
    ) -> Result<usize, Reason> {
        let mut why = Reason::FallbackNoReplica;
        let mut best: Option<(usize, (bool, u128, u32))> = None;
        for (i, node) in self.replicas(cluster) {
            if let Err(reason) = eligible(node, limits) {
                why = stricter(why, reason);
                continue;
            }
            // Same region first, then RTT to the millisecond; equally near
            // replicas split the load by outstanding work.
            let rtt_ms = node.status.rtt.map_or(u128::MAX, |r| r.as_millis());
            let rank = (node.config.region != region, rtt_ms, node.outstanding);
            if best.as_ref().is_none_or(|(_, b)| rank < *b) {
                best = Some((i, rank));
            }
        }
        best.map(|(i, _)| i).ok_or(why)
    }

    /// Any replica of `cluster` that is up, ignoring lag: the last resort
    /// for reads while no primary is reachable.
    pub fn any_replica(&self, cluster: &str) -> Option<usize> {
        self.replicas(cluster).map(|(i, _)| i).next()
    }

    fn replicas<'s>(&'s self, cluster: &'s str) -> impl Iterator<Item = (usize, &'s NodeView<'a>)> + 's {
        self.nodes.iter().enumerate().filter(move |(_, n)| {
            n.config.cluster == cluster
                && n.status.up
                && n.status.role == Role::Replica
                && n.config.role != RoleSetting::Primary
        })
    }
}

/// Whether a replica may serve a read under `limits`.
fn eligible(node: &NodeView, limits: &Limits) -> Result<(), Reason> {
    let routing = limits.policy.routing;
    let lag = node.lag.ok_or(Reason::ReplicaLagging)?;
    if lag > routing.max_replica_lag {
        return Err(Reason::ReplicaLagging);
    }
    if let (Some(max), Some(bytes)) = (routing.max_replica_lag_bytes, node.lag_bytes) {
        if bytes > max {
            return Err(Reason::ReplicaLagging);
        }
    }
    if limits.max_staleness.is_some_and(|bound| lag > bound) {
        return Err(Reason::Rule);
    }
    match limits.freshness {
        Freshness::Any => Ok(()),
        Freshness::Unknown => Err(Reason::PinnedAfterWrite),
        Freshness::AtLeast(needed) => match node.status.lsn {
            Some(replayed) if replayed >= needed => Ok(()),
            _ => Err(Reason::PinnedAfterWrite),
        },
    }
}

/// The reason to report when several replicas were refused for different
/// reasons: the one that explains the most.
fn stricter(a: Reason, b: Reason) -> Reason {
    let rank = |r: Reason| match r {
        Reason::FallbackNoReplica => 0,
        Reason::ReplicaLagging => 1,
        Reason::Rule => 2,
        _ => 3,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}
