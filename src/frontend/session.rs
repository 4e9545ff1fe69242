//! One client session after authentication: the relay loop.
//!
//! The loop waits on the client and on every open server connection at
//! once. Client messages are grouped into units of work: one simple Query,
//! or extended-protocol messages up to Sync (or Flush). Each unit is routed
//! as a whole (`unit`), and a unit or a transaction stays on one server
//! until that server's ReadyForQuery says it is idle. Server messages are
//! relayed as they arrive and flushed to the client once per read batch;
//! responses to pgnear's own replays are swallowed.

mod drive;
mod local;
mod plan;
pub mod pool;
mod reply;
mod send;
mod server;
mod state;
mod tx;
mod unit;
mod wake;

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::BytesMut;
use smallvec::{smallvec, SmallVec};
use tokio::io::AsyncWriteExt;

use super::cancel::{Registration, ServerKey};
use super::handshake::Login;
use super::Shared;
use crate::backend::ServerLogin;
use crate::cluster::catalog::Catalog;
use crate::cluster::Lsn;
use crate::config::ReadYourWrites;
use crate::error::ProxyError;
use crate::protocol::backend::{backend_key_data, parameter_status, ready_for_query, TxStatus};
use crate::protocol::{Frame, FrameReader, ProtocolError};
use crate::router::classify::Classification;
use crate::router::consistency::Watermark;
use crate::tls::Split;
use local::ProxySettings;
use server::{first_server, Server};
use state::SessionState;
use unit::Taken;

/// Client output is flushed once it grows past this, even mid-batch.
const FLUSH_AT: usize = 64 * 1024;

/// How far the watermark re-check backs off while the session stays busy:
/// up to this many times its first wait (half the monitor's interval).
const TICK_BACKOFF: u32 = 16;

/// Which of the session's server connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

/// Whether the loop goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
    /// A server is going away; handle it as lost.
    Lost(Target),
}

/// Something the loop must handle.
#[derive(Debug)]
enum Event {
    /// A whole frame was read: `buffered_event` takes it.
    Ready,
    Client(Result<Option<Frame>, ProtocolError>),
    Server(Target, Result<Option<Frame>, ProtocolError>),
    /// A write's watermark may have resolved: check and report it.
    WatermarkTick,
    IdleTimeout,
    /// The waiting unit's pool has a connection for it.
    Permit(tokio::sync::OwnedSemaphorePermit),
    /// The waiting unit waited `proxy.pool_timeout`.
    PoolTimeout,
    /// The proxy is closing every session (a second shutdown signal).
    Close,
}

/// The client side of a session.
struct Client<S: Split> {
    reader: FrameReader<S::Read>,
    writer: S::Write,
    out: BytesMut,
    /// Server bytes in `out`, counted in the metrics when flushed.
    relayed: u64,
    relayed_counter: prometheus::IntCounter,
}

impl<S: Split> Client<S> {
    fn queue(&mut self, frame: &Frame) {
        self.out.extend_from_slice(frame.raw());
    }

    /// Queues a server message for the client.
    fn relay(&mut self, frame: &Frame) {
        self.queue(frame);
        self.relayed += frame.len() as u64;
    }

