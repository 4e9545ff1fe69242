//! The client listener: accepts connections, enforces the connection
//! limit, runs one task per client and drains on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::error::ProxyError;
use crate::frontend::{serve, Shared};
use crate::protocol::startup::{read_startup, StartupRequest};

/// Accepts clients until `shutdown` turns true, then waits for running
/// sessions to finish.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(shared.config.proxy.max_client_connections));
    let next_id = AtomicU64::new(1);
    let mut sessions = JoinSet::new();
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
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(sessions = sessions.len(), "draining client sessions");
    while sessions.join_next().await.is_some() {}
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
/// after its startup packet, with 53300.
async fn refuse_over_limit(mut stream: TcpStream, shared: Arc<Shared>) {
    let read = async {
        loop {
            match read_startup(&mut stream).await {
                Ok(Some(StartupRequest::Ssl | StartupRequest::GssEnc)) => {
                    stream.write_all(b"N").await.ok()?
                }
                Ok(Some(_)) => return Some(()),
                _ => return None,
            }
        }
    };
    if tokio::time::timeout(shared.config.proxy.startup_timeout, read).await.ok().flatten().is_none() {
        return;
    }
    let error = ProxyError::TooManyClients(shared.config.proxy.max_client_connections);
    if let Some(frame) = error.to_frame() {
        let _ = stream.write_all(frame.raw()).await;
    }
    let _ = stream.shutdown().await;
}
