//! Client messages into units of work. Extended-protocol messages wait
//! for their Sync (or go ahead early once their server is settled); a
//! Query, a Sync, a Flush or a FunctionCall makes a unit, which the
//! planner routes (`plan`) and the driver sends (`drive`). `pgnear.*`
//! commands are answered here. One path for every message: `take`, and
//! `finish` for what needs waiting.

use std::sync::Arc;

use smallvec::SmallVec;

use super::state::SessionState;
use super::{Batch, Flow, Pause, Session, Target};
use crate::error::ProxyError;
use crate::protocol::backend::TxStatus;
use crate::protocol::frontend::{self, Target as Named};
use crate::protocol::{Frame, ProtocolError};
use crate::router::classify::{Block, Class, Classification, ProxyCommand, Tx};
use crate::tls::Split;

/// What taking a client message left to do.
pub(super) enum Taken {
    /// Nothing: it was buffered, sent or answered.
    Done,
    /// The client said goodbye (Terminate).
    End,
    /// A unit whose plan needs waiting (I/O) before it is sent, and
    /// whether it is complete. Boxed: the path is rare, and a `Taken` is
    /// returned for every client message.
    Unit(Box<Batch>, bool),
    /// A `SHOW` of the watermark, answered once it has resolved.
    Local(ProxyCommand),
}

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// Takes a client message without waiting: extended-protocol messages
    /// are buffered; a complete or flushed unit is planned and, unless
    /// its plan needs waiting, sent. The path every message takes.
    pub(super) fn take(&mut self, frame: Frame) -> Result<Taken, ProxyError> {
        match frame.tag() {
            tag if super::is_batched(tag) => self.on_extended(frame)?,
            b'Q' => return self.on_query(frame),
            b'S' => return Ok(self.on_sync(frame)),
            b'H' => return Ok(self.on_flush(frame)),
            // A fast-path function call may do anything: the primary.
            b'F' => return Ok(self.dispatch_now(Batch::one(frame, WRITE.clone()), true)),
            b'd' | b'c' | b'f' => self.on_copy(frame),
            b'X' => return Ok(Taken::End),
            tag => {
                let when = "from a client in a session";
                return Err(ProtocolError::Unexpected { tag: tag as char, when }.into());
            }
        }
        Ok(Taken::Done)
    }

    /// Takes a client message and does whatever it leaves to do.
    pub(super) async fn on_client(&mut self, frame: Frame) -> Result<Flow, ProxyError> {
        let taken = self.take(frame)?;
        self.finish(taken).await
    }

    /// Does what taking a message left to do, waiting as long as it needs.
    pub(super) async fn finish(&mut self, taken: Taken) -> Result<Flow, ProxyError> {
        match taken {
            Taken::Done => return Ok(Flow::Continue),
            Taken::End => return Ok(Flow::End),
            Taken::Unit(unit, complete) => self.dispatch(*unit, complete).await?,
            Taken::Local(command) => {
                self.await_watermark().await;
                self.answer_local_query(&command);
            }
        }
        // Sockets may have been read (a replay) or opened meanwhile.
        self.sources.mark_all();
        Ok(Flow::Continue)
    }

    /// The classification of a statement's text, as this session runs it.
    pub(super) fn classify(&mut self, text: &[u8]) -> Arc<Classification> {
        let class = self.known.recently_classified.classify(&self.shared.classifier, text);
        if !matches!(class.class, Class::Transaction(Tx::Begin { .. })) {
            return class;
        }
        let serializable = self.state.settings.mentions("default_transaction_isolation", "serializable");
        let defaults = Defaults {
            read_only: self.known.default_read_only,
            serializable: serializable.unwrap_or(self.known.serializable_at_startup),
        };
        begin_as_run(defaults, class, text)
    }

    pub(super) fn on_query(&mut self, frame: Frame) -> Result<Taken, ProxyError> {
        let class = self.classify(frontend::query_text(&frame)?);
        let Class::ProxyLocal(command) = &class.class else {
            let unit = self.query_unit(frame, class);
            return Ok(self.dispatch_now(unit, true));
        };
        if self.in_flight() {
            // Answered once the responses before it reach the client.
            self.pause = Some(Pause::Held(frame));
            return Ok(Taken::Done);
        }
        if matches!(command, ProxyCommand::Show { name } if name == "write_lsn" || name == "all") {
            return Ok(Taken::Local(command.clone()));
        }
        self.answer_local_query(command);
        Ok(Taken::Done)
    }

    /// The unit of a simple Query.
    pub(super) fn query_unit(&self, frame: Frame, class: Arc<Classification>) -> Batch {
        let mut unit = Batch { frames: smallvec::smallvec![frame], ..Batch::default() };
        add_class(&self.state, &mut unit.classes, class);
        unit
    }

    /// Buffers an extended-protocol message until its Sync or Flush.
    pub(super) fn on_extended(&mut self, frame: Frame) -> Result<(), ProxyError> {
        // A Bind or Describe of a statement: its name.
        let mut uses = None;
        match frame.tag() {
            b'P' => {
                let parse = frontend::parse(&frame)?;
                let class = self.classify(parse.query);
                let batch = &mut self.batch;
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
                Named::Statement(name) => self.batch.named |= !name.is_empty(),
                Named::Portal(_) => {}
            },
            _ => {
                frontend::execute_portal(&frame)?;
            }
        }
        let batch = &mut self.batch;
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

    pub(super) fn on_sync(&mut self, frame: Frame) -> Taken {
        if self.batch.classes.iter().any(|c| matches!(c.class, Class::ProxyLocal(_))) {
            if self.in_flight() {
                self.pause = Some(Pause::Held(frame));
                return Taken::Done;
            }
            let batch = std::mem::take(&mut self.batch);
            self.answer_local_batch(&batch.frames, &batch.classes);
            return Taken::Done;
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.frames.push(frame);
        self.dispatch_now(batch, true)
    }

    /// A Flush sends what the batch has so far; the session then stays on
    /// that server until the Sync (see `send`).
    pub(super) fn on_flush(&mut self, frame: Frame) -> Taken {
        if self.batch.frames.is_empty() && self.bound.is_none() {
            return Taken::Done; // nothing is pending anywhere: nothing to flush
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.frames.push(frame);
        self.dispatch_now(batch, false)
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
        if batch.frames.is_empty() || self.pause.is_some() {
            return Ok(());
        }
        let executes = batch.frames.iter().any(|f| f.tag() == b'E');
        let local = batch.classes.iter().any(|c| matches!(c.class, Class::ProxyLocal(_)));
        if !executes || local || !self.settled(batch) {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let taken = self.dispatch_now(batch, false);
        self.finish(taken).await.map(|_| ())
    }

    /// CopyData, CopyDone and CopyFail go to the server running the COPY;
    /// outside COPY the server would ignore them, and so does pgnear.
    pub(super) fn on_copy(&mut self, frame: Frame) {
        let Some(target) = self.bound_to() else { return };
        let Some(server) = self.server_mut(target) else { return };
        let probe = match frame.tag() {
            b'd' => false,
            tag => {
                server.backend.copy_in = false;
                server.copy_ended(tag == b'f')
            }
        };
        server.backend.queue(&frame);
        if probe && target == Target::Primary && self.writes.primary_dirty && self.probes_commits() {
            self.probe_behind();
        }
    }

    /// Whether a commit on the primary is followed by a probe: always with
    /// read-your-writes on, and for a schema change even with it off.
    pub(super) fn probes_commits(&self) -> bool {
        self.tracks_writes() || self.writes.schema_changed
    }

    /// Whether read-your-writes is on, in either scope.
    pub(super) fn tracks_writes(&self) -> bool {
        self.shared.config().consistency.read_your_writes != crate::config::ReadYourWrites::Off
    }

    /// Holds a unit back until no server owes the client responses; it is
    /// taken again then, from its last message.
    pub(super) fn hold(&mut self, mut unit: Batch) {
        let last = unit.frames.pop();
        if !unit.frames.is_empty() {
            // Extended-protocol messages wait again for their Sync or Flush.
            self.batch = unit;
        }
        self.pause = last.map(Pause::Held);
    }

    /// The transaction status to report for a locally answered query.
    pub(super) fn bound_status(&self) -> TxStatus {
        if let Some(status) = self.optimistic_status() {
            return status;
        }
        self.bound_to().and_then(|t| self.server(t)).map_or(TxStatus::Idle, |s| s.backend.tx_status)
    }
}

/// A statement that may do anything: a fast-path function call, or the
/// EXECUTE of a SQL-level prepared statement the session does not know.
pub(super) static WRITE: std::sync::LazyLock<Arc<Classification>> = std::sync::LazyLock::new(|| {
    Arc::new(Classification {
        class: Class::Write,
        hint: None,
        tables: Vec::new(),
        functions: Vec::new(),
        effects: Vec::new(),
        unparsed: false,
        ddl: false,
        schema_change: false,
        defines_functions: false,
        names_databases: false,
        loads: None,
        node_state: false,
        executes: Vec::new(),
        block: Block::Same,
        copies_in: 0,
    })
});

/// Puts `class` in a unit, and behind it the class of each prepared
/// statement it `EXECUTE`s: as the session prepared it (in SQL or through
/// the protocol: PostgreSQL keeps both in one namespace), or a write for a
/// name the session does not know (the primary has it, if any node does).
pub(super) fn add_class(
    state: &SessionState,
    classes: &mut SmallVec<[Arc<Classification>; 1]>,
    class: Arc<Classification>,
) {
    for name in &class.executes {
        let prepared = state.sql_prepared.get(name).map(|p| p.body.clone());
        let prepared = prepared.or_else(|| state.prepared.get(name).map(|p| p.class.clone()));
        classes.push(prepared.unwrap_or_else(|| WRITE.clone()));
    }
    classes.push(class);
}

/// The session's transaction defaults, as far as pgnear can see them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Defaults {
    /// `default_transaction_read_only = on`, as the server reports it.
    pub(super) read_only: bool,
    /// `default_transaction_isolation = serializable`, from the startup
    /// parameters or a SET (a role's or database's default is not seen).
    pub(super) serializable: bool,
}

/// A BEGIN as the session's defaults make it: under
/// `default_transaction_read_only = on` a plain BEGIN starts a read-only
/// transaction, which a replica may run (`BEGIN READ WRITE` keeps its
/// primary); a serializable one, by default or by its own words, needs the
/// primary, since a hot standby refuses serializable mode.
pub(super) fn begin_as_run(
    defaults: Defaults,
    class: Arc<Classification>,
    text: &[u8],
) -> Arc<Classification> {
    let Class::Transaction(Tx::Begin { read_only }) = class.class else { return class };
    if !defaults.read_only && !defaults.serializable {
        // The classifier already read the BEGIN's own words: most
        // transactions (every ORM unit of work) stop here, unlowercased.
        return class;
    }
    let text = text.to_ascii_lowercase();
    let says = |words: &[u8]| memchr::memmem::find(&text, words).is_some();
    let serializable = match says(b"isolation level") {
        true => says(b"serializable"),
        false => defaults.serializable,
    };
    let runs_read_only = (read_only || defaults.read_only && !says(b"read write")) && !serializable;
    if runs_read_only == read_only {
        return class;
    }
    let mut as_run = (*class).clone();
    as_run.class = Class::Transaction(Tx::Begin { read_only: runs_read_only });
    Arc::new(as_run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::classify;

    #[test]
    fn a_begin_runs_as_the_session_defaults_make_it() {
        let plain = Defaults { read_only: false, serializable: false };
        let read_only = Defaults { read_only: true, serializable: false };
        let serializable = Defaults { read_only: false, serializable: true };
        let both = Defaults { read_only: true, serializable: true };
        let cases = [
            (plain, "BEGIN", false),
            (plain, "BEGIN READ ONLY", true),
            (plain, "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", false),
            (plain, "START TRANSACTION READ ONLY, ISOLATION LEVEL REPEATABLE READ", true),
            (read_only, "BEGIN", true),
            (read_only, "BEGIN READ WRITE", false),
            (read_only, "BEGIN ISOLATION LEVEL SERIALIZABLE", false),
            (serializable, "BEGIN READ ONLY", false),
            (serializable, "BEGIN READ ONLY ISOLATION LEVEL READ COMMITTED", true),
            (both, "BEGIN", false),
            (both, "BEGIN ISOLATION LEVEL REPEATABLE READ", true),
        ];
        for (defaults, sql, expected) in cases {
            let class = begin_as_run(defaults, Arc::new(classify(sql)), sql.as_bytes());
            assert_eq!(
                class.class,
                Class::Transaction(Tx::Begin { read_only: expected }),
                "{sql} with {defaults:?}"
            );
        }
        let select = Arc::new(classify("SELECT 1"));
        assert!(Arc::ptr_eq(&begin_as_run(both, select.clone(), b"SELECT 1"), &select));
    }
}
