//! Splitting a [`Stream`] into a read half and a write half that a session
//! polls independently. Plain TCP splits into tokio's owned halves, which
//! share the socket without a lock; TLS needs one state machine for both
//! directions, so it goes through `tokio::io::split` and its lock.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::Stream;

/// Anything a session can split into independently polled halves.
pub trait Split: AsyncRead + AsyncWrite + Sized {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;

    fn split(self) -> (Self::Read, Self::Write);
}

/// The read half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Locked(tokio::io::ReadHalf<Stream>),
}

/// The write half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Locked(tokio::io::WriteHalf<Stream>),
}

impl Split for Stream {
    type Read = ReadHalf;
    type Write = WriteHalf;

    fn split(self) -> (ReadHalf, WriteHalf) {
        match self.into_plain() {
            Ok(tcp) => {
                let (read, write) = tcp.into_split();
                (ReadHalf::Plain(read), WriteHalf::Plain(write))
            }
            Err(stream) => {
                let (read, write) = tokio::io::split(stream);
                (ReadHalf::Locked(read), WriteHalf::Locked(write))
            }
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(half) => Pin::new(half).poll_read(cx, buf),
            ReadHalf::Locked(half) => Pin::new(half).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_write(cx, buf),
            WriteHalf::Locked(half) => Pin::new(half).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_flush(cx),
            WriteHalf::Locked(half) => Pin::new(half).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(half) => Pin::new(half).poll_shutdown(cx),
            WriteHalf::Locked(half) => Pin::new(half).poll_shutdown(cx),
        }
    }
}
