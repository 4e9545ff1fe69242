//! Splitting a [`Stream`] into a read half and a write half that a session
//! polls independently. A plain socket (TCP or Unix) splits into tokio's
//! owned halves, which share the socket without a lock; TLS needs one state machine for both
//! directions, so it goes through `tokio::io::split` and its lock.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{tcp, unix};

use super::stream::Socket;
use super::Stream;

/// Anything a session can split into independently polled halves.
pub trait Split: AsyncRead + AsyncWrite + Sized {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + WriteNow + Unpin + Send + 'static;

    fn split(self) -> (Self::Read, Self::Write);
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Plain(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    Locked(tokio::io::ReadHalf<Stream>),
}

/// The write half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf {
    Plain(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Locked(tokio::io::WriteHalf<Stream>),
}

impl Split for Stream {
    type Read = ReadHalf;
    type Write = WriteHalf;

    fn split(self) -> (ReadHalf, WriteHalf) {
        match self.into_plain() {
            Ok(Socket::Tcp(tcp)) => {
                let (read, write) = tcp.into_split();
                (ReadHalf::Plain(read), WriteHalf::Plain(write))
            }
            Ok(Socket::Unix(unix)) => {
                let (read, write) = unix.into_split();
                (ReadHalf::Unix(read), WriteHalf::Unix(write))
            }
            Err(stream) => {
                let (read, write) = tokio::io::split(stream);
                (ReadHalf::Locked(read), WriteHalf::Locked(write))
            }
        }
    }
}

/// A write that either happens at once or would block.
pub trait WriteNow {
    /// Writes what the socket takes of `buf` now, without registering for
    /// readiness; `WouldBlock` when nothing can be written that way.
    fn write_now(&mut self, buf: &[u8]) -> io::Result<usize>;
}

impl WriteNow for WriteHalf {
    fn write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WriteHalf::Plain(half) => half.try_write(buf),
            WriteHalf::Unix(half) => half.try_write(buf),
            // TLS records go through the stream's state machine.
            WriteHalf::Locked(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// Writes all of `buf` and flushes it. A plain socket nearly always takes
/// a relayed batch at once: written directly, it costs one send, without
/// a future, the task's budget or a readiness check; the rest (a full
/// socket buffer, TLS) waits as `write_all` does.
pub async fn send_all<W: AsyncWrite + WriteNow + Unpin>(writer: &mut W, buf: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < buf.len() {
        match writer.write_now(&buf[sent..]) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(error) if matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                break
            }
            Err(error) => return Err(error),
        }
    }
    if sent == buf.len() && sent > 0 {
        // Only a plain socket writes now, and it has nothing to flush.
        return Ok(());
    }
    writer.write_all(&buf[sent..]).await?;
    // TLS holds records back until flushed.
    writer.flush().await
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(half) => Pin::new(half).poll_read(cx, buf),
            ReadHalf::Unix(half) => Pin::new(half).poll_read(cx, buf),
            ReadHalf::Locked(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_write(cx, buf),
            WriteHalf::Unix(half) => Pin::new(half).poll_write(cx, buf),
            WriteHalf::Locked(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_flush(cx),
            WriteHalf::Unix(half) => Pin::new(half).poll_flush(cx),
            WriteHalf::Locked(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Unix(half) => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Locked(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// More than a loopback socket's buffers hold, to a reader that waits
    /// before reading: the direct write fills the socket, and the rest
    /// goes through the waiting path, in order.
    #[tokio::test]
    async fn send_all_finishes_a_write_the_socket_cannot_take_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (read, mut write) = Stream::plain(client.expect("connect")).split();
        let mut peer = accepted.expect("accept").0;
        let payload: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        assert!(matches!(write, WriteHalf::Plain(_)));
        let first = write.write_now(&payload).expect("a direct write");
        assert!(0 < first && first < payload.len(), "the socket took {first} bytes at once");
        let reader = tokio::spawn(async move {
            tokio::task::yield_now().await;
            let mut received = Vec::new();
            peer.read_to_end(&mut received).await.expect("read");
            received
        });
        send_all(&mut write, &payload[first..]).await.expect("send_all");
        drop(write);
        drop(read);
        assert!(reader.await.expect("reader") == payload, "the bytes arrived whole and in order");
    }
}
