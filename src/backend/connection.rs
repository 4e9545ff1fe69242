//! One open server connection as a session sees it: a frame reader, a
//! write buffer flushed once per batch, and what is in flight on it.

use std::collections::VecDeque;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::cluster::Lsn;
use crate::protocol::backend::TxStatus;
use crate::protocol::startup::CancelKey;
use crate::protocol::{Frame, FrameReader, ProtocolError};
use crate::tls::{ReadHalf, WriteHalf};

/// Server responses that pgnear caused itself and the client must not see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hidden {
    /// Everything up to and including the next ReadyForQuery (a replayed
    /// simple Query such as `SET`).
    UntilReady,
    /// The next ParseComplete (a replayed Parse).
    ParseComplete,
    /// The next CloseComplete (a Close of a statement the client closed
    /// on another server).
    CloseComplete,
    /// The answer to a watermark probe (`PROBE_SQL`): its row, tag, any
    /// error, and its ReadyForQuery.
    Probe,
}

/// The watermark probe pipelined behind a unit that commits: the primary's
/// insert position once the unit's commit is in, schema-qualified so that
/// no `search_path` can stand another function in for it.
pub const PROBE_SQL: &str = "SELECT pg_catalog.pg_current_wal_insert_lsn()";

/// The probe as a simple Query message, built once.
static PROBE_QUERY: std::sync::LazyLock<Frame> = std::sync::LazyLock::new(|| {
    let mut body = Vec::with_capacity(PROBE_SQL.len() + 1);
    body.extend_from_slice(PROBE_SQL.as_bytes());
    body.push(0);
    Frame::new(b'Q', &body)
});

/// A response pgnear expects for itself, and how many ReadyForQuery the
/// connection must have received before it comes (the client's units sent
/// ahead of it answer first).
#[derive(Debug, Clone, Copy)]
struct Expected {
    hidden: Hidden,
    after: u64,
}

/// What [`Backend::swallow`] made of a server frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swallowed {
    /// The client's: relay it.
    No,
    /// pgnear's own: drop it.
    Yes,
    /// The last message of a probe's answer: the insert LSN it read (none
    /// if it failed) and the transaction status it ended in.
    Probe(Option<Lsn>, TxStatus),
}

/// Server messages the session relays without looking at them: not
/// ReadyForQuery, ErrorResponse, NoticeResponse (a read may still be
/// retried after one), ParameterStatus or CopyInResponse, which
/// `Session::on_server` handles.
pub fn needs_no_bookkeeping(tag: u8) -> bool {
    matches!(
        tag,
        b'D' | b'T'
            | b'C'
            | b'1'
            | b'2'
            | b'3'
            | b'n'
            | b's'
            | b't'
            | b'I'
            | b'H'
            | b'd'
            | b'c'
            | b'A'
            | b'V'
    )
}

/// A running checksum of what a server returned to the client: its rows,
/// COPY data and command tags, in order. Two runs of the same statements
/// that return the same results have the same digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Digest {
    hash: u64,
    frames: u64,
}

impl Digest {
    /// Adds one whole frame (tag, length and body), if it is a result.
    pub fn add(&mut self, raw: &[u8]) {
        if matches!(raw.first(), Some(b'D' | b'C' | b'd')) {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::hash::DefaultHasher::new();
            self.hash.hash(&mut hasher);
            raw.hash(&mut hasher);
            self.hash = hasher.finish();
            self.frames += 1;
        }
    }

    /// Adds each of the whole frames laid end to end in `raw`.
    fn add_all(&mut self, mut raw: &[u8]) {
        while let Some(&[_, a, b, c, d]) = raw.get(..5) {
            let total = (u32::from_be_bytes([a, b, c, d]) as usize + 1).min(raw.len());
            self.add(&raw[..total]);
            raw = &raw[total..];
        }
    }
}

