//! The planner: given a unit and what the session and the cluster know,
//! what happens to it next. Either a final plan (send it to this server
//! for this reason, fail it, hold it, wait for a pooled connection) or an
//! I/O step to perform first (open a server, restore settings, prepare,
//! reload the catalog, wait for a replica), after which the driver
//! (`drive`) asks again. Nothing here does I/O or changes the session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::optimistic::Opening;
use super::{Batch, Session, Target};
use crate::backend::pool::Pool;
use crate::cluster::Lsn;
use crate::config::ReplicaWait;
use crate::protocol::backend::{error_response, Severity};
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::{Frame, SqlState};
use crate::router::classify::Classification;
use crate::router::functions::VolatileFunctions;
use crate::router::{self, ClusterView, Destination, Freshness, Need, Policy, Reason, Route, SessionView};
use crate::tls::Split;

/// What to do with a unit now.
pub(super) enum Plan {
    /// Send it to `target` for `reason`; `fresh` if routed now rather
    /// than held on a server.
    Send { target: Target, reason: Reason, fresh: bool },
    /// Fail it with this error; the session stays.
    Fail(Frame),
    /// Hold it until no server owes the client responses (a probe's
    /// answer included), then take it again.
    Hold,
    /// Transaction pooling: wait for a connection of this pool, all of
    /// whose connections are in use, for `target`.
    WaitPool(Arc<Pool>, Target),
    /// Answer it in the server's place (an optimistic transaction's).
    Local(super::optimistic::Local),
    /// Perform this step first, then plan again.
    Do(Step),
}

/// An I/O step the planner asks the driver for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// End the batch left open on the held server (after a Flush) with a
    /// Sync of pgnear's own: the next unit belongs elsewhere.
    EndOpenBatch,
    /// Transaction pooling: take back the connection the session last
    /// wrote on, for `currval()` or `lastval()`.
    TakeBackWriteConnection,
    /// Reload the volatile-function catalog, which DDL made stale.
    RefreshCatalog,
    /// Wait for replica `node` to replay `lsn`, until then.
    WaitReplica { node: usize, lsn: Lsn, until: Instant },
    /// Wait a moment for the monitor (the watermark, a lagging replica),
    /// until then at most.
    WaitMonitor { until: Instant },
    /// Make `node` the session's primary connection.
    OpenPrimary(usize),
    /// Make `node` the session's replica connection.
    OpenReplica(usize),
    /// Bring the server's settings up to the session's.
    RestoreSettings(Target),
    /// Prepare there the SQL-level statements the unit executes.
    PrepareSql(Target),
    /// Move the optimistic transaction from the replica to the primary.
    Promote,
    /// Wait while pgnear (`PAUSE`) or this node (`PAUSE <node>`) is
    /// paused, until it resumes.
    WaitResume(Option<usize>),
}

