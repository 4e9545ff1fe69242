//! The client listener: accepts connections, enforces the connection
//! limit, runs one task per client, reloads the TLS certificate on SIGHUP
//! and drains on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::ProxyError;
use crate::frontend::handshake::{negotiate, Opening};
use crate::frontend::{serve, Shared};
use crate::tls::Stream;

/// Accepts clients until `shutdown` turns true, then waits for running
/// sessions to finish.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(shared.config.proxy.max_client_connections));
    let next_id = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
    let mut hangup = hangup_signal(&shared);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    accept(stream, peer, &shared, &limit, id, &mut sessions);
                }
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            Some(()) = recv(&mut hangup) => reload_certificate(&shared),
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(sessions = sessions.len(), "draining client sessions");
    while sessions.join_next().await.is_some() {}
}

/// SIGHUP, when there is a certificate to reload.
fn hangup_signal(shared: &Shared) -> Option<Signal> {
    shared.tls.acceptor.as_ref()?;
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP: the TLS certificate will not reload");
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

/// New handshakes use the new certificate; running sessions keep theirs.
fn reload_certificate(shared: &Shared) {
    let Some(acceptor) = &shared.tls.acceptor else { return };
    match acceptor.reload() {
        Ok(()) => tracing::info!("TLS certificate reloaded"),
        Err(error) => tracing::error!(%error, "TLS certificate reload failed; keeping the previous one"),
    }
}

fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    limit: &Arc<Semaphore>,
    id: u64,
    sessions: &mut JoinSet<()>,
) {
    let _ = stream.set_nodelay(true);
    let shared = shared.clone();
    let stream = Stream::plain(stream);
    match limit.clone().try_acquire_owned() {
        Ok(permit) => {
            sessions.spawn(async move {
                serve(stream, peer, shared, id).await;
                drop(permit);
            });
        }
        Err(_) => {
            tracing::warn!(%peer, "connection refused: too many clients");
            sessions.spawn(refuse_over_limit(stream, shared));
        }
    }
}

/// Answers a client over the connection limit the way PostgreSQL does:
/// after its startup packet (inside TLS if it asked for TLS), with 53300.
/// A CancelRequest is still forwarded: it is how a client gets out of a
/// query that holds its connection.
async fn refuse_over_limit(mut stream: Stream, shared: Arc<Shared>) {
    let timeout = shared.config.proxy.startup_timeout;
    let opening = tokio::time::timeout(timeout, negotiate(&mut stream, shared.tls.acceptor.as_ref())).await;
    match opening {
        Ok(Ok(Opening::Startup(_))) => {}
        Ok(Ok(Opening::Cancel(key))) => {
            return shared.cancels.cancel(key, shared.config.proxy.connect_timeout).await
        }
        Ok(Err(error)) => return crate::frontend::refuse(&mut stream, &error).await,
        Ok(Ok(Opening::Closed)) | Err(_) => return,
    }
    let error = ProxyError::TooManyClients(shared.config.proxy.max_client_connections);
    if let Some(frame) = error.to_frame() {
        let _ = stream.write_all(frame.raw()).await;
    }
    let _ = stream.shutdown().await;
}