    async fn flush(&mut self) -> Result<(), ProxyError> {
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
struct Timers {
    /// Re-checks a pending write watermark while the session is quiet, so
    /// that a client that wrote and went quiet still gets its
    /// `pgnear.write_lsn`.
    tick: Pin<Box<tokio::time::Sleep>>,
    tick_armed: bool,
    /// The re-check's next wait: half the monitor's interval, doubled (up
    /// to `TICK_BACKOFF` times) each time it finds that the session sent
    /// work since it was armed, back to the start when it finds it quiet.
    /// A busy session's own units resolve and report the watermark, and
    /// every expiry costs the service loop (which serves these timers) a
    /// wake-up and the session a cross-thread one: a client writing
    /// nonstop (pgbench's TPC-B) would otherwise cause 40 a second each.
    tick_every: std::time::Duration,
    /// The re-check's first wait: half the monitor's interval.
    tick_first: std::time::Duration,
    /// Complete units sent so far, and when the re-check was armed.
    units: u64,
    units_at_arm: u64,
    /// `proxy.idle_client_timeout`, counted from `last_activity`.
    idle: Pin<Box<tokio::time::Sleep>>,
    last_activity: Instant,
    /// `proxy.pool_timeout` for a unit waiting for a pooled connection.
    pool_wait: Pin<Box<tokio::time::Sleep>>,
}

impl Timers {
    fn new(idle_timeout: Option<std::time::Duration>, monitor_interval: std::time::Duration) -> Timers {
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
    fn arm_tick(&mut self) {
        self.tick.as_mut().reset(tokio::time::Instant::now() + self.tick_every);
        self.tick_armed = true;
        self.units_at_arm = self.units;
    }

    /// The re-check fired: the next one waits longer if the session sent
    /// work meanwhile, and half the monitor's interval again if not.
    fn tick_fired(&mut self) {
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
struct Batch {
    frames: SmallVec<[Frame; 5]>,
    classes: SmallVec<[Arc<Classification>; 1]>,
    /// A message names a prepared statement, which the server may lack
    /// or which the session must track.
    named: bool,
    /// A Parse of the unnamed statement.
    parses_unnamed: bool,
    /// A Bind or Describe of the unnamed statement ahead of any Parse of
    /// it: it uses the unnamed statement an earlier unit parsed.
    uses_earlier_unnamed: bool,
}

impl Batch {
    /// A unit of one message: a FunctionCall (a simple Query is built by
    /// `query_unit`, which adds what an EXECUTE runs).
    fn one(frame: Frame, class: Arc<Classification>) -> Batch {
        Batch { frames: smallvec![frame], classes: smallvec![class], ..Batch::default() }
    }
}

/// An authenticated client and its server connections.
pub struct Session<S: Split> {
    shared: Arc<Shared>,
    client: Client<S>,
    login: ServerLogin,
    cluster: String,
    catalog: Arc<Catalog>,
    /// The connection to the cluster's primary, opened at startup (or on
    /// the first write, if the primary was unreachable then).
    primary: Option<Box<Server>>,
    replica: Option<Box<Server>>,
    /// Where the current unit of work runs. Set when a unit starts and
    /// cleared when that server reports idle.
    bound: Option<Target>,
    /// Why the bound server was chosen, for units pipelined behind.
    bound_reason: crate::router::Reason,
    /// A Flush sent part of a batch ahead of its Sync: stay bound.
    open_batch: bool,
    batch: Batch,
    state: SessionState,
    settings: ProxySettings,
    watermark: Watermark,
    /// The proxy-wide count of each probe on its way (`probe_behind`),
    /// oldest first: answered in order, and dropped with the session.
    probes: std::collections::VecDeque<crate::router::consistency::Probe>,
    /// The `pgnear.write_lsn` last reported to the client.
    reported_lsn: Option<Lsn>,
    /// The session itself wrote: only then is `pgnear.write_lsn` reported
    /// to it. A session starts from the proxy-wide watermark, and one that
    /// never wrote must not be sent a ParameterStatus out of the blue
    /// (PgJDBC, waiting for notifications, fails on one).
    wrote: bool,
    /// Work that may write was sent to the primary since it was last idle.
    primary_dirty: bool,
    /// DDL that may define a function was sent to the primary: mark the
    /// volatile-function catalog stale once the primary is idle (committed).
    defines_functions: bool,
    /// A client message pgnear answers itself, held back until the
    /// responses still in flight have reached the client, so that the
    /// client sees answers in the order it asked.
    held: Option<Frame>,
    /// The read running on the replica, kept until its first response
    /// reaches the client so that it can be retried elsewhere if the
    /// replica fails first.
    retry: Option<Batch>,
    /// Where the unnamed statement was last parsed.
    unnamed_on: Option<Target>,
    /// Transaction pooling (`proxy.pool_mode = "transaction"`): server
    /// connections go back to their pool whenever they are idle.
    pooling: bool,
    /// Transaction pooling: the connection the session last wrote on and
    /// its turn then, where `currval()`/`lastval()` can be read.
    write_at: Option<(ServerKey, u64)>,
    /// The client's startup `application_name` ("" without one): in
    /// transaction pooling it is set on each connection the session takes.
    app_name: String,
    /// Transaction pooling: the body of the last Parse of the unnamed
    /// statement (empty: none), for a later unit that binds it on another
    /// connection.
    unnamed_parse: Vec<u8>,
    /// The texts and shapes the session classified lately, for repeats.
    recently_classified: crate::router::cache::RecentlyClassified,
    /// Transaction pooling: the session's pool for each node it used.
    pools: Vec<(usize, Arc<pool::Pool>)>,
    /// Transaction pooling: the unit waiting for a connection. Client
    /// messages wait behind it.
    waiting: Option<Box<drive::Waiting>>,
    /// Which sockets may have something to read (`wait_event`).
    sources: wake::Sources,
    /// A replica refused the session's settings: reads stay on the primary.
    settings_refused: bool,
    /// Session effects waiting for the open transaction to commit.
    tx: tx::TxEffects,
    /// The server reports `default_transaction_read_only = on`.
    default_read_only: bool,
    /// Since when reads have been held on the primary after a write.
    pinned_since: Option<Instant>,
    timers: Timers,
    /// The session's span (id, peer, user, database): the parent of the
    /// relay's log events.
    span: tracing::Span,
    registration: Registration,
    /// Where the registration points cancels now (changed only when this
    /// does).
    cancels_to: Option<ServerKey>,
    /// The registration has the task's waker, to wake it for a close.
    close_watch: bool,
}

impl<S: Split + Unpin + Send + 'static> Session<S> {
    /// Opens the primary connection and completes the client's startup
    /// with the primary's ParameterStatus messages and BackendKeyData.
    pub async fn start(
        shared: Arc<Shared>,
        mut stream: S,
        login: Login,
        cluster: String,
        span: tracing::Span,
    ) -> Result<Self, ProxyError> {
        let (settings, params) = match startup_settings(&login) {
            Ok(split) => split,
            Err(frame) => {
                let _ = stream.write_all(frame.raw()).await;
                return Err(ProxyError::Unsupported("invalid pgnear setting in startup options".into()));
            }
        };
        let server_login = ServerLogin {
            user: login.user.server_user.clone(),
            password: login.user.server_password.clone(),
            params,
        };
        let state = SessionState::default();
        let (primary, replica) = match first_server(&shared, &cluster, &server_login, state.owner()).await {
            Ok(servers) => servers,
            Err(error) => {
                super::refuse(&mut stream, &error).await;
                return Err(error);
            }
        };
        let Some(home) = primary.as_ref().or(replica.as_ref()) else {
            return Err(ProxyError::NoPrimary(crate::cluster::NoPrimary::Unreachable));
        };
        let pooling = shared.config.proxy.pool_mode == crate::config::PoolMode::Transaction;
        let app_name = server_login.param(server::APPLICATION_NAME).unwrap_or_default().to_string();
        let mut startup_params = home.backend.startup_params.clone();
        if pooling {
            // A pooled connection may have been opened by a client with
            // another name; the first unit sets this one's.
            for frame in &mut startup_params {
                let theirs = crate::protocol::backend::parse_parameter_status(frame)
                    .is_ok_and(|(name, _)| name == server::APPLICATION_NAME);
                if theirs {
                    *frame = parameter_status(server::APPLICATION_NAME, &app_name);
                }
            }
        }
        let registration = shared.cancels.register(home.backend.key.pid);
        let database = login.param("database").unwrap_or(&login.user.name).to_string();
        let catalog = shared.catalogs.get(&cluster, &database).await;
        let (read, writer) = stream.split();
        let limit = shared.config.proxy.max_message_bytes;
        let mut client = Client {
            reader: FrameReader::with_buffered(read, limit, login.buffered),
            writer,
            out: BytesMut::new(),
            relayed: 0,
            relayed_counter: shared.metrics.bytes_counter(crate::metrics::Direction::ServerToClient),
        };
        for frame in &startup_params {
            client.queue(frame);
        }
        client.queue(&backend_key_data(registration.key));
        client.queue(&ready_for_query(TxStatus::Idle));
        client.flush().await?;
        let shared_mode = shared.config.consistency.read_your_writes;
        let shared_idle_timeout = shared.config.proxy.idle_client_timeout;
        let shared_monitor_interval = shared.config.monitor.interval;
        let shared_watermark = shared.watermark.inherited(Instant::now());
        Ok(Session {
            shared,
            client,
            login: server_login,
            cluster,
            catalog,
            primary,
            replica,
            bound: None,
            bound_reason: crate::router::Reason::Transaction,
            open_batch: false,
            batch: Batch::default(),
            state,
            settings,
            watermark: match shared_mode {
                ReadYourWrites::Off => Watermark::default(),
                ReadYourWrites::Session | ReadYourWrites::Proxy => shared_watermark,
            },
            probes: std::collections::VecDeque::new(),
            reported_lsn: None,
            wrote: false,
            primary_dirty: false,
            defines_functions: false,
            held: None,
            pinned_since: None,
            unnamed_on: None,
            pooling,
            app_name,
            write_at: None,
            unnamed_parse: Vec::new(),
            recently_classified: Default::default(),
            pools: Vec::new(),
            waiting: None,
            sources: wake::Sources::new(),
            settings_refused: false,
            tx: tx::TxEffects::default(),
            default_read_only: startup_params.iter().any(is_read_only_default),
            retry: None,
            timers: Timers::new(shared_idle_timeout, shared_monitor_interval),
            span,
            registration,
            close_watch: false,
            cancels_to: None,
        })
    }

    /// Relays until the client leaves or the session fails.
    ///
    /// By reference: a by-value `self` would be stored twice in the future.
    pub async fn run(&mut self) -> Result<(), ProxyError> {
        let result = self.relay().await;
        if let Err(error) = &result {
            if let Some(frame) = error.to_frame() {
                self.client.queue(&frame);
                let _ = self.client.flush().await;
            }
        }
        // Boxed, like every rare path below: an async fn's future is as
        // large as its largest await, and the session's future lives (and
        // occupies memory) for as long as the client stays connected.
        Box::pin(self.close()).await;
        result
    }

    async fn relay(&mut self) -> Result<(), ProxyError> {
        loop {
            if self.pooling && self.bound.is_none() {
                self.release_idle();
            }
            let event = match self.buffered_event() {
                Some(event) => event,
                None => {
                    self.forward_partial().await?;
                    self.flush_all().await?;
                    self.wait_event().await
                }
            };
            // Nearly every client message needs no I/O before it is
            // buffered or sent (`on_client_now`), and a server message is
            // only relayed; the rest take boxed or async paths.
            let flow = match event {
                Event::Ready => Flow::Continue,
                Event::Client(Ok(Some(frame))) => match self.on_client_run(frame)? {
                    Taken::Done => Flow::Continue,
                    taken => self.finish(taken).await?,
                },
                Event::Permit(permit) => {
                    self.permit_granted(permit).await?;
                    Flow::Continue
                }
                Event::PoolTimeout => {
                    if let Some(waiting) = self.waiting.take() {
                        let frame = drive::pool_exhausted(self.shared.config.proxy.pool_timeout);
                        waiting.count.timed_out();
                        drop(waiting);
                        self.client.queue(&frame);
                        self.client.queue(&ready_for_query(TxStatus::Idle));
                    }
                    Flow::Continue
                }
                Event::Client(Ok(None)) => Flow::End,
                Event::Client(Err(error)) => return Err(error.into()),
                Event::Server(target, Ok(Some(frame))) => match self.on_server(target, frame)? {
                    Flow::Lost(target) => {
                        Box::pin(self.server_lost(target)).await?;
                        Flow::Continue
                    }
                    flow => flow,
                },
                Event::Server(target, end) => {
                    if let Err(error) = end {
                        let node = self.node_name(target);
                        tracing::warn!(parent: &self.span, node, %error, "server broke the protocol");
                    }
                    Box::pin(self.server_lost(target)).await?;
                    Flow::Continue
                }
                Event::WatermarkTick => {
                    self.timers.tick_fired();
                    self.refresh_watermark();
                    Flow::Continue
                }
                Event::IdleTimeout if self.idle_expired() => return Err(ProxyError::IdleTimeout),
                Event::Close => return Err(ProxyError::Shutdown),
                Event::IdleTimeout => Flow::Continue,
            };
            if flow == Flow::End {
                return self.client.flush().await;
            }
            if self.shared.config.proxy.idle_client_timeout.is_some() {
                self.timers.last_activity = Instant::now();
            }
            if self.held.is_some() && !self.in_flight() {
                if let Some(frame) = self.held.take() {
                    self.on_client(frame).await?;
                    self.sources.mark_all();
                }
            }
            if self.client.out.len() >= FLUSH_AT {
                self.client.flush().await?;
            }
        }
    }

    /// Takes a client frame and then, as long as each needs no I/O, the
    /// whole frames buffered behind it: the messages of one unit go
    /// through in one pass instead of a turn of the loop (and a look at
    /// every server) each. Server frames that arrived meanwhile wait, as
    /// they would have had they arrived a moment later.
    fn on_client_run(&mut self, mut frame: Frame) -> Result<Taken, ProxyError> {
        loop {
            let taken = self.take(frame)?;
            let paused = self.held.is_some() || self.waiting.is_some();
            if !matches!(taken, Taken::Done) || paused || self.client.out.len() >= FLUSH_AT {
                return Ok(taken);
            }
            match self.client.reader.buffered()? {
                Some(next) => frame = next,
                None => return Ok(Taken::Done),
            }
        }
    }

    /// The waiting unit's pool gave it a permit: take an idle connection
    /// (or, if none is left idle, let `dispatch` open one) and run it.
    async fn permit_granted(&mut self, permit: tokio::sync::OwnedSemaphorePermit) -> Result<(), ProxyError> {
        let Some(waiting) = self.waiting.take() else { return Ok(()) };
        let drive::Waiting { unit, complete, target, pool, .. } = *waiting;
        let slot = match target {
            Target::Primary => &mut self.primary,
            Target::Replica => &mut self.replica,
        };
        match pool.take_with(permit, self.state.owner()) {
            Ok(server) if slot.is_none() => {
                *slot = Some(server);
                self.sources.mark_all();
            }
            Ok(server) => pool.put(server),
            Err(permit) => drop(permit),
        }
        // Routed afresh: the cluster may have changed while it waited.
        let taken = self.dispatch_now(unit, complete);
        self.finish(taken).await?;
        Ok(())
    }

    /// Transaction pooling: gives server connections that are idle back
    /// to their pools. A pinned session (LISTEN, a temp table ...) keeps
    /// its primary connection, where that state lives.
    fn release_idle(&mut self) {
        if self.open_batch {
            return;
        }
        for target in [Target::Primary, Target::Replica] {
            let keep = target == Target::Primary && self.state.pinned;
            let reusable = self.server(target).is_some_and(|s| s.reusable());
            if keep || !reusable {
                continue;
            }
            let server = match target {
                Target::Primary => self.primary.take(),
                Target::Replica => self.replica.take(),
            };
            let Some(server) = server else { continue };
            if self.unnamed_on == Some(target) {
                self.unnamed_on = None;
            }
            if self.cancels_to.take().is_some() {
                self.registration.target.set(None);
            }
            if let Some(pool) = server.pool.clone() {
                pool.put(server);
            }
        }
    }

    async fn close(&mut self) {
        if self.defines_functions {
            // The client left before its DDL was seen to finish.
            self.catalog.mark_stale();
        }
        if self.pooling && self.bound.is_none() {
            self.release_idle();
        }
        let busy: Vec<ServerKey> = [self.primary.as_ref(), self.replica.as_ref()]
            .into_iter()
            .flatten()
            .filter(|s| s.backend.in_flight > 0)
            .map(|s| s.cancel_key)
            .collect();
        for server in busy {
            // The client left mid-query: stop the server's work too.
            let timeout = self.shared.config.proxy.connect_timeout;
            let endpoint = &self.shared.topology.nodes[server.node].endpoint;
            crate::backend::connect::send_cancel(endpoint, server.key, timeout).await;
        }
        if let Some(replica) = self.replica.take() {
            replica.backend.terminate().await;
        }
        if let Some(primary) = self.primary.take() {
            primary.backend.terminate().await;
        }
        let _ = self.client.writer.shutdown().await;
        // The cancel registration goes with the session, right after.
    }

    /// A frame already read from any side, without waiting. Server frames
    /// first, so that responses drain before new work is taken. Server
    /// messages that need no bookkeeping go straight to the client's
    /// output on the way, a run at a time.
    fn buffered_event(&mut self) -> Option<Event> {
        for target in [Target::Primary, Target::Replica] {
            let server = match target {
                Target::Primary => self.primary.as_mut(),
                Target::Replica => self.replica.as_mut(),
            };
            if let Some(server) = server.filter(|s| s.backend.has_input()) {
                let moved = server.backend.pass_through(&mut self.client.out, FLUSH_AT);
                if moved > 0 {
                    self.client.relayed += moved as u64;
                    if target == Target::Replica {
                        // The read has answered: too late to retry it.
                        self.retry = None;
                    }
                }
                match server.backend.buffered() {
                    Ok(None) => {}
                    other => return Some(Event::Server(target, other)),
                }
            }
        }
        if self.held.is_some() || self.waiting.is_some() {
            return None;
        }
        match self.client.reader.buffered() {
            Ok(None) => None,
            other => Some(Event::Client(other)),
        }
    }

    /// Whether any server still owes the client responses, or the primary
    /// a probe's answer (which comes right behind the client's).
    fn in_flight(&self) -> bool {
        [self.primary.as_ref(), self.replica.as_ref()].into_iter().flatten().any(|s| s.backend.in_flight > 0)
            || self.watermark.is_probing()
    }

    async fn flush_all(&mut self) -> Result<(), ProxyError> {
        for target in [Target::Primary, Target::Replica] {
            let Some(server) = self.server_mut(target) else { continue };
            if server.backend.has_output() && server.backend.flush().await.is_err() {
                return Box::pin(self.server_lost(target)).await;
            }
        }
        self.client.flush().await
    }

    /// Waits for the next frame from any side. Every branch is cancel
    /// safe: frame readers only move bytes into their own buffers.
    async fn wait_event(&mut self) -> Event {
        let idle_on = self.shared.config.proxy.idle_client_timeout.is_some() && self.bound.is_none();
        // While a unit runs, its own responses wake the loop often enough,
        // and a probe's answer comes right behind them: only a commit left
        // to the monitor needs the re-check.
        let tick_on = self.bound.is_none() && self.wrote && self.watermark.waits_for_monitor();
        if tick_on && !self.timers.tick_armed {
            self.timers.arm_tick();
        }
        let held = self.held.is_some() || self.waiting.is_some();
        let sources = &self.sources;
        let timers = &mut self.timers;
        let closing = &self.registration.target;
        let close_watch = &mut self.close_watch;
        std::future::poll_fn(|cx| {
            sources.register(cx);
            // The task's waker is registered once: it does not change.
            let waker = (!std::mem::replace(close_watch, true)).then(|| cx.waker());
            if closing.closing(waker) {
                return Poll::Ready(Event::Close);
            }
            // Servers first: responses drain before new work is taken.
            if let Some(server) = self.primary.as_mut() {
                if let Poll::Ready(filled) = sources.poll(wake::PRIMARY, pin!(server.backend.fill())) {
                    return Poll::Ready(filled_event(filled, |end| Event::Server(Target::Primary, end)));
                }
            }
            if let Some(server) = self.replica.as_mut() {
                if let Poll::Ready(filled) = sources.poll(wake::REPLICA, pin!(server.backend.fill())) {
                    return Poll::Ready(filled_event(filled, |end| Event::Server(Target::Replica, end)));
                }
            }
            if !held {
                if let Poll::Ready(filled) = sources.poll(wake::CLIENT, pin!(self.client.reader.fill())) {
                    return Poll::Ready(filled_event(filled, Event::Client));
                }
            }
            if tick_on && timers.tick.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::WatermarkTick);
            }
            if idle_on && timers.idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::IdleTimeout);
            }
            if let Some(waiting) = self.waiting.as_mut() {
                // The semaphore is never closed.
                if let Poll::Ready(Ok(permit)) = waiting.permit.as_mut().poll(cx) {
                    return Poll::Ready(Event::Permit(permit));
                }
                if timers.pool_wait.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::PoolTimeout);
                }
            }
            Poll::Pending
        })
        .await
    }

    /// The idle timer fired: the client really has been idle that long,
    /// or it was active since and the timer moves to the new deadline.
    fn idle_expired(&mut self) -> bool {
        let Some(after) = self.shared.config.proxy.idle_client_timeout else { return false };
        let deadline = self.timers.last_activity + after;
        if Instant::now() >= deadline {
            return true;
        }
        self.timers.idle.as_mut().reset(tokio::time::Instant::from_std(deadline));
        false
    }

    fn node_name(&self, target: Target) -> String {
        match self.server(target) {
            Some(server) => self.shared.topology.nodes[server.node].config.name.clone(),
            None => String::from("replica"),
        }
    }

    fn server(&self, target: Target) -> Option<&Server> {
        match target {
            Target::Primary => self.primary.as_deref(),
            Target::Replica => self.replica.as_deref(),
        }
    }

    fn server_mut(&mut self, target: Target) -> Option<&mut Server> {
        match target {
            Target::Primary => self.primary.as_deref_mut(),
            Target::Replica => self.replica.as_deref_mut(),
        }
    }
}

