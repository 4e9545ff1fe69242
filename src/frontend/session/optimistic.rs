//! Optimistic transactions (`routing.optimistic_transactions`). ORMs open
//! a plain BEGIN for every unit of work, reads included. pgnear answers
//! such a BEGIN itself and sends it nowhere yet (`Phase::Deferred`); the
//! transaction's first statement decides where it runs. A read opens it
//! read-only on a replica, under the same freshness rules as any read
//! (`Phase::OnReplica`), and pgnear keeps the statements run there and a
//! digest of the results the client received. If the transaction ends
//! there, that is all. If a statement that needs the primary arrives, the
//! replica's transaction is rolled back, the same one is opened on the
//! primary and its statements replayed; only if the replay returns what
//! the client received does the transaction go on there, unnoticed.
//! Otherwise the client gets 40001, retryable, and its transaction is
//! aborted (`Phase::Aborted`) until it ends it: never a silently
//! different answer. The opening statement of a transaction that moved
//! is remembered (`router::learned`), so that the next ones like it start
//! on the primary.
//!
//! A BEGIN that a standby refuses or cannot honour (SERIALIZABLE, READ
//! WRITE) is not deferred, and the opening unit goes to the primary when
//! it needs it anyway: a write, a pin, a function whose result differs
//! from one run to the next.

use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use super::plan::{Plan, Step};
use super::send::{close_statement, missing_statements, split_state};
use super::{Batch, Bound, Session, Target};
use crate::backend::connection::{Digest, Hidden};
use crate::error::ProxyError;
use crate::metrics::Optimistic;
use crate::protocol::backend::{
    command_complete, error_response, no_data, parse_complete, ready_for_query, ready_status, Severity,
    TxStatus,
};
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::{Frame, SqlState};
use crate::router::classify::{Class, Classification, Tx};
use crate::router::{Need, Reason};
use crate::tls::Split;

/// How many bytes of client messages an optimistic transaction keeps to
/// replay; one that runs more can no longer move to the primary.
pub(super) const REPLAY_LIMIT: usize = 256 * 1024;

/// Built-in functions whose result differs from one run to the next (or
/// between a replica and the primary): a read that calls one could never
/// replay to the same result, so it moves the transaction to the primary
/// before it runs. Volatile user functions are writers already.
const DIFFERS_PER_RUN: &[&str] = &[
    "now",
    "current_timestamp",
    "current_time",
    "localtime",
    "localtimestamp",
    "transaction_timestamp",
    "statement_timestamp",
    "clock_timestamp",
    "timeofday",
    "random",
    "random_normal",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "pg_backend_pid",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_current_snapshot",
    "txid_current_snapshot",
    "inet_server_addr",
    "inet_server_port",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
];

/// Where a transaction opened with a plain BEGIN stands.
pub(super) enum Phase {
    /// The BEGIN was answered by pgnear and sent nowhere yet: the unit
    /// after it decides where the transaction runs. Its messages.
    Deferred(Box<Batch>),
    /// Running read-only on the replica.
    OnReplica(Box<Replay>),
    /// It could not move to the primary and the client has its error: its
    /// transaction is aborted until it ends it. `skip_to_sync`: the error
    /// came before a Sync, and the messages up to it are skipped.
    Aborted { skip_to_sync: bool },
}

/// What an optimistic transaction ran on the replica, to replay.
pub(super) struct Replay {
    /// The deferred BEGIN, replayed first (its answer was pgnear's own).
    begin: Option<Box<Batch>>,
    units: Vec<Batch>,
    bytes: usize,
    /// It ran more than `REPLAY_LIMIT`: it cannot be replayed.
    overflow: bool,
    /// The opening statement's shape, remembered if the transaction writes.
    shape: u64,
    /// The replica's digest, kept here once the replica is gone.
    digest: Option<Digest>,
}

impl Replay {
    fn new(begin: Option<Box<Batch>>, shape: u64) -> Replay {
        Replay { begin, units: Vec::new(), bytes: 0, overflow: false, shape, digest: None }
    }

