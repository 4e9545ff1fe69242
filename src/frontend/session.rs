//! One client session after authentication: the relay loop.
//!
//! The loop waits on the client and on every open server connection at
//! once. Client messages are grouped into units of work: one simple Query,
//! or extended-protocol messages up to Sync (or Flush) (`unit`). Each unit
//! is planned as a whole (`plan`) and the plan carried out (`drive`,
//! `send`); a unit or a transaction stays on one server until that
//! server's ReadyForQuery says it is idle (`reply`). Server messages are
//! relayed as they arrive and flushed to the client once per read batch;
//! responses to pgnear's own replays are swallowed.

mod drive;
mod local;
mod open;
mod optimistic;
mod parts;
mod plan;
mod reply;
mod send;
mod state;
mod tx;
mod unit;
mod wake;

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::cancel::ServerKey;
use super::handshake::Login;
use super::Shared;
use crate::backend::server::Server;
use crate::backend::ServerLogin;
use crate::config::ReadYourWrites;
use crate::error::ProxyError;
use crate::protocol::backend::{backend_key_data, parameter_status, ready_for_query, TxStatus};
use crate::protocol::{Frame, FrameReader, ProtocolError};
use crate::router::consistency::Watermark;
use crate::tls::Split;
use local::ProxySettings;
use open::first_server;
use parts::{Batch, Bound, Cancels, Client, Known, Pause, Pooling, Scope, Timers, Writes};
use state::SessionState;
use unit::Taken;

/// Client output is flushed once it grows past this, even mid-batch.
const FLUSH_AT: usize = 64 * 1024;

/// Which of the session's server connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

/// Whether the loop goes on.
enum Flow {
    Continue,
    End,
    /// A server is going away; handle it as lost.
    Lost(Target),
    /// A replica refused a read before anything of it reached the client:
    /// run it again on the primary.
    Retry(Box<Batch>, parts::Refusal),
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

/// An authenticated client and its server connections.
pub struct Session<S: Split> {
    shared: Arc<Shared>,
    client: Client<S>,
    scope: Scope,
    /// The connection to the cluster's primary, opened at startup (or on
    /// the first write, if the primary was unreachable then).
    primary: Option<Box<Server>>,
    replica: Option<Box<Server>>,
    /// Where the current unit of work runs: set when a unit starts,
    /// cleared when that server reports idle.
    bound: Option<Bound>,
    /// Client input waits: for the responses in flight, or for a pool.
    pause: Option<Pause>,
    /// Extended-protocol messages waiting for their Sync.
    batch: Batch,
    /// A transaction opened with a plain BEGIN, deferred or running
    /// optimistically on the replica.
    optimistic: Option<optimistic::Phase>,
    state: SessionState,
    known: Known,
    writes: Writes,
    /// Transaction pooling (`proxy.pool_mode = "transaction"`): server
    /// connections go back to their pool whenever they are idle.
    pooling: Option<Box<Pooling>>,
    timers: Timers,
    /// Which sockets may have something to read (`wait_event`).
    sources: wake::Sources,
    cancels: Cancels,
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
        let startup = local::startup_settings(&login).and_then(|(settings, params)| {
            let (region, regions) = (settings.prefer_region.as_deref(), local::regions(&shared, &cluster));
            ProxySettings::known_region("prefer_region", region.unwrap_or_default(), &regions)
                .map(|()| (settings, params))
        });
        let (settings, params) = match startup {
            Ok(split) => split,
            Err(frame) => {
                let _ = stream.write_all(frame.raw()).await;
                return Err(ProxyError::Unsupported("invalid pgnear setting in startup options".into()));
            }
        };
        let server_login = ServerLogin {
            user: login.user.server_user.clone(),
            auth: login.server_auth.clone(),
            max_connections: login.user.max_user_connections,
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
        let pooling = shared.config().proxy.pool_mode == crate::config::PoolMode::Transaction;
        let app_name =
            server_login.param(crate::backend::server::APPLICATION_NAME).unwrap_or_default().to_string();
        let mut startup_params = home.backend.startup_params.clone();
        if pooling {
            // A pooled connection may have been opened by a client with
            // another name; the first unit sets this one's.
            for frame in &mut startup_params {
                let theirs = crate::protocol::backend::parse_parameter_status(frame)
                    .is_ok_and(|(name, _)| name == crate::backend::server::APPLICATION_NAME);
                if theirs {
                    *frame = parameter_status(crate::backend::server::APPLICATION_NAME, &app_name);
                }
            }
        }
        let registration = shared.cancels.register(home.backend.key.pid);
        let database = login.param("database").unwrap_or(&login.user.name).to_string();
        let catalog = shared.catalogs.get(&cluster, &database).await;
        let (read, writer) = stream.split();
        let limit = shared.config().proxy.max_message_bytes;
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
        let watermark = match shared.config().consistency.read_your_writes {
            ReadYourWrites::Off => Watermark::default(),
            ReadYourWrites::Session | ReadYourWrites::Proxy => shared.watermark.inherited(Instant::now()),
        };
        let timers = Timers::new(shared.config().proxy.idle_client_timeout, shared.config().monitor.interval);
        let schema = shared.schema.of(&cluster);
        let pooling = pooling.then(|| {
            let fresh = Pooling { pools: Vec::new(), write_at: None, unnamed_parse: Vec::new(), app_name };
            Box::new(fresh)
        });
        let known = Known {
            settings,
            default_read_only: startup_params.iter().any(local::is_read_only_default),
            serializable_at_startup: local::serializable_at_startup(&server_login.params),
            ..Known::default()
        };
        Ok(Session {
            shared,
            client,
            scope: Scope {
                user: login.user.name.clone(),
                login: server_login,
                schema,
                cluster,
                catalog,
                span,
            },
            primary,
            replica,
            bound: None,
            pause: None,
            batch: Batch::default(),
            optimistic: None,
            state,
            known,
            writes: Writes { watermark, ..Writes::default() },
            pooling,
            timers,
            sources: wake::Sources::new(),
            cancels: Cancels { registration, to: None, close_watch: false },
        })
    }

