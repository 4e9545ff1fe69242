//! The client listeners (TCP, and a Unix-domain socket with
//! `proxy.unix_socket_dir`): accepts connections, enforces the connection
//! limit over both, runs one task per client, reloads the TLS certificate
//! on SIGHUP and drains on shutdown.
//!
//! Sessions are spread over `proxy.worker_threads` event loops, each a
//! single-threaded runtime on its own thread beside the accepting one (the
//! service loop, which also runs the monitor and the admin listener). A
//! session stays on its loop: its sockets are registered there, so a round
//! trip wakes one thread and no work is stolen across threads, as with
//! PgBouncer's `so_reuseport` processes, but sharing one configuration,
//! cluster view and set of pools. Session loops have no time driver: their
//! rare timers are served by the service loop's (`crate::clock`). That is
//! why even one worker is a loop of its own: on the service loop, every
//! park of the sessions' loop also turned the timer wheel, some 370
//! instructions per transaction.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::runtime::Handle;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::ProxyError;
use crate::frontend::handshake::{negotiate, Opening};
use crate::frontend::{serve, Peer, Shared};
use crate::tls::Stream;

mod unix;
pub use unix::UnixSocket;

/// An accepted connection, before it is a [`Stream`].
enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A [`Client`] between two event loops' reactors.
enum Moving {
    Tcp(std::net::TcpStream),
    Unix(StdUnixStream),
}

impl Client {
    fn into_stream(self) -> Stream {
        match self {
            Client::Tcp(tcp) => Stream::plain(tcp),
            Client::Unix(unix) => Stream::unix(unix),
        }
    }

    /// Leaves this loop's reactor.
    fn into_std(self) -> std::io::Result<Moving> {
        match self {
            Client::Tcp(tcp) => tcp.into_std().map(Moving::Tcp),
            Client::Unix(unix) => unix.into_std().map(Moving::Unix),
        }
    }
}

impl Moving {
    /// Joins the calling loop's reactor.
    fn register(self) -> std::io::Result<Stream> {
        match self {
            Moving::Tcp(tcp) => TcpStream::from_std(tcp).map(Stream::plain),
            Moving::Unix(unix) => UnixStream::from_std(unix).map(Stream::unix),
        }
    }
}

/// The next client on the Unix socket; never resolves without one.
/// Cancel safe.
async fn accept_unix(socket: Option<&UnixSocket>) -> std::io::Result<UnixStream> {
    match socket {
        Some(socket) => socket.listener().accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Accepts clients until `shutdown` turns true, then waits for running
/// sessions to finish, or closes them all when `close_now` turns true.
pub async fn run(
    listener: TcpListener,
    unix_socket: Option<UnixSocket>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    mut close_now: watch::Receiver<bool>,
) {
    let max_clients = shared.config().proxy.max_client_connections;
    shared.metrics.client_limit(max_clients);
    let limit = Arc::new(Semaphore::new(max_clients));
    let next_id = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    let loops = Loops::start(shared.config().proxy.workers());
    let mut hangup = hangup_signal();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    accept(Client::Tcp(stream), Peer::Tcp(peer), &shared, &limit, id, &mut sessions, &loops);
                }
                Err(error) => accept_failed(error).await,
            },
            accepted = accept_unix(unix_socket.as_ref()) => match accepted {
                Ok(stream) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    accept(Client::Unix(stream), Peer::Unix, &shared, &limit, id, &mut sessions, &loops);
                }
                Err(error) => accept_failed(error).await,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            Some(()) = recv(&mut hangup) => {
                // Off the accept loop: a reload derives SCRAM keys.
                let shared = shared.clone();
                tokio::spawn(async move { crate::frontend::reload::reload(&shared).await });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    drop(unix_socket);
    if !*close_now.borrow() {
        tracing::info!(sessions = sessions.len(), "draining client sessions");
    }
    let mut closing = false;
    // After a close, what is left once this has passed is aborted.
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        if !closing && *close_now.borrow_and_update() {
            closing = true;
            tracing::warn!(sessions = sessions.len(), "closing the remaining client sessions");
            // Each session tells its client (FATAL 57P01) and closes its
            // server connections, as PostgreSQL's own fast shutdown does.
            shared.cancels.close_all();
            grace = Some(Box::pin(crate::clock::sleep(CLOSE_GRACE)));
        }
        tokio::select! {
            joined = sessions.join_next() => if joined.is_none() { break },
            changed = close_now.changed(), if !closing => {
                if changed.is_err() {
                    // The proxy is gone, and with it the way to ask:
                    // stop listening and go on draining.
                    closing = true;
                }
            }
            () = async { if let Some(grace) = grace.as_mut() { grace.await } }, if grace.is_some() => {
                // Still in a handshake, or waiting on a server: dropped.
                sessions.abort_all();
                grace = None;
            }
        }
    }
    drop(loops);
}

/// EMFILE and friends: back off briefly instead of spinning.
async fn accept_failed(error: std::io::Error) {
    tracing::warn!(%error, "accept failed");
    crate::clock::sleep(std::time::Duration::from_millis(50)).await;
}

