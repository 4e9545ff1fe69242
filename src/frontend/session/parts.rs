//! The parts a session is made of: its client side, its timers, the unit
//! being gathered, and the state it keeps, grouped by what each is for.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use smallvec::{smallvec, SmallVec};

use super::drive::Waiting;
use super::Target;
use crate::backend::pool::Pool;
use crate::backend::ServerLogin;
use crate::cluster::catalog::Catalog;
use crate::cluster::Lsn;
use crate::error::ProxyError;
use crate::frontend::cancel::{Registration, ServerKey};
use crate::protocol::{Frame, FrameReader};
use crate::router::classify::Classification;
use crate::router::consistency::{Probe, Watermark};
use crate::router::Reason;
use crate::tls::Split;

/// How far the watermark re-check backs off while the session stays busy:
/// up to this many times its first wait (half the monitor's interval).
const TICK_BACKOFF: u32 = 16;

/// The client side of a session.
pub(super) struct Client<S: Split> {
    pub(super) reader: FrameReader<S::Read>,
    pub(super) writer: S::Write,
    pub(super) out: BytesMut,
    /// Server bytes in `out`, counted in the metrics when flushed.
    pub(super) relayed: u64,
    pub(super) relayed_counter: prometheus::IntCounter,
}

impl<S: Split> Client<S> {
    pub(super) fn queue(&mut self, frame: &Frame) {
        self.out.extend_from_slice(frame.raw());
    }

    /// Queues a server message for the client.
    pub(super) fn relay(&mut self, frame: &Frame) {
        self.queue(frame);
        self.relayed += frame.len() as u64;
    }

    pub(super) async fn flush(&mut self) -> Result<(), ProxyError> {
        if !self.out.is_empty() {
            crate::tls::send_all(&mut self.writer, &self.out).await.map_err(ProxyError::ClientGone)?;
            self.out.clear();
            self.relayed_counter.inc_by(std::mem::take(&mut self.relayed));
        }
        Ok(())
    }
}

/// The session's timers, created once and re-armed only when they
/// fire: a timer made afresh on every wait would register and cancel an
/// entry in the runtime's timer wheel for every message relayed.
pub(super) struct Timers {
    /// Re-checks a pending write watermark while the session is quiet, so
    /// that a client that wrote and went quiet still gets its
    /// `pgnear.write_lsn`.
    pub(super) tick: Pin<Box<tokio::time::Sleep>>,
    pub(super) tick_armed: bool,
    /// The re-check's next wait: half the monitor's interval, doubled (up
    /// to `TICK_BACKOFF` times) each time it finds that the session sent
    /// work since it was armed, back to the start when it finds it quiet.
    /// A busy session's own units resolve and report the watermark, and
    /// every expiry costs the service loop (which serves these timers) a
    /// wake-up and the session a cross-thread one: a client writing
    /// nonstop (pgbench's TPC-B) would otherwise cause 40 a second each.
    pub(super) tick_every: std::time::Duration,
    /// The re-check's first wait: half the monitor's interval.
    pub(super) tick_first: std::time::Duration,
    /// Complete units sent so far, and when the re-check was armed.
    pub(super) units: u64,
    pub(super) units_at_arm: u64,
    /// `proxy.idle_client_timeout`, counted from `last_activity`.
    pub(super) idle: Pin<Box<tokio::time::Sleep>>,
    pub(super) last_activity: Instant,
    /// `proxy.pool_timeout` for a unit waiting for a pooled connection.
    pub(super) pool_wait: Pin<Box<tokio::time::Sleep>>,
}

impl Timers {
    pub(super) fn new(
        idle_timeout: Option<std::time::Duration>,
        monitor_interval: std::time::Duration,
    ) -> Timers {
        let now = tokio::time::Instant::now();
        let far = now + std::time::Duration::from_secs(86_400 * 365);
        Timers {
            tick: Box::pin(crate::clock::sleep_until(far)),
            tick_armed: false,
            tick_every: monitor_interval / 2,
            tick_first: monitor_interval / 2,
            units: 0,
            units_at_arm: 0,
            idle: Box::pin(crate::clock::sleep_until(idle_timeout.map_or(far, |after| now + after))),
            last_activity: Instant::now(),
            pool_wait: Box::pin(crate::clock::sleep_until(far)),
        }
    }

