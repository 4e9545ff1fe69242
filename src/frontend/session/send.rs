//! Sending a planned unit: the replays its server needs first (prepared
//! statements), and what the unit changes in the session.
use std::sync::Arc;
use std::time::Instant;

use crate::tls::Split;

use super::plan::NO_FUNCTIONS;
use super::state::{HashMap, Prepared};
use super::{Batch, Bound, Server, Session, Target};
use crate::backend::connection::Hidden;
use crate::backend::server::ServerState;
use crate::metrics::{Direction, RoleLabel};
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::Frame;
use crate::router::classify::{Class, Classification, SessionEffect, Tx};
use crate::router::Reason;

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// Sends a routed unit to `target`, with whatever the server is
    /// missing of the session's prepared statements queued ahead of it,
    /// and records what the unit changes.
    pub(super) fn send(&mut self, target: Target, reason: Reason, unit: &Batch, complete: bool) {
        let frames = &unit.frames[..];
        let kinds = Kinds::of(frames);
        if kinds.names_statements || kinds.runs && unit.classes.iter().any(|c| sql_names(c).next().is_some())
        {
            self.replay(target, unit, !kinds.extended);
        }
        if kinds.executes {
            self.count_route(target, reason);
            if let Some(node) = self.server(target).map(|s| s.node) {
                self.served_by(node);
            }
        }

        self.shared.metrics.bytes(Direction::ClientToServer, kinds.bytes);
        if complete {
            self.timers.units += 1;
        }
        let Some(server) = self.server_mut(target) else { return };
        server.metrics.received(kinds.bytes);
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
        if leaves_no_block && target == Target::Primary && self.writes.primary_dirty && self.probes_commits()
        {
            self.probe_behind();
        }
        let loaded = kinds.runs.then(|| unit.classes.iter().find_map(|c| c.loads.as_deref())).flatten();
        if let Some(library) = loaded {
            self.state.settings.forget_prefix(library);
            let key = self.state.settings_key();
            if let Some(server) = self.server_mut(target) {
                server.state.settings = key;
            }
        }
        if unit.parses_unnamed {
            self.known.unnamed_on = Some((target, reason));
            if let Some(pooling) = self.pooling.as_mut() {
                // A copy, into a reused buffer: the frame shares the
                // client's read buffer, and most units parse the unnamed
                // statement.
                pooling.unnamed_parse.clear();
                let last = frames.iter().rev().find(|f| f.tag() == b'P' && f.body().first() == Some(&0));
                if let Some(parse) = last {
                    pooling.unnamed_parse.extend_from_slice(parse.body());
                }
            }
        }
        let bound = self.bound.get_or_insert_with(|| Bound {
            target,
            reason,
            open_batch: false,
            // A read on a replica, kept until its first response reaches
            // the client so that it can run elsewhere if the replica fails.
            retry: (target == Target::Replica && complete).then(|| Box::new(unit.clone())),
            refused: None,
            noticed: false,
        });
        // Messages sent ahead of their Sync keep the session on that server
        // until the Sync, unless the next unit can go elsewhere (`plan`).
        bound.open_batch = !complete && (bound.open_batch || unit.frames.iter().any(|f| f.tag() != b'H'));
        let cancel_key = self.server(target).map(|s| s.cancel_key);
        if cancel_key.is_some() && cancel_key != self.cancels.to {
            self.cancels.registration.target.set(cancel_key);
            self.cancels.to = cancel_key;
        }
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
            self.writes.primary_dirty = true;
            if let Some(pooling) = self.pooling.as_mut() {
                pooling.write_at = self.primary.as_ref().map(|p| (p.cancel_key, p.turns));
            }
        }
        // A schema change moves the cluster's schema watermark once it
        // commits (the probe behind its commit, or the fallback).
        if target == Target::Primary && kinds.executes && classes.iter().any(|c| c.schema_change) {
            self.writes.schema_changed = true;
        }
        // Only DDL that may create a volatile function needs the catalog
        // reloaded, and only where a replica could otherwise be chosen.
        if classes.iter().any(|c| c.defines_functions) && self.cluster_has_replicas() {
            self.writes.defines_functions = true;
        }
        if self.pooling.is_some() && classes.iter().any(|c| c.names_databases) {
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
            let pooling = self.pooling.is_some();
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

    /// Queues, ahead of a unit, what `target` is missing of the session:
    /// Closes of statements closed elsewhere, and the named statements the
    /// unit uses as the session prepared them (closing first a different
    /// statement of the same name that another session left on a pooled
    /// connection). Their responses are swallowed. In transaction pooling
    /// the unnamed statement an earlier unit parsed is replayed too.
    /// Only for units with Parse, Bind, Describe, Close or Execute.
    pub(super) fn replay(&mut self, target: Target, unit: &Batch, simple: bool) {
        let (state, server, _) =
            split_state(&mut self.state, self.primary.as_deref_mut(), self.replica.as_deref_mut(), target);
        let (needed, in_sql) = match server {
            Some(server) => {
                let needed = match unit.named {
                    true => missing_statements(&state.prepared, &mut server.state, &unit.frames),
                    false => Vec::new(),
                };
                (needed, named_in_sql(&state.prepared, &mut server.state, &unit.classes))
            }
            None => (Vec::new(), Vec::new()),
        };
        // A simple Query's statements are parsed first in a batch of their
        // own, whose Sync's ReadyForQuery is swallowed.
        let sync = simple && !in_sql.is_empty();
        let elsewhere = self.known.unnamed_on.is_none_or(|(t, _)| t != target);
        let parse = self.pooling.as_ref().map(|p| &p.unnamed_parse).filter(|p| !p.is_empty());
        let unnamed = match unit.uses_earlier_unnamed && elsewhere {
            true if parse.is_some() => parse.map(|body| Frame::new(b'P', body)),
            _ => None,
        };
        let Some(server) = self.server_mut(target) else { return };
        for name in std::mem::take(&mut server.state.stale) {
            server.backend.queue_hidden(&close_statement(&name), Hidden::CloseComplete);
            server.state.statements.remove(&name);
        }
        for fix in needed.into_iter().chain(in_sql) {
            fix.queue(&mut server.backend, &mut server.state);
        }
        if sync {
            server.backend.queue_hidden(&Frame::new(b'S', &[]), Hidden::UntilReady);
        }
        if let Some(parse) = unnamed {
            server.backend.queue_hidden(&parse, Hidden::ParseComplete);
            self.known.unnamed_on = Some((target, self.known.unnamed_on.map_or(Reason::Read, |(_, r)| r)));
        }
    }

    pub(super) fn cluster_has_replicas(&self) -> bool {
        let nodes = self.shared.topology.live();
        nodes.filter(|(_, n)| n.config.cluster == self.scope.cluster).count() > 1
    }

    /// Counts a unit that executes statements, by node, role and reason.
    pub(super) fn count_route(&mut self, target: Target, reason: Reason) {
        let role = match target {
            Target::Primary => RoleLabel::Primary,
            Target::Replica => RoleLabel::Replica,
        };
        if let Some(server) = self.server_mut(target) {
            server.metrics.routed(role, reason);
        }
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
    /// Queues the fix on a server, its responses hidden.
    pub(super) fn queue(self, backend: &mut crate::backend::connection::Backend, state: &mut ServerState) {
        if self.close {
            backend.queue_hidden(&close_statement(&self.name), Hidden::CloseComplete);
            state.statements.remove(&self.name);
        }
        if let Some(parse) = self.parse {
            backend.queue_hidden(&parse, Hidden::ParseComplete);
            state.add_statement(self.name, parse);
        }
    }

    pub(super) fn parse(name: &str, parse: &Frame, close: bool) -> StatementFix {
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
pub(super) fn missing_statements(
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

/// The protocol-level statements of the session that a unit's SQL names
/// (`EXECUTE name`, `DEALLOCATE name`) and `server` lacks, or has as
/// another Parse made them: the statement must be where the SQL runs,
/// whichever node it was parsed on. Marks them used.
pub(super) fn named_in_sql(
    prepared: &HashMap<String, Prepared>,
    server: &mut ServerState,
    classes: &[Arc<Classification>],
) -> Vec<StatementFix> {
    let mut needed: Vec<StatementFix> = Vec::new();
    for name in classes.iter().flat_map(|c| sql_names(c)) {
        let Some(ours) = prepared.get(name) else { continue };
        if needed.iter().any(|fix| fix.name == name) {
            continue;
        }
        match server.use_statement(name) {
            Some(theirs) if theirs.is(&ours.parse) || theirs.raw() == ours.parse.raw() => {}
            there => needed.push(StatementFix::parse(name, &ours.parse, there.is_some())),
        }
    }
    needed
}

/// The prepared statements a statement's SQL names: those it `EXECUTE`s
/// and the one it `DEALLOCATE`s.
pub(super) fn sql_names(class: &Classification) -> impl Iterator<Item = &str> {
    let deallocated = class.effects.iter().filter_map(|effect| match effect {
        SessionEffect::Deallocate { name: Some(name) } => Some(name.as_str()),
        _ => None,
    });
    class.executes.iter().map(String::as_str).chain(deallocated)
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
    pub(super) fn of(frames: &[Frame]) -> Kinds {
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
pub(super) fn close_statement(name: &str) -> Frame {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(b'S');
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    Frame::new(b'C', &body)
}

/// Whether a statement is a SQL-level PREPARE.
pub(super) fn prepares(class: &Classification) -> bool {
    class.effects.iter().any(|e| matches!(e, crate::router::classify::SessionEffect::Prepare { .. }))
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