/// What the driver learned while performing a unit's steps.
#[derive(Debug, Default)]
pub(super) struct Progress {
    pub(super) catalog_refreshed: bool,
    /// The wait for the monitor began, and ends then.
    pub(super) deadline: Option<Instant>,
    /// The wait for a replica is over: whether it caught up.
    pub(super) waited: Option<bool>,
    /// The replica could not be opened: reads fall back to the primary.
    pub(super) replica_failed: bool,
    /// The replica refused a PREPARE the unit needs: the primary runs it.
    pub(super) primary_only: bool,
    /// Waited while pgnear was paused.
    pub(super) resumed: bool,
    /// A replica refused the unit: it runs again on the primary.
    pub(super) retried: bool,
}

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// Plans a unit: where it goes, or what must happen first.
    pub(super) fn plan(&self, unit: &Batch, progress: &Progress) -> Plan {
        if let Some(plan) = self.plan_reopen(unit) {
            return plan;
        }
        if let Some(plan) = self.plan_optimistic(unit) {
            return plan;
        }
        if let Some(plan) = self.plan_sequence_read(unit) {
            return plan;
        }
        let (target, reason, fresh) = match self.held_target(unit) {
            Some((target, reason)) => (target, reason, false),
            None => match self.plan_route(unit, progress) {
                Ok((target, reason)) => (target, reason, true),
                Err(plan) => return plan,
            },
        };
        if self.bound.is_none() && !self.settings_current(target) {
            // The settings' replay would read a probe's answer as its own.
            let probing = self.server(target).is_some_and(|s| s.backend.is_probing());
            return if probing { Plan::Hold } else { Plan::Do(Step::RestoreSettings(target)) };
        }
        if self.lacks_sql_prepared(target, unit) {
            // A replay's responses must not mix with those still owed.
            return if self.in_flight() { Plan::Hold } else { Plan::Do(Step::PrepareSql(target)) };
        }
        Plan::Send { target, reason, fresh }
    }

    /// Where a unit not held on a server goes: the router's decision, after
    /// any wait it calls for, on a server connection that is open.
    pub(super) fn plan_route(&self, unit: &Batch, progress: &Progress) -> Result<(Target, Reason), Plan> {
        if self.shared.paused.is_on() && !progress.resumed {
            return Err(Plan::Do(Step::WaitResume(None)));
        }
        if self.scope.catalog.is_stale() && !progress.catalog_refreshed {
            return Err(Plan::Do(Step::RefreshCatalog));
        }
        let opening = self.opening(unit);
        let classes = match opening {
            Opening::AsRead(skip) => &unit.classes[skip..],
            _ => &unit.classes[..],
        };
        let route = match (progress.primary_only, opening) {
            _ if progress.retried => self.primary_route(Reason::RetriedOnPrimary),
            (true, _) => self.primary_route(Reason::SessionState),
            (false, _) if self.shared.refused.any(classes) => self.primary_route(Reason::ReplicaRefused),
            (false, Opening::OnPrimary(reason)) => self.primary_route(reason),
            (false, _) => self.decide(classes),
        };
        let route = route.map_err(|no_primary| Plan::Fail(no_route(&no_primary)))?;
        let route = match progress.waited {
            // Waited once already: go where the router says now.
            Some(true) if matches!(route.destination, Destination::Replica(_)) => {
                Route { reason: Reason::CaughtUp, ..route }
            }
            Some(_) => route,
            None => match self.wait_plan(classes, &route, progress.deadline) {
                Some(wait) => return Err(wait),
                None => route,
            },
        };
        let route = match route.destination {
            Destination::Replica(_) if progress.replica_failed => self
                .primary_route(Reason::FallbackNoReplica)
                .map_err(|no_primary| Plan::Fail(no_route(&no_primary)))?,
            _ => route,
        };
        let (Destination::Primary(node) | Destination::Replica(node)) = route.destination;
        if self.shared.topology.node(node).paused() && !progress.resumed {
            // `PAUSE <node>`: work for that node waits.
            return Err(Plan::Do(Step::WaitResume(Some(node))));
        }
        match route.destination {
            Destination::Primary(node) if self.primary.as_ref().is_some_and(|p| p.node == node) => {
                Ok((Target::Primary, route.reason))
            }
            Destination::Primary(node) => Err(Plan::Do(Step::OpenPrimary(node))),
            Destination::Replica(node) if self.replica.as_ref().is_some_and(|r| r.node == node) => {
                Ok((Target::Replica, route.reason))
            }
            Destination::Replica(node) => Err(Plan::Do(Step::OpenReplica(node))),
        }
    }

    /// The session is held on a server only by extended messages sent
    /// ahead of a Sync (after a Flush; asyncpg prepares that way). If they
    /// executed nothing, the server is otherwise idle and the next unit
    /// does not use the unnamed statement or portal left there, and the
    /// router would send it elsewhere, the open batch ends first.
    pub(super) fn plan_reopen(&self, unit: &Batch) -> Option<Plan> {
        let held = self.bound.as_ref().filter(|b| b.open_batch)?.target;
        // Statements executed ahead of the Sync run in the client's
        // implicit transaction: a Sync of pgnear's own would commit it.
        let quiet = self.server(held).is_some_and(|s| s.backend.is_idle() && !s.ran_partial);
        if !quiet || uses_unnamed(&unit.frames) {
            return None;
        }
        let target = match self.decide(&unit.classes).ok()?.destination {
            Destination::Primary(_) => Target::Primary,
            Destination::Replica(_) => Target::Replica,
        };
        (target != held).then_some(Plan::Do(Step::EndOpenBatch))
    }

    /// Transaction pooling: `currval()` and `lastval()` read what the
    /// session's last `nextval()` left on one server connection. A unit
    /// that reads them and writes nothing itself runs on the connection
    /// the session last wrote on, taken back from the pool if no other
    /// session has used it since; otherwise it fails instead of reading
    /// another client's value.
    pub(super) fn plan_sequence_read(&self, unit: &Batch) -> Option<Plan> {
        let pooling = self.pooling.as_ref()?;
        if !reads_sequence_state(unit) {
            return None;
        }
        let Some((key, turn)) = pooling.write_at else { return Some(Plan::Fail(sequence_state_elsewhere())) };
        match self.primary.as_ref() {
            Some(primary) if primary.cancel_key == key && primary.held_by_since(self.state.owner(), turn) => {
                None
            }
            Some(_) => Some(Plan::Fail(sequence_state_elsewhere())),
            None => Some(Plan::Do(Step::TakeBackWriteConnection)),
        }
    }

    /// The route to the cluster's primary, for `reason`.
    pub(super) fn primary_route(&self, reason: Reason) -> Result<Route, crate::cluster::NoPrimary> {
        let node = self.shared.topology.primary(&self.scope.cluster)?;
        Ok(Route { destination: Destination::Primary(node), reason })
    }

    /// The server the session is held on for this unit, if any: inside a
    /// transaction, pipelined behind the unit that chose it (and sharing
    /// its reason), or where the unnamed statement the unit uses was parsed.
    pub(super) fn held_target(&self, unit: &Batch) -> Option<(Target, Reason)> {
        match &self.bound {
            Some(bound) => match self.server(bound.target).map(|s| s.backend.tx_status) {
                Some(status) if status.in_block() => Some((bound.target, Reason::Transaction)),
                _ => Some((bound.target, bound.reason)),
            },
            None => {
                self.known.unnamed_on.filter(|(t, _)| unit.uses_earlier_unnamed && self.server(*t).is_some())
            }
        }
    }

    /// Whether a unit's server is known before the unit is complete: no
    /// later message can change it.
    pub(super) fn settled(&self, unit: &Batch) -> bool {
        if self.held_target(unit).is_some() {
            return true;
        }
        let route = match self.scope.catalog.is_stale() {
            true => return false,
            false => self.decide(&unit.classes),
        };
        // Reasons that a later statement cannot take back.
        let lasting = [Reason::Write, Reason::Unparsed, Reason::Transaction, Reason::SessionState];
        matches!(route, Ok(Route { destination: Destination::Primary(_), reason }) if lasting.contains(&reason))
    }

    /// Whether a read that `route` keeps on the primary should wait
    /// instead, and for what. `deadline` is that of a wait for the monitor
    /// already begun.
    /// - Its session's own probe is on its way: wait for it (it comes right
    ///   behind the client's ReadyForQuery), then route again.
    /// - Its watermark is known and the replica it would use otherwise
    ///   could replay it within the bound (`consistency.replica_wait_ms`;
    ///   by default the primary's measured round trip, so waiting never
    ///   costs more than going there): wait on that replica.
    /// - An explicit bound and a watermark that waits for the monitor (or
    ///   a lagging replica): look again every few milliseconds until then.
    pub(super) fn wait_plan(
        &self,
        classes: &[Arc<Classification>],
        route: &Route,
        deadline: Option<Instant>,
    ) -> Option<Plan> {
        if !matches!(route.reason, Reason::PinnedAfterWrite | Reason::ReplicaLagging) {
            return None;
        }
        if route.reason == Reason::PinnedAfterWrite && self.writes.watermark.is_probing() {
            return Some(Plan::Hold);
        }
        let bound = match self.shared.config().consistency.replica_wait {
            ReplicaWait::Fixed(bound) => bound,
            ReplicaWait::Auto => self.primary_rtt().unwrap_or_default(),
        };
        let now = Instant::now();
        if let Some(until) = deadline {
            return (now < until).then_some(Plan::Do(Step::WaitMonitor { until }));
        }
        if bound.is_zero() {
            return None;
        }
        let (all, schema) = self.read_freshness();
        let skips_writes = matches!(self.need(classes), Need::Read { skip_writes: true, .. });
        let freshness = if skips_writes { schema } else { all };
        match (route.reason, freshness) {
            (Reason::PinnedAfterWrite, Freshness::AtLeast(lsn)) => {
                let node = self.replica_to_wait_on(classes, bound)?;
                Some(Plan::Do(Step::WaitReplica { node, lsn, until: now + bound }))
            }
            _ if matches!(self.shared.config().consistency.replica_wait, ReplicaWait::Fixed(_)) => {
                Some(Plan::Do(Step::WaitMonitor { until: now + bound }))
            }
            _ => None,
        }
    }

    /// The replica a read would use but for its watermark, if it is likely
    /// to replay the write within `bound`: one replaying all it receives
    /// waits only for the WAL to arrive, while one with a backlog of WAL
    /// received but not replayed for longer than `bound` (a delayed
    /// standby, a long replay conflict) is not waited on.
    pub(super) fn replica_to_wait_on(
        &self,
        classes: &[Arc<Classification>],
        bound: Duration,
    ) -> Option<usize> {
        let route = self.decide_with(classes, (Freshness::Any, Freshness::Any)).ok()?;
        let Destination::Replica(node) = route.destination else { return None };
        let view = ClusterView::capture(&self.shared.topology);
        let replica = view.nodes.get(node)?;
        let backlog = match (replica.status.receive_lsn, replica.status.lsn) {
            (Some(received), Some(replayed)) => received > replayed,
            _ => true,
        };
        let lag = replica.lag?;
        (!backlog || lag <= bound).then_some(node)
    }

    /// The primary's measured round trip (the monitor's EWMA).
    pub(super) fn primary_rtt(&self) -> Option<Duration> {
        let node = self.shared.topology.primary(&self.scope.cluster).ok()?;
        self.shared.topology.node(node).status.load().rtt
    }

    /// The database's user-defined volatile functions, loaded only when a
    /// statement of the unit calls a function.
    pub(super) fn volatile_for(
        &self,
        classes: &[Arc<Classification>],
    ) -> Option<arc_swap::Guard<Arc<VolatileFunctions>>> {
        classes.iter().any(|c| !c.functions.is_empty()).then(|| self.scope.catalog.volatile.load())
    }

    pub(super) fn decide(&self, classes: &[Arc<Classification>]) -> Result<Route, crate::cluster::NoPrimary> {
        self.decide_with(classes, self.read_freshness())
    }

    /// `decide`, as if the session's reads needed `freshness`: (all they
    /// must see, what they must see even when they skip the session's
    /// writes).
    pub(super) fn decide_with(
        &self,
        classes: &[Arc<Classification>],
        freshness: (Freshness, Freshness),
    ) -> Result<Route, crate::cluster::NoPrimary> {
        self.with_policy(classes, freshness, |session, policy, volatile| {
            router::route(classes, session, &*self.shared.topology, policy, volatile)
        })
    }

    /// What statements need, before looking at nodes.
    pub(super) fn need(&self, classes: &[Arc<Classification>]) -> Need {
        self.with_policy(classes, (Freshness::Any, Freshness::Any), |session, policy, volatile| {
            router::need(classes, session, policy, volatile)
        })
    }

    /// Calls `f` with what the router needs of the session and the config.
    fn with_policy<R>(
        &self,
        classes: &[Arc<Classification>],
        (freshness, schema): (Freshness, Freshness),
        f: impl FnOnce(&SessionView, &Policy, &VolatileFunctions) -> R,
    ) -> R {
        let config = &self.shared.config();
        let session = SessionView {
            cluster: &self.scope.cluster,
            setting: self.known.settings.route,
            pinned: self.state.pinned || self.known.settings_refused,
            freshness,
            schema,
            staleness: self.known.settings.staleness,
        };
        let region = self.known.settings.prefer_region.as_deref().unwrap_or(&config.proxy.region);
        let policy = Policy { routing: &config.routing, rules: &config.rules, region };
        let volatile = self.volatile_for(classes);
        let volatile = volatile.as_ref().map_or(&*NO_FUNCTIONS, |v| &***v);
        f(&session, &policy, volatile)
    }

    /// Whether `target` (if open) already has the session's settings.
    pub(super) fn settings_current(&self, target: Target) -> bool {
        self.server(target).is_none_or(|s| {
            s.state.settings == self.state.settings_key()
                && self
                    .pooling
                    .as_ref()
                    .is_none_or(|p| s.state.app_name.as_deref() == Some(p.app_name.as_str()))
        })
    }

    /// Whether `target` lacks a SQL-level prepared statement that the unit
    /// executes, as the session prepared it.
    pub(super) fn lacks_sql_prepared(&self, target: Target, unit: &Batch) -> bool {
        if unit.classes.iter().all(|c| c.executes.is_empty()) {
            return false;
        }
        let Some(server) = self.server(target) else { return false };
        !self.state.missing_sql_prepared(executed(unit), &server.state).is_empty()
    }
}