    /// Arms the watermark re-check, `tick_every` from now.
    pub(super) fn arm_tick(&mut self) {
        self.tick.as_mut().reset(tokio::time::Instant::now() + self.tick_every);
        self.tick_armed = true;
        self.units_at_arm = self.units;
    }

    /// The re-check fired: the next one waits longer if the session sent
    /// work meanwhile, and half the monitor's interval again if not.
    pub(super) fn tick_fired(&mut self) {
        self.tick_armed = false;
        self.tick_every = if self.units == self.units_at_arm {
            self.tick_first
        } else {
            (self.tick_every * 2).min(self.tick_first * TICK_BACKOFF)
        };
    }
}

/// A unit of work: client messages (extended-protocol ones wait here for
/// their Sync), the classifications of the statements they parse or
/// execute, and what the relay needs to know of the messages, noted once
/// as they arrive. Inline up to pgbench's Parse, Bind, Describe, Execute
/// and Sync, so that a unit costs no allocation.
#[derive(Default, Clone)]
pub(super) struct Batch {
    pub(super) frames: SmallVec<[Frame; 5]>,
    pub(super) classes: SmallVec<[Arc<Classification>; 1]>,
    /// A message names a prepared statement, which the server may lack
    /// or which the session must track.
    pub(super) named: bool,
    /// A Parse of the unnamed statement.
    pub(super) parses_unnamed: bool,
    /// A Bind or Describe of the unnamed statement ahead of any Parse of
    /// it: it uses the unnamed statement an earlier unit parsed.
    pub(super) uses_earlier_unnamed: bool,
}

impl Batch {
    /// A unit of one message: a FunctionCall (a simple Query is built by
    /// `query_unit`, which adds what an EXECUTE runs).
    pub(super) fn one(frame: Frame, class: Arc<Classification>) -> Batch {
        Batch { frames: smallvec![frame], classes: smallvec![class], ..Batch::default() }
    }
}

/// What the session is: the login it uses on servers, its cluster and
/// database catalog, and its log span.
pub(super) struct Scope {
    /// The client's user name (pgnear's `[[users]]` entry, or looked up).
    pub(super) user: String,
    pub(super) login: ServerLogin,
    pub(super) cluster: String,
    /// The cluster's schema watermark (`Shared::schema`).
    pub(super) schema: Arc<crate::router::consistency::SharedWatermark>,
    pub(super) catalog: Arc<Catalog>,
    /// The session's span (id, peer, user, database): the parent of the
    /// relay's log events.
    pub(super) span: tracing::Span,
}

/// The server a unit of work runs on, until it reports idle.
pub(super) struct Bound {
    pub(super) target: Target,
    /// Why it was chosen, for units pipelined behind.
    pub(super) reason: Reason,
    /// Messages went ahead of their Sync (a Flush, or an early forward):
    /// stay bound until the Sync.
    pub(super) open_batch: bool,
    /// A read running on a replica, kept until its first response reaches
    /// the client so that it can run elsewhere if the replica fails first.
    pub(super) retry: Option<Box<Batch>>,
    /// The replica refused that read with an error the primary would not
    /// give (25006, 40001; 42P01, 42703, 42883 from a replica behind),
    /// and why: held back until its ReadyForQuery says whether the read
    /// can run again on the primary.
    pub(super) refused: Option<(Frame, Refusal)>,
    /// A notice from the replica reached the client: the read is no
    /// longer run again after an error.
    pub(super) noticed: bool,
}

/// Why a replica's error for a read makes pgnear run it again on the
/// primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// 25006 (the read writes after all: a view over `nextval()`) or
    /// 40001 (a recovery conflict): its statements are remembered and go
    /// to the primary from then on.
    Refused,
    /// 42P01, 42703 or 42883 (an undefined table, column or function)
    /// from a replica that has not replayed all the primary has: the
    /// schema change may not have reached it. Transient: not remembered.
    Missing,
}

/// Why client input waits.
pub(super) enum Pause {
    /// A client message that must wait for the responses still in flight
    /// (an answer of pgnear's own, a replay), so that the client sees
    /// answers in the order it asked.
    Held(Frame),
    /// Transaction pooling: a unit waits for a connection.
    Pool(Box<Waiting>),
}

