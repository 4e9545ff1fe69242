//! One client session after authentication: the relay loop.
//!
//! The loop waits on the client and on every open server connection at
//! once. Client messages are grouped into units of work: one simple Query,
//! or an extended-protocol batch up to Sync. Each unit is routed as a
//! whole, and a unit (or a transaction) stays on one server until its
//! ReadyForQuery says that server is idle. Server messages are relayed as
//! they arrive, and flushed to the client once per read batch.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::cancel::{Registration, ServerKey};
use super::handshake::Login;
use super::Shared;
use crate::backend::{connect, Backend, ServerLogin};
use crate::error::ProxyError;
use crate::protocol::backend::{backend_key_data, ready_for_query, ready_status, ErrorFields};
use crate::protocol::{Frame, FrameReader, ProtocolError};

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
    Client(Option<Frame>),
    Server(Target, Option<Frame>),
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
            self.out.clear();
        }
        Ok(())
    }
}

/// A server connection with the key a cancel should use.
struct Server {
    backend: Backend,
    node: usize,
    cancel_key: Arc<ServerKey>,
}

/// An authenticated client and its server connections.
pub struct Session<S> {
    shared: Arc<Shared>,
    client: Client<S>,
    login: ServerLogin,
    cluster: String,
    primary: Server,
    replica: Option<Server>,
    /// Where the current unit of work runs. Set when a unit starts and
    /// cleared when that server reports idle.
    bound: Option<Target>,
    /// A Flush sent part of a batch ahead of its Sync: stay bound.
    open_batch: bool,
    /// Extended-protocol messages waiting for their Sync to be routed.
    batch: Vec<Frame>,
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
        let limit = shared.config.proxy.max_message_bytes;
        let server_login = ServerLogin {
            user: login.user.server_user.clone(),
            password: login.user.server_password.clone(),
            params: server_params(&login),
        };
        let opened = match shared.topology.primary(&cluster) {
            Ok(node) => open(&shared, node, &server_login).await,
            Err(no_primary) => Err(no_primary.into()),
        };
        let primary = match opened {
            Ok(primary) => primary,
            Err(error) => {
                super::refuse(&mut stream, &error).await;
                return Err(error);
            }
        };
        let registration = shared.cancels.register(primary.backend.key.pid);
        let (read, writer) = tokio::io::split(stream);
        let mut client = Client {
            reader: FrameReader::with_buffered(read, limit, login.buffered),
            writer,
            out: BytesMut::with_capacity(16 * 1024),
        };
        for frame in &primary.backend.startup_params {
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
            primary,
            replica: None,
            bound: None,
            open_batch: false,
            batch: Vec::new(),
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
            let event = match self.buffered_event()? {
                Some(event) => event,
                None => {
                    self.flush_all().await?;
                    self.wait_event().await?
                }
            };
            if self.handle(event).await? == Flow::End {
                return self.client.flush().await;
            }
            if self.client.out.len() >= FLUSH_AT {
                self.client.flush().await?;
            }
        }
    }

    async fn close(mut self) {
        let busy = [Some(&self.primary), self.replica.as_ref()]
            .into_iter()
            .flatten()
            .filter(|s| s.backend.in_flight > 0)
            .map(|s| *s.cancel_key)
            .collect::<Vec<_>>();
        for server in busy {
            // The client left mid-query: stop the server's work too.
            crate::backend::connect::send_cancel(
                server.addr,
                server.key,
                self.shared.config.proxy.connect_timeout,
            )
            .await;
        }
        if let Some(replica) = self.replica.take() {
            replica.backend.terminate().await;
        }
        self.primary.backend.terminate().await;
        let _ = self.client.writer.shutdown().await;
        drop(self.registration);
    }

    /// A frame already read from any side, without waiting.
    fn buffered_event(&mut self) -> Result<Option<Event>, ProxyError> {
        let node = |s: &Server| s.backend.addr.to_string();
        if let Some(frame) =
            self.primary.backend.buffered().map_err(|e| backend_err(node(&self.primary), e))?
        {
            return Ok(Some(Event::Server(Target::Primary, Some(frame))));
        }
        if let Some(replica) = self.replica.as_mut() {
            if let Some(frame) = replica.backend.buffered().map_err(|e| backend_err(node(replica), e))? {
                return Ok(Some(Event::Server(Target::Replica, Some(frame))));
            }
        }
        Ok(self.client.reader.buffered()?.map(|f| Event::Client(Some(f))))
    }

    async fn flush_all(&mut self) -> Result<(), ProxyError> {
        let lost = |s: &Server| ProxyError::BackendLost { node: s.backend.addr.to_string() };
        if self.primary.backend.has_output() {
            self.primary.backend.flush().await.map_err(|_| lost(&self.primary))?;
        }
        if let Some(replica) = self.replica.as_mut() {
            if replica.backend.has_output() {
                replica.backend.flush().await.map_err(|_| lost(replica))?;
            }
        }
        self.client.flush().await
    }

    /// Waits for the next frame from any side. Every branch is cancel
    /// safe: frame readers only move bytes into their own buffers.
    async fn wait_event(&mut self) -> Result<Event, ProxyError> {
        let idle_timeout = self.shared.config.proxy.idle_client_timeout.filter(|_| self.bound.is_none());
        let idle = async {
            match idle_timeout {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        let replica = async {
            match self.replica.as_mut() {
                Some(server) => server.backend.next().await,
                None => std::future::pending().await,
            }
        };
        let primary_node = self.primary.backend.addr;
        tokio::select! {
            frame = self.client.reader.next() => Ok(Event::Client(frame?)),
            frame = self.primary.backend.next() => frame
                .map(|f| Event::Server(Target::Primary, f))
                .map_err(|e| backend_err(primary_node.to_string(), e)),
            frame = replica => frame
                .map(|f| Event::Server(Target::Replica, f))
                .map_err(|e| ProxyError::BackendProtocol { node: "replica".into(), source: e }),
            () = idle => Ok(Event::IdleTimeout),
        }
    }

    async fn handle(&mut self, event: Event) -> Result<Flow, ProxyError> {
        match event {
            Event::Client(Some(frame)) => self.on_client(frame).await,
            Event::Client(None) => Ok(Flow::End),
            Event::Server(target, Some(frame)) => self.on_server(target, frame),
            Event::Server(target, None) => {
                let node = self.server(target).map(|s| self.node_name(s)).unwrap_or_default();
                Err(ProxyError::BackendLost { node })
            }
            Event::IdleTimeout => Err(ProxyError::IdleTimeout),
        }
    }

    async fn on_client(&mut self, frame: Frame) -> Result<Flow, ProxyError> {
        match frame.tag() {
            b'Q' => {
                crate::protocol::frontend::query_text(&frame)?;
                self.send_unit(vec![frame]).await?;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => {
                if let Some(target) = self.bound {
                    self.forward(target, &frame);
                } else {
                    self.batch.push(frame);
                }
            }
            b'H' => self.on_flush(frame).await?,
            b'S' => self.on_sync(frame).await?,
            // Outside COPY the server ignores these, and so do we.
            b'd' | b'c' | b'f' => {
                if let Some(target) = self.bound {
                    self.forward(target, &frame);
                }
            }
            b'F' => self.send_unit(vec![frame]).await?,
            b'X' => return Ok(Flow::End),
            tag => {
                return Err(ProtocolError::Unexpected {
                    tag: tag as char,
                    when: "from a client in a session",
                }
                .into())
            }
        }
        Ok(Flow::Continue)
    }

    async fn on_flush(&mut self, frame: Frame) -> Result<(), ProxyError> {
        if self.bound.is_none() && !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let target = self.begin_unit(&batch).await?;
            self.open_batch = true;
            for f in &batch {
                self.forward(target, f);
            }
        }
        if let Some(target) = self.bound {
            self.forward(target, &frame);
        }
        Ok(())
    }

    async fn on_sync(&mut self, frame: Frame) -> Result<(), ProxyError> {
        if self.bound.is_some() {
            self.open_batch = false;
            let target = self.bound.unwrap_or(Target::Primary);
            self.forward(target, &frame);
            self.server_mut(target).backend.in_flight += 1;
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.batch);
        batch.push(frame);
        self.send_unit(batch).await
    }

    /// Routes a complete unit (ending in Query, Sync or FunctionCall) and
    /// sends it.
    async fn send_unit(&mut self, unit: Vec<Frame>) -> Result<(), ProxyError> {
        let target = match self.bound {
            Some(target) => target,
            None => self.begin_unit(&unit).await?,
        };
        for frame in &unit {
            self.forward(target, frame);
        }
        self.server_mut(target).backend.in_flight += 1;
        Ok(())
    }

    /// Picks the server for a new unit, opens it if needed and binds the
    /// session to it until it is idle again.
    async fn begin_unit(&mut self, _unit: &[Frame]) -> Result<Target, ProxyError> {
        let target = Target::Primary;
        self.ensure_open(target).await?;
        let server = self.server(target).map(|s| s.cancel_key.clone());
        if let Some(key) = server {
            self.registration.target.set(&key);
        }
        self.bound = Some(target);
        Ok(target)
    }

    async fn ensure_open(&mut self, target: Target) -> Result<(), ProxyError> {
        if target == Target::Replica && self.replica.is_none() {
            let Some(node) = self.replica_node() else {
                return Err(ProxyError::Unsupported("no replica available".into()));
            };
            self.replica = Some(open(&self.shared, node, &self.login).await?);
        }
        Ok(())
    }

    fn replica_node(&self) -> Option<usize> {
        let topology = &self.shared.topology;
        topology.nodes.iter().enumerate().find_map(|(i, n)| {
            let status = n.status.load();
            let ok =
                n.config.cluster == self.cluster && status.up && status.role == crate::cluster::Role::Replica;
            ok.then_some(i)
        })
    }

    fn forward(&mut self, target: Target, frame: &Frame) {
        self.server_mut(target).backend.queue(frame);
    }

    fn on_server(&mut self, target: Target, frame: Frame) -> Result<Flow, ProxyError> {
        let open_batch = self.open_batch;
        let server = self.server_mut(target);
        if server.backend.swallow(&frame) {
            return Ok(Flow::Continue);
        }
        let mut flow = Flow::Continue;
        match frame.tag() {
            b'Z' => {
                let status =
                    ready_status(&frame).map_err(|e| backend_err(server.backend.addr.to_string(), e))?;
                server.backend.in_flight = server.backend.in_flight.saturating_sub(1);
                server.backend.tx_status = status;
                if server.backend.is_idle() && !open_batch && self.bound == Some(target) {
                    self.bound = None;
                }
            }
            b'E' => {
                let fields = ErrorFields::parse(&frame)
                    .map_err(|e| backend_err(server.backend.addr.to_string(), e))?;
                if fields.is_fatal() {
                    flow = Flow::End;
                }
            }
            _ => {}
        }
        self.client.queue(&frame);
        Ok(flow)
    }

    /// The configured name of a server's node, for errors and logs.
    fn node_name(&self, server: &Server) -> String {
        self.shared.topology.nodes[server.node].config.name.clone()
    }

    fn server(&self, target: Target) -> Option<&Server> {
        match target {
            Target::Primary => Some(&self.primary),
            Target::Replica => self.replica.as_ref(),
        }
    }

    fn server_mut(&mut self, target: Target) -> &mut Server {
        match (target, self.replica.as_mut()) {
            (Target::Replica, Some(replica)) => replica,
            _ => &mut self.primary,
        }
    }
}

fn backend_err(node: String, source: ProtocolError) -> ProxyError {
    ProxyError::BackendProtocol { node, source }
}

/// The startup parameters a server sees: the client's own, minus `user`
/// (the server user replaces it) and pgnear's own settings.
fn server_params(login: &Login) -> Vec<(String, String)> {
    let mut params: Vec<(String, String)> = login.params.clone();
    if login.param("database").is_none() {
        params.push(("database".into(), login.user.name.clone()));
    }
    params
}

async fn open(shared: &Shared, node: usize, login: &ServerLogin) -> Result<Server, ProxyError> {
    let addr = shared.topology.nodes[node].addr;
    let proxy = &shared.config.proxy;
    let backend = connect(addr, login, proxy.connect_timeout, proxy.max_message_bytes).await?;
    let cancel_key = Arc::new(ServerKey { addr, key: backend.key });
    Ok(Server { backend, node, cancel_key })
}