/// An authenticated server connection.
#[derive(Debug)]
pub struct Backend {
    /// The server's real key, for cancel requests.
    pub key: CancelKey,
    /// Whether the connection is encrypted.
    pub tls: bool,
    reader: FrameReader<ReadHalf>,
    writer: WriteHalf,
    out: BytesMut,
    /// ParameterStatus frames the server sent at startup.
    pub startup_params: Vec<Frame>,
    /// Queries and Syncs sent whose ReadyForQuery has not come back.
    pub in_flight: u32,
    /// The last ReadyForQuery status: `I`, `T` or `E`.
    pub tx_status: TxStatus,
    /// Between the server's CopyInResponse and the client's CopyDone or
    /// CopyFail: the server ignores any Sync it gets meanwhile.
    pub copy_in: bool,
    /// The last unit sent was extended-protocol and ended with Sync.
    pub last_unit_synced: bool,
    /// ReadyForQuery received so far (and Syncs the server ignored in COPY
    /// IN mode): where the connection is in the order of its answers.
    readies: u64,
    hidden: VecDeque<Expected>,
    /// The LSN a probe's row carried, until its ReadyForQuery.
    probe_lsn: Option<Lsn>,
    /// While set, the results relayed to the client are added to it (an
    /// optimistic transaction's, to compare with their replay).
    pub digest: Option<Digest>,
}

impl Backend {
    pub(super) fn new(
        key: CancelKey,
        tls: bool,
        reader: FrameReader<ReadHalf>,
        writer: WriteHalf,
        startup_params: Vec<Frame>,
    ) -> Backend {
        Backend {
            key,
            tls,
            reader,
            writer,
            out: BytesMut::new(),
            startup_params: startup_params.iter().map(Frame::detached).collect(),
            in_flight: 0,
            tx_status: TxStatus::Idle,
            copy_in: false,
            last_unit_synced: false,
            readies: 0,
            hidden: VecDeque::new(),
            probe_lsn: None,
            digest: None,
        }
    }

    /// Queues a frame; it is sent at the next [`Backend::flush`].
    pub fn queue(&mut self, frame: &Frame) {
        self.out.extend_from_slice(frame.raw());
    }

    /// Queues a frame whose responses pgnear will swallow. They come after
    /// the answers to everything already in flight.
    pub fn queue_hidden(&mut self, frame: &Frame, hidden: Hidden) {
        self.queue(frame);
        self.expect(hidden);
        if hidden == Hidden::UntilReady {
            self.in_flight += 1;
        }
    }

    /// Queues a watermark probe behind what is queued. It is not counted
    /// in flight: the connection is idle for the client as soon as the
    /// client's own units are answered.
    pub fn queue_probe(&mut self) {
        self.out.extend_from_slice(PROBE_QUERY.raw());
        self.expect(Hidden::Probe);
    }

    fn expect(&mut self, hidden: Hidden) {
        let after = self.readies + u64::from(self.in_flight);
        self.hidden.push_back(Expected { hidden, after });
    }