    fn record(&mut self, unit: &Batch) {
        if self.overflow {
            return;
        }
        self.bytes += unit.frames.iter().map(Frame::len).sum::<usize>();
        if self.bytes > REPLAY_LIMIT {
            self.overflow = true;
            self.units = Vec::new();
            return;
        }
        // Copies: a frame shares the client's read buffer, which a kept
        // frame would keep from being reused.
        let frames = unit.frames.iter().map(Frame::detached).collect();
        self.units.push(Batch {
            frames,
            classes: unit.classes.clone(),
            named: unit.named,
            parses_unnamed: unit.parses_unnamed,
            uses_earlier_unnamed: unit.uses_earlier_unnamed,
        });
    }
}

/// How a unit that may open a transaction is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// It opens none, or opens one the usual way.
    No,
    /// As a read, its first `skip` statements (its BEGIN) aside.
    AsRead(usize),
    /// On the primary, for this reason.
    OnPrimary(Reason),
}

/// An answer pgnear gives in the server's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Local {
    /// A plain BEGIN, deferred.
    Begin,
    /// The COMMIT or ROLLBACK of a transaction that ran nothing anywhere
    /// (or whose replica is gone having only read).
    End,
    /// Anything in a transaction that could not move to the primary.
    Aborted,
}

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// What an optimistic transaction, or a BEGIN that may open one, makes
    /// of a unit before the usual routing: `None` leaves it to that.
    pub(super) fn plan_optimistic(&self, unit: &Batch) -> Option<Plan> {
        let answer = |local| Some(if self.in_flight() { Plan::Hold } else { Plan::Local(local) });
        match self.optimistic.as_ref() {
            None => {
                let text = lone_begin(unit)?;
                if !self.may_open_optimistic(text) {
                    return None;
                }
                // Behind units still in flight (a pipelined Close), the
                // answer waits for theirs; inside a block it is the
                // server's (a warning).
                if self.in_flight() {
                    return Some(Plan::Hold);
                }
                self.bound.is_none().then_some(Plan::Local(Local::Begin))
            }
            Some(Phase::Deferred(_)) => lone_end(unit).and(answer(Local::End)),
            Some(Phase::Aborted { .. }) => answer(Local::Aborted),
            Some(Phase::OnReplica(_)) => {
                let on_replica = self.replica.is_some() && self.bound_to() == Some(Target::Replica);
                if on_replica && !self.moves_to_primary(&unit.classes) {
                    return None;
                }
                if !on_replica && lone_end(unit).is_some() {
                    // The replica went away between statements: a
                    // transaction that only read has nothing to commit.
                    return answer(Local::End);
                }
                let failed = self.replica.as_ref().is_some_and(|r| r.backend.tx_status == TxStatus::Failed);
                if on_replica && failed && !self.in_flight() {
                    // Aborted there: the replica answers as the primary would.
                    return None;
                }
                if self.in_flight() {
                    return Some(Plan::Hold);
                }
                let node = match self.shared.topology.primary(&self.scope.cluster) {
                    Ok(node) => node,
                    Err(no_primary) => return Some(Plan::Fail(super::plan::no_route(&no_primary))),
                };
                if self.primary.as_ref().is_none_or(|p| p.node != node) {
                    return Some(Plan::Do(Step::OpenPrimary(node)));
                }
                if !self.settings_current(Target::Primary) {
                    return Some(Plan::Do(Step::RestoreSettings(Target::Primary)));
                }
                Some(Plan::Do(Step::Promote))
            }
        }
    }

    /// How a unit not held on a server is routed if it opens a
    /// transaction: the one after a deferred BEGIN, or one that begins
    /// with a plain BEGIN itself (PgJDBC sends it with the first statement).
    pub(super) fn opening(&self, unit: &Batch) -> Opening {
        let skip = match self.optimistic {
            Some(Phase::Deferred(_)) => 0,
            Some(_) => return Opening::No,
            None => {
                let plain = matches!(
                    unit.classes.first().map(|c| &c.class),
                    Some(Class::Transaction(Tx::Begin { read_only: false }))
                );
                let text = unit.frames.iter().find_map(statement_text);
                if !plain || unit.classes.len() < 2 || !text.is_some_and(|t| self.may_open_optimistic(t)) {
                    return Opening::No;
                }
                1
            }
        };
        if self.moves_to_primary(&unit.classes[skip..]) {
            return match skip {
                0 => Opening::OnPrimary(Reason::Transaction),
                _ => Opening::No,
            };
        }
        if self.shared.learned.writes(self.opening_shape(unit), Instant::now()) {
            return Opening::OnPrimary(Reason::LearnedWrite);
        }
        Opening::AsRead(skip)
    }

    /// Whether a transaction that a BEGIN of this text opens may run on a
    /// replica: optimism is on, nothing holds the session on the primary,
    /// and neither the BEGIN nor the session's default asks for what a
    /// standby refuses (SERIALIZABLE, READ WRITE).
    fn may_open_optimistic(&self, begin: &[u8]) -> bool {
        let config = &self.shared.config();
        if !config.routing.optimistic_transactions
            || config.routing.default == crate::config::DefaultRoute::Primary
            || self.state.pinned
            || self.known.settings_refused
            || self.known.settings.route == crate::router::RouteSetting::Primary
            || !self.cluster_has_replicas()
        {
            return false;
        }
        let serializable = self.state.settings.mentions("default_transaction_isolation", "serializable");
        if serializable.unwrap_or(self.known.serializable_at_startup) {
            return false;
        }
        !["serializable", "write", "deferrable"].iter().any(|word| contains_word(begin, word))
    }

    /// Whether statements inside an optimistic transaction need the
    /// primary: anything but reads and transaction control, by the same
    /// rules as outside one, and reads whose replay could not match.
    pub(super) fn moves_to_primary(&self, classes: &[Arc<Classification>]) -> bool {
        let stays = |c: &&Arc<Classification>| {
            matches!(
                c.class,
                Class::Transaction(Tx::Commit | Tx::Rollback | Tx::Savepoint | Tx::Release | Tx::RollbackTo)
            )
        };
        let rest: SmallVec<[Arc<Classification>; 2]> =
            classes.iter().filter(|c| !stays(c)).cloned().collect();
        if rest.is_empty() {
            return false;
        }
        let replays_differently = |c: &Arc<Classification>| {
            matches!(c.class, Class::Transaction(_))
                || !c.executes.is_empty()
                || c.functions.iter().any(|f| DIFFERS_PER_RUN.contains(&f.as_str()))
        };
        rest.iter().any(replays_differently) || !matches!(self.need(&rest), Need::Read { .. })
    }

    /// A hash of the shape of a unit's opening statement: its last text
    /// (a Query's, a Parse's, or that of the statement a Bind names).
    fn opening_shape(&self, unit: &Batch) -> u64 {
        let text = unit.frames.iter().rev().find_map(|frame| match frame.tag() {
            b'B' => {
                let name = frontend::bind(frame).ok()?.statement;
                self.state.prepared.get(name).and_then(|p| statement_text(&p.parse))
            }
            _ => statement_text(frame),
        });
        let text = text.unwrap_or_default();
        let mut shape = Vec::new();
        let key: &[u8] = match crate::router::shape::shape_into(text, &mut shape) {
            Some(true) => &shape,
            _ => text,
        };
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        hasher.finish()
    }

    /// Answers a unit in the server's place (`Local`).
    pub(super) fn answer_optimistic(&mut self, local: Local, unit: Batch) {
        match local {
            Local::Begin => {
                let text = lone_begin(&unit).unwrap_or_default();
                let tag = if starts_with_word(text, "start") { "START TRANSACTION" } else { "BEGIN" };
                self.answer_as_server(&unit.frames, tag, TxStatus::InBlock);
                if unit.parses_unnamed {
                    // The client's unnamed statement is this BEGIN, on no
                    // server until it is sent (`open_optimistic`).
                    self.known.unnamed_on = None;
                    if let Some(pooling) = self.pooling.as_mut() {
                        pooling.unnamed_parse.clear();
                        let parse = unit.frames.iter().find(|f| f.tag() == b'P');
                        pooling.unnamed_parse.extend_from_slice(parse.map_or(&[][..], |p| p.body()));
                    }
                }
                let frames = unit.frames.iter().map(Frame::detached).collect();
                self.optimistic = Some(Phase::Deferred(Box::new(Batch { frames, ..unit })));
            }
            Local::End => {
                if let Some(Phase::OnReplica(_)) = self.optimistic {
                    self.shared.metrics.optimistic(Optimistic::Replica);
                }
                self.optimistic = None;
                self.state.tx = super::tx::TxEffects::default();
                let tag = lone_end(&unit).unwrap_or("COMMIT");
                self.answer_as_server(&unit.frames, tag, TxStatus::Idle);
            }
            Local::Aborted => {
                let skip_to_sync = matches!(self.optimistic, Some(Phase::Aborted { skip_to_sync: true }));
                let complete = unit.frames.last().is_some_and(|f| matches!(f.tag(), b'Q' | b'S'));
                if lone_end(&unit).is_some() && !skip_to_sync {
                    self.optimistic = None;
                    self.state.tx = super::tx::TxEffects::default();
                    self.answer_as_server(&unit.frames, "ROLLBACK", TxStatus::Idle);
                    return;
                }
                if !skip_to_sync {
                    let message =
                        "current transaction is aborted, commands ignored until end of transaction block";
                    self.client.queue(&error_response(
                        Severity::Error,
                        SqlState::InFailedSqlTransaction,
                        message,
                    ));
                }
                if complete {
                    self.client.queue(&ready_for_query(TxStatus::Failed));
                }
                self.optimistic = Some(Phase::Aborted { skip_to_sync: !complete });
            }
        }
    }

    /// Queues what a server would answer to `frames`, one statement of
    /// transaction control, with `tag` and ending in `status`.
    fn answer_as_server(&mut self, frames: &[Frame], tag: &str, status: TxStatus) {
        for frame in frames {
            match frame.tag() {
                b'P' => self.client.queue(&parse_complete()),
                b'B' => self.client.queue(&Frame::new(b'2', &[])),
                b'D' => {
                    if frame.body().first() == Some(&b'S') {
                        self.client.queue(&Frame::new(b't', &0i16.to_be_bytes()));
                    }
                    self.client.queue(&no_data());
                }
                b'E' => self.client.queue(&command_complete(tag)),
                b'Q' => {
                    self.client.queue(&command_complete(tag));
                    self.client.queue(&ready_for_query(status));
                }
                b'S' => self.client.queue(&ready_for_query(status)),
                _ => {}
            }
        }
    }

    /// A unit is about to be sent to `target`: a deferred BEGIN goes there
    /// first, an optimistic transaction opens on the replica, and one
    /// running there records the unit.
    pub(super) fn open_optimistic(&mut self, target: Target, reason: Reason, unit: &Batch) {
        if reason == Reason::LearnedWrite {
            self.shared.metrics.optimistic(Optimistic::Learned);
        }
        let phase = match self.optimistic.take() {
            Some(Phase::Deferred(begin)) => {
                self.send_begin(target, &begin);
                (target == Target::Replica).then(|| Replay::new(Some(begin), self.opening_shape(unit)))
            }
            None => {
                let opens = matches!(
                    unit.classes.first().map(|c| &c.class),
                    Some(Class::Transaction(Tx::Begin { read_only: false }))
                );
                (target == Target::Replica && opens && self.bound.is_none())
                    .then(|| Replay::new(None, self.opening_shape(unit)))
            }
            Some(Phase::OnReplica(replay)) => {
                self.optimistic = Some(Phase::OnReplica(replay));
                if let Some(Phase::OnReplica(replay)) = self.optimistic.as_mut() {
                    replay.record(unit);
                }
                return;
            }
            aborted => {
                self.optimistic = aborted;
                return;
            }
        };
        let Some(mut replay) = phase else { return };
        replay.record(unit);
        if let Some(replica) = self.replica.as_mut() {
            replica.backend.digest = Some(Digest::default());
        }
        self.optimistic = Some(Phase::OnReplica(Box::new(replay)));
    }

    /// Queues a deferred BEGIN's messages on `target`, their answers
    /// hidden (the client had pgnear's).
    fn send_begin(&mut self, target: Target, begin: &Batch) {
        let Some(server) = self.server_mut(target) else { return };
        let Some((last, rest)) = begin.frames.split_last() else { return };
        for frame in rest {
            server.backend.queue(frame);
        }
        server.backend.queue_hidden(last, Hidden::UntilReady);
        // The units behind it run inside the block it opens: no watermark
        // probe may follow them until it ends.
        server.expect_block = Some(true);
        if begin.parses_unnamed {
            self.known.unnamed_on = Some((target, Reason::Transaction));
        }
    }

    /// The replica's ReadyForQuery says `status`: an optimistic
    /// transaction that ended there is over.
    pub(super) fn replica_ready(&mut self, status: TxStatus) {
        if status == TxStatus::Idle && matches!(self.optimistic, Some(Phase::OnReplica(_))) {
            self.optimistic = None;
            if let Some(replica) = self.replica.as_mut() {
                replica.backend.digest = None;
            }
            self.shared.metrics.optimistic(Optimistic::Replica);
        }
    }

    /// The replica connection is gone while an optimistic transaction
    /// runs there. Between statements nothing is lost: the next one moves
    /// the transaction to the primary, checked as for a write. Mid-
    /// statement the client has part of an answer that no replay can
    /// finish: its transaction is aborted. False if none runs there.
    pub(super) fn replica_lost_optimistic(
        &mut self,
        lost: Option<&mut crate::backend::server::Server>,
    ) -> bool {
        let Some(Phase::OnReplica(replay)) = self.optimistic.as_mut() else { return false };
        let busy = lost.as_ref().is_some_and(|s| s.backend.in_flight > 0);
        if let Some(server) = lost {
            replay.digest = server.backend.digest.take();
        }
        if self.bound_to() == Some(Target::Replica) {
            self.bound = None;
        }
        if busy {
            self.optimistic = Some(Phase::Aborted { skip_to_sync: false });
            let message = "the connection to the replica running this transaction was lost mid-statement; \
                           the transaction is aborted: retry it";
            self.client.queue(&error_response(Severity::Error, SqlState::ConnectionFailure, message));
            self.client.queue(&ready_for_query(TxStatus::Failed));
        }
        true
    }

    /// Moves the optimistic transaction to the primary: rolls it back on
    /// the replica, replays it on the primary, and goes on there if the
    /// replay returned what the client received; else fails the unit with
    /// 40001. The primary is open, current and owes nothing.
    pub(super) async fn promote(&mut self, complete: bool) -> Result<super::drive::Outcome, ProxyError> {
        use super::drive::Outcome;
        let Some(Phase::OnReplica(mut replay)) = self.optimistic.take() else { return Ok(Outcome::Again) };
        self.shared.learned.wrote(replay.shape, Instant::now());
        let open_batch = self.bound.as_ref().is_some_and(|b| b.open_batch);
        let digest = match self.replica.as_mut() {
            Some(replica) => {
                let digest = replica.backend.digest.take();
                replica.backend.queue_hidden(&simple_query("ROLLBACK"), Hidden::UntilReady);
                digest
            }
            None => replay.digest.take(),
        };
        if self.bound_to() == Some(Target::Replica) {
            self.bound = None;
        }
        let Some(digest) = digest.filter(|_| !replay.overflow && !open_batch) else {
            return Ok(self.abort_optimistic(Optimistic::TooLarge, complete));
        };
        let replayed = self.replay_on_primary(&replay).await?;
        if replayed.as_ref() != Some(&digest) {
            if let Some(primary) = self.primary.as_mut() {
                primary.backend.queue_hidden(&simple_query("ROLLBACK"), Hidden::UntilReady);
            }
            return Ok(self.abort_optimistic(Optimistic::Mismatched, complete));
        }
        self.shared.metrics.optimistic(Optimistic::Matched);
        self.bound = Some(Bound {
            target: Target::Primary,
            reason: Reason::Transaction,
            open_batch: false,
            retry: None,
            refused: None,
            noticed: false,
        });
        Ok(Outcome::Again)
    }

    /// Replays an optimistic transaction on the primary and waits for it:
    /// the digest of its results, or `None` if a statement failed.
    async fn replay_on_primary(&mut self, replay: &Replay) -> Result<Option<Digest>, ProxyError> {
        if let Some(begin) = &replay.begin {
            self.send_begin(Target::Primary, begin);
        }
        let (state, primary, _) = split_state(
            &mut self.state,
            self.primary.as_deref_mut(),
            self.replica.as_deref_mut(),
            Target::Primary,
        );
        let Some(primary) = primary else { return Ok(None) };
        // Statements the transaction parsed itself are replayed as it did;
        // those it only uses are put there as the session has them.
        let mut parsed: Vec<String> = Vec::new();
        for unit in &replay.units {
            for frame in &unit.frames {
                match frame.tag() {
                    b'P' => {
                        let name = frontend::parse_name(frame).unwrap_or_default();
                        if !name.is_empty() {
                            if primary.state.statements.remove(name).is_some() {
                                primary.backend.queue_hidden(&close_statement(name), Hidden::CloseComplete);
                            }
                            primary.state.add_statement(name.to_string(), frame.detached());
                            parsed.push(name.to_string());
                        }
                    }
                    b'C' => {
                        if let Ok(Named::Statement(name)) = frontend::target(frame) {
                            primary.state.statements.remove(name);
                        }
                    }
                    b'B' | b'D' => {
                        let used = match frame.tag() {
                            b'B' => frontend::bind(frame).map(|b| b.statement).ok(),
                            _ => match frontend::target(frame) {
                                Ok(Named::Statement(name)) => Some(name),
                                _ => None,
                            },
                        };
                        if used.is_some_and(|name| !name.is_empty() && !parsed.iter().any(|p| p == name)) {
                            let fixes = missing_statements(
                                &state.prepared,
                                &mut primary.state,
                                std::slice::from_ref(frame),
                            );
                            for fix in fixes {
                                fix.queue(&mut primary.backend, &mut primary.state);
                            }
                        }
                    }
                    _ => {}
                }
                primary.backend.queue(frame);
                if matches!(frame.tag(), b'Q' | b'S') {
                    primary.backend.in_flight += 1;
                }
            }
        }
        if replay.units.iter().any(|u| u.parses_unnamed) {
            self.known.unnamed_on = Some((Target::Primary, Reason::Transaction));
        }
        let node = self.node_name(Target::Primary);
        let Some(primary) = self.primary.as_mut() else { return Ok(None) };
        let lost = || ProxyError::BackendLost { node: node.clone() };
        primary.backend.flush().await.map_err(|_| lost())?;
        let mut digest = Digest::default();
        let mut failed = false;
        while primary.backend.in_flight > 0 || primary.backend.has_hidden() {
            let frame = match primary.backend.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) => return Err(lost()),
                Err(source) => return Err(ProxyError::BackendProtocol { node, source }),
            };
            if primary.backend.swallow(&frame) != crate::backend::connection::Swallowed::No {
                continue;
            }
            match frame.tag() {
                b'Z' => primary.backend.ready(ready_status(&frame)?),
                b'E' => failed = true,
                _ => digest.add(frame.raw()),
            }
        }
        Ok((!failed).then_some(digest))
    }

    /// The optimistic transaction cannot go on: the client gets 40001 and
    /// its transaction is aborted until it ends it.
    fn abort_optimistic(&mut self, outcome: Optimistic, complete: bool) -> super::drive::Outcome {
        self.shared.metrics.optimistic(outcome);
        let message = match outcome {
            Optimistic::TooLarge => {
                "could not serialize: this transaction read more than pgnear keeps to move it to the \
                 primary for its write; retry it"
            }
            _ => "could not serialize: the data read in this transaction changed; retry it",
        };
        self.client.queue(&error_response(Severity::Error, SqlState::SerializationFailure, message));
        if complete {
            self.client.queue(&ready_for_query(TxStatus::Failed));
        }
        self.optimistic = Some(Phase::Aborted { skip_to_sync: !complete });
        tracing::debug!(parent: &self.scope.span, outcome = outcome.as_str(), "optimistic transaction aborted");
        super::drive::Outcome::Answered
    }

    /// The transaction status the client sees while pgnear answers for an
    /// optimistic transaction, if it does.
    pub(super) fn optimistic_status(&self) -> Option<TxStatus> {
        match self.optimistic.as_ref()? {
            Phase::Deferred(_) => Some(TxStatus::InBlock),
            Phase::Aborted { .. } => Some(TxStatus::Failed),
            Phase::OnReplica(_) if self.replica.is_none() => Some(TxStatus::InBlock),
            Phase::OnReplica(_) => None,
        }
    }
}