/// What a unit that calls no function is checked against.
pub(super) static NO_FUNCTIONS: std::sync::LazyLock<VolatileFunctions> =
    std::sync::LazyLock::new(VolatileFunctions::default);

/// The SQL-level prepared statements a unit executes.
pub(super) fn executed(unit: &Batch) -> impl Iterator<Item = &String> {
    unit.classes.iter().flat_map(|c| c.executes.iter())
}

/// Whether a unit runs `currval()` or `lastval()` without writing
/// anything itself (a text that also inserts or calls `nextval()` runs on
/// one connection, its own state included).
pub(super) fn reads_sequence_state(unit: &Batch) -> bool {
    let calls =
        |c: &Arc<Classification>, names: &[&str]| c.functions.iter().any(|f| names.contains(&f.as_str()));
    // The rare part first: this runs for every pooled unit.
    if !unit.classes.iter().any(|c| calls(c, &["currval", "lastval"])) {
        return false;
    }
    let executes = unit.frames.iter().any(|f| matches!(f.tag(), b'Q' | b'E'));
    let writes = unit
        .classes
        .iter()
        .any(|c| !c.tables.is_empty() || c.unparsed || c.ddl || calls(c, &["nextval", "setval"]));
    executes && !writes
}

/// The error that fails a sequence read whose state is on a connection
/// another session has used since.
pub(super) fn sequence_state_elsewhere() -> Frame {
    let message = "currval() and lastval() through transaction pooling read the server connection \
                   this session last wrote on, and another client has used it since (or the \
                   session has written nothing): use INSERT ... RETURNING, or one transaction";
    error_response(Severity::Error, SqlState::ObjectNotInPrerequisiteState, message)
}

