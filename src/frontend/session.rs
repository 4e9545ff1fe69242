//! One client session after authentication: the relay loop.
//!
//! The loop waits on the client and on every open server connection at
//! once. Client messages are grouped into units of work: one simple Query,
//! or extended-protocol messages up to Sync (or Flush). Each unit is routed
//! as a whole (`unit`), and a unit or a transaction stays on one server
//! until that server's ReadyForQuery says it is idle. Server messages are
//! relayed as they arrive and flushed to the client once per read batch;
//! responses to pgnear's own replays are swallowed.

mod local;
mod state;
mod unit;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::cancel::{Registration, ServerKey};
use super::handshake::Login;
use super::Shared;
use crate::backend::{connect, Backend, ServerLogin};
use crate::cluster::catalog::Catalog;
use crate::cluster::Lsn;
use crate::config::ReadYourWrites;
use crate::error::ProxyError;
use crate::metrics::{Direction, GaugeGuard};
use crate::protocol::backend::{
    backend_key_data, parameter_status, ready_for_query, ready_status, ErrorFields,
};
use crate::protocol::{Frame, FrameReader, ProtocolError};
use crate::router::classify::Classification;
use crate::router::consistency::{PrimarySample, Watermark};
use local::ProxySettings;
use state::{ServerState, SessionState};

/// Client output is flushed once it grows past this, even mid-batch.
const FLUSH_AT: usize = 64 * 1024;

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
}

/// Something the loop must handle.
#[derive(Debug)]
enum Event {
    Client(Result<Option<Frame>, ProtocolError>),
    Server(Target, Result<Option<Frame>, ProtocolError>),
    /// A write's watermark may have resolved: check and report it.
    WatermarkTick,
    IdleTimeout,
}

/// The client side of a session.
struct Client<S> {
    reader: FrameReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite> Client<S> {
    fn queue(&mut self, frame: &Frame) {
        self.out.extend_from_slice(frame.raw());
    }

    async fn flush(&mut self) -> Result<(), ProxyError> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).await.map_err(ProxyError::ClientGone)?;
            // TLS buffers records until flushed.
            self.writer.flush().await.map_err(ProxyError::ClientGone)?;
            self.out.clear();
        }
        Ok(())
    }
}

/// A server connection, the key a cancel should use, and what it has of
/// the session state.
struct Server {
    backend: Backend,
    node: usize,
    cancel_key: Arc<ServerKey>,
    state: ServerState,
    /// When each complete unit in flight was sent, for the latency metric.
    started: std::collections::VecDeque<Instant>,
    /// This connection's share of the node's outstanding units.
    load: Load,
    /// Session effects (SET, DISCARD ...) of each complete unit in flight,
    /// applied when the unit succeeds.
    effects: std::collections::VecDeque<Vec<Arc<Classification>>>,
    /// Effects of units sent ahead of their Sync (after a Flush).
    carry: Vec<Arc<Classification>>,
    /// The unit now answering has reported an error.
    unit_failed: bool,
    _gauge: GaugeGuard,
}

/// Units a server connection adds to its node's outstanding count; given
/// back when they finish or the connection goes.
struct Load {
    node: Arc<AtomicU32>,
    held: u32,
}

