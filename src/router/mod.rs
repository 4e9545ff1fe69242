//! Routing decisions, as pure functions: [`classify`](classify::classify)
//! turns SQL text into a [`Classification`]; [`route`] turns a unit of work,
//! the session's state and a [`ClusterView`] into a [`Route`]. Neither does
//! I/O or reads a clock. Anything not provably read-only goes to the
//! primary.

pub mod cache;
pub mod classify;
pub(crate) mod consistency;
pub mod functions;
pub mod learned;
pub(crate) mod shape;
mod view;

use std::sync::Arc;

use crate::cluster::{Lsn, NoPrimary};
use crate::config::{DefaultRoute, RoutingConfig, RuleAction, RuleConfig};
use classify::{Class, Classification, Hint, StalenessHint, Tx};
use functions::VolatileFunctions;
pub use view::{ClusterView, NodeView};

/// Why a unit went where it went; a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Write,
    Read,
    /// A read kept on the primary because the session's writes have not
    /// replayed on any eligible replica yet.
    PinnedAfterWrite,
    /// A read kept on the primary because every replica lags too much.
    ReplicaLagging,
    /// A read after a write that waited for a replica to replay it, and
    /// runs there.
    CaughtUp,
    Rule,
    Hint,
    Transaction,
    SessionState,
    Unparsed,
    FallbackNoReplica,
    /// A read a replica refused (25006 read-only, 40001 recovery conflict)
    /// run again on the primary, unnoticed.
    RetriedOnPrimary,
    /// A read a replica refused before, sent to the primary from then on.
    ReplicaRefused,
    /// A transaction opened with a plain BEGIN sent to the primary, since
    /// transactions that opened with its first statement lately wrote.
    LearnedWrite,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::Read => "read",
            Reason::PinnedAfterWrite => "pinned_after_write",
            Reason::ReplicaLagging => "replica_lagging",
            Reason::CaughtUp => "replica_caught_up",
            Reason::Rule => "rule",
            Reason::Hint => "hint",
            Reason::Transaction => "transaction",
            Reason::SessionState => "session_state",
            Reason::Unparsed => "unparsed",
            Reason::FallbackNoReplica => "fallback_no_replica",
            Reason::LearnedWrite => "learned_write",
            Reason::RetriedOnPrimary => "retried_on_primary",
            Reason::ReplicaRefused => "replica_refused",
        }
    }
}

/// Where a unit runs: a node index into the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Primary(usize),
    Replica(usize),
}

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub destination: Destination,
    pub reason: Reason,
}

/// `SET pgnear.route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteSetting {
    #[default]
    Auto,
    Primary,
    Replica,
}

/// How fresh a replica must be for this session's reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Freshness {
    /// No constraint beyond the lag limits.
    #[default]
    Any,
    /// A write has committed but its LSN is not known yet: primary only.
    Unknown,
    /// The replica must have replayed at least this LSN.
    AtLeast(Lsn),
}

/// A session's bound on the staleness of its reads
/// (`pgnear.max_staleness_ms`, `pgnear.read_your_writes`), which a
/// statement's hint may override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Staleness {
    /// Replicas lagging more than this serve none of the reads.
    pub max: Option<std::time::Duration>,
    /// Reads must see the session's writes; only an explicit `off` lets
    /// a replica that has not replayed them serve.
    pub read_your_writes: bool,
}

impl Staleness {
    /// No bound, and read-your-writes.
    pub const DEFAULT: Staleness = Staleness { max: None, read_your_writes: true };

    /// The session's bound with what a hint says instead.
    fn with(self, hint: Option<StalenessHint>) -> Staleness {
        let Some(hint) = hint else { return self };
        Staleness {
            max: hint.max.or(self.max),
            read_your_writes: hint.read_your_writes.unwrap_or(self.read_your_writes),
        }
    }
}

impl Default for Staleness {
    fn default() -> Staleness {
        Staleness::DEFAULT
    }
}

/// What the router needs to know about the session.
#[derive(Debug, Clone, Copy)]
pub struct SessionView<'a> {
    pub cluster: &'a str,
    pub setting: RouteSetting,
    /// LISTEN, temp objects, session advisory locks, WITH HOLD cursors.
    pub pinned: bool,
    /// What the session's reads must see: its writes (as the consistency
    /// scope has it), `pgnear.min_lsn` and the schema watermark.
    pub freshness: Freshness,
    /// What every read must see, even one that waives the session's
    /// writes: the cluster's schema watermark (DDL that committed).
    pub schema: Freshness,
    /// The session's bound on the staleness of its reads.
    pub staleness: Staleness,
}

/// The config that shapes routing.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub routing: &'a RoutingConfig,
    pub rules: &'a [RuleConfig],
    pub region: &'a str,
}

/// What a unit of work needs, before looking at nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Primary(Reason),
    /// A read; `skip_writes` when a replica hint, `pgnear.route =
    /// replica` or an explicit `read_your_writes = off` waives the
    /// session's writes (never the schema watermark, the lag limits, the
    /// staleness bound or the cluster).
    Read {
        skip_writes: bool,
        max_staleness: Option<std::time::Duration>,
    },
}

/// Where a route's nodes come from: a view taken for the decision (tests,
/// benches), or the live topology, whose view is taken only when a read
/// needs one: a write needs the primary's index alone.
pub trait NodeSource {
    fn primary(&self, cluster: &str) -> Result<usize, NoPrimary>;
    fn with_view<R>(&self, f: impl FnOnce(&ClusterView) -> R) -> R;
}

