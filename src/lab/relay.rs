//! A TCP relay that delays every byte by a one-way latency: a WAN link on loopback, since the
//! lab kernel has no netem.
//!
//! Each accepted connection gets one task that dials the target and pumps both directions.
//! A direction is a reader and a writer joined by a bounded channel: the reader stamps each
//! chunk with the instant it is due (`read time + delay + jitter`), and the writer sleeps until
//! that instant and writes it. Later chunks queue up meanwhile, so latency is added without
//! limiting throughput to one chunk per delay. Delay, jitter and partitions live in one watch
//! channel that every task reads; a change applies to bytes read after it, on existing and new
//! connections alike.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};

#[cfg(test)]
mod tests;

/// Bytes asked of the kernel per read; one read becomes one delayed chunk.
const READ_CHUNK: usize = 64 * 1024;
/// Chunks a direction holds in flight before the reader stops reading (backpressure).
const IN_FLIGHT_CHUNKS: usize = 1024;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The simulated link, shared by the accept task and every connection task.
#[derive(Debug, Clone, Copy)]
struct Link {
    delay: Duration,
    jitter: Duration,
    /// While true, new connections are reset as soon as they are accepted.
    partitioned: bool,
    /// Incremented by every partition; a connection older than the latest cut is reset, even
    /// if the link healed before its task noticed.
    cuts: u64,
}

impl Link {
    /// The delay for a chunk read now: `delay` plus a uniform `0..=jitter`.
    fn sample_delay(&self) -> Duration {
        if self.jitter.is_zero() {
            return self.delay;
        }
        let max = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
        self.delay + Duration::from_nanos(rand::rng().random_range(0..=max))
    }
}

/// A delaying TCP relay on `127.0.0.1:<free port>` in front of one target address.
///
/// Dropping it stops accepting and aborts every relayed connection.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    /// The link settings; connection tasks hold receivers and read it per chunk.
    link: watch::Sender<Link>,
    /// Owns the connection tasks (in a `JoinSet`), so aborting it aborts them all.
    accept: JoinHandle<()>,
}

// === impl Relay ===

impl Relay {
    /// Listens on 127.0.0.1 port 0 and relays every connection to `target`, delaying each
    /// direction by `one_way_delay` (a round trip gains twice that).
    pub async fn start(target: SocketAddr, one_way_delay: Duration) -> io::Result<Relay> {
        Relay::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), target, one_way_delay).await
    }

    /// As [`Relay::start`], listening on `listen` (another loopback
    /// address, a chosen port: a host name that moves between servers).
    pub async fn start_on(
        listen: SocketAddr,
        target: SocketAddr,
        one_way_delay: Duration,
    ) -> io::Result<Relay> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (link, watcher) = watch::channel(Link {
            delay: one_way_delay,
            jitter: Duration::ZERO,
            partitioned: false,
            cuts: 0,
        });
        let accept = tokio::spawn(accept_loop(listener, target, watcher));
        Ok(Relay { addr, target, link, accept })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where connections are relayed to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The current one-way delay.
    pub fn delay(&self) -> Duration {
        self.link.borrow().delay
    }

    /// Changes the one-way delay for bytes read from now on, on every connection.
    pub fn set_delay(&self, one_way: Duration) {
        self.link.send_modify(|link| link.delay = one_way);
    }

    /// Adds a uniform random `0..=jitter` to each chunk's delay. Bytes are never reordered:
    /// a chunk is never due before the one read ahead of it.
    pub fn set_jitter(&self, jitter: Duration) {
        self.link.send_modify(|link| link.jitter = jitter);
    }

    /// Cuts the link: resets every relayed connection and resets new ones on accept, until
    /// [`heal`](Self::heal).
    pub fn partition(&self) {
        self.link.send_modify(|link| {
            link.partitioned = true;
            link.cuts += 1;
        });
    }

    /// Relays new connections again; connections cut by the partition stay closed.
    pub fn heal(&self) {
        self.link.send_modify(|link| link.partitioned = false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Accepts until aborted, spawning one task per connection into a `JoinSet` that dies with it.
async fn accept_loop(listener: TcpListener, target: SocketAddr, link: watch::Receiver<Link>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) if link.borrow().partitioned => reset(client),
                Ok((client, _)) => {
                    connections.spawn(relay_connection(client, target, link.clone()));
                }
                Err(error) => {
                    tracing::debug!(%error, "relay accept failed");
                    sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Relays one connection until both sides have closed, either fails, or the link is cut.
async fn relay_connection(mut client: TcpStream, target: SocketAddr, mut link: watch::Receiver<Link>) {
    let born = link.borrow().cuts;
    let server = tokio::select! {
        server = TcpStream::connect(target) => server,
        () = cut(&mut link, born) => return reset(client),
    };
    let mut server = match server {
        Ok(server) => server,
        Err(error) => {
            tracing::debug!(%error, %target, "relay could not reach its target");
            return reset(client);
        }
    };
    // Without this, Nagle's algorithm would add its own delay on top of ours.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reader = link.clone();
    let was_cut = tokio::select! {
        result = splice(&mut client, &mut server, &reader) => {
            if let Err(error) = result {
                tracing::debug!(%error, "relayed connection failed");
            }
            false
        }
        () = cut(&mut link, born) => true,
    };
    if was_cut {
        reset(client);
        reset(server);
    }
}

/// Resolves once the link has been cut after `born` (or the relay is gone). Cancel safe.
async fn cut(link: &mut watch::Receiver<Link>, born: u64) {
    let _ = link.wait_for(|link| link.cuts != born).await;
}

/// Closes with RST, so the peer sees a reset rather than a clean end of stream.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Pumps both directions through delayed pipes until both have finished or one fails.
async fn splice(
    client: &mut TcpStream,
    server: &mut TcpStream,
    link: &watch::Receiver<Link>,
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(
        delayed_pipe(client_read, server_write, link),
        delayed_pipe(server_read, client_write, link),
    )?;
    Ok(())
}

/// Copies `from` to `to`, writing each chunk no sooner than its delay after it was read, then
/// shuts down `to`'s write side once `from` reaches end of stream (half-close).
async fn delayed_pipe<R, W>(mut from: R, mut to: W, link: &watch::Receiver<Link>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (chunks, mut due) = mpsc::channel::<(Instant, Bytes)>(IN_FLIGHT_CHUNKS);
    let read = async move {
        let mut buf = BytesMut::new();
        let mut previous = Instant::now();
        loop {
            buf.reserve(READ_CHUNK);
            if from.read_buf(&mut buf).await? == 0 {
                return Ok::<_, io::Error>(()); // dropping `chunks` tells the writer
            }
            let delay = link.borrow().sample_delay();
            // Jitter must not let a chunk overtake the one before it.
            previous = previous.max(Instant::now() + delay);
            if chunks.send((previous, buf.split().freeze())).await.is_err() {
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((deadline, chunk)) = due.recv().await {
            sleep_until(deadline).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write)?;
    Ok(())
}