impl Load {
    fn add(&mut self) {
        self.held += 1;
        self.node.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&mut self) {
        if self.held > 0 {
            self.held -= 1;
            self.node.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.node.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// Extended-protocol messages waiting for their Sync, with the
/// classifications of the statements they parse or execute.
#[derive(Default)]
struct Batch {
    frames: Vec<Frame>,
    classes: Vec<Arc<Classification>>,
}

/// An authenticated client and its server connections.
pub struct Session<S> {
    shared: Arc<Shared>,
    client: Client<S>,
    login: ServerLogin,
    cluster: String,
    catalog: Arc<Catalog>,
    /// The connection to the cluster's primary, opened at startup (or on
    /// the first write, if the primary was unreachable then).
    primary: Option<Server>,
    replica: Option<Server>,
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
    /// The `pgnear.write_lsn` last reported to the client.
    reported_lsn: Option<Lsn>,
    /// Work that may write was sent to the primary since it was last idle.
    primary_dirty: bool,
    /// DDL ran: reload the volatile-function catalog before routing again.
    catalog_stale: bool,
    /// A client message pgnear answers itself, held back until the
    /// responses still in flight have reached the client, so that the
    /// client sees answers in the order it asked.
    held: Option<Frame>,
    /// The read running on the replica, kept until its first response
    /// reaches the client so that it can be retried elsewhere if the
    /// replica fails first.
    retry: Option<Batch>,
    /// The server reports `default_transaction_read_only = on`.
    default_read_only: bool,
    /// Since when reads have been held on the primary after a write.
    pinned_since: Option<Instant>,
    registration: Registration,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Session<S> {
    /// Opens the primary connection and completes the client's startup
    /// with the primary's ParameterStatus messages and BackendKeyData.
    pub async fn start(
        shared: Arc<Shared>,
        mut stream: S,
        login: Login,
        cluster: String,
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
        let (primary, replica) = match first_server(&shared, &cluster, &server_login).await {
            Ok(servers) => servers,
            Err(error) => {
                super::refuse(&mut stream, &error).await;
                return Err(error);
            }
        };
        let Some(home) = primary.as_ref().or(replica.as_ref()) else {
            return Err(ProxyError::NoPrimary(crate::cluster::NoPrimary::Unreachable));
        };
        let startup_params = home.backend.startup_params.clone();
        let registration = shared.cancels.register(home.backend.key.pid);
        let database = login.param("database").unwrap_or(&login.user.name).to_string();
        let catalog = shared.catalogs.get(&cluster, &database).await;
        let (read, writer) = tokio::io::split(stream);
        let limit = shared.config.proxy.max_message_bytes;
        let mut client = Client {
            reader: FrameReader::with_buffered(read, limit, login.buffered),
            writer,
            out: BytesMut::with_capacity(16 * 1024),
        };
        for frame in &startup_params {
            client.queue(frame);
        }
        client.queue(&backend_key_data(registration.key));
        client.queue(&ready_for_query(b'I'));
        client.flush().await?;
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
            state: SessionState::default(),
            settings,
            watermark: Watermark::default(),
            reported_lsn: None,
            primary_dirty: false,
            catalog_stale: false,
            held: None,
            pinned_since: None,
            default_read_only: startup_params.iter().any(is_read_only_default),
            retry: None,
            registration,
        })
    }

    /// Relays until the client leaves or the session fails.
    pub async fn run(mut self) -> Result<(), ProxyError> {
        let result = self.relay().await;
        if let Err(error) = &result {
            if let Some(frame) = error.to_frame() {
                self.client.queue(&frame);
                let _ = self.client.flush().await;
            }
        }
        self.close().await;
        result
    }

    async fn relay(&mut self) -> Result<(), ProxyError> {
        loop {
            let event = match self.buffered_event() {
                Some(event) => event,
                None => {
                    self.flush_all().await?;
                    self.wait_event().await
                }
            };
            if self.handle(event).await? == Flow::End {
                return self.client.flush().await;
            }
            if self.held.is_some() && !self.in_flight() {
                if let Some(frame) = self.held.take() {
                    self.on_client(frame).await?;
                }
            }
            if self.client.out.len() >= FLUSH_AT {
                self.client.flush().await?;
            }
        }
    }

    async fn close(mut self) {
        let busy: Vec<ServerKey> = [self.primary.as_ref(), self.replica.as_ref()]
            .into_iter()
            .flatten()
            .filter(|s| s.backend.in_flight > 0)
            .map(|s| *s.cancel_key)
            .collect();
        for server in busy {
            // The client left mid-query: stop the server's work too.
            let timeout = self.shared.config.proxy.connect_timeout;
            crate::backend::connect::send_cancel(server.addr, server.key, timeout).await;
        }
        if let Some(replica) = self.replica.take() {
            replica.backend.terminate().await;
        }
        if let Some(primary) = self.primary.take() {
            primary.backend.terminate().await;
        }
        let _ = self.client.writer.shutdown().await;
        drop(self.registration);
    }

    /// A frame already read from any side, without waiting. Server frames
    /// first, so that responses drain before new work is taken.
    fn buffered_event(&mut self) -> Option<Event> {
        for target in [Target::Primary, Target::Replica] {
            if let Some(server) = self.server_mut(target) {
                match server.backend.buffered() {
                    Ok(None) => {}
                    other => return Some(Event::Server(target, other)),
                }
            }
        }
        if self.held.is_some() {
            return None;
        }
        match self.client.reader.buffered() {
            Ok(None) => None,
            other => Some(Event::Client(other)),
        }
    }

    /// Whether any server still owes the client responses.
    fn in_flight(&self) -> bool {
        [self.primary.as_ref(), self.replica.as_ref()].into_iter().flatten().any(|s| s.backend.in_flight > 0)
    }

    async fn flush_all(&mut self) -> Result<(), ProxyError> {
        for target in [Target::Primary, Target::Replica] {
            let Some(server) = self.server_mut(target) else { continue };
            if server.backend.has_output() && server.backend.flush().await.is_err() {
                return self.server_lost(target).await;
            }
        }
        self.client.flush().await
    }

    /// Waits for the next frame from any side. Every branch is cancel
    /// safe: frame readers only move bytes into their own buffers.
    async fn wait_event(&mut self) -> Event {
        let idle_timeout = self.shared.config.proxy.idle_client_timeout.filter(|_| self.bound.is_none());
        let idle = async {
            match idle_timeout {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        let tick_every = (self.watermark.is_pending()).then(|| self.shared.config.monitor.interval / 2);
        let tick = async {
            match tick_every {
                Some(every) => tokio::time::sleep(every).await,
                None => std::future::pending().await,
            }
        };
        let replica = async {
            match self.replica.as_mut() {
                Some(server) => server.backend.next().await,
                None => std::future::pending().await,
            }
        };
        let primary = async {
            match self.primary.as_mut() {
                Some(server) => server.backend.next().await,
                None => std::future::pending().await,
            }
        };
        let held = self.held.is_some();
        tokio::select! {
            frame = self.client.reader.next(), if !held => Event::Client(frame),
            frame = primary => Event::Server(Target::Primary, frame),
            frame = replica => Event::Server(Target::Replica, frame),
            () = tick => Event::WatermarkTick,
            () = idle => Event::IdleTimeout,
        }
    }

    async fn handle(&mut self, event: Event) -> Result<Flow, ProxyError> {
        match event {
            Event::Client(Ok(Some(frame))) => self.on_client(frame).await,
            Event::Client(Ok(None)) => Ok(Flow::End),
            Event::Client(Err(error)) => Err(error.into()),
            Event::Server(target, Ok(Some(frame))) => self.on_server(target, frame),
            Event::Server(target, Ok(None)) => self.server_lost(target).await.map(|()| Flow::Continue),
            Event::Server(target, Err(error)) => {
                let node = self.node_name(target);
                tracing::warn!(node, %error, "server broke the protocol");
                self.server_lost(target).await.map(|()| Flow::Continue)
            }
            Event::WatermarkTick => {
                self.refresh_watermark();
                Ok(Flow::Continue)
            }
            Event::IdleTimeout => Err(ProxyError::IdleTimeout),
        }
    }

    /// A server connection closed or failed. Losing the primary ends the
    /// session; losing a replica fails only the unit running there.
    async fn server_lost(&mut self, target: Target) -> Result<(), ProxyError> {
        let node = self.node_name(target);
        if target == Target::Primary {
            return Err(ProxyError::BackendLost { node });
        }
        tracing::warn!(node, "replica connection lost");
        let was_bound = self.bound == Some(Target::Replica);
        if let Some(lost) = self.replica.take() {
            self.shared.topology.suspect(lost.node);
        }
        if let (true, Some(unit)) = (was_bound, self.retry.take()) {
            // Nothing of this read reached the client yet: run it again on
            // the next eligible node, unnoticed.
            self.bound = None;
            self.open_batch = false;
            return self.dispatch(unit.frames, unit.classes, true).await;
        }
        if was_bound {
            self.bound = None;
            self.open_batch = false;
            let message = format!("connection to replica {node} was lost; the statement did not complete");
            let error = crate::protocol::backend::error_response(
                crate::protocol::backend::Severity::Error,
                crate::protocol::SqlState::ConnectionFailure,
                &message,
            );
            self.client.queue(&error);
            let status = self.primary.as_ref().map_or(b'I', |p| p.backend.tx_status);
            self.client.queue(&ready_for_query(status));
        }
        Ok(())
    }

    fn on_server(&mut self, target: Target, frame: Frame) -> Result<Flow, ProxyError> {
        let open_batch = self.open_batch;
        let no_primary = self.primary.is_none();
        let mut read_only = None;
        let Some(server) = self.server_mut(target) else { return Ok(Flow::Continue) };
        let mut latency = None;
        let mut finished = None;
        if server.backend.swallow(&frame) {
            return Ok(Flow::Continue);
        }
        if target == Target::Replica {
            self.retry = None;
        }
        let Some(server) = self.server_mut(target) else { return Ok(Flow::Continue) };
        let mut flow = Flow::Continue;
        match frame.tag() {
            b'Z' => {
                let status = ready_status(&frame)?;
                latency = server.started.pop_front().map(|started| {
                    server.load.done();
                    (server.node, started.elapsed())
                });
                let failed = std::mem::take(&mut server.unit_failed);
                finished = server.effects.pop_front().filter(|e| !failed && !e.is_empty());
                server.backend.in_flight = server.backend.in_flight.saturating_sub(1);
                server.backend.tx_status = status;
                let idle = server.backend.is_idle();
                if idle && !open_batch && self.bound == Some(target) {
                    self.bound = None;
                }
                if idle && target == Target::Primary {
                    self.primary_idle(Instant::now());
                }
            }
            b'S' if target == Target::Primary || no_primary => {
                if let Ok((name, value)) = crate::protocol::backend::parse_parameter_status(&frame) {
                    if name == "default_transaction_read_only" {
                        read_only = Some(value == "on");
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
                    server.backend.in_flight = server.backend.in_flight.saturating_sub(1);
                }
            }
            b'E' if !ErrorFields::parse(&frame)?.is_fatal() => server.unit_failed = true,
            b'E' => {
                if target == Target::Replica && self.bound != Some(Target::Replica) {
                    // An idle replica going away is not the client's business.
                    self.replica = None;
                    return Ok(Flow::Continue);
                }
                flow = Flow::End;
            }
            _ => {}
        }
        if let Some(effects) = finished {
            self.unit_done(target, &effects);
        }
        if let Some(read_only) = read_only {
            self.default_read_only = read_only;
        }
        if let Some((node, elapsed)) = latency {
            self.shared.metrics.query_latency(&self.shared.topology.nodes[node].config.name, elapsed);
        }
        self.shared.metrics.bytes(Direction::ServerToClient, frame.len());
        self.client.queue(&frame);
        Ok(flow)
    }

    /// A unit with session effects succeeded on `target`: record them.
    fn unit_done(&mut self, target: Target, effects: &[Arc<Classification>]) {
        let (state, ran_on, mut others) =
            unit::split_state(&mut self.state, self.primary.as_mut(), self.replica.as_mut(), target);
        let Some(ran_on) = ran_on else { return };
        let mut others: Vec<&mut ServerState> = others.iter_mut().map(|s| &mut s.state).collect();
        for class in effects {
            state.apply(class, &mut ran_on.state, &mut others);
        }
    }

    /// The primary finished its work: a write, if any, has committed.
    fn primary_idle(&mut self, at: Instant) {
        if !std::mem::take(&mut self.primary_dirty) {
            return;
        }
        if self.pinned_since.is_none()
            && self.shared.config.consistency.read_your_writes != ReadYourWrites::Off
        {
            self.pinned_since = Some(at);
            self.shared.metrics.pin_started();
        }
        match self.shared.config.consistency.read_your_writes {
            ReadYourWrites::Off => {}
            ReadYourWrites::Session => self.watermark.wrote(at),
            ReadYourWrites::Proxy => {
                self.watermark.wrote(at);
                self.shared.watermark.wrote(at);
            }
        }
    }

    /// The monitor's latest primary sample, for resolving watermarks.
    fn primary_sample(&self) -> Option<PrimarySample> {
        let node = self.shared.topology.primary(&self.cluster).ok()?;
        let status = self.shared.topology.nodes[node].status.load();
        Some(PrimarySample { sent_at: status.probe_sent?, lsn: status.insert_lsn? })
    }

    /// Resolves pending watermarks and reports a new one to the client as
    /// ParameterStatus `pgnear.write_lsn`.
    fn refresh_watermark(&mut self) {
        let proxy_scope = self.shared.config.consistency.read_your_writes == ReadYourWrites::Proxy;
        let pending =
            self.watermark.is_pending() || (proxy_scope && self.shared.watermark.get().is_pending());
        if !pending {
            return;
        }
        let sample = self.primary_sample();
        self.watermark.resolve(sample);
        self.shared.watermark.resolve(sample);
        let lsn = self.watermark.lsn();
        if lsn.is_some() && lsn != self.reported_lsn {
            self.reported_lsn = lsn;
            let value = lsn.map(|l| l.to_string()).unwrap_or_default();
            self.client.queue(&parameter_status("pgnear.write_lsn", &value));
        }
    }

    /// The watermark reads must respect under the configured scope.
    fn effective_watermark(&self) -> Watermark {
        match self.shared.config.consistency.read_your_writes {
            ReadYourWrites::Off => Watermark::default(),
            ReadYourWrites::Session => self.watermark,
            ReadYourWrites::Proxy => self.watermark.merge(self.shared.watermark.get()),
        }
    }

    fn node_name(&self, target: Target) -> String {
        match self.server(target) {
            Some(server) => self.shared.topology.nodes[server.node].config.name.clone(),
            None => String::from("replica"),
        }
    }

    fn server(&self, target: Target) -> Option<&Server> {
        match target {
            Target::Primary => self.primary.as_ref(),
            Target::Replica => self.replica.as_ref(),
        }
    }

    fn server_mut(&mut self, target: Target) -> Option<&mut Server> {
        match target {
            Target::Primary => self.primary.as_mut(),
            Target::Replica => self.replica.as_mut(),
        }
    }
}

/// A ParameterStatus saying new transactions are read-only by default.
fn is_read_only_default(frame: &Frame) -> bool {
    crate::protocol::backend::parse_parameter_status(frame)
        .is_ok_and(|(name, value)| name == "default_transaction_read_only" && value == "on")
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

/// The session's first server: the primary, or, while no primary is
/// reachable, a replica so that reads keep working.
async fn first_server(
    shared: &Shared,
    cluster: &str,
    login: &ServerLogin,
) -> Result<(Option<Server>, Option<Server>), ProxyError> {
    let view = crate::router::ClusterView::capture(&shared.topology);
    match view.primary(cluster) {
        Ok(node) => Ok((Some(open(shared, node, login).await?), None)),
        Err(no_primary) => match view.replica_for_startup(cluster) {
            Some(node) => {
                tracing::warn!(error = %no_primary, "starting the session on a replica: writes will fail until a primary is back");
                Ok((None, Some(open(shared, node, login).await?)))
            }
            None => Err(no_primary.into()),
        },
    }
}

async fn open(shared: &Shared, node: usize, login: &ServerLogin) -> Result<Server, ProxyError> {
    let addr = shared.topology.nodes[node].addr;
    let proxy = &shared.config.proxy;
    let tls = &shared.tls.connectors[node];
    let backend = connect(addr, tls, login, proxy.connect_timeout, proxy.max_message_bytes).await?;
    let cancel_key = Arc::new(ServerKey { addr, key: backend.key });
    let gauge = shared.metrics.backend_connection(&shared.topology.nodes[node].config.name);
    Ok(Server {
        backend,
        node,
        cancel_key,
        state: ServerState::default(),
        started: std::collections::VecDeque::new(),
        load: Load { node: shared.topology.nodes[node].outstanding.clone(), held: 0 },
        effects: std::collections::VecDeque::new(),
        carry: Vec::new(),
        unit_failed: false,
        _gauge: gauge,
    })
}