/// The error that fails a unit no node can take.
pub(super) fn no_route(no_primary: &crate::cluster::NoPrimary) -> Frame {
    let message = format!("cannot route this statement: {no_primary}");
    error_response(Severity::Error, SqlState::ConnectionFailure, &message)
}

/// Whether a unit uses what only the held server has: the unnamed
/// statement, or any portal, that the unit does not create itself.
pub(super) fn uses_unnamed(frames: &[Frame]) -> bool {
    let mut parsed_unnamed = false;
    let mut portals: Vec<&str> = Vec::new();
    for frame in frames {
        let portal = match frame.tag() {
            b'P' => {
                parsed_unnamed |= frontend::parse_name(frame).is_ok_and(str::is_empty);
                continue;
            }
            b'B' => {
                let Ok(bind) = frontend::bind(frame) else { continue };
                if bind.statement.is_empty() && !parsed_unnamed {
                    return true;
                }
                portals.push(bind.portal);
                continue;
            }
            b'D' | b'C' => match frontend::target(frame) {
                Ok(Named::Statement("")) if frame.tag() == b'D' && !parsed_unnamed => return true,
                Ok(Named::Portal(name)) => name,
                _ => continue,
            },
            b'E' => match frontend::execute_portal(frame) {
                Ok(name) => name,
                Err(_) => continue,
            },
            _ => continue,
        };
        if !portals.contains(&portal) {
            return true;
        }
    }
    false
}