/// Extended-protocol messages that wait in the batch for their Sync.
fn is_batched(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C')
}

/// What a wait for a whole frame came to: the frame is taken from the
/// buffer next; the end of the stream and errors are the side's events.
fn filled_event(
    filled: Result<bool, ProtocolError>,
    side: impl FnOnce(Result<Option<Frame>, ProtocolError>) -> Event,
) -> Event {
    match filled {
        Ok(true) => Event::Ready,
        Ok(false) => side(Ok(None)),
        Err(error) => side(Err(error)),
    }
}

/// A ParameterStatus saying new transactions are read-only by default.
fn is_read_only_default(frame: &Frame) -> bool {
    crate::protocol::backend::parse_parameter_status(frame)
        .is_ok_and(|(name, value)| name == "default_transaction_read_only" && value == b"on")
}

/// Splits `pgnear.*` settings out of the startup `options`; the rest of
/// the startup parameters go to every server the session uses.
fn startup_settings(login: &Login) -> Result<(ProxySettings, Vec<(String, String)>), Frame> {
    let mut settings = ProxySettings::default();
    let mut params = Vec::with_capacity(login.params.len() + 1);
    for (name, value) in &login.params {
        if name == "options" {
            let (rest, found) = local::split_options(value);
            for (name, value) in found {
                settings.set(&name, &value)?;
            }
            if !rest.is_empty() {
                params.push((name.clone(), rest));
            }
        } else if let Some(setting) = name.strip_prefix("pgnear.") {
            settings.set(setting, value)?;
        } else {
            params.push((name.clone(), value.clone()));
        }
    }
    if login.param("database").is_none() {
        params.push(("database".into(), login.user.name.clone()));
    }
    Ok((settings, params))
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
