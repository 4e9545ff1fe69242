//! The client side of the relay: grouping client messages into units of
//! work, routing each unit, and sending it with whatever replay the chosen
//! server needs first (settings, prepared statements).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tls::Split;

use super::local::Report;
use super::state::{HashMap, Prepared, ServerState, SessionState, SqlPrepared};
use super::{Batch, Flow, Server, Session, Target};
use crate::backend::connection::Hidden;
use crate::cluster::Lsn;
use crate::config::ReplicaWait;
use crate::error::ProxyError;
use crate::metrics::WaitOutcome;
use crate::metrics::{Direction, RoleLabel};
use crate::protocol::backend::{
    error_response, no_data, parse_complete, ready_for_query, ready_status, Severity, TxStatus,
};
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::{Frame, ProtocolError, SqlState};
use crate::router::classify::{Block, Class, Classification, ProxyCommand, Tx};
use crate::router::functions::VolatileFunctions;
use crate::router::{self, ClusterView, Destination, Freshness, Need, Policy, Reason, Route, SessionView};
use smallvec::SmallVec;

/// A statement that may do anything: a fast-path function call, or the
/// EXECUTE of a SQL-level prepared statement the session does not know.
static WRITE: std::sync::LazyLock<Arc<Classification>> = std::sync::LazyLock::new(|| {
    Arc::new(Classification {
        class: Class::Write,
        hint: None,
        tables: Vec::new(),
        functions: Vec::new(),
        effects: Vec::new(),
        unparsed: false,
        ddl: false,
        node_state: false,
        executes: Vec::new(),
        block: Block::Same,
        copies_in: 0,
    })
});

/// What a unit that calls no function is checked against.
static NO_FUNCTIONS: std::sync::LazyLock<VolatileFunctions> =
    std::sync::LazyLock::new(VolatileFunctions::default);

/// Where `choose` sends a unit.
pub(super) enum Choice {
    /// To this server, for this reason.
    Go(Target, Reason),
    /// Nowhere: the unit fails with this error and the session stays.
    Fail(Frame),
    /// Not yet: it is held until the session's probe has been answered.
    Hold,
}

/// What a read kept on the primary by a write waits for first.
enum Wait {
    /// Nothing: it goes where it was routed.
    No,
    /// The session's probe's answer.
    Probe,
    /// Replica `node` replaying `lsn`, until then.
    Replica { node: usize, lsn: Lsn, until: Instant },
    /// The monitor resolving the watermark or a replica catching up,
    /// looking again every `REPLICA_WAIT_STEP` until then.
    Monitor { until: Instant },
}

/// A client message the relay could not take without waiting.
pub(super) enum Deferred {
    /// For `on_client`.
    Message(Frame),
    /// A unit for `dispatch`, and whether it is complete. Boxed: the
    /// path is rare, and the enum is returned for every client message.
    Unit(Box<Batch>, bool),
    /// Transaction pooling: a unit that waits, in the relay loop, for a
    /// connection of a pool whose connections are all in use.
    Wait(Box<Waiting>),
}

/// A unit waiting for a pooled connection.
pub(super) struct Waiting {
    pub(super) unit: Batch,
    pub(super) complete: bool,
    pub(super) target: Target,
    /// Kept across the loop's waits: the pool serves waiters in turn, and
    /// a new request would go to the back of the line.
    pub(super) permit: PermitRequest,
    pub(super) pool: Arc<super::pool::Pool>,
    /// Counts this unit among the pool's waiting ones while it waits.
    pub(super) count: super::pool::WaitCount,
}

/// A pending request for a pool's permit.
pub(super) type PermitRequest = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>>
            + Send,
    >,
>;

/// How often a read waiting for the monitor (an explicit
/// `replica_wait_ms`) looks again.
const REPLICA_WAIT_STEP: Duration = Duration::from_millis(2);