/// How long sessions asked to close may take to say so to their clients.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The session loops beside the service loop.
struct Loops {
    /// The service loop's sessions (only when no session loop started),
    /// then each session loop's.
    sessions: Vec<Arc<AtomicUsize>>,
    extra: Vec<Handle>,
    /// Dropped to stop the extra loops, once their sessions are done.
    _stop: oneshot::Sender<()>,
}

/// A session's place on its loop: counted while the session lives.
struct Seat(Arc<AtomicUsize>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Loops {
    /// Starts `workers` session loops beside the calling (service) loop.
    /// A loop that cannot start is logged and left out: its sessions run on
    /// the others, or on the service loop when none started.
    fn start(workers: usize) -> Loops {
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = stopped.shared();
        let service = Handle::current();
        // The loops log where the starting thread does: the binary's global
        // subscriber, or a scoped one when pgnear is embedded (as in the
        // tests), which other threads would not see.
        let logger = tracing::dispatcher::get_default(Clone::clone);
        let mut extra = Vec::new();
        for index in 1..=workers {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let stopped = stopped.clone();
            let service = service.clone();
            let logger = logger.clone();
            let spawned = std::thread::Builder::new().name(format!("pgnear-loop-{index}")).spawn(move || {
                let _logging = tracing::dispatcher::set_default(&logger);
                crate::clock::set_current_loop(index);
                crate::clock::serve_timers_from(service);
                match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                    Ok(runtime) => {
                        let _ = handle_tx.send(Ok(runtime.handle().clone()));
                        let _ = runtime.block_on(stopped);
                    }
                    Err(error) => {
                        let _ = handle_tx.send(Err(error));
                    }
                }
            });
            let started = match spawned {
                Ok(_) => {
                    handle_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("the loop thread exited")))
                }
                Err(error) => Err(error),
            };
            match started {
                Ok(handle) => extra.push(handle),
                Err(error) => {
                    tracing::error!(%error, index, "cannot start an event loop; running with fewer")
                }
            }
        }
        let sessions = (0..=extra.len()).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        Loops { sessions, extra, _stop: stop }
    }

    /// The session loop with the fewest sessions (0, the service loop,
    /// only when there is no other), and the new session's seat there.
    fn pick(&self) -> (usize, Seat) {
        let skip = usize::from(!self.extra.is_empty());
        let (index, count) = self
            .sessions
            .iter()
            .enumerate()
            .skip(skip)
            .min_by_key(|(_, count)| count.load(Ordering::Relaxed))
            .unwrap_or((0, &self.sessions[0]));
        count.fetch_add(1, Ordering::Relaxed);
        (index, Seat(count.clone()))
    }
}

/// SIGHUP, which reloads the configuration. Listened for from the start:
/// a process that is not listening for it would be ended by it.
fn hangup_signal() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: the configuration will not reload");
            None
        }
    }
}

/// The next signal; never resolves without one. Cancel safe.
async fn recv(signal: &mut Option<Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

fn accept(
    client: Client,
    peer: Peer,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
    id: u64,
    sessions: &mut JoinSet<()>,
    loops: &Loops,
) {
    let shared = shared.clone();
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        tracing::warn!(%peer, "connection refused: too many clients");
        sessions.spawn(refuse_over_limit(client.into_stream(), shared));
        return;
    };
    let (index, seat) = loops.pick();
    let Some(handle) = index.checked_sub(1).and_then(|i| loops.extra.get(i)) else {
        sessions.spawn(async move {
            serve(client.into_stream(), peer, shared, id).await;
            drop((seat, permit));
        });
        return;
    };
    // The socket moves to the other loop's reactor.
    let moving = match client.into_std() {
        Ok(moving) => moving,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot hand the connection to an event loop");
            return;
        }
    };
    sessions.spawn_on(
        async move {
            match moving.register() {
                Ok(stream) => serve(stream, peer, shared, id).await,
                Err(error) => tracing::warn!(%peer, %error, "cannot register the connection"),
            }
            drop((seat, permit));
        },
        handle,
    );
}

/// Answers a client over the connection limit the way PostgreSQL does:
/// after its startup packet (inside TLS if it asked for TLS), with 53300.
/// A CancelRequest is still forwarded: it is how a client gets out of a
/// query that holds its connection.
async fn refuse_over_limit(mut stream: Stream, shared: Arc<Shared>) {
    let timeout = shared.config().proxy.startup_timeout;
    let opening = crate::clock::timeout(timeout, negotiate(&mut stream, shared.tls.acceptor.as_ref())).await;
    match opening {
        Ok(Ok(Opening::Startup(_))) => {}
        Ok(Ok(Opening::Cancel(key))) => {
            return shared.cancels.cancel(key, &shared.topology, shared.config().proxy.connect_timeout).await
        }
        Ok(Err(error)) => return crate::frontend::refuse(&mut stream, &error).await,
        Ok(Ok(Opening::Closed)) | Err(_) => return,
    }
    let error = ProxyError::TooManyClients(shared.config().proxy.max_client_connections);
    if let Some(frame) = error.to_frame() {
        let _ = stream.write_all(frame.raw()).await;
    }
    let _ = stream.shutdown().await;
}
