//! A connection that is plain TCP, TLS, or a Unix-domain socket, toward a
//! client or a server. Toward clients TCP starts plain and may switch to
//! TLS in place during the handshake (SSLRequest or direct TLS). A Unix
//! socket never carries TLS, as in PostgreSQL: it does not leave the host.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use super::{end_point, Acceptor, Connector};

/// Plain TCP, TLS over TCP, or a Unix-domain socket.
#[derive(Debug)]
pub struct Stream {
    inner: Inner,
    /// tls-server-end-point channel binding data of this connection's
    /// server certificate (pgnear's own toward clients).
    end_point: Option<Arc<[u8]>>,
}

#[derive(Debug)]
enum Inner {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
    /// The TCP stream is inside a TLS handshake that failed or was
    /// interrupted: nothing can be read or written any more.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake did not finish")
}

impl Stream {
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream { inner: Inner::Plain(tcp), end_point: None }
    }

    pub fn unix(socket: UnixStream) -> Stream {
        Stream { inner: Inner::Unix(socket), end_point: None }
    }

    /// A Unix-domain socket, which never switches to TLS.
    pub fn is_unix(&self) -> bool {
        matches!(self.inner, Inner::Unix(_))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// Channel binding data, when TLS is on and the certificate allows it.
    pub fn end_point(&self) -> Option<Arc<[u8]>> {
        self.end_point.clone()
    }

    /// The protocol the TLS handshake agreed on with ALPN.
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.inner {
            Inner::Tls(tls) => tls.get_ref().1.alpn_protocol(),
            _ => None,
        }
    }

    /// The socket, if the connection is plain (not TLS).
    pub(super) fn into_plain(self) -> Result<Socket, Stream> {
        match self.inner {
            Inner::Plain(tcp) => Ok(Socket::Tcp(tcp)),
            Inner::Unix(unix) => Ok(Socket::Unix(unix)),
            inner => Err(Stream { inner, end_point: self.end_point }),
        }
    }

    /// The first byte the peer sent, without consuming it; `None` if the
    /// peer closed first or the stream is not plain TCP (TLS is not
    /// offered on a Unix socket). Cancel safe.
    pub async fn peek_first(&self) -> io::Result<Option<u8>> {
        let Inner::Plain(tcp) = &self.inner else { return Ok(None) };
        let mut byte = [0u8; 1];
        Ok((tcp.peek(&mut byte).await? == 1).then_some(byte[0]))
    }

    /// Performs the server side of a TLS handshake in place, with the
    /// acceptor's current certificate. Not cancel safe: a dropped
    /// handshake leaves the stream unusable.
    pub async fn accept(&mut self, acceptor: &Acceptor) -> io::Result<()> {
        let certified = acceptor.current();
        let Inner::Plain(tcp) = std::mem::replace(&mut self.inner, Inner::Detached) else {
            return Err(io::Error::other("the connection is not plain TCP"));
        };
        let tls = TlsAcceptor::from(certified.config.clone()).accept(tcp).await?;
        self.inner = Inner::Tls(Box::new(tls.into()));
        self.end_point = certified.end_point.clone();
        Ok(())
    }

    /// The client side of a TLS handshake toward a server.
    pub(super) async fn connect(tcp: TcpStream, connector: &Connector) -> io::Result<Stream> {
        let tls = TlsConnector::from(connector.config.clone()).connect(connector.name.clone(), tcp).await?;
        let end_point = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| end_point(cert))
            .map(Arc::from);
        Ok(Stream { inner: Inner::Tls(Box::new(tls.into())), end_point })
    }
}

/// A plain socket, TCP or Unix.
pub(super) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Each of the plain sockets, the same way.
macro_rules! on_socket {
    ($inner:expr, $socket:ident => $plain:expr, $tls:ident => $encrypted:expr, $detached:expr) => {
        match $inner {
            Inner::Plain($socket) => $plain,
            Inner::Unix($socket) => $plain,
            Inner::Tls($tls) => $encrypted,
            Inner::Detached => $detached,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        on_socket!(&mut self.get_mut().inner,
            socket => Pin::new(socket).poll_read(cx, buf),
            tls => Pin::new(tls.as_mut()).poll_read(cx, buf),
            Poll::Ready(Err(detached())))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_socket!(&mut self.get_mut().inner,
            socket => Pin::new(socket).poll_write(cx, buf),
            tls => Pin::new(tls.as_mut()).poll_write(cx, buf),
            Poll::Ready(Err(detached())))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_socket!(&mut self.get_mut().inner,
            socket => Pin::new(socket).poll_write_vectored(cx, bufs),
            tls => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
            Poll::Ready(Err(detached())))
    }

    fn is_write_vectored(&self) -> bool {
        on_socket!(&self.inner, socket => socket.is_write_vectored(), tls => tls.is_write_vectored(), false)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(&mut self.get_mut().inner,
            socket => Pin::new(socket).poll_flush(cx),
            tls => Pin::new(tls.as_mut()).poll_flush(cx),
            Poll::Ready(Ok(())))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(&mut self.get_mut().inner,
            socket => Pin::new(socket).poll_shutdown(cx),
            tls => Pin::new(tls.as_mut()).poll_shutdown(cx),
            Poll::Ready(Ok(())))
    }
}
