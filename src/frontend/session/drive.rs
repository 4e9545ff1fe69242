//! The driver: asks the planner (`plan`) what to do with a unit, performs
//! each I/O step it asks for, and concludes with its final plan: send,
//! fail, hold or wait for a pooled connection. The fast path is the same
//! loop with steps that need no waiting (`dispatch_now`); a step that
//! needs waiting hands the unit to `dispatch`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::plan::{Plan, Progress, Step};
use super::unit::Taken;
use super::{wake, Batch, Pause, Session, Target};
use crate::backend::pool::Pool;
use crate::error::ProxyError;
use crate::metrics::WaitOutcome;
use crate::protocol::backend::{error_response, ready_for_query, ready_status, Severity};
use crate::protocol::{Frame, SqlState};
use crate::router::Reason;
use crate::tls::Split;

/// What performing a step came to.
pub(super) enum Outcome {
    /// Done: plan again.
    Again,
    /// The unit's plan is this, after all.
    Final(Plan),
    /// The unit is over: the client has had its answer (a replayed
    /// PREPARE failed with the server's error).
    Answered,
}

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// Plans a unit and concludes it, performing the steps that need no
    /// waiting on the way; the unit comes back if one does.
    pub(super) fn dispatch_now(&mut self, unit: Batch, complete: bool) -> Taken {
        let progress = Progress::default();
        loop {
            if self.bound.is_none() {
                self.refresh_watermark();
            }
            let step = match self.plan(&unit, &progress) {
                Plan::Do(step) => step,
                plan => return self.conclude(plan, unit, complete),
            };
            match self.perform_now(step) {
                Some(Outcome::Again) => continue,
                Some(Outcome::Final(plan)) => return self.conclude(plan, unit, complete),
                Some(Outcome::Answered) => return Taken::Done,
                None => return Taken::Unit(Box::new(unit), complete),
            }
        }
    }

    /// Plans a unit and concludes it, performing every step on the way.
    /// `complete` units end with Query, Sync or FunctionCall and so get a
    /// ReadyForQuery back.
    pub(super) async fn dispatch(&mut self, unit: Batch, complete: bool) -> Result<(), ProxyError> {
        self.dispatch_with(unit, complete, Progress::default()).await
    }

    /// `dispatch`, with what is already known of the unit.
    pub(super) async fn dispatch_with(
        &mut self,
        unit: Batch,
        complete: bool,
        mut progress: Progress,
    ) -> Result<(), ProxyError> {
        loop {
            if self.bound.is_none() {
                self.refresh_watermark();
            }
            let step = match self.plan(&unit, &progress) {
                Plan::Do(step) => step,
                plan => {
                    self.conclude(plan, unit, complete);
                    break;
                }
            };
            match Box::pin(self.perform(step, &unit, complete, &mut progress)).await? {
                Outcome::Again => continue,
                Outcome::Final(plan) => {
                    self.conclude(plan, unit, complete);
                    break;
                }
                Outcome::Answered => break,
            }
        }
        // Sockets may have been read (settings replay) or opened here.
        self.sources.mark_all();
        Ok(())
    }

    /// Carries out a unit's final plan.
    pub(super) fn conclude(&mut self, plan: Plan, unit: Batch, complete: bool) -> Taken {
        match plan {
            Plan::Send { target, reason, fresh } => {
                if fresh {
                    self.routed(target, reason);
                }
                self.open_optimistic(target, reason, &unit);
                self.send(target, reason, &unit, complete);
            }
            Plan::Local(local) => self.answer_optimistic(local, unit),
            Plan::Fail(error) => self.fail_unit(&error),
            Plan::WaitPool(pool, target) => self.start_wait(unit, complete, pool, target),
            // A step is never final: the driver performs it. Holding the
            // unit takes it again later.
            Plan::Hold | Plan::Do(_) => self.hold(unit),
        }
        Taken::Done
    }

    /// Performs a step that needs no waiting; `None` if it needs some.
    fn perform_now(&mut self, step: Step) -> Option<Outcome> {
        match step {
            Step::EndOpenBatch => {
                let held = self.bound.take()?.target;
                if let Some(server) = self.server_mut(held) {
                    let sync = Frame::new(b'S', &[]);
                    server.backend.queue_hidden(&sync, crate::backend::connection::Hidden::UntilReady);
                }
                Some(Outcome::Again)
            }
            Step::TakeBackWriteConnection => Some(self.take_back_write_connection()),
            Step::OpenPrimary(node) if self.primary.is_none() => self.take_pooled(node, Target::Primary),
            Step::OpenReplica(node) if self.replica.is_none() => self.take_pooled(node, Target::Replica),
            _ => None,
        }
    }

    /// Performs any step, waiting as long as it takes.
    async fn perform(
        &mut self,
        step: Step,
        unit: &Batch,
        complete: bool,
        progress: &mut Progress,
    ) -> Result<Outcome, ProxyError> {
        if let Some(outcome) = self.perform_now(step) {
            return Ok(outcome);
        }
        match step {
            Step::RefreshCatalog => {
                self.scope.catalog.refresh_now(self.shared.config().proxy.connect_timeout).await;
                progress.catalog_refreshed = true;
            }
            Step::WaitReplica { node, lsn, until } => {
                let started = Instant::now();
                let caught_up = self.shared.topology.node(node).replayed(lsn, until).await;
                let outcome = if caught_up { WaitOutcome::CaughtUp } else { WaitOutcome::TimedOut };
                self.shared.metrics.replica_wait(outcome, started.elapsed());
                progress.waited = Some(caught_up);
            }
            Step::WaitMonitor { until } => {
                progress.deadline = Some(until);
                let left = until.saturating_duration_since(Instant::now());
                crate::clock::sleep(REPLICA_WAIT_STEP.min(left)).await;
            }
            Step::OpenPrimary(node) => {
                if let Err(error) = self.use_primary(node).await? {
                    return Ok(Outcome::Final(Plan::Fail(error)));
                }
            }
            Step::OpenReplica(node) => progress.replica_failed |= !self.use_replica(node).await,
            Step::RestoreSettings(target) => self.restore_settings(target).await?,
            Step::PrepareSql(target) => return self.prepare_sql(target, unit, complete, progress).await,
            Step::Promote => return self.promote(complete).await,
            Step::WaitResume(node) => {
                let limit = self.shared.config().proxy.pause_timeout;
                progress.resumed = true;
                let topology = self.shared.topology.clone();
                let paused = || node.is_some_and(|n| topology.node(n).paused());
                if !self.shared.paused.resumed(limit, paused).await {
                    let message = format!(
                        "pgnear is paused (PAUSE) and did not resume within proxy.pause_timeout_ms ({} ms)",
                        limit.as_millis()
                    );
                    let error = error_response(Severity::Error, SqlState::CannotConnectNow, &message);
                    return Ok(Outcome::Final(Plan::Fail(error)));
                }
            }
            Step::EndOpenBatch | Step::TakeBackWriteConnection => {}
        }
        Ok(Outcome::Again)
    }

    /// Logs where a unit was routed.
    fn routed(&mut self, target: Target, reason: Reason) {
        if target == Target::Replica {
            self.replica_chosen();
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let node = self.node_name(target);
            tracing::debug!(parent: &self.scope.span, node, reason = reason.as_str(), "routed");
        }
    }

    /// Transaction pooling: a unit waits, in the relay loop, for a
    /// connection of `pool`; the client's next messages wait behind it.
    fn start_wait(&mut self, unit: Batch, complete: bool, pool: Arc<Pool>, target: Target) {
        let permit = Box::pin(pool.permits().acquire_owned());
        let count = crate::backend::pool::WaitCount::new(pool.clone());
        let until = tokio::time::Instant::now() + self.shared.config().proxy.pool_timeout;
        self.timers.pool_wait.as_mut().reset(until);
        self.pause = Some(Pause::Pool(Box::new(Waiting { unit, complete, target, permit, pool, count })));
    }

    /// Transaction pooling: takes back the connection the session last
    /// wrote on, if no other session has used it since.
    fn take_back_write_connection(&mut self) -> Outcome {
        let owner = self.state.owner();
        let taken = self.pooling.as_ref().and_then(|pooling| {
            let (key, turn) = pooling.write_at?;
            pooling.pools.iter().find_map(|(_, pool)| pool.take_back(key, owner, turn))
        });
        let Some(server) = taken else {
            return Outcome::Final(Plan::Fail(super::plan::sequence_state_elsewhere()));
        };
        self.primary = Some(server);
        self.sources.mark(wake::PRIMARY);
        Outcome::Again
    }

    /// Transaction pooling: an idle connection of `node`'s pool for
    /// `target`, or a wait for one if all are in use; `None` (outside
    /// transaction pooling too) when a new connection is to be opened.
    fn take_pooled(&mut self, node: usize, target: Target) -> Option<Outcome> {
        let holder = self.state.owner();
        let pool = self.pool(node)?.clone();
        match pool.take_now(holder) {
            Ok(server) => {
                let (slot, source) = match target {
                    Target::Primary => (&mut self.primary, wake::PRIMARY),
                    Target::Replica => (&mut self.replica, wake::REPLICA),
                };
                *slot = Some(server);
                self.sources.mark(source);
                Some(Outcome::Again)
            }
            Err(true) => Some(Outcome::Final(Plan::WaitPool(pool, target))),
            Err(false) => None,
        }
    }

    /// Brings `target`'s settings up to date. A replica that refuses them
    /// is dropped, and the session's reads stay on the primary from now
    /// on; a primary that refuses them ends the session, which cannot run
    /// a statement with settings (a role, a search_path) not its own.
    async fn restore_settings(&mut self, target: Target) -> Result<(), ProxyError> {
        let Some(message) = self.sync_settings(target).await? else { return Ok(()) };
        if target == Target::Primary {
            return Err(ProxyError::SettingsLost(message));
        }
        let node = self.node_name(target);
        tracing::warn!(parent: &self.scope.span, node, message, "cannot restore session settings on the replica");
        self.known.settings_refused = true;
        if let Some(replica) = self.replica.take() {
            replica.backend.terminate().await;
        }
        Ok(())
    }

    /// Prepares on `target` the SQL-level statements the unit executes that
    /// it lacks: the client's PREPARE, one at a time, waiting for each. A
    /// replica that refuses one outside a transaction (it has not replayed
    /// a table yet, say) is passed over for the primary; otherwise the unit
    /// fails with the server's error: inside a transaction that error has
    /// aborted it, as the client then sees.
    async fn prepare_sql(
        &mut self,
        target: Target,
        unit: &Batch,
        complete: bool,
        progress: &mut Progress,
    ) -> Result<Outcome, ProxyError> {
        let missing: Vec<(String, super::state::SqlPrepared, bool)> = match self.server(target) {
            Some(server) => self
                .state
                .missing_sql_prepared(super::plan::executed(unit), &server.state)
                .into_iter()
                .map(|(name, prepared)| {
                    (name.clone(), prepared.clone(), server.state.sql_prepared.contains_key(name))
                })
                .collect(),
            None => Vec::new(),
        };
        for (name, prepared, redefined) in missing {
            let mut sql = String::new();
            if redefined {
                // Another statement of that name, deallocated elsewhere.
                sql.push_str("DEALLOCATE ");
                push_identifier(&mut sql, &name);
                sql.push_str(";\n");
            }
            sql.push_str(&prepared.statement);
            let failure = self.query_hidden(target, &sql).await?;
            let Some(server) = self.server_mut(target) else { break };
            let Some(error) = failure else {
                server.state.sql_prepared.insert(name, prepared.statement);
                continue;
            };
            server.state.sql_prepared.remove(&name);
            let status = server.backend.tx_status;
            if target == Target::Replica && self.bound.is_none() {
                let node = self.node_name(target);
                tracing::debug!(parent: &self.scope.span, node, statement = name, "replica refused a PREPARE: the primary runs it");
                progress.primary_only = true;
                return Ok(Outcome::Again);
            }
            self.client.queue(&error);
            if complete {
                self.client.queue(&ready_for_query(status));
            }
            return Ok(Outcome::Answered);
        }
        Ok(Outcome::Again)
    }

    /// Transaction pooling: the session's pool for `node`, looked up once.
    pub(super) fn pool(&mut self, node: usize) -> Option<&std::sync::Arc<crate::backend::pool::Pool>> {
        let pooling = self.pooling.as_mut()?;
        let at = match pooling.pools.iter().position(|(n, _)| *n == node) {
            Some(at) => at,
            None => {
                pooling.pools.push((node, self.shared.pools.pool(node, &self.scope.login)));
                pooling.pools.len() - 1
            }
        };
        Some(&pooling.pools[at].1)
    }

    /// Brings `target`'s settings up to date before a new unit, waiting
    /// for the result: a statement must never run with settings (a role,
    /// a search_path) other than the session's. On failure the error's
    /// message is returned and the server is left out of date.
    pub(super) async fn sync_settings(&mut self, target: Target) -> Result<Option<String>, ProxyError> {
        if self.settings_current(target) {
            return Ok(None);
        }
        let key = self.state.settings_key();
        let app_name = self.pooling.as_ref().map(|p| p.app_name.clone());
        let sql = self.state.settings.replay_sql(app_name.as_deref());
        let failure = match self.query_hidden(target, &sql).await? {
            Some(error) => Some(crate::protocol::backend::ErrorFields::parse(&error)?.message),
            None => None,
        };
        if let Some(server) = self.server_mut(target).filter(|_| failure.is_none()) {
            server.state.settings = key;
            if app_name.is_some() {
                server.state.app_name = app_name;
            }
        }
        Ok(failure)
    }

    /// Runs `sql` on `target`, which owes the client nothing, as a simple
    /// Query of pgnear's own, and waits for it: its responses never reach
    /// the client. Gives the server's ErrorResponse if it failed.
    pub(super) async fn query_hidden(
        &mut self,
        target: Target,
        sql: &str,
    ) -> Result<Option<Frame>, ProxyError> {
        let mut body = Vec::with_capacity(sql.len() + 1);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        let Some(server) = self.server_mut(target) else { return Ok(None) };
        server.backend.queue(&Frame::new(b'Q', &body));
        let lost = |_| ProxyError::BackendLost { node: format!("{target:?}") };
        server.backend.flush().await.map_err(lost)?;
        let mut failure = None;
        loop {
            let frame = match server.backend.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(ProxyError::BackendLost { node: format!("{target:?}") }),
                Err(source) => {
                    return Err(ProxyError::BackendProtocol { node: format!("{target:?}"), source })
                }
            };
            match frame.tag() {
                b'E' => failure = Some(frame.detached()),
                b'Z' => {
                    server.backend.tx_status = ready_status(&frame)?;
                    break;
                }
                _ => {}
            }
        }
        Ok(failure)
    }

    /// Makes `node` the session's primary connection. A session whose
    /// primary moved (failover) ends, since its server-side state is gone;
    /// one that had none (started while no primary was reachable) opens it.
    pub(super) async fn use_primary(&mut self, node: usize) -> Result<Result<(), Frame>, ProxyError> {
        let topology = &self.shared.topology;
        if let Some(primary) = self.primary.as_mut().filter(|p| p.node != node) {
            if topology.same_server(primary.node, node) {
                // A reload gave the primary a new region or role setting:
                // the same server under a new node id. Nothing moves.
                primary.node = node;
            }
        }
        if self.primary.as_ref().is_some_and(|p| p.node != node) && self.can_move_primary() {
            // The primary moved (a switchover, a failover): a session with
            // nothing pinned to the old one follows it, its settings and
            // prepared statements replayed there as on any new connection.
            if let Some(old) = self.primary.take() {
                let from = self.shared.topology.node(old.node).config.name.clone();
                let to = self.shared.topology.node(node).config.name.as_str();
                tracing::info!(parent: &self.scope.span, from, to, "the session follows the primary");
                old.backend.terminate().await;
            }
        }
        let pool = if self.primary.is_none() { self.pool(node).cloned() } else { None };
        match &self.primary {
            Some(primary) if primary.node == node => Ok(Ok(())),
            Some(_) => {
                let name = self.shared.topology.node(node).config.name.clone();
                Err(ProxyError::PrimaryMoved { node: name })
            }
            None => match Box::pin(super::open::acquire(
                &self.shared,
                node,
                &self.scope.login,
                pool,
                self.state.owner(),
            ))
            .await
            {
                Ok(server) => {
                    self.primary = Some(server);
                    Ok(Ok(()))
                }
                Err(ProxyError::PoolExhausted(after)) => Ok(Err(pool_exhausted(after))),
                Err(ProxyError::Connect(crate::backend::ConnectError::Limit(message))) => {
                    Ok(Err(error_response(Severity::Error, SqlState::TooManyConnections, &message)))
                }
                Err(error) => {
                    self.shared.topology.suspect(node);
                    let message = format!("cannot reach the primary: {error}");
                    Ok(Err(error_response(Severity::Error, SqlState::ConnectionFailure, &message)))
                }
            },
        }
    }

    /// Whether the session can leave its primary connection for another
    /// server: nothing pinned there (LISTEN, temp tables, session advisory
    /// locks, WITH HOLD cursors), no transaction open or unit in flight.
    pub(super) fn can_move_primary(&self) -> bool {
        let idle = self.primary.as_ref().is_none_or(|p| p.backend.is_idle() && !p.backend.has_hidden());
        idle && !self.state.pinned && self.bound_to() != Some(Target::Primary)
    }

    /// Makes `node` the session's replica connection; false if it cannot
    /// be opened (the unit then falls back to the primary).
    pub(super) async fn use_replica(&mut self, node: usize) -> bool {
        if self.replica.as_ref().is_some_and(|r| r.node == node) {
            return true;
        }
        if let Some(old) = self.replica.take() {
            match old.pool.clone() {
                Some(pool) if old.reusable() => pool.put(old),
                _ => old.backend.terminate().await,
            }
        }
        let pool = self.pool(node).cloned();
        match Box::pin(super::open::acquire(&self.shared, node, &self.scope.login, pool, self.state.owner()))
            .await
        {
            Ok(server) => {
                self.replica = Some(server);
                true
            }
            Err(
                error @ (ProxyError::PoolExhausted(_)
                | ProxyError::Connect(crate::backend::ConnectError::Limit(_))),
            ) => {
                let name = &self.shared.topology.node(node).config.name;
                tracing::info!(parent: &self.scope.span, node = name.as_str(), %error, "replica pool exhausted: using the primary");
                false
            }
            Err(error) => {
                let name = &self.shared.topology.node(node).config.name;
                tracing::warn!(parent: &self.scope.span, node = name.as_str(), %error, "cannot open a replica connection");
                self.shared.topology.suspect(node);
                false
            }
        }
    }

    /// A read goes to the replica: a read-your-writes pin, if any, ends.
    pub(super) fn replica_chosen(&mut self) {
        if let Some(since) = self.writes.pinned_since.take() {
            self.shared.metrics.pin_ended(since.elapsed());
        }
    }

    /// No server can take this unit: fail it, keep the session (and the
    /// transaction it is in, if any).
    pub(super) fn fail_unit(&mut self, error: &Frame) {
        self.client.queue(error);
        self.client.queue(&ready_for_query(self.bound_status()));
    }
}