/// A simple Query of pgnear's own.
fn simple_query(sql: &str) -> Frame {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    Frame::new(b'Q', &body)
}

/// The SQL text a Query or a Parse carries.
fn statement_text(frame: &Frame) -> Option<&[u8]> {
    match frame.tag() {
        b'Q' => frontend::query_text(frame).ok(),
        b'P' => frontend::parse(frame).ok().map(|p| p.query),
        _ => None,
    }
}

/// The text of a complete unit that is a plain BEGIN alone, as a simple
/// Query or as the unnamed statement's Parse, Bind, Describe, Execute and
/// Sync (psycopg's, asyncpg's), which pgnear can answer itself.
pub(super) fn lone_begin(unit: &Batch) -> Option<&[u8]> {
    let [class] = &unit.classes[..] else { return None };
    if class.class != Class::Transaction(Tx::Begin { read_only: false }) {
        return None;
    }
    lone_statement(unit)
}

/// The command tag of a complete unit that is a plain COMMIT or ROLLBACK
/// alone, sent as `lone_begin` describes.
pub(super) fn lone_end(unit: &Batch) -> Option<&'static str> {
    let [class] = &unit.classes[..] else { return None };
    let tag = match class.class {
        Class::Transaction(Tx::Commit) => "COMMIT",
        Class::Transaction(Tx::Rollback) => "ROLLBACK",
        _ => return None,
    };
    lone_statement(unit).map(|_| tag)
}

