//! The server side of the relay: what each server message does to the
//! session (ReadyForQuery ends units, errors mark them failed, FATAL ends
//! the session), a lost server connection, and the write watermark.

use std::sync::Arc;
use std::time::Instant;

use crate::tls::Split;

use super::parts::{Refusal, SentProbe};
use super::{Flow, Session, Target};
use crate::backend::connection::Swallowed;
use crate::backend::server::ServerState;
use crate::cluster::Lsn;
use crate::config::ReadYourWrites;
use crate::error::ProxyError;
use crate::protocol::backend::{parameter_status, ready_for_query, ready_status, ErrorFields, TxStatus};
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::Frame;
use crate::router::classify::{Classification, SessionEffect};
use crate::router::consistency::{PrimarySample, Watermark};
use crate::router::Freshness;

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// A server connection closed or failed. Losing the primary ends the
    /// session; losing a replica fails only the unit running there.
    pub(super) async fn server_lost(&mut self, target: Target) -> Result<(), ProxyError> {
        self.sources.mark_all();
        let node = self.node_name(target);
        if target == Target::Primary {
            if self.can_move_primary() {
                // Idle, nothing pinned: the next unit opens the primary
                // afresh (the same server back, or a new one after a
                // switchover) and the client never notices.
                tracing::info!(parent: &self.scope.span, node, "idle primary connection lost; the next unit reopens one");
                // Not suspected: an idle connection also ends for reasons
                // of its own (idle_session_timeout, pg_terminate_backend).
                self.primary = None;
                return Ok(());
            }
            return Err(ProxyError::BackendLost { node });
        }
        tracing::warn!(parent: &self.scope.span, node, "replica connection lost");
        let mut lost = self.replica.take();
        if let Some(lost) = &lost {
            self.shared.topology.suspect(lost.node);
        }
        if self.replica_lost_optimistic(lost.as_deref_mut()) {
            return Ok(());
        }
        let bound = self.bound.take_if(|b| b.target == Target::Replica);
        let Some(bound) = bound else { return Ok(()) };
        if let Some(unit) = bound.retry {
            // Nothing of this read reached the client yet: run it again on
            // the next eligible node, unnoticed.
            return self.dispatch(*unit, true).await;
        }
        {
            let message = format!("connection to replica {node} was lost; the statement did not complete");
            let error = crate::protocol::backend::error_response(
                crate::protocol::backend::Severity::Error,
                crate::protocol::SqlState::ConnectionFailure,
                &message,
            );
            self.client.queue(&error);
            let status = self.primary.as_ref().map_or(TxStatus::Idle, |p| p.backend.tx_status);
            self.client.queue(&ready_for_query(status));
        }
        Ok(())
    }

    pub(super) fn on_server(&mut self, target: Target, frame: Frame) -> Result<Flow, ProxyError> {
        let open_batch = self.bound.as_ref().is_some_and(|b| b.open_batch);
        let no_primary = self.primary.is_none();
        let mut read_only = None;
        let Some(server) = self.server_mut(target) else { return Ok(Flow::Continue) };
        let mut finished = None;
        match server.backend.swallow(&frame) {
            Swallowed::No => {}
            Swallowed::Yes => return Ok(Flow::Continue),
            Swallowed::Probe(lsn, status) => {
                self.probe_answered(lsn, status);
                return Ok(Flow::Continue);
            }
        }
        // A read on a replica that may still run elsewhere: what only
        // acknowledges its messages waits for its first result, so that an
        // error then leaves nothing seen by the client.
        let may_retry = target == Target::Replica && self.bound.as_ref().is_some_and(|b| b.retry.is_some());
        if may_retry && matches!(frame.tag(), b'1' | b'2' | b'3' | b't' | b'n' | b'T') {
            if let Some(replica) = self.replica.as_mut() {
                replica.held.extend_from_slice(frame.raw());
            }
            return Ok(Flow::Continue);
        }
        // A read the replica refused, held back: its ReadyForQuery decides.
        let refused = match frame.tag() {
            b'Z' if target == Target::Replica => {
                self.bound.as_mut().and_then(|b| b.refused.take().map(|error| (error, b.retry.take())))
            }
            _ => None,
        };
        // Notices (PostgreSQL warns before an immediate shutdown) and
        // ParameterStatus are not results: the read may still be retried.
        if target == Target::Replica && !matches!(frame.tag(), b'N' | b'S' | b'E') {
            self.no_retry();
        }
        let Some(server) = self.server_mut(target) else { return Ok(Flow::Continue) };
        let mut flow = Flow::Continue;
        let mut ended_idle = false;
        match frame.tag() {
            b'Z' => {
                let status = ready_status(&frame)?;
                ended_idle = status == TxStatus::Idle;
                if ended_idle {
                    server.metrics.transaction_ended(server.backend.take_read());
                }
                let now = Instant::now();
                if let Some(started) = server.started.pop_front() {
                    server.load.done();
                    server.metrics.query_latency(now.saturating_duration_since(started));
                }
                let failed = std::mem::take(&mut server.unit_failed);
                let before = server.backend.tx_status;
                finished = server.effects.pop_front().map(|e| (e, failed, before, status));
                server.backend.ready(status);
                server.note_status(status);
                let idle = server.backend.is_idle();
                if idle && !open_batch && self.bound_to() == Some(target) {
                    self.bound = None;
                }
                if idle && target == Target::Primary {
                    self.primary_idle(now);
                }
                if target == Target::Replica {
                    self.replica_ready(status);
                }
            }
            b'S' if target == Target::Primary || no_primary => {
                if let Ok((name, value)) = crate::protocol::backend::parse_parameter_status(&frame) {
                    if name == "default_transaction_read_only" {
                        read_only = Some(value == b"on");
                    }
                }
            }
            b'G' => {
                server.backend.copy_in = true;
                if std::mem::take(&mut server.backend.last_unit_synced) {
                    // Its ReadyForQuery comes with the Sync after CopyDone,
                    // which counts as a unit of its own.
                    if server.started.pop_back().is_some() {
                        server.load.done();
                    }
                    server.effects.pop_back();
                    // The Sync sent with this COPY's Execute reached the
                    // server in COPY IN mode, where it is ignored.
                    server.backend.sync_ignored();
                }
            }
            b'E' if !ErrorFields::parse(&frame)?.is_fatal() => {
                server.unit_failed = true;
                if target == Target::Replica {
                    if self.hold_refusal(&frame)? {
                        return Ok(Flow::Continue);
                    }
                    self.no_retry();
                }
            }
            b'N' if target == Target::Replica => {
                // The client sees it: an error after it is the client's.
                if let Some(bound) = self.bound.as_mut() {
                    bound.noticed = true;
                }
            }
            b'E' => {
                if target == Target::Primary && self.can_move_primary() {
                    // The primary is going away while the session is idle
                    // on it (a switchover, a restart): nothing is lost.
                    return Ok(Flow::Lost(Target::Primary));
                }
                if target == Target::Replica
                    && matches!(self.optimistic, Some(super::optimistic::Phase::OnReplica(_)))
                {
                    // The replica running an optimistic transaction is
                    // going away: the transaction moves to the primary.
                    return Ok(Flow::Lost(Target::Replica));
                }
                if target == Target::Replica && self.bound_to() != Some(Target::Replica) {
                    // An idle replica going away is not the client's business.
                    self.replica = None;
                    return Ok(Flow::Continue);
                }
                if target == Target::Replica && self.bound.as_ref().is_some_and(|b| b.retry.is_some()) {
                    // The replica is going away before the read produced
                    // anything: run it elsewhere instead.
                    return Ok(Flow::Lost(Target::Replica));
                }
                flow = Flow::End;
            }
            _ => {}
        }
        if let Some((effects, failed, before, after)) = finished {
            self.unit_finished(target, effects, failed, before, after);
        }
        if let Some(read_only) = read_only {
            self.known.default_read_only = read_only;
        }
        if let Some(((error, refusal), unit)) = refused {
            match unit.filter(|_| ended_idle) {
                // Outside a block, nothing of it seen: run it again.
                Some(unit) => {
                    if let Some(replica) = self.replica.as_mut() {
                        replica.held.clear();
                    }
                    return Ok(Flow::Retry(unit, refusal));
                }
                None => {
                    self.release_held();
                    self.client.relay(&error);
                }
            }
        }
        if target == Target::Replica {
            self.release_held();
        }
        if let Some(digest) = self.server_mut(target).and_then(|s| s.backend.digest.as_mut()) {
            digest.add(frame.raw());
        }
        self.client.relay(&frame);
        Ok(flow)
    }

    /// A replica's error for the read it runs: held back, instead of
    /// relayed, when the primary would not give it and the read can still
    /// run there unnoticed: nothing of it reached the client (no row, tag
    /// or notice). Whether it ran outside a block, its ReadyForQuery
    /// tells. Two kinds:
    /// - 25006 (the read needed the primary after all, as a view over
    ///   `nextval` does) or 40001 (a recovery conflict), when it parses no
    ///   named statement (which the session now has);
    /// - 42P01, 42703 or 42883 (an undefined table, column or function)
    ///   while the replica is behind: a schema change may not have
    ///   reached it. The statements it parsed there are forgotten before
    ///   it runs again (`retry_on_primary`).
    fn hold_refusal(&mut self, frame: &Frame) -> Result<bool, crate::protocol::ProtocolError> {
        let code = ErrorFields::parse(frame)?.code;
        let behind = matches!(code.as_str(), "42P01" | "42703" | "42883") && self.replica_behind();
        let Some(bound) = self.bound.as_mut() else { return Ok(false) };
        let Some(unit) = bound.retry.as_ref() else { return Ok(false) };
        if bound.noticed {
            return Ok(false);
        }
        let parses_named = unit.frames.iter().any(|f| f.tag() == b'P' && f.body().first() != Some(&0));
        let refusal = match code.as_str() {
            "25006" | "40001" if !parses_named => Refusal::Refused,
            _ if behind => Refusal::Missing,
            _ => return Ok(false),
        };
        bound.refused = Some((frame.detached(), refusal));
        Ok(true)
    }

    /// Whether the session's replica may lack something the primary has:
    /// its last measured replay position is behind the primary's or the
    /// cluster's schema watermark (or unknown), or it has received WAL it
    /// has not replayed. Without a primary to run the read, it is not.
    fn replica_behind(&self) -> bool {
        let Some(replica) = self.replica.as_ref() else { return false };
        let topology = &self.shared.topology;
        let Ok(primary) = topology.primary(&self.scope.cluster) else { return false };
        let status = topology.node(replica.node).status.load();
        let schema = self.scope.schema.get();
        let Some(replayed) = status.lsn else { return true };
        let primary_lsn = topology.node(primary).status.load().lsn;
        schema.is_pending()
            || status.receive_lsn.is_some_and(|received| received > replayed)
            || primary_lsn.max(schema.lsn()).is_some_and(|lsn| replayed < lsn)
    }

    /// Relays the acknowledgements held for a read on the replica (none
    /// of them is a result: an optimistic transaction's digest skips them).
    fn release_held(&mut self) {
        let Some(replica) = self.replica.as_mut() else { return };
        if replica.held.is_empty() {
            return;
        }
        self.client.out.extend_from_slice(&replica.held);
        self.client.relayed += replica.held.len() as u64;
        replica.held.clear();
    }

    /// Runs a read a replica refused again on the primary. A refusal is
    /// remembered (its statements go to the primary from then on); a
    /// missing object is not, since the replica will replay it.
    pub(super) async fn retry_on_primary(
        &mut self,
        unit: super::Batch,
        refusal: Refusal,
    ) -> Result<(), ProxyError> {
        match refusal {
            Refusal::Refused => {
                for class in &unit.classes {
                    self.shared.refused.add(class);
                }
                tracing::info!(parent: &self.scope.span, "a replica refused a read: it runs again on the primary");
            }
            Refusal::Missing => {
                self.forget_replica_statements(&unit);
                tracing::info!(parent: &self.scope.span, "a replica behind lacks what a read names: it runs again on the primary");
            }
        }
        let progress = super::plan::Progress { retried: true, ..super::plan::Progress::default() };
        self.dispatch_with(unit, true, progress).await?;
        self.sources.mark_all();
        Ok(())
    }

    /// A read failed on the replica before it runs again on the primary:
    /// the named statements it parsed or used there (pgnear's replays of
    /// them included) may not exist there, so the replica closes them
    /// before its next use (closing one that does not exist is no error),
    /// and those it parsed are the session's only once the primary has
    /// parsed them.
    fn forget_replica_statements(&mut self, unit: &super::Batch) {
        let Some(replica) = self.replica.as_mut() else { return };
        for frame in &unit.frames {
            let (name, parses) = match frame.tag() {
                b'P' => (frontend::parse_name(frame).ok(), true),
                b'B' => (frontend::bind(frame).map(|b| b.statement).ok(), false),
                b'D' => match frontend::target(frame) {
                    Ok(Named::Statement(name)) => (Some(name), false),
                    _ => (None, false),
                },
                _ => (None, false),
            };
            let Some(name) = name.filter(|n| !n.is_empty()) else { continue };
            let state = &mut replica.state;
            if state.statements.contains_key(name) && !state.stale.iter().any(|s| s == name) {
                state.stale.push(name.to_string());
            }
            if parses {
                self.state.prepared.remove(name);
            }
        }
    }

    /// A unit ended: the session effects that now last are recorded
    /// (`TxEffects::finish` says which).
    fn unit_finished(
        &mut self,
        target: Target,
        effects: Vec<Arc<Classification>>,
        failed: bool,
        before: TxStatus,
        after: TxStatus,
    ) {
        let kept = self.state.tx.finish(effects, failed, before, after);
        if !kept.is_empty() {
            self.unit_done(target, &kept);
        }
    }

    /// A unit with session effects succeeded on `target`: record them.
    fn unit_done(&mut self, target: Target, effects: &[Arc<Classification>]) {
        let (state, ran_on, mut others) = super::send::split_state(
            &mut self.state,
            self.primary.as_deref_mut(),
            self.replica.as_deref_mut(),
            target,
        );
        let Some(ran_on) = ran_on else { return };
        let mut others: Vec<&mut ServerState> = others.iter_mut().map(|s| &mut s.state).collect();
        for class in effects {
            state.apply(class, &mut ran_on.state, &mut others);
        }
        // DISCARD ALL forgets the session's region preference and
        // staleness bound too: a pooler's next client starts without them.
        let discards =
            |c: &Arc<Classification>| c.effects.iter().any(|e| matches!(e, SessionEffect::DiscardAll));
        if effects.iter().any(discards) {
            self.known.settings.prefer_region = None;
            self.known.settings.staleness = crate::router::Staleness::DEFAULT;
        }
    }

    /// The primary finished its work: a write, if any, has committed.
    fn primary_idle(&mut self, at: Instant) {
        if std::mem::take(&mut self.writes.defines_functions) {
            // Every session reloads the catalog before routing again.
            self.scope.catalog.mark_stale();
        }
        if !std::mem::take(&mut self.writes.primary_dirty) {
            return;
        }
        if self.shared.config().consistency.read_your_writes != ReadYourWrites::Off {
            self.pin_started(at);
        }
        // Schema changes are global, whatever the read-your-writes scope.
        if std::mem::take(&mut self.writes.schema_changed) {
            self.scope.schema.wrote(at);
        }
        match self.shared.config().consistency.read_your_writes {
            ReadYourWrites::Off => {}
            // The proxy-wide watermark is kept in both scopes: sessions
            // start from it, so a client that reconnects (psql's `\c`, a
            // pool opening a new connection) still reads what it wrote.
            ReadYourWrites::Session | ReadYourWrites::Proxy => {
                self.writes.watermark.wrote(at);
                self.shared.watermark.wrote(at);
                self.writes.wrote = true;
            }
        }
    }

    /// A unit that may have written and leaves the primary outside a
    /// transaction block was just queued there: pipeline a probe behind
    /// it, so that its commit's LSN comes back in the same flight.
    pub(super) fn probe_behind(&mut self) {
        let Some(primary) = self.primary.as_mut() else { return };
        primary.backend.queue_probe();
        self.writes.primary_dirty = false;
        self.writes.watermark.probe_sent();
        let schema = std::mem::take(&mut self.writes.schema_changed).then(|| self.scope.schema.probe());
        self.writes.probes.push_back(SentProbe { writes: self.shared.watermark.probe(), schema });
        self.writes.wrote = true;
        self.pin_started(Instant::now());
    }

    /// Reads are held after a write from `at`, unless they already were.
    fn pin_started(&mut self, at: Instant) {
        if self.writes.pinned_since.is_none() {
            self.writes.pinned_since = Some(at);
            self.shared.metrics.pin_started();
        }
    }

    /// A probe came back. With an LSN, and outside a block as predicted,
    /// it is the watermark, reported to the client at once. Otherwise the
    /// commit falls back to the monitor, and a block still open (the
    /// prediction failed: an error skipped the COMMIT) is still dirty.
    fn probe_answered(&mut self, lsn: Option<Lsn>, status: TxStatus) {
        let now = Instant::now();
        let lsn = lsn.filter(|_| status == TxStatus::Idle);
        if status != TxStatus::Idle {
            self.writes.primary_dirty = true;
        }
        self.writes.watermark.probe_answered(lsn, now);
        if let Some(sent) = self.writes.probes.pop_front() {
            sent.writes.answered(lsn, now);
            if let Some(schema) = sent.schema {
                // A block still open commits its schema change later.
                self.writes.schema_changed |= status != TxStatus::Idle;
                schema.answered(lsn, now);
            }
        }
        self.shared.metrics.probe(lsn.is_some());
        self.report_watermark();
    }

    /// The monitor's latest primary sample, for resolving watermarks.
    fn primary_sample(&self) -> Option<PrimarySample> {
        let node = self.shared.topology.primary(&self.scope.cluster).ok()?;
        let status = self.shared.topology.node(node).status.load();
        Some(PrimarySample { sent_at: status.probe_sent?, lsn: status.insert_lsn? })
    }

    /// Resolves pending watermarks and reports a new one to the client as
    /// ParameterStatus `pgnear.write_lsn`.
    pub(super) fn refresh_watermark(&mut self) {
        let pending = self.writes.watermark.is_pending()
            || self.shared.watermark.get().is_pending()
            || self.scope.schema.get().is_pending();
        if !pending {
            return;
        }
        let sample = self.primary_sample();
        self.writes.watermark.resolve(sample);
        self.shared.watermark.resolve(sample);
        self.scope.schema.resolve(sample);
        self.report_watermark();
    }

    /// Reports a new resolved watermark to a client that wrote.
    fn report_watermark(&mut self) {
        if self.writes.watermark.is_pending() {
            return;
        }
        let lsn = self.writes.watermark.lsn();
        if self.writes.wrote && lsn.is_some() && lsn != self.writes.reported_lsn {
            self.writes.reported_lsn = lsn;
            let value = lsn.map(|l| l.to_string()).unwrap_or_default();
            self.client.queue(&parameter_status("pgnear.write_lsn", &value));
        }
    }

    /// What the session's reads must see: all of it (the watermark of
    /// the configured scope, `pgnear.min_lsn`, and the cluster's schema
    /// watermark), and what even a read that skips the session's writes
    /// must see (the schema watermark). Under `read_your_writes = "off"`
    /// neither watermark counts.
    pub(super) fn read_freshness(&self) -> (Freshness, Freshness) {
        let (own, schema) = match self.shared.config().consistency.read_your_writes {
            // No read-your-writes, but schema changes are global.
            ReadYourWrites::Off => (Watermark::default(), self.scope.schema.get()),
            ReadYourWrites::Session => (self.writes.watermark, self.scope.schema.get()),
            ReadYourWrites::Proxy => {
                (self.writes.watermark.merge(self.shared.watermark.get()), self.scope.schema.get())
            }
        };
        (own.merge(schema).freshness(self.known.settings.min_lsn), schema.freshness(None))
    }
}