/// How often a read waiting for the monitor (an explicit
/// `replica_wait_ms`) looks again.
pub(super) const REPLICA_WAIT_STEP: Duration = Duration::from_millis(2);

/// A unit waiting for a pooled connection.
pub(super) struct Waiting {
    pub(super) unit: Batch,
    pub(super) complete: bool,
    pub(super) target: Target,
    /// Kept across the loop's waits: the pool serves waiters in turn, and
    /// a new request would go to the back of the line.
    pub(super) permit: PermitRequest,
    pub(super) pool: Arc<crate::backend::pool::Pool>,
    /// Counts this unit among the pool's waiting ones while it waits.
    pub(super) count: crate::backend::pool::WaitCount,
}

/// A pending request for a pool's permit.
pub(super) type PermitRequest = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>>
            + Send,
    >,
>;

/// The error that fails a unit that waited `after` for a pooled connection.
pub(super) fn pool_exhausted(after: Duration) -> Frame {
    let message = ProxyError::PoolExhausted(after).to_string();
    error_response(Severity::Error, SqlState::TooManyConnections, &message)
}

/// Appends `name` as a quoted identifier.
pub(super) fn push_identifier(sql: &mut String, name: &str) {
    sql.push('"');
    sql.push_str(&name.replace('"', "\"\""));
    sql.push('"');
}
