//! One open server connection as a session sees it: a frame reader, a
//! write buffer flushed once per batch, and what is in flight on it.

use std::collections::VecDeque;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

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
}

/// Server messages the session relays without looking at them: not
/// ReadyForQuery, ErrorResponse, NoticeResponse (a read may still be
/// retried after one), ParameterStatus or CopyInResponse, which
/// `Session::on_server` handles.
fn needs_no_bookkeeping(tag: u8) -> bool {
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
    pub tx_status: u8,
    /// Between the server's CopyInResponse and the client's CopyDone or
    /// CopyFail: the server ignores any Sync it gets meanwhile.
    pub copy_in: bool,
    /// The last unit sent was extended-protocol and ended with Sync.
    pub last_unit_synced: bool,
    hidden: VecDeque<Hidden>,
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
            tx_status: b'I',
            copy_in: false,
            last_unit_synced: false,
            hidden: VecDeque::new(),
        }
    }

    /// Queues a frame; it is sent at the next [`Backend::flush`].
    pub fn queue(&mut self, frame: &Frame) {
        self.out.extend_from_slice(frame.raw());
    }

    /// Queues a frame whose responses pgnear will swallow.
    pub fn queue_hidden(&mut self, frame: &Frame, hidden: Hidden) {
        self.queue(frame);
        self.hidden.push_back(hidden);
        if hidden == Hidden::UntilReady {
            self.in_flight += 1;
        }
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
        self.in_flight == 0 && self.tx_status == b'I'
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
        self.reader.pass_through(out, until, needs_no_bookkeeping)
    }

    /// Decides whether a server frame is a response to pgnear's own
    /// replay; if so it must not reach the client.
    pub fn swallow(&mut self, frame: &Frame) -> bool {
        if frame.tag() == b'E' {
            // After an error the server skips to Sync: replayed Parse and
            // Close responses that were still expected will never come.
            while matches!(self.hidden.front(), Some(Hidden::ParseComplete | Hidden::CloseComplete)) {
                self.hidden.pop_front();
            }
        }
        match (self.hidden.front(), frame.tag()) {
            (Some(Hidden::UntilReady), b'Z') => {
                self.hidden.pop_front();
                self.in_flight = self.in_flight.saturating_sub(1);
                true
            }
            // Errors of a replay are not hidden: the client must learn that
            // its session state could not be reproduced.
            (Some(Hidden::UntilReady), b'E') => false,
            (Some(Hidden::UntilReady), _) => true,
            (Some(Hidden::ParseComplete), b'1') | (Some(Hidden::CloseComplete), b'3') => {
                self.hidden.pop_front();
                true
            }
            _ => false,
        }
    }

    /// Sends Terminate and closes, ignoring errors: the session is over.
    pub async fn terminate(mut self) {
        self.out.clear();
        self.queue(&Frame::new(b'X', &[]));
        let _ = self.flush().await;
        let _ = self.writer.shutdown().await;
    }
}