impl<S: Split + Unpin + Send + 'static> Session<S> {
    pub(super) async fn on_client(&mut self, frame: Frame) -> Result<Flow, ProxyError> {
        match frame.tag() {
            b'Q' => self.on_query(frame).await?,
            tag if super::is_batched(tag) => self.on_extended(frame)?,
            b'H' => self.on_flush(frame).await?,
            b'S' => self.on_sync(frame).await?,
            b'd' | b'c' | b'f' => self.on_copy(frame),
            b'F' => {
                // A fast-path function call may do anything: the primary.
                self.dispatch(Batch::one(frame, WRITE.clone()), true).await?;
            }
            b'X' => return Ok(Flow::End),
            tag => {
                return Err(ProtocolError::Unexpected {
                    tag: tag as char,
                    when: "from a client in a session",
                }
                .into())
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_query(&mut self, frame: Frame) -> Result<(), ProxyError> {
        let text = frontend::query_text(&frame)?;
        let class = self.recently_classified.classify(&self.shared.classifier, text);
        let class = read_only_begin(self.default_read_only, class, text);
        if let Class::ProxyLocal(command) = &class.class {
            if self.in_flight() {
                self.held = Some(frame);
                return Ok(());
            }
            if matches!(command, ProxyCommand::Show { name } if name == "write_lsn" || name == "all") {
                self.await_watermark().await;
            }
            self.refresh_watermark();
            let report = Report { write_lsn: self.watermark.lsn() };
            for response in self.settings.execute(command, &report) {
                self.client.queue(&response);
            }
            let status = self.bound_status();
            self.client.queue(&ready_for_query(status));
            return Ok(());
        }
        let unit = self.query_unit(frame, class);
        self.dispatch(unit, true).await
    }

    /// The unit of a simple Query.
    fn query_unit(&self, frame: Frame, class: Arc<Classification>) -> Batch {
        let mut unit = Batch { frames: smallvec::smallvec![frame], ..Batch::default() };
        add_class(&self.state, &mut unit.classes, class);
        unit
    }

    /// Buffers an extended-protocol message until its Sync or Flush.
    pub(super) fn on_extended(&mut self, frame: Frame) -> Result<(), ProxyError> {
        let batch = &mut self.batch;
        // A Bind or Describe of a statement: its name.
        let mut uses = None;
        match frame.tag() {
            b'P' => {
                let parse = frontend::parse(&frame)?;
                let class = self.recently_classified.classify(&self.shared.classifier, parse.query);
                let class = read_only_begin(self.default_read_only, class, parse.query);
                add_class(&self.state, &mut batch.classes, class);
                batch.named |= !parse.name.is_empty();
                batch.parses_unnamed |= parse.name.is_empty();
            }
            b'B' => uses = Some(frontend::bind(&frame)?.statement),
            b'D' => match frontend::target(&frame)? {
                Named::Statement(name) => uses = Some(name),
                Named::Portal(_) => {}
            },
            b'C' => match frontend::target(&frame)? {
                Named::Statement(name) => batch.named |= !name.is_empty(),
                Named::Portal(_) => {}
            },
            _ => {
                frontend::execute_portal(&frame)?;
            }
        }
        match uses {
            Some("") => batch.uses_earlier_unnamed |= !batch.parses_unnamed,
            Some(name) => {
                batch.named = true;
                // The classification of the statement parsed earlier; the
                // unnamed statement's comes with the Parse in this unit.
                if let Some(prepared) = self.state.prepared.get(name) {
                    add_class(&self.state, &mut batch.classes, prepared.class.clone());
                }
            }
            None => {}
        }
        batch.frames.push(frame);
        Ok(())
    }

    async fn on_sync(&mut self, frame: Frame) -> Result<(), ProxyError> {
        if self.batch.classes.iter().any(|c| matches!(c.class, Class::ProxyLocal(_))) {
            if self.in_flight() {
                self.held = Some(frame);
                return Ok(());
            }
            let batch = std::mem::take(&mut self.batch);
            self.answer_local_batch(&batch.frames, &batch.classes);
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.frames.push(frame);
        self.dispatch(batch, true).await
    }

    async fn on_flush(&mut self, frame: Frame) -> Result<(), ProxyError> {
        if self.batch.frames.is_empty() && self.bound.is_none() {
            return Ok(()); // nothing is pending anywhere: nothing to flush
        }
        let mut batch = std::mem::take(&mut self.batch);
        let opens = !batch.frames.is_empty();
        batch.frames.push(frame);
        self.dispatch(batch, false).await?;
        // Messages sent ahead of their Sync keep the session on that server,
        // unless the next unit can go elsewhere (see `reopen`). A unit held
        // back was not sent.
        self.open_batch |= opens && self.held.is_none();
        Ok(())
    }

    /// Extended-protocol messages still waiting for their Sync go ahead
    /// once the client has sent nothing more for now, if they execute
    /// something and their server is already settled: the session is held
    /// on one, or they need the primary whatever follows (a write, a
    /// transaction). PostgreSQL sends an error at once, mid-batch, and a
    /// client reading while it writes (libpq's pipeline mode, asyncpg's
    /// `executemany`) sees it before it sends the rest; held here until
    /// the Sync, it would wait for an answer that never comes.
    pub(super) async fn forward_partial(&mut self) -> Result<(), ProxyError> {
        let batch = &self.batch;
        if batch.frames.is_empty() || self.held.is_some() || self.waiting.is_some() {
            return Ok(());
        }
        let executes = batch.frames.iter().any(|f| f.tag() == b'E');
        let local = batch.classes.iter().any(|c| matches!(c.class, Class::ProxyLocal(_)));
        if !executes || local || !self.settled(batch) {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.dispatch(batch, false).await?;
        self.open_batch |= self.held.is_none();
        Ok(())
    }

    /// Whether a unit's server is known before the unit is complete: no
    /// later message can change it.
    fn settled(&self, unit: &Batch) -> bool {
        if self.held_target(unit).is_some() {
            return true;
        }
        let route = match self.catalog.is_stale() {
            true => return false,
            false => self.decide(&unit.classes),
        };
        // Reasons that a later statement cannot take back.
        let lasting = [Reason::Write, Reason::Unparsed, Reason::Transaction, Reason::SessionState];
        matches!(route, Ok(Route { destination: Destination::Primary(_), reason }) if lasting.contains(&reason))
    }

    /// CopyData, CopyDone and CopyFail go to the server running the COPY;
    /// outside COPY the server would ignore them, and so does pgnear.
    fn on_copy(&mut self, frame: Frame) {
        let Some(target) = self.bound else { return };
        let Some(server) = self.server_mut(target) else { return };
        let probe = match frame.tag() {
            b'd' => false,
            tag => {
                server.backend.copy_in = false;
                server.copy_ended(tag == b'f')
            }
        };
        server.backend.queue(&frame);
        if probe && target == Target::Primary && self.primary_dirty && self.tracks_writes() {
            self.probe_behind();
        }
    }

    /// Whether read-your-writes is on, in either scope.
    fn tracks_writes(&self) -> bool {
        self.shared.config.consistency.read_your_writes != crate::config::ReadYourWrites::Off
    }

    /// Routes a unit (unless a transaction or earlier unit holds the
    /// session on a server) and sends it. `complete` units end with
    /// Query, Sync or FunctionCall and so get a ReadyForQuery back.
    pub(super) async fn dispatch(&mut self, unit: Batch, complete: bool) -> Result<(), ProxyError> {
        let result = self.dispatch_unit(unit, complete).await;
        // Sockets may have been read (settings replay) or opened here.
        self.sources.mark_all();
        result
    }

    async fn dispatch_unit(&mut self, unit: Batch, complete: bool) -> Result<(), ProxyError> {
        let (frames, classes) = (&unit.frames[..], &unit.classes[..]);
        if self.open_batch {
            self.reopen(frames, classes).await?;
        }
        if let Err(error) = self.place_sequence_read(&unit) {
            self.fail_unit(&error);
            return Ok(());
        }
        let (target, reason) = match self.held_target(&unit) {
            Some(held) => held,
            None => match self.choose(classes).await? {
                Choice::Go(target, reason) => (target, reason),
                Choice::Fail(error) => {
                    self.fail_unit(&error);
                    return Ok(());
                }
                Choice::Hold => {
                    self.hold(&unit);
                    return Ok(());
                }
            },
        };
        let probing = self.server(target).is_some_and(|s| s.backend.is_probing());
        let (target, reason) = match self.bound {
            Some(_) => (target, reason),
            None if self.settings_current(target) => (target, reason),
            // The settings' replay would read the probe's answer as its own.
            None if probing => {
                self.hold(&unit);
                return Ok(());
            }
            None => match Box::pin(self.sync_settings(target)).await? {
                None => (target, reason),
                Some(message) if target == Target::Replica => {
                    // Keep this session's reads on the primary from now on.
                    let node = self.node_name(target);
                    tracing::warn!(parent: &self.span, node, message, "cannot restore session settings on the replica");
                    self.settings_refused = true;
                    if let Some(replica) = self.replica.take() {
                        replica.backend.terminate().await;
                    }
                    match self.choose(classes).await? {
                        Choice::Go(Target::Primary, reason) => {
                            match Box::pin(self.sync_settings(Target::Primary)).await? {
                                None => (Target::Primary, reason),
                                Some(message) => return Err(ProxyError::SettingsLost(message)),
                            }
                        }
                        _ => return Err(ProxyError::SettingsLost(message)),
                    }
                }
                Some(message) => return Err(ProxyError::SettingsLost(message)),
            },
        };
        let (target, reason) = match Box::pin(self.prepare_for(target, reason, &unit, complete)).await? {
            Some(ready) => ready,
            None => return Ok(()),
        };
        self.send(target, reason, &unit, complete);
        Ok(())
    }

    /// Sends a routed unit to `target`, with whatever the server is
    /// missing of the session's prepared statements queued ahead of it,
    /// and records what the unit changes.
    fn send(&mut self, target: Target, reason: Reason, unit: &Batch, complete: bool) {
        let frames = &unit.frames[..];
        let kinds = Kinds::of(frames);
        if kinds.names_statements {
            self.replay(target, unit);
        }
        if kinds.executes {
            self.count_route(target, reason);
        }
        if target == Target::Replica && complete && self.bound.is_none() {
            self.retry = Some(unit.clone());
        }
        self.shared.metrics.bytes(Direction::ClientToServer, kinds.bytes);
        if complete {
            self.timers.units += 1;
        }
        let Some(server) = self.server_mut(target) else { return };
        for frame in frames {
            server.backend.queue(frame);
        }
        if complete {
            server.started.push_back(Instant::now());
            server.load.add();
        }
        server.ran_partial = !complete && (server.ran_partial || kinds.executes);
        // Before this unit counts in flight: where the server was before it.
        let leaves_no_block = server.expect_after(&unit.classes, complete, !kinds.extended);
        // Syncs sent while the server is in COPY IN are ignored by it.
        if complete && !server.backend.copy_in {
            server.backend.in_flight += 1;
        }
        server.backend.last_unit_synced = complete && kinds.extended;
        self.track(target, unit, complete, kinds);
        if leaves_no_block && target == Target::Primary && self.primary_dirty && self.tracks_writes() {
            self.probe_behind();
        }
        if let Some(library) = loaded_library(frames) {
            self.state.settings.forget_prefix(&library);
            let key = self.state.settings_key();
            if let Some(server) = self.server_mut(target) {
                server.state.settings = key;
            }
        }
        if unit.parses_unnamed {
            self.unnamed_on = Some(target);
            if self.pooling {
                // A copy, into a reused buffer: the frame shares the
                // client's read buffer, and most units parse the unnamed
                // statement.
                self.unnamed_parse.clear();
                let last = frames.iter().rev().find(|f| f.tag() == b'P' && f.body().first() == Some(&0));
                if let Some(parse) = last {
                    self.unnamed_parse.extend_from_slice(parse.body());
                }
            }
        }
        if self.bound.is_none() {
            self.bound_reason = reason;
        }
        self.bound = Some(target);
        if complete {
            self.open_batch = false;
        }
        let cancel_key = self.server(target).map(|s| s.cancel_key);
        if cancel_key.is_some() && cancel_key != self.cancels_to {
            self.registration.target.set(cancel_key);
            self.cancels_to = cancel_key;
        }
    }

    /// Takes a client message without waiting when it needs no I/O first:
    /// extended-protocol messages are buffered, and a Query or Sync whose
    /// server is open, up to date and chosen without waiting is sent.
    /// Anything else is handed back for the async path (`on_client`,
    /// `dispatch`). This is the path nearly every message takes.
    pub(super) fn on_client_now(&mut self, frame: Frame) -> Result<Option<Deferred>, ProxyError> {
        match frame.tag() {
            tag if super::is_batched(tag) => {
                self.on_extended(frame)?;
                Ok(None)
            }
            b'Q' => {
                let text = frontend::query_text(&frame)?;
                let class = self.recently_classified.classify(&self.shared.classifier, text);
                let class = read_only_begin(self.default_read_only, class, text);
                if matches!(class.class, Class::ProxyLocal(_)) {
                    return Ok(Some(Deferred::Message(frame)));
                }
                let unit = self.query_unit(frame, class);
                Ok(self.dispatch_now(unit, true))
            }
            b'S' if !self.batch.classes.iter().any(|c| matches!(c.class, Class::ProxyLocal(_))) => {
                let mut batch = std::mem::take(&mut self.batch);
                batch.frames.push(frame);
                Ok(self.dispatch_now(batch, true))
            }
            _ => Ok(Some(Deferred::Message(frame))),
        }
    }

    /// The server the session is held on for this unit, if any: inside a
    /// transaction, pipelined behind the unit that chose it (and sharing
    /// its reason), or where the unnamed statement the unit uses was parsed.
    fn held_target(&self, unit: &Batch) -> Option<(Target, Reason)> {
        match self.bound {
            Some(target) => match self.server(target).map(|s| s.backend.tx_status) {
                Some(status) if status.in_block() => Some((target, Reason::Transaction)),
                _ => Some((target, self.bound_reason)),
            },
            None => self
                .unnamed_on
                .filter(|t| unit.uses_earlier_unnamed && self.server(*t).is_some())
                .map(|t| (t, self.bound_reason)),
        }
    }

    /// No server can take this unit: fail it, keep the session.
    fn fail_unit(&mut self, error: &Frame) {
        self.client.queue(error);
        self.client.queue(&ready_for_query(TxStatus::Idle));
    }

    /// `dispatch` for a unit that needs no I/O before it is sent; the
    /// unit comes back if it does.
    pub(super) fn dispatch_now(&mut self, unit: Batch, complete: bool) -> Option<Deferred> {
        if self.open_batch {
            return Some(Deferred::Unit(Box::new(unit), complete));
        }
        if let Err(error) = self.place_sequence_read(&unit) {
            self.fail_unit(&error);
            return None;
        }
        let (target, reason) = match self.held_target(&unit) {
            Some(held) => held,
            None => match self.choose_now(&unit.classes) {
                Some(Ok(chosen)) => chosen,
                Some(Err(error)) => {
                    self.fail_unit(&error);
                    return None;
                }
                None => match self.exhausted.take() {
                    Some((pool, target)) => {
                        let permit = Box::pin(pool.permits().acquire_owned());
                        let count = super::pool::WaitCount::new(pool.clone());
                        let waiting = Waiting { unit, complete, target, permit, pool, count };
                        return Some(Deferred::Wait(Box::new(waiting)));
                    }
                    None => return Some(Deferred::Unit(Box::new(unit), complete)),
                },
            },
        };
        if self.bound.is_none() && !self.settings_current(target) || self.lacks_sql_prepared(target, &unit) {
            return Some(Deferred::Unit(Box::new(unit), complete));
        }
        self.send(target, reason, &unit, complete);
        None
    }

    /// `choose` when it needs no I/O: the catalog is current, the route
    /// needs no wait for a replica, and its server is open. `None` if it
    /// does.
    fn choose_now(&mut self, classes: &[Arc<Classification>]) -> Option<Result<(Target, Reason), Frame>> {
        if self.catalog.is_stale() {
            return None;
        }
        self.refresh_watermark();
        let route = match self.decide(classes) {
            Ok(route) => route,
            Err(no_primary) => {
                return Some(Err(no_route(&no_primary)));
            }
        };
        if !matches!(self.wait_plan(classes, &route, None), Wait::No) {
            return None;
        }
        let chosen = match route.destination {
            Destination::Primary(node) if self.primary.as_ref().is_some_and(|p| p.node == node) => {
                Target::Primary
            }
            Destination::Replica(node) if self.replica.as_ref().is_some_and(|r| r.node == node) => {
                Target::Replica
            }
            // Transaction pooling: an idle pooled connection, if one is free.
            Destination::Primary(node) if self.primary.is_none() => {
                self.primary = Some(self.take_pooled(node, Target::Primary)?);
                self.sources.mark(super::wake::PRIMARY);
                Target::Primary
            }
            Destination::Replica(node) if self.replica.is_none() => {
                self.replica = Some(self.take_pooled(node, Target::Replica)?);
                self.sources.mark(super::wake::REPLICA);
                Target::Replica
            }
            _ => return None,
        };
        self.routed(route);
        if chosen == Target::Replica {
            self.replica_chosen();
        }
        Some(Ok((chosen, route.reason)))
    }

    /// Transaction pooling: `currval()` and `lastval()` read what the
    /// session's last `nextval()` left on one server connection. A unit
    /// that reads them and writes nothing itself runs on the connection
    /// the session last wrote on, taken back from the pool if no other
    /// session has used it since; otherwise it fails instead of reading
    /// another client's value.
    fn place_sequence_read(&mut self, unit: &Batch) -> Result<(), Frame> {
        if !self.pooling || !reads_sequence_state(unit) {
            return Ok(());
        }
        let owner = self.state.owner();
        let Some((key, turn)) = self.write_at else { return Err(sequence_state_elsewhere()) };
        if let Some(primary) = self.primary.as_ref() {
            let same = primary.cancel_key == key && primary.held_by_since(owner, turn);
            return if same { Ok(()) } else { Err(sequence_state_elsewhere()) };
        }
        let Some(server) = self.pools.iter().find_map(|(_, pool)| pool.take_back(key, owner, turn)) else {
            return Err(sequence_state_elsewhere());
        };
        self.primary = Some(server);
        self.sources.mark(super::wake::PRIMARY);
        Ok(())
    }

    /// Transaction pooling: an idle connection of `node`'s pool. When all
    /// are in use, `exhausted` says which pool the unit waits for.
    fn take_pooled(&mut self, node: usize, target: Target) -> Option<Box<Server>> {
        let holder = self.state.owner();
        let pool = self.pool(node)?;
        match pool.take_now(holder) {
            Ok(server) => Some(server),
            Err(busy) => {
                if busy {
                    self.exhausted = Some((pool.clone(), target));
                }
                None
            }
        }
    }

    /// Transaction pooling: the session's pool for `node`, looked up once.
    fn pool(&mut self, node: usize) -> Option<&std::sync::Arc<super::pool::Pool>> {
        if !self.pooling {
            return None;
        }
        let at = match self.pools.iter().position(|(n, _)| *n == node) {
            Some(at) => at,
            None => {
                self.pools.push((node, self.shared.pools.pool(node, &self.login)));
                self.pools.len() - 1
            }
        };
        Some(&self.pools[at].1)
    }

    fn routed(&self, route: Route) {
        let node = match route.destination {
            Destination::Primary(n) | Destination::Replica(n) => {
                self.shared.topology.nodes[n].config.name.as_str()
            }
        };
        tracing::debug!(parent: &self.span, node, reason = route.reason.as_str(), "routed");
    }

    /// The session is held on a server only by extended messages sent ahead
    /// of a Sync (after a Flush; asyncpg prepares that way). If the server
    /// is otherwise idle and the next unit does not use the unnamed
    /// statement or portal left there, route it afresh; when it belongs
    /// elsewhere, end the open batch with a Sync of pgnear's own.
    async fn reopen(&mut self, frames: &[Frame], classes: &[Arc<Classification>]) -> Result<(), ProxyError> {
        let Some(held) = self.bound else { return Ok(()) };
        // Statements executed ahead of the Sync run in the client's implicit
        // transaction: a Sync of pgnear's own would commit it early.
        let quiet = self.server(held).is_some_and(|s| s.backend.is_idle() && !s.ran_partial);
        if !quiet || uses_unnamed(frames) {
            return Ok(());
        }
        let Choice::Go(target, _) = self.choose(classes).await? else { return Ok(()) };
        if target == held {
            return Ok(());
        }
        if let Some(server) = self.server_mut(held) {
            server.backend.queue_hidden(&Frame::new(b'S', &[]), Hidden::UntilReady);
        }
        self.open_batch = false;
        self.bound = None;
        Ok(())
    }

    /// Records what the unit changes: session state, prepared statements,
    /// whether the primary may have written, whether DDL ran.
    fn track(&mut self, target: Target, unit: &Batch, complete: bool, kinds: Kinds) {
        let (frames, classes) = (&unit.frames[..], &unit.classes[..]);
        let executes = kinds.runs;
        let volatile = self.volatile_for(classes);
        let volatile = volatile.as_ref().map_or(&*NO_FUNCTIONS, |v| &***v);
        // A unit that only parses or describes a write runs nothing.
        let writes = kinds.executes
            && classes
                .iter()
                .any(|c| matches!(c.class, Class::Write) || c.unparsed || c.calls_volatile(volatile));
        if target == Target::Primary && writes {
            self.primary_dirty = true;
            if self.pooling {
                self.write_at = self.primary.as_ref().map(|p| (p.cancel_key, p.turns));
            }
        }
        // Only DDL that may create a volatile function needs the catalog
        // reloaded, and only where a replica could otherwise be chosen.
        let ddl = classes.iter().any(|c| c.ddl);
        if ddl && may_define_functions(frames) && self.cluster_has_replicas() {
            self.defines_functions = true;
        }
        if ddl && self.pooling && mentions_databases(frames) {
            // CREATE DATABASE (from a template) and DROP DATABASE fail
            // while other sessions are connected to that database.
            if let Some(server) = self.server(target) {
                self.shared.pools.close_idle(server.node);
            }
        }
        let classifier = &self.shared.classifier;
        let (state, ran_on, mut others) =
            split_state(&mut self.state, self.primary.as_deref_mut(), self.replica.as_deref_mut(), target);
        let Some(ran_on) = ran_on else { return };
        if executes {
            // Pins hold at once; other effects wait for the unit to succeed
            // (see `Session::unit_done`), so a failed SET is never replayed.
            // In transaction pooling a SQL-level PREPARE pins too: its
            // statement exists only on this connection.
            let pooling = self.pooling;
            state.pinned |= classes.iter().any(|c| c.pins().next().is_some() || (pooling && prepares(c)));
            // Transaction control too: it decides which effects last.
            let bounds = |c: &&Arc<Classification>| {
                matches!(c.class, Class::Transaction(Tx::Begin { .. } | Tx::Commit | Tx::Rollback))
            };
            ran_on.carry.extend(classes.iter().filter(|c| !c.effects.is_empty() || bounds(c)).cloned());
        }
        if complete {
            let effects = std::mem::take(&mut ran_on.carry);
            ran_on.effects.push_back(effects);
        }
        if !unit.named {
            return;
        }
        for frame in frames {
            match frame.tag() {
                b'P' => match frontend::parse(frame) {
                    Ok(parse) if !parse.name.is_empty() => {
                        let class = classifier.classify(parse.query);
                        // A copy: the statement outlives the read buffer
                        // this frame shares.
                        let prepared = Prepared { parse: frame.detached(), class };
                        state.parsed(parse.name, prepared, &mut ran_on.state);
                    }
                    _ => {}
                },
                b'C' => match frontend::target(frame) {
                    Ok(Named::Statement(name)) if !name.is_empty() => {
                        let mut others: Vec<_> = others.iter_mut().map(|s| &mut s.state).collect();
                        state.closed(name, &mut ran_on.state, &mut others);
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }

    /// Whether `target` (if open) already has the session's settings.
    fn settings_current(&self, target: Target) -> bool {
        self.server(target).is_none_or(|s| {
            s.state.settings == self.state.settings_key()
                && (!self.pooling || s.state.app_name.as_deref() == Some(self.app_name.as_str()))
        })
    }

    /// Brings `target`'s settings up to date before a new unit, waiting
    /// for the result: a statement must never run with settings (a role,
    /// a search_path) other than the session's. On failure the error's
    /// message is returned and the server is left out of date.
    async fn sync_settings(&mut self, target: Target) -> Result<Option<String>, ProxyError> {
        if self.settings_current(target) {
            return Ok(None);
        }
        let key = self.state.settings_key();
        let app_name = self.pooling.then(|| self.app_name.clone());
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
    async fn query_hidden(&mut self, target: Target, sql: &str) -> Result<Option<Frame>, ProxyError> {
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

    /// Whether `target` lacks a SQL-level prepared statement that the unit
    /// executes, as the session prepared it.
    fn lacks_sql_prepared(&self, target: Target, unit: &Batch) -> bool {
        if unit.classes.iter().all(|c| c.executes.is_empty()) {
            return false;
        }
        let Some(server) = self.server(target) else { return false };
        !self.state.missing_sql_prepared(executed(unit), &server.state).is_empty()
    }

    /// Prepares on `target`, before a unit, the SQL-level statements the
    /// unit executes that `target` lacks: the client's PREPARE, one at a
    /// time, waiting for each. Gives where the unit goes then, or `None`
    /// when it is not to be sent now:
    /// - while a server still owes the client responses, the unit waits
    ///   for them (held), since a replay's own responses must not mix
    ///   with theirs;
    /// - a replica that refuses the PREPARE outside a transaction (it has
    ///   not replayed a table yet, say) is passed over for the primary;
    /// - otherwise the unit fails with the server's error: inside a
    ///   transaction that error has aborted it, as the client then sees.
    async fn prepare_for(
        &mut self,
        target: Target,
        reason: Reason,
        unit: &Batch,
        complete: bool,
    ) -> Result<Option<(Target, Reason)>, ProxyError> {
        if unit.classes.iter().all(|c| c.executes.is_empty()) {
            return Ok(Some((target, reason)));
        }
        let missing: Vec<(String, SqlPrepared, bool)> = match self.server(target) {
            Some(server) => self
                .state
                .missing_sql_prepared(executed(unit), &server.state)
                .into_iter()
                .map(|(name, prepared)| {
                    (name.clone(), prepared.clone(), server.state.sql_prepared.contains_key(name))
                })
                .collect(),
            None => Vec::new(),
        };
        if missing.is_empty() {
            return Ok(Some((target, reason)));
        }
        if self.in_flight() {
            self.hold(unit);
            return Ok(None);
        }
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
                tracing::debug!(parent: &self.span, node, statement = name, "replica refused a PREPARE: the primary runs it");
                return Box::pin(self.prepare_on_primary(unit, complete)).await;
            }
            self.client.queue(&error);
            if complete {
                self.client.queue(&ready_for_query(status));
            }
            return Ok(None);
        }
        Ok(Some((target, reason)))
    }

    /// `prepare_for` on the primary, for a unit a replica could not take.
    async fn prepare_on_primary(
        &mut self,
        unit: &Batch,
        complete: bool,
    ) -> Result<Option<(Target, Reason)>, ProxyError> {
        let node = match self.shared.topology.primary(&self.cluster) {
            Ok(node) => node,
            Err(no_primary) => {
                self.fail_unit(&no_route(&no_primary));
                return Ok(None);
            }
        };
        if let Err(error) = Box::pin(self.use_primary(node)).await? {
            self.fail_unit(&error);
            return Ok(None);
        }
        if let Some(message) = Box::pin(self.sync_settings(Target::Primary)).await? {
            return Err(ProxyError::SettingsLost(message));
        }
        Box::pin(self.prepare_for(Target::Primary, Reason::SessionState, unit, complete)).await
    }

    /// Holds a unit back until no server owes the client responses; it is
    /// taken again then, from its last message.
    fn hold(&mut self, unit: &Batch) {
        let mut unit = unit.clone();
        let last = unit.frames.pop();
        if !unit.frames.is_empty() {
            // Extended-protocol messages wait again for their Sync or Flush.
            self.batch = unit;
        }
        self.held = last;
    }

    /// Queues, ahead of a unit, what `target` is missing of the session:
    /// Closes of statements closed elsewhere, and the named statements the
    /// unit uses as the session prepared them (closing first a different
    /// statement of the same name that another session left on a pooled
    /// connection). Their responses are swallowed. In transaction pooling
    /// the unnamed statement an earlier unit parsed is replayed too.
    /// Only for units with Parse, Bind, Describe, Close or Execute.
    fn replay(&mut self, target: Target, unit: &Batch) {
        let needed = match unit.named {
            true => {
                let (state, server, _) = split_state(
                    &mut self.state,
                    self.primary.as_deref_mut(),
                    self.replica.as_deref_mut(),
                    target,
                );
                server
                    .map(|s| missing_statements(&state.prepared, &mut s.state, &unit.frames))
                    .unwrap_or_default()
            }
            false => Vec::new(),
        };
        let unnamed = match unit.uses_earlier_unnamed && self.unnamed_on != Some(target) {
            true if !self.unnamed_parse.is_empty() => Some(Frame::new(b'P', &self.unnamed_parse)),
            _ => None,
        };
        let Some(server) = self.server_mut(target) else { return };
        for name in std::mem::take(&mut server.state.stale) {
            server.backend.queue_hidden(&close_statement(&name), Hidden::CloseComplete);
            server.state.statements.remove(&name);
        }
        for fix in needed {
            if fix.close {
                server.backend.queue_hidden(&close_statement(&fix.name), Hidden::CloseComplete);
                server.state.statements.remove(&fix.name);
            }
            if let Some(parse) = fix.parse {
                server.backend.queue_hidden(&parse, Hidden::ParseComplete);
                server.state.add_statement(fix.name, parse);
            }
        }
        if let Some(parse) = unnamed {
            server.backend.queue_hidden(&parse, Hidden::ParseComplete);
            self.unnamed_on = Some(target);
        }
    }

    /// Picks the server for a new unit, opening a replica connection if
    /// needed. A read after a write may first wait: for its probe's answer
    /// (`Choice::Hold`), or for a replica to replay the write.
    async fn choose(&mut self, classes: &[Arc<Classification>]) -> Result<Choice, ProxyError> {
        if self.catalog.is_stale() {
            Box::pin(self.catalog.refresh_now(self.shared.config.proxy.connect_timeout)).await;
        }
        let mut deadline = None;
        let route = loop {
            self.refresh_watermark();
            let route = match self.decide(classes) {
                Ok(route) => route,
                Err(no_primary) => return Ok(Choice::Fail(no_route(&no_primary))),
            };
            match self.wait_plan(classes, &route, deadline) {
                Wait::No => break route,
                Wait::Probe => return Ok(Choice::Hold),
                Wait::Replica { node, lsn, until } => {
                    let started = Instant::now();
                    let caught_up = self.shared.topology.nodes[node].replayed(lsn, until).await;
                    let outcome = if caught_up { WaitOutcome::CaughtUp } else { WaitOutcome::TimedOut };
                    self.shared.metrics.replica_wait(outcome, started.elapsed());
                    match self.decide(classes) {
                        Ok(route) if caught_up && matches!(route.destination, Destination::Replica(_)) => {
                            break Route { reason: Reason::CaughtUp, ..route };
                        }
                        Ok(route) => break route,
                        Err(no_primary) => return Ok(Choice::Fail(no_route(&no_primary))),
                    }
                }
                Wait::Monitor { until } => {
                    let now = Instant::now();
                    deadline = Some(until);
                    crate::clock::sleep(REPLICA_WAIT_STEP.min(until - now)).await;
                }
            }
        };
        self.routed(route);
        match route.destination {
            Destination::Primary(node) if self.primary.as_ref().is_some_and(|p| p.node == node) => {
                Ok(Choice::Go(Target::Primary, route.reason))
            }
            Destination::Primary(node) => Ok(match Box::pin(self.use_primary(node)).await? {
                Ok(target) => Choice::Go(target, route.reason),
                Err(error) => Choice::Fail(error),
            }),
            Destination::Replica(node) if self.replica.as_ref().is_some_and(|r| r.node == node) => {
                self.replica_chosen();
                Ok(Choice::Go(Target::Replica, route.reason))
            }
            Destination::Replica(node) => match Box::pin(self.use_replica(node)).await {
                Target::Replica => {
                    self.replica_chosen();
                    Ok(Choice::Go(Target::Replica, route.reason))
                }
                // The replica is now suspect: route again without it.
                Target::Primary => Box::pin(self.choose(classes)).await,
            },
        }
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
    fn wait_plan(&self, classes: &[Arc<Classification>], route: &Route, deadline: Option<Instant>) -> Wait {
        if !matches!(route.reason, Reason::PinnedAfterWrite | Reason::ReplicaLagging) {
            return Wait::No;
        }
        if route.reason == Reason::PinnedAfterWrite && self.watermark.is_probing() {
            return Wait::Probe;
        }
        let bound = match self.shared.config.consistency.replica_wait {
            ReplicaWait::Fixed(bound) => bound,
            ReplicaWait::Auto => self.primary_rtt().unwrap_or_default(),
        };
        let now = Instant::now();
        if let Some(until) = deadline {
            return if now < until { Wait::Monitor { until } } else { Wait::No };
        }
        if bound.is_zero() {
            return Wait::No;
        }
        let freshness = self.effective_watermark().freshness(self.settings.min_lsn);
        match (route.reason, freshness) {
            (Reason::PinnedAfterWrite, Freshness::AtLeast(lsn)) => {
                match self.replica_to_wait_on(classes, bound) {
                    Some(node) => Wait::Replica { node, lsn, until: now + bound },
                    None => Wait::No,
                }
            }
            _ if matches!(self.shared.config.consistency.replica_wait, ReplicaWait::Fixed(_)) => {
                Wait::Monitor { until: now + bound }
            }
            _ => Wait::No,
        }
    }

    /// The replica a read would use but for its watermark, if it is likely
    /// to replay the write within `bound`: one replaying all it receives
    /// waits only for the WAL to arrive, while one with a backlog of WAL
    /// received but not replayed for longer than `bound` (a delayed
    /// standby, a long replay conflict) is not waited on.
    fn replica_to_wait_on(&self, classes: &[Arc<Classification>], bound: Duration) -> Option<usize> {
        let route = self.decide_with(classes, Freshness::Any).ok()?;
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
    fn primary_rtt(&self) -> Option<Duration> {
        let node = self.shared.topology.primary(&self.cluster).ok()?;
        self.shared.topology.nodes[node].status.load().rtt
    }

    /// The database's user-defined volatile functions, loaded only when a
    /// statement of the unit calls a function.
    fn volatile_for(
        &self,
        classes: &[Arc<Classification>],
    ) -> Option<arc_swap::Guard<Arc<VolatileFunctions>>> {
        classes.iter().any(|c| !c.functions.is_empty()).then(|| self.catalog.volatile.load())
    }

    /// A read goes to the replica: a read-your-writes pin, if any, ends.
    fn replica_chosen(&mut self) {
        if let Some(since) = self.pinned_since.take() {
            self.shared.metrics.pin_ended(since.elapsed());
        }
    }

    fn decide(&self, classes: &[Arc<Classification>]) -> Result<Route, crate::cluster::NoPrimary> {
        self.decide_with(classes, self.effective_watermark().freshness(self.settings.min_lsn))
    }

    /// `decide`, as if the session's reads needed `freshness`.
    fn decide_with(
        &self,
        classes: &[Arc<Classification>],
        freshness: Freshness,
    ) -> Result<Route, crate::cluster::NoPrimary> {
        let config = &self.shared.config;
        let session = SessionView {
            cluster: &self.cluster,
            setting: self.settings.route,
            pinned: self.state.pinned || self.settings_refused,
            freshness,
        };
        let policy = Policy { routing: &config.routing, rules: &config.rules, region: &config.proxy.region };
        let volatile = self.volatile_for(classes);
        let volatile = volatile.as_ref().map_or(&*NO_FUNCTIONS, |v| &***v);
        let need = router::need(classes, &session, &policy, volatile);
        if let Need::Primary(reason) = need {
            // Writes (and everything routed like them) need only the
            // primary's index, not a view of every node.
            let node = self.shared.topology.primary(&self.cluster)?;
            return Ok(Route { destination: Destination::Primary(node), reason });
        }
        let view = ClusterView::capture(&self.shared.topology);
        router::route_need(need, &session, &view, &policy)
    }

    /// Makes `node` the session's primary connection. A session whose
    /// primary moved (failover) ends, since its server-side state is gone;
    /// one that had none (started while no primary was reachable) opens it.
    async fn use_primary(&mut self, node: usize) -> Result<Result<Target, Frame>, ProxyError> {
        let pool = if self.primary.is_none() { self.pool(node).cloned() } else { None };
        match &self.primary {
            Some(primary) if primary.node == node => Ok(Ok(Target::Primary)),
            Some(_) => {
                let name = self.shared.topology.nodes[node].config.name.clone();
                Err(ProxyError::PrimaryMoved { node: name })
            }
            None => match Box::pin(super::server::acquire(
                &self.shared,
                node,
                &self.login,
                pool,
                self.state.owner(),
            ))
            .await
            {
                Ok(server) => {
                    self.primary = Some(server);
                    Ok(Ok(Target::Primary))
                }
                Err(ProxyError::PoolExhausted(after)) => Ok(Err(pool_exhausted(after))),
                Err(error) => {
                    self.shared.topology.suspect(node);
                    let message = format!("cannot reach the primary: {error}");
                    Ok(Err(error_response(Severity::Error, SqlState::ConnectionFailure, &message)))
                }
            },
        }
    }

    /// Makes `node` the session's replica connection; falls back to the
    /// primary if it cannot be opened.
    async fn use_replica(&mut self, node: usize) -> Target {
        if self.replica.as_ref().is_some_and(|r| r.node == node) {
            return Target::Replica;
        }
        if let Some(old) = self.replica.take() {
            match old.pool.clone() {
                Some(pool) if old.reusable() => pool.put(old),
                _ => old.backend.terminate().await,
            }
        }
        let pool = self.pool(node).cloned();
        match Box::pin(super::server::acquire(&self.shared, node, &self.login, pool, self.state.owner()))
            .await
        {
            Ok(server) => {
                self.replica = Some(server);
                Target::Replica
            }
            Err(error @ ProxyError::PoolExhausted(_)) => {
                let name = &self.shared.topology.nodes[node].config.name;
                tracing::info!(parent: &self.span, node = name.as_str(), %error, "replica pool exhausted: using the primary");
                Target::Primary
            }
            Err(error) => {
                let name = &self.shared.topology.nodes[node].config.name;
                tracing::warn!(parent: &self.span, node = name.as_str(), %error, "cannot open a replica connection");
                self.shared.topology.suspect(node);
                Target::Primary
            }
        }
    }

    /// Waits (a few monitor intervals at most) for a pending watermark to
    /// resolve, so that `SHOW pgnear.write_lsn` reports the last write.
    async fn await_watermark(&mut self) {
        let deadline = Instant::now() + self.shared.config.monitor.interval * 4 + Duration::from_millis(100);
        while self.watermark.is_pending() && Instant::now() < deadline {
            self.refresh_watermark();
            crate::clock::sleep(REPLICA_WAIT_STEP).await;
        }
    }

    /// Answers an extended-protocol batch that runs a `pgnear.*` command
    /// (JDBC and others send even SET this way) as a server would.
    fn answer_local_batch(&mut self, frames: &[Frame], classes: &[Arc<Classification>]) {
        let command = classes.iter().find_map(|c| match &c.class {
            Class::ProxyLocal(command) => Some(command.clone()),
            _ => None,
        });
        let mixed = classes.iter().any(|c| !matches!(c.class, Class::ProxyLocal(_)));
        let report = Report { write_lsn: self.watermark.lsn() };
        let mut failed = false;
        for frame in frames {
            if failed {
                break;
            }
            let (Some(command), false) = (&command, mixed) else {
                let message = "pgnear.* commands must be sent on their own, not with other statements";
                self.client.queue(&error_response(Severity::Error, SqlState::FeatureNotSupported, message));
                break;
            };
            let show = matches!(command, ProxyCommand::Show { .. });
            match frame.tag() {
                b'P' => {
                    if let Some(parse) = frontend::parse(frame).ok().filter(|p| !p.name.is_empty()) {
                        // Later Binds of this name are answered here too.
                        let class = self.shared.classifier.classify(parse.query);
                        let prepared = Prepared { parse: frame.detached(), class };
                        self.state.prepared.insert(parse.name.to_string(), prepared);
                    }
                    self.client.queue(&parse_complete());
                }
                b'B' => self.client.queue(&Frame::new(b'2', &[])),
                b'C' => self.client.queue(&Frame::new(b'3', &[])),
                b'D' if matches!(frontend::target(frame), Ok(Named::Statement(_))) && !show => {
                    self.client.queue(&Frame::new(b't', &0i16.to_be_bytes()));
                    self.client.queue(&no_data());
                }
                b'D' if show => {
                    if matches!(frontend::target(frame), Ok(Named::Statement(_))) {
                        self.client.queue(&Frame::new(b't', &0i16.to_be_bytes()));
                    }
                    let responses = self.settings.execute(command, &report);
                    if let Some(description) = responses.iter().find(|f| f.tag() == b'T') {
                        self.client.queue(description);
                    }
                }
                b'D' => self.client.queue(&no_data()),
                b'E' => {
                    for response in self.settings.execute(command, &report) {
                        failed |= response.tag() == b'E';
                        if response.tag() != b'T' {
                            self.client.queue(&response);
                        }
                    }
                }
                _ => {}
            }
        }
        let status = self.bound_status();
        self.client.queue(&ready_for_query(status));
    }

    fn cluster_has_replicas(&self) -> bool {
        let nodes = &self.shared.topology.nodes;
        nodes.iter().filter(|n| n.config.cluster == self.cluster).count() > 1
    }

    /// Counts a unit that executes statements, by node, role and reason.
    fn count_route(&mut self, target: Target, reason: Reason) {
        let role = match target {
            Target::Primary => RoleLabel::Primary,
            Target::Replica => RoleLabel::Replica,
        };
        if let Some(server) = self.server_mut(target) {
            server.metrics.routed(role, reason);
        }
    }

    /// The transaction status to report for a locally answered query.
    fn bound_status(&self) -> TxStatus {
        self.bound.and_then(|t| self.server(t)).map_or(TxStatus::Idle, |s| s.backend.tx_status)
    }
}

/// A named statement to put right on a server before a unit runs.
pub(super) struct StatementFix {
    name: String,
    /// Close the server's statement of that name first.
    close: bool,
    /// Then parse the session's.
    parse: Option<Frame>,
}

impl StatementFix {
    fn parse(name: &str, parse: &Frame, close: bool) -> StatementFix {
        StatementFix { name: name.to_string(), close, parse: Some(parse.clone()) }
    }
}

/// What `target` needs so that the unit's named statements mean there
/// what they mean in the session: a Bind or Describe of a statement
/// the session prepared needs that very statement (replayed if the
/// server lacks it or has another of the name); one of a statement the
/// session does not have, or a Parse of a new name, needs the name
/// free, as PostgreSQL would have it; a Parse of a name the session
/// already has must fail on the server as a duplicate, so the
/// session's statement is replayed first. Marks the statements used.
fn missing_statements(
    prepared: &HashMap<String, Prepared>,
    server: &mut ServerState,
    frames: &[Frame],
) -> Vec<StatementFix> {
    let mut seen: smallvec::SmallVec<[&str; 4]> = smallvec::SmallVec::new();
    let mut needed: Vec<StatementFix> = Vec::new();
    for frame in frames {
        let (name, parses) = match frame.tag() {
            b'P' => (frontend::parse_name(frame).ok(), true),
            b'B' => (frontend::bind(frame).map(|b| b.statement).ok(), false),
            // A Describe of a portal (pgbench's, libpq's) names none.
            b'D' if frame.body().first() == Some(&b'S') => match frontend::target(frame) {
                Ok(Named::Statement(name)) => (Some(name), false),
                _ => (None, false),
            },
            _ => (None, false),
        };
        let Some(name) = name.filter(|n| !n.is_empty() && !seen.contains(n)) else { continue };
        seen.push(name);
        let there = server.use_statement(name);
        let fix = match prepared.get(name) {
            // A Parse of a name the session has: let the server refuse it.
            Some(ours) if parses => there.is_none().then(|| StatementFix::parse(name, &ours.parse, false)),
            Some(ours) => match there {
                Some(theirs) if theirs.is(&ours.parse) || theirs.raw() == ours.parse.raw() => None,
                Some(_) => Some(StatementFix::parse(name, &ours.parse, true)),
                None => Some(StatementFix::parse(name, &ours.parse, false)),
            },
            None => {
                there.is_some().then(|| StatementFix { name: name.to_string(), close: true, parse: None })
            }
        };
        needed.extend(fix);
    }
    needed
}

/// What a unit's messages are, found in one pass over them.
#[derive(Debug, Clone, Copy, Default)]
struct Kinds {
    bytes: usize,
    /// Query, Execute or FunctionCall: the unit runs something.
    executes: bool,
    /// Query or Execute: statements whose effects the session tracks.
    runs: bool,
    /// Anything but Query and FunctionCall: extended-protocol messages.
    extended: bool,
    /// Parse, Bind, Describe, Close or Execute: the unit may name
    /// statements (or the unnamed one) that the server must have.
    names_statements: bool,
}

impl Kinds {
    fn of(frames: &[Frame]) -> Kinds {
        let mut kinds = Kinds::default();
        for frame in frames {
            let tag = frame.tag();
            kinds.bytes += frame.len();
            kinds.executes |= matches!(tag, b'Q' | b'E' | b'F');
            kinds.runs |= matches!(tag, b'Q' | b'E');
            kinds.extended |= !matches!(tag, b'Q' | b'F');
            kinds.names_statements |= matches!(tag, b'P' | b'B' | b'D' | b'C' | b'E');
        }
        kinds
    }
}

/// A Close of the named statement `name`.
fn close_statement(name: &str) -> Frame {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(b'S');
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    Frame::new(b'C', &body)
}

/// The SQL-level prepared statements a unit executes.
fn executed(unit: &Batch) -> impl Iterator<Item = &String> {
    unit.classes.iter().flat_map(|c| c.executes.iter())
}

/// Puts `class` in a unit, and behind it the class of each SQL-level
/// prepared statement it executes: as the session prepared it, or a write
/// for a name the session does not know (the primary has it, if any node
/// does).
fn add_class(
    state: &SessionState,
    classes: &mut SmallVec<[Arc<Classification>; 1]>,
    class: Arc<Classification>,
) {
    for name in &class.executes {
        classes.push(state.sql_prepared.get(name).map_or_else(|| WRITE.clone(), |p| p.body.clone()));
    }
    classes.push(class);
}

/// Appends `name` as a quoted identifier.
fn push_identifier(sql: &mut String, name: &str) {
    sql.push('"');
    sql.push_str(&name.replace('"', "\"\""));
    sql.push('"');
}

/// Whether a statement is a SQL-level PREPARE.
fn prepares(class: &Classification) -> bool {
    class.effects.iter().any(|e| matches!(e, crate::router::classify::SessionEffect::Prepare { .. }))
}

/// Whether the unit's SQL names databases (CREATE, DROP, ALTER DATABASE).
fn mentions_databases(frames: &[Frame]) -> bool {
    unit_sql(frames).any(|t| memchr::memmem::find(&t.to_ascii_lowercase(), b"database").is_some())
}

/// The error that fails a unit that waited `after` for a pooled connection.
pub(super) fn pool_exhausted(after: Duration) -> Frame {
    let message = ProxyError::PoolExhausted(after).to_string();
    error_response(Severity::Error, SqlState::TooManyConnections, &message)
}

/// Whether a unit runs `currval()` or `lastval()` without writing
/// anything itself (a text that also inserts or calls `nextval()` runs on
/// one connection, its own state included).
fn reads_sequence_state(unit: &Batch) -> bool {
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
fn sequence_state_elsewhere() -> Frame {
    let message = "currval() and lastval() through transaction pooling read the server connection \
                   this session last wrote on, and another client has used it since (or the \
                   session has written nothing): use INSERT ... RETURNING, or one transaction";
    error_response(Severity::Error, SqlState::ObjectNotInPrerequisiteState, message)
}

/// The error that fails a unit no node can take.
fn no_route(no_primary: &crate::cluster::NoPrimary) -> Frame {
    let message = format!("cannot route this statement: {no_primary}");
    error_response(Severity::Error, SqlState::ConnectionFailure, &message)
}

/// Under `default_transaction_read_only = on` (as the server reports it),
/// a plain BEGIN starts a read-only transaction, which a replica may run.
/// `BEGIN READ WRITE` keeps its primary.
fn read_only_begin(default_read_only: bool, class: Arc<Classification>, text: &[u8]) -> Arc<Classification> {
    let plain_begin = matches!(class.class, Class::Transaction(Tx::Begin { read_only: false }));
    if !default_read_only
        || !plain_begin
        || memchr::memmem::find(&text.to_ascii_lowercase(), b"read write").is_some()
    {
        return class;
    }
    Arc::new(Classification { class: Class::Transaction(Tx::Begin { read_only: true }), ..(*class).clone() })
}

/// Borrows the session state, the server `target` and the other server.
pub(super) fn split_state<'a>(
    state: &'a mut super::state::SessionState,
    primary: Option<&'a mut Server>,
    replica: Option<&'a mut Server>,
    target: Target,
) -> (&'a mut super::state::SessionState, Option<&'a mut Server>, Vec<&'a mut Server>) {
    match target {
        Target::Primary => (state, primary, replica.into_iter().collect()),
        Target::Replica => (state, replica, primary.into_iter().collect()),
    }
}

/// Whether a unit uses what only the held server has: the unnamed
/// statement, or any portal, that the unit does not create itself.
fn uses_unnamed(frames: &[Frame]) -> bool {
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

/// Whether the unit's SQL could define or replace a function: then the
/// volatile-function catalog is reloaded before the next routing decision.
fn may_define_functions(frames: &[Frame]) -> bool {
    unit_sql(frames).any(|t| {
        let t = t.to_ascii_lowercase();
        ["function", "procedure", "extension", "aggregate", "language"]
            .iter()
            .any(|w| memchr::memmem::find(&t, w.as_bytes()).is_some())
            || t.trim_ascii_start().starts_with(b"do")
    })
}

/// The SQL texts of a unit's Query and Parse messages.
fn unit_sql(frames: &[Frame]) -> impl Iterator<Item = &[u8]> {
    frames.iter().filter_map(|frame| match frame.tag() {
        b'Q' => frontend::query_text(frame).ok(),
        b'P' => frontend::parse(frame).ok().map(|p| p.query),
        _ => None,
    })
}

/// The library a simple `LOAD 'name'` loads (its base name), if that is
/// what the unit is.
fn loaded_library(frames: &[Frame]) -> Option<String> {
    let [frame] = frames else { return None };
    let start = frame.body().iter().position(|b| !b.is_ascii_whitespace())?;
    if !frame.body()[start..].get(..4)?.eq_ignore_ascii_case(b"load") {
        return None;
    }
    let text = std::str::from_utf8(frontend::query_text(frame).ok()?).ok()?;
    let text = text.trim().trim_end_matches(';').trim();
    text.get(..4).filter(|w| w.eq_ignore_ascii_case("load"))?;
    let path = text[4..].trim().trim_matches('\'');
    let base = path.rsplit('/').next()?.split('.').next()?;
    (!base.is_empty()).then(|| base.to_ascii_lowercase())
}