/// The text of a complete unit of one unnamed statement and nothing else.
fn lone_statement(unit: &Batch) -> Option<&[u8]> {
    if unit.named || unit.uses_earlier_unnamed {
        return None;
    }
    let tags: SmallVec<[u8; 5]> = unit.frames.iter().map(Frame::tag).collect();
    let text = match tags.as_slice() {
        [b'Q'] => statement_text(&unit.frames[0]),
        [b'P', b'B', b'E', b'S'] | [b'P', b'B', b'D', b'E', b'S'] => statement_text(&unit.frames[0]),
        _ => None,
    }?;
    // Portals are unnamed too: a Bind's first string is its portal.
    let portal_unnamed = unit.frames.iter().filter(|f| f.tag() == b'B').all(|f| f.body().first() == Some(&0));
    portal_unnamed.then_some(text)
}

/// Whether `text` contains `word` (lowercase) as a whole word, in any case.
fn contains_word(text: &[u8], word: &str) -> bool {
    let word = word.as_bytes();
    let ident = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    (0..text.len().saturating_sub(word.len() - 1)).any(|at| {
        text[at..at + word.len()].eq_ignore_ascii_case(word)
            && !ident(at.checked_sub(1).and_then(|i| text.get(i)))
            && !ident(text.get(at + word.len()))
    })
}

