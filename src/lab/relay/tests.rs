#![allow(clippy::unwrap_used)] // tests fail loudly

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use super::{delayed_pipe, Link, Relay};

const ONE_WAY: Duration = Duration::from_millis(50);
/// Bound on waiting for something that should happen promptly (not a latency assertion).
const PROMPTLY: Duration = Duration::from_secs(5);

/// An echo server on a free port; it lives as long as the test's runtime.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Duration {
    let started = Instant::now();
    stream.write_all(message).await.unwrap();
    let mut echoed = vec![0; message.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, message);
    started.elapsed()
}

/// Whether the peer has closed or reset the connection (a read gives EOF or an error).
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0; 1];
    matches!(timeout(PROMPTLY, stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn a_round_trip_takes_both_one_way_delays() {
    let relay = Relay::start(echo_server().await, ONE_WAY).await.unwrap();
    let mut stream = TcpStream::connect(relay.addr()).await.unwrap();
    let rtt = round_trip(&mut stream, b"ping").await;
    assert!(rtt >= 2 * ONE_WAY, "round trip took {rtt:?}");

    relay.set_delay(2 * ONE_WAY);
    assert_eq!(relay.delay(), 2 * ONE_WAY);
    let rtt = round_trip(&mut stream, b"pong").await;
    assert!(rtt >= 4 * ONE_WAY, "round trip after set_delay took {rtt:?}");
}

#[tokio::test]
async fn a_megabyte_passes_intact_with_jitter() {
    let relay = Relay::start(echo_server().await, Duration::from_millis(5)).await.unwrap();
    relay.set_jitter(Duration::from_millis(5));
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let stream = TcpStream::connect(relay.addr()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    read.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert!(echoed == payload, "{} bytes came back altered", echoed.len());
}

#[tokio::test]
async fn a_partition_cuts_connections_until_healed() {
    let relay = Relay::start(echo_server().await, Duration::from_millis(1)).await.unwrap();
    let mut before = TcpStream::connect(relay.addr()).await.unwrap();
    round_trip(&mut before, b"hello").await;

    relay.partition();
    assert!(is_closed(&mut before).await, "existing connection survived");
    // The kernel may complete the handshake, but the relay resets the connection at once.
    if let Ok(mut during) = TcpStream::connect(relay.addr()).await {
        let _ = during.write_all(b"x").await;
        assert!(is_closed(&mut during).await, "new connection was relayed");
    }

    relay.heal();
    let mut after = TcpStream::connect(relay.addr()).await.unwrap();
    round_trip(&mut after, b"again").await;
}

#[tokio::test]
async fn dropping_the_relay_closes_its_connections() {
    let relay = Relay::start(echo_server().await, Duration::ZERO).await.unwrap();
    let mut stream = TcpStream::connect(relay.addr()).await.unwrap();
    round_trip(&mut stream, b"hi").await;
    drop(relay);
    assert!(is_closed(&mut stream).await);
}

/// An `AsyncRead` that hands out one queued chunk per read, all immediately available.
struct Chunks(VecDeque<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(chunk) = self.0.pop_front() {
            buf.put_slice(&chunk);
        }
        Poll::Ready(Ok(()))
    }
}

fn link(delay: Duration, jitter: Duration) -> watch::Receiver<Link> {
    let (sender, receiver) = watch::channel(Link { delay, jitter, partitioned: false, cuts: 0 });
    // The pipe only reads the current value, which the receiver keeps after the sender goes.
    drop(sender);
    receiver
}

/// Pipes numbered chunks and returns what came out and how long it took.
async fn pipe_chunks(count: u16, link: watch::Receiver<Link>) -> (Vec<u8>, Vec<u8>, Duration) {
    let chunks: VecDeque<Vec<u8>> = (0..count).map(|i| i.to_be_bytes().to_vec()).collect();
    let expected: Vec<u8> = chunks.iter().flatten().copied().collect();
    let (mut out, sink) = tokio::io::duplex(1 << 20);
    let started = Instant::now();
    let pipe = tokio::spawn(async move { delayed_pipe(Chunks(chunks), sink, &link).await });
    let mut received = Vec::new();
    out.read_to_end(&mut received).await.unwrap();
    let elapsed = started.elapsed();
    pipe.await.unwrap().unwrap();
    (received, expected, elapsed)
}

#[tokio::test]
async fn queued_chunks_share_one_delay_instead_of_adding_up() {
    let delay = Duration::from_millis(100);
    let (received, expected, elapsed) = pipe_chunks(20, link(delay, Duration::ZERO)).await;
    assert_eq!(received, expected);
    assert!(elapsed >= delay, "chunks arrived after {elapsed:?}");
    // Serialised delays would take 20 x 100 ms; the bound leaves a 10x margin over one delay.
    assert!(elapsed < 10 * delay, "latency was serialised: {elapsed:?}");
}

#[tokio::test]
async fn jitter_never_reorders_bytes() {
    let jittery = link(Duration::from_millis(1), Duration::from_millis(30));
    let (received, expected, _) = pipe_chunks(500, jittery).await;
    assert_eq!(received, expected);
}