    /// Names the session's client for the console (SHOW CLIENTS, KILL).
    pub fn describe(&self, id: u64, peer: String) {
        let login = &self.scope.login;
        let info = super::cancel::ClientInfo {
            id,
            user: self.scope.user.clone(),
            database: login.param("database").unwrap_or(&login.user).to_string(),
            peer,
            since: std::time::SystemTime::now(),
        };
        let _ = self.cancels.registration.target.info.set(info);
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
            if self.pooling.is_some() && self.bound.is_none() {
                self.release_idle();
            }
            let event = match self.buffered_event() {
                Some(event) => event,
                None => {
                    if !self.batch.frames.is_empty() {
                        self.forward_partial().await?;
                    }
                    self.flush_all().await?;
                    self.wait_event().await
                }
            };
            // Nearly every client message needs no I/O before it is
            // buffered or sent (`take`), and a server message is
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
                    if let Some(Pause::Pool(waiting)) = self.pause.take_if(|p| matches!(p, Pause::Pool(_))) {
                        let frame = drive::pool_exhausted(self.shared.config().proxy.pool_timeout);
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
                    Flow::Retry(unit, refusal) => {
                        Box::pin(self.retry_on_primary(*unit, refusal)).await?;
                        Flow::Continue
                    }
                    flow => flow,
                },
                Event::Server(target, end) => {
                    if let Err(error) = end {
                        let node = self.node_name(target);
                        tracing::warn!(parent: &self.scope.span, node, %error, "server broke the protocol");
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
            if matches!(flow, Flow::End) {
                return self.client.flush().await;
            }
            if self.shared.config().proxy.idle_client_timeout.is_some() {
                self.timers.last_activity = Instant::now();
            }
            if matches!(self.pause, Some(Pause::Held(_))) && !self.in_flight() {
                if let Some(Pause::Held(frame)) = self.pause.take() {
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
            let paused = self.pause.is_some();
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
        let Some(Pause::Pool(waiting)) = self.pause.take_if(|p| matches!(p, Pause::Pool(_))) else {
            return Ok(());
        };
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
        if self.bound.as_ref().is_some_and(|b| b.open_batch) {
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
            if self.known.unnamed_on.is_some_and(|(t, _)| t == target) {
                self.known.unnamed_on = None;
            }
            if self.cancels.to.take().is_some() {
                self.cancels.registration.target.set(None);
            }
            if let Some(pool) = server.pool.clone() {
                pool.put(server);
            }
        }
    }

    async fn close(&mut self) {
        if self.writes.defines_functions {
            // The client left before its DDL was seen to finish.
            self.scope.catalog.mark_stale();
        }
        if self.pooling.is_some() && self.bound.is_none() {
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
            let timeout = self.shared.config().proxy.connect_timeout;
            if let Some(endpoint) = self.shared.topology.node(server.node).last_endpoint() {
                crate::backend::connect::send_cancel(&endpoint, server.key, timeout).await;
            }
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
            // A read that may still run elsewhere goes frame by frame
            // until its first result (`on_server` holds what comes before).
            let retrying =
                target == Target::Replica && self.bound.as_ref().is_some_and(|b| b.retry.is_some());
            if let Some(server) = server.filter(|s| s.backend.has_input()) {
                let mut retrying = retrying;
                if retrying {
                    server.backend.hold_acknowledgements(&mut server.held);
                    // A row or a tag next: the read has answered, and what
                    // was held goes out ahead of it, in this same pass. Not
                    // while pgnear's replays are answered (a CloseComplete,
                    // a ParseComplete): `on_server` swallows those, and the
                    // replay may still fail (a table the replica lacks).
                    let answered = !server.backend.has_hidden()
                        && server
                            .backend
                            .next_tag()
                            .is_some_and(crate::backend::connection::needs_no_bookkeeping);
                    if answered {
                        self.client.out.extend_from_slice(&server.held);
                        self.client.relayed += server.held.len() as u64;
                        server.held.clear();
                        if let Some(bound) = self.bound.as_mut() {
                            bound.retry = None;
                        }
                        retrying = false;
                    }
                }
                let moved = match retrying {
                    true => 0,
                    false => server.backend.pass_through(&mut self.client.out, FLUSH_AT),
                };
                if moved > 0 {
                    self.client.relayed += moved as u64;
                    if target == Target::Replica {
                        // The read has answered: too late to retry it.
                        if let Some(bound) = self.bound.as_mut() {
                            bound.retry = None;
                        }
                    }
                }
                match server.backend.buffered() {
                    Ok(None) => {}
                    other => return Some(Event::Server(target, other)),
                }
            }
        }
        if self.pause.is_some() {
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
            || self.writes.watermark.is_probing()
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
        let idle_on = self.shared.config().proxy.idle_client_timeout.is_some() && self.bound.is_none();
        // While a unit runs, its own responses wake the loop often enough,
        // and a probe's answer comes right behind them: only a commit left
        // to the monitor needs the re-check.
        let tick_on = self.bound.is_none() && self.writes.wrote && self.writes.watermark.waits_for_monitor();
        if tick_on && !self.timers.tick_armed {
            self.timers.arm_tick();
        }
        let held = self.pause.is_some();
        let sources = &self.sources;
        let timers = &mut self.timers;
        let closing = &self.cancels.registration.target;
        let close_watch = &mut self.cancels.close_watch;
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
            if let Some(Pause::Pool(waiting)) = self.pause.as_mut() {
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
        let Some(after) = self.shared.config().proxy.idle_client_timeout else { return false };
        let deadline = self.timers.last_activity + after;
        if Instant::now() >= deadline {
            return true;
        }
        self.timers.idle.as_mut().reset(tokio::time::Instant::from_std(deadline));
        false
    }

    fn node_name(&self, target: Target) -> String {
        match self.server(target) {
            Some(server) => self.shared.topology.node(server.node).config.name.clone(),
            None => String::from("replica"),
        }
    }

    /// The server the current unit runs on, if any.
    fn bound_to(&self) -> Option<Target> {
        self.bound.as_ref().map(|b| b.target)
    }

    /// The replica's read has answered: too late to retry it elsewhere.
    fn no_retry(&mut self) {
        if let Some(bound) = self.bound.as_mut() {
            bound.retry = None;
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