impl NodeSource for ClusterView<'_> {
    fn primary(&self, cluster: &str) -> Result<usize, NoPrimary> {
        ClusterView::primary(self, cluster)
    }

    fn with_view<R>(&self, f: impl FnOnce(&ClusterView) -> R) -> R {
        f(self)
    }
}

impl NodeSource for crate::cluster::Topology {
    fn primary(&self, cluster: &str) -> Result<usize, NoPrimary> {
        crate::cluster::Topology::primary(self, cluster)
    }

    fn with_view<R>(&self, f: impl FnOnce(&ClusterView) -> R) -> R {
        f(&ClusterView::capture(self))
    }
}

/// Routes one unit of work: the statements of a simple Query, or of an
/// extended-protocol batch up to Sync. What the session calls for every
/// unit it routes.
pub fn route(
    unit: &[Arc<Classification>],
    session: &SessionView,
    nodes: &impl NodeSource,
    policy: &Policy,
    volatile: &VolatileFunctions,
) -> Result<Route, NoPrimary> {
    match need(unit, session, policy, volatile) {
        Need::Primary(reason) => nodes
            .primary(session.cluster)
            .map(|node| Route { destination: Destination::Primary(node), reason }),
        read => nodes.with_view(|view| route_need(read, session, view, policy)),
    }
}

/// Routes a unit whose [`Need`] is known.
fn route_need(
    need: Need,
    session: &SessionView,
    view: &ClusterView,
    policy: &Policy,
) -> Result<Route, NoPrimary> {
    let primary = |reason| {
        view.primary(session.cluster).map(|node| Route { destination: Destination::Primary(node), reason })
    };
    match need {
        Need::Primary(reason) => primary(reason),
        Need::Read { skip_writes, max_staleness } => {
            let freshness = if skip_writes { session.schema } else { session.freshness };
            let limits = view::Limits { policy, freshness, max_staleness };
            match view.nearest_replica(session.cluster, policy.region, &limits) {
                Ok(node) => Ok(Route { destination: Destination::Replica(node), reason: Reason::Read }),
                Err(why) => primary(why).or_else(|e| {
                    // No primary: a read may still use any replica that is up.
                    view.any_replica(session.cluster)
                        .map(|node| Route { destination: Destination::Replica(node), reason: Reason::Read })
                        .ok_or(e)
                }),
            }
        }
    }
}

/// What a unit of work needs, from its statements, the session and the
/// config alone.
pub fn need(
    unit: &[Arc<Classification>],
    session: &SessionView,
    policy: &Policy,
    volatile: &VolatileFunctions,
) -> Need {
    let hint = unit.iter().find_map(|c| c.hint);
    if let Some(reason) = primary_reason(unit, session, volatile) {
        return Need::Primary(reason);
    }
    if hint == Some(Hint::Primary) {
        return Need::Primary(Reason::Hint);
    }
    if unit.iter().any(|c| c.node_state) {
        return Need::Primary(Reason::Rule);
    }
    let staleness = session.staleness.with(match hint {
        Some(Hint::Staleness(hint)) => Some(hint),
        _ => None,
    });
    // The strictest bound: the statement's (or session's) and its tables'.
    let mut max_staleness = staleness.max;
    for rule in policy.rules {
        if !unit.iter().any(|c| c.tables.iter().any(|t| rule.tables.contains(t))) {
            continue;
        }
        match rule.action {
            RuleAction::Primary => return Need::Primary(Reason::Rule),
            RuleAction::MaxStaleness(bound) => {
                max_staleness = Some(max_staleness.map_or(bound, |b: std::time::Duration| b.min(bound)))
            }
        }
    }
    let hinted = hint == Some(Hint::Replica) || session.setting == RouteSetting::Replica;
    let skip_writes = hinted || !staleness.read_your_writes;
    match (session.setting, policy.routing.default) {
        (RouteSetting::Primary, _) => Need::Primary(Reason::Hint),
        (RouteSetting::Auto, DefaultRoute::Primary) if !hinted => Need::Primary(Reason::Rule),
        _ => Need::Read { skip_writes, max_staleness },
    }
}

/// Why the unit must run on the primary, if it must.
fn primary_reason(
    unit: &[Arc<Classification>],
    session: &SessionView,
    volatile: &VolatileFunctions,
) -> Option<Reason> {
    if unit.iter().any(|c| c.unparsed) {
        return Some(Reason::Unparsed);
    }
    if unit
        .iter()
        .any(|c| c.needs_primary() && !matches!(c.class, Class::Transaction(Tx::Begin { read_only: false })))
    {
        return Some(Reason::Write);
    }
    if unit.iter().any(|c| c.calls_volatile(volatile)) {
        return Some(Reason::Write);
    }
    if session.pinned {
        return Some(Reason::SessionState);
    }
    // The end of a read-only transaction the unit itself began, and its
    // savepoints, run wherever that transaction does.
    let mut read_only_begun = false;
    for c in unit {
        match &c.class {
            Class::Transaction(Tx::Begin { read_only: true }) => read_only_begun = true,
            Class::Read => {}
            Class::Transaction(Tx::Savepoint | Tx::Release | Tx::RollbackTo) if read_only_begun => {}
            Class::Transaction(Tx::Commit | Tx::Rollback) if read_only_begun => read_only_begun = false,
            Class::Transaction(_) => return Some(Reason::Transaction),
            Class::Session | Class::ProxyLocal(_) => return Some(Reason::SessionState),
            Class::Write => return Some(Reason::Write),
        }
    }
    if unit.is_empty() {
        return Some(Reason::SessionState);
    }
    None
}

#[cfg(test)]
mod tests;