/// What the session learned that routing uses.
#[derive(Default)]
pub(super) struct Known {
    /// The session's `pgnear.*` settings.
    pub(super) settings: super::local::ProxySettings,
    /// The texts and shapes the session classified lately, for repeats.
    pub(super) recently_classified: crate::router::cache::RecentlyClassified,
    /// The server reports `default_transaction_read_only = on`.
    pub(super) default_read_only: bool,
    /// The startup parameters set `default_transaction_isolation` to
    /// serializable (a SET since then overrides it).
    pub(super) serializable_at_startup: bool,
    /// A replica refused the session's settings: reads stay on the primary.
    pub(super) settings_refused: bool,
    /// The node that served the session's last statement.
    pub(super) last_node: Option<usize>,
    /// Where the unnamed statement was last parsed, and why it went there.
    pub(super) unnamed_on: Option<(Target, Reason)>,
}

/// The session's writes: what reads must see, and what is still to learn.
#[derive(Default)]
pub(super) struct Writes {
    pub(super) watermark: Watermark,
    /// The proxy-wide counts of each probe on its way (`probe_behind`),
    /// oldest first: answered in order, and dropped with the session.
    pub(super) probes: std::collections::VecDeque<SentProbe>,
    /// The `pgnear.write_lsn` last reported to the client.
    pub(super) reported_lsn: Option<Lsn>,
    /// The session itself wrote: only then is `pgnear.write_lsn` reported
    /// to it. A session starts from the proxy-wide watermark, and one that
    /// never wrote must not be sent a ParameterStatus out of the blue
    /// (PgJDBC, waiting for notifications, fails on one).
    pub(super) wrote: bool,
    /// Work that may write was sent to the primary since it was last idle.
    pub(super) primary_dirty: bool,
    /// DDL that may define a function was sent to the primary: mark the
    /// volatile-function catalog stale once the primary is idle (committed).
    pub(super) defines_functions: bool,
    /// A schema change was sent to the primary since its last probe: the
    /// next probe (or the fallback) moves the cluster's schema watermark.
    pub(super) schema_changed: bool,
    /// Since when reads have been held on the primary after a write.
    pub(super) pinned_since: Option<Instant>,
}

/// A probe on its way, as the proxy-wide watermarks count it: always the
/// read-your-writes one, and the cluster's schema watermark when the
/// commit it follows may change the schema.
pub(super) struct SentProbe {
    pub(super) writes: Probe,
    pub(super) schema: Option<Probe>,
}

/// Transaction pooling: what a session keeps while its server connections
/// come and go.
pub(super) struct Pooling {
    /// The session's pool for each node it used.
    pub(super) pools: Vec<(usize, Arc<Pool>)>,
    /// The connection the session last wrote on and its turn then, where
    /// `currval()`/`lastval()` can be read.
    pub(super) write_at: Option<(ServerKey, u64)>,
    /// The body of the last Parse of the unnamed statement (empty: none),
    /// for a later unit that binds it on another connection.
    pub(super) unnamed_parse: Vec<u8>,
    /// The client's startup `application_name` ("" without one), set on
    /// each connection the session takes.
    pub(super) app_name: String,
}

/// Where the client's cancel requests go.
pub(super) struct Cancels {
    pub(super) registration: Registration,
    /// Where the registration points cancels now (changed only when this
    /// does).
    pub(super) to: Option<ServerKey>,
    /// The registration has the task's waker, to wake it for a close.
    pub(super) close_watch: bool,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Timers, TICK_BACKOFF};

    #[tokio::test]
    async fn the_watermark_recheck_backs_off_while_busy_and_resets_when_quiet() {
        let first = Duration::from_millis(25);
        let mut timers = Timers::new(None, first * 2);
        let mut waits = Vec::new();
        for _ in 0..6 {
            timers.arm_tick();
            waits.push(timers.tick_every);
            timers.units += 3; // the session sent work before it fired
            timers.tick_fired();
        }
        let doubling: Vec<Duration> = [1, 2, 4, 8, 16, 16].iter().map(|k| first * *k).collect();
        assert_eq!(waits, doubling);
        assert_eq!(timers.tick_every, first * TICK_BACKOFF);
        // Quiet since it was armed: back to the first wait.
        timers.arm_tick();
        timers.tick_fired();
        assert_eq!(timers.tick_every, first);
        assert!(!timers.tick_armed);
    }
}