/// Whether `text`'s first word (after blanks and comments) is `word`.
fn starts_with_word(text: &[u8], word: &str) -> bool {
    let mut rest = text;
    loop {
        rest = rest.trim_ascii_start();
        if let Some(line) = rest.strip_prefix(b"--") {
            rest = line.iter().position(|&b| b == b'\n').map_or(&[][..], |at| &line[at..]);
        } else if let Some(block) = rest.strip_prefix(b"/*") {
            rest = memchr::memmem::find(block, b"*/").map_or(&[][..], |at| &block[at + 2..]);
        } else {
            break;
        }
    }
    rest.len() >= word.len()
        && rest[..word.len()].eq_ignore_ascii_case(word.as_bytes())
        && !rest.get(word.len()).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::classify;

    fn query(sql: &str) -> Batch {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        Batch::one(Frame::new(b'Q', &body), Arc::new(classify(sql)))
    }

    fn extended(sql: &str, tags: &[u8]) -> Batch {
        let mut parse = vec![0];
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        let frames = tags
            .iter()
            .map(|&tag| match tag {
                b'P' => Frame::new(b'P', &parse),
                b'B' => Frame::new(b'B', b"\0\0\0\0\0\0\0\0"),
                b'D' => Frame::new(b'D', b"P\0"),
                b'E' => Frame::new(b'E', b"\0\0\0\0\0"),
                tag => Frame::new(tag, &[]),
            })
            .collect();
        Batch {
            frames,
            classes: smallvec::smallvec![Arc::new(classify(sql))],
            parses_unnamed: true,
            ..Batch::default()
        }
    }

    #[test]
    fn lone_begins_and_ends_are_recognised() {
        assert_eq!(lone_begin(&query("BEGIN")), Some(&b"BEGIN"[..]));
        assert!(lone_begin(&query("start transaction isolation level repeatable read")).is_some());
        assert!(lone_begin(&extended("BEGIN", b"PBDES")).is_some());
        assert!(lone_begin(&extended("BEGIN", b"PBES")).is_some());
        // Not alone, not plain, not complete.
        assert!(lone_begin(&query("BEGIN; SELECT 1")).is_none());
        assert!(lone_begin(&query("BEGIN READ ONLY")).is_none());
        assert!(lone_begin(&extended("BEGIN", b"PBDE")).is_none());
        assert!(lone_begin(&query("SELECT 1")).is_none());
        let mut named = extended("BEGIN", b"PBDES");
        named.named = true;
        assert!(lone_begin(&named).is_none());
        assert_eq!(lone_end(&query("COMMIT")), Some("COMMIT"));
        assert_eq!(lone_end(&query("end")), Some("COMMIT"));
        assert_eq!(lone_end(&query("ABORT")), Some("ROLLBACK"));
        assert_eq!(lone_end(&extended("ROLLBACK", b"PBDES")), Some("ROLLBACK"));
        assert_eq!(lone_end(&query("COMMIT AND CHAIN")), None);
        assert_eq!(lone_end(&query("ROLLBACK TO SAVEPOINT a")), None);
    }

    #[test]
    fn begin_words_are_found_whole() {
        assert!(contains_word(b"BEGIN ISOLATION LEVEL SERIALIZABLE", "serializable"));
        assert!(contains_word(b"begin read write", "write"));
        assert!(!contains_word(b"begin /* rewrite */", "write"));
        assert!(!contains_word(b"BEGIN", "write"));
        assert!(starts_with_word(b"  /* x */ -- y\n start transaction", "start"));
        assert!(!starts_with_word(b"BEGIN", "start"));
        assert!(!starts_with_word(b"started", "start"));
    }

    #[test]
    fn functions_that_differ_per_run_are_collected_by_the_classifier() {
        for sql in ["SELECT now()", "SELECT random()", "SELECT clock_timestamp()", "SELECT CURRENT_TIMESTAMP"]
        {
            let class = classify(sql);
            assert!(
                class.functions.iter().any(|f| DIFFERS_PER_RUN.contains(&f.as_str())),
                "{sql}: {class:?}"
            );
        }
    }
}