    /// A ReadyForQuery of the client's reached pgnear, with `status`.
    pub fn ready(&mut self, status: TxStatus) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.readies += 1;
        self.tx_status = status;
    }

    /// A Sync sent with a COPY's Execute reached the server in COPY IN
    /// mode, where it is ignored: no ReadyForQuery will answer it.
    pub fn sync_ignored(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.readies += 1;
    }

    /// Whether a probe's answer is still expected.
    pub fn is_probing(&self) -> bool {
        self.hidden.iter().any(|e| e.hidden == Hidden::Probe)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            crate::tls::send_all(&mut self.writer, &self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Idle: nothing in flight and not inside a transaction.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.tx_status == TxStatus::Idle
    }

    /// Whether responses to pgnear's own replay are still expected.
    pub fn has_hidden(&self) -> bool {
        !self.hidden.is_empty()
    }

    /// Whether the server has nothing to say right now, checked without
    /// waiting: an idle connection that sent something (a FATAL before
    /// shutdown, a NOTICE) or closed is not fit to take work.
    pub fn is_quiet(&mut self) -> bool {
        if !self.reader.is_empty() {
            return false;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let pending = {
            let fill = std::pin::pin!(self.reader.fill());
            std::future::Future::poll(fill, &mut cx).is_pending()
        };
        pending && self.reader.is_empty()
    }

    /// Whether any bytes from the server wait to be taken.
    pub fn has_input(&self) -> bool {
        !self.reader.is_empty()
    }

    /// The bytes read from the server since the last call.
    pub fn take_read(&mut self) -> u64 {
        self.reader.take_read()
    }

    /// A whole frame already read, if any.
    pub fn buffered(&mut self) -> Result<Option<Frame>, ProtocolError> {
        self.reader.buffered()
    }

    /// The next frame from the server. Cancel safe.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        self.reader.next().await
    }

    /// Reads until a whole frame is buffered; `false` at end of stream.
    /// Cancel safe.
    pub async fn fill(&mut self) -> Result<bool, ProtocolError> {
        self.reader.fill().await
    }

    /// Moves buffered responses that need no bookkeeping (rows, command
    /// tags, parse and bind completions ...) straight into the client's
    /// output `out`, up to `until` bytes. Nothing passes while a response
    /// to pgnear's own replay is still expected. Returns the bytes moved.
    pub fn pass_through(&mut self, out: &mut BytesMut, until: usize) -> usize {
        if !self.hidden.is_empty() {
            return 0;
        }
        let start = out.len();
        let moved = self.reader.pass_through(out, until, needs_no_bookkeeping);
        if let Some(digest) = self.digest.as_mut() {
            digest.add_all(&out[start..]);
        }
        moved
    }

    /// The tag of the next buffered frame, if any.
    pub fn next_tag(&self) -> Option<u8> {
        self.reader.next_tag()
    }

    /// Moves buffered acknowledgements (ParseComplete, BindComplete,
    /// CloseComplete, ParameterDescription, NoData, RowDescription) into
    /// `held`, up to the first frame that is anything else: what a read
    /// that may still run elsewhere answers before its first result.
    pub fn hold_acknowledgements(&mut self, held: &mut BytesMut) {
        if self.hidden.is_empty() {
            let acknowledges = |tag| matches!(tag, b'1' | b'2' | b'3' | b't' | b'n' | b'T');
            self.reader.pass_through(held, usize::MAX, acknowledges);
        }
    }

    /// Decides whether a server frame is a response to pgnear's own
    /// replay or probe; if so it must not reach the client. An expected
    /// response counts only once the client's units sent ahead of it have
    /// been answered.
    pub fn swallow(&mut self, frame: &Frame) -> Swallowed {
        let tag = frame.tag();
        if tag == b'E' {
            // After an error the server skips to Sync: replayed Parse and
            // Close responses that were still expected will never come.
            while matches!(self.current(), Some(Hidden::ParseComplete | Hidden::CloseComplete)) {
                self.hidden.pop_front();
            }
        }
        match (self.current(), tag) {
            (Some(Hidden::UntilReady), b'Z') => {
                self.hidden.pop_front();
                self.in_flight = self.in_flight.saturating_sub(1);
                self.readies += 1;
                // pgnear's own statement may have ended or opened a block
                // (the ROLLBACK of an optimistic transaction moved away).
                if let Ok(status) = crate::protocol::backend::ready_status(frame) {
                    self.tx_status = status;
                }
                Swallowed::Yes
            }
            // Errors of a replay are not hidden: the client must learn that
            // its session state could not be reproduced.
            (Some(Hidden::UntilReady), b'E') => Swallowed::No,
            (Some(Hidden::UntilReady), _) => Swallowed::Yes,
            (Some(Hidden::ParseComplete), b'1') | (Some(Hidden::CloseComplete), b'3') => {
                self.hidden.pop_front();
                Swallowed::Yes
            }
            (Some(Hidden::Probe), b'D') => {
                let text = crate::protocol::backend::single_value(frame);
                self.probe_lsn = text.and_then(|t| std::str::from_utf8(t).ok()?.parse().ok());
                Swallowed::Yes
            }
            // A notice or a notification while the probe runs is the
            // client's; its error (a failed transaction) is not.
            (Some(Hidden::Probe), b'T' | b'C' | b'E' | b'I') => Swallowed::Yes,
            (Some(Hidden::Probe), b'Z') => {
                self.hidden.pop_front();
                // A malformed status counts as a failed probe.
                let status = crate::protocol::backend::ready_status(frame).unwrap_or(TxStatus::Failed);
                Swallowed::Probe(self.probe_lsn.take(), status)
            }
            _ => Swallowed::No,
        }
    }

    /// The expected response now due, if the client's answers ahead of it
    /// are all in.
    fn current(&self) -> Option<Hidden> {
        self.hidden.front().filter(|e| e.after <= self.readies).map(|e| e.hidden)
    }

    /// Sends Terminate and closes, ignoring errors: the session is over.
    pub async fn terminate(mut self) {
        self.out.clear();
        self.queue(&Frame::new(b'X', &[]));
        let _ = self.flush().await;
        let _ = self.writer.shutdown().await;
    }
}
