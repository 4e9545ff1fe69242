//! A connection that is plain TCP or TLS, toward a client or a server.
//! Toward clients it starts plain and may switch to TLS in place during
//! the handshake (SSLRequest or direct TLS).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use super::{end_point, Acceptor, Connector};

/// Plain TCP or TLS over TCP.
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

    /// The TCP stream, if the connection is plain (not TLS).
    pub(super) fn into_plain(self) -> Result<TcpStream, Stream> {
        match self.inner {
            Inner::Plain(tcp) => Ok(tcp),
            inner => Err(Stream { inner, end_point: self.end_point }),
        }
    }

    /// The first byte the peer sent, without consuming it; `None` if the
    /// peer closed first or the stream is already TLS. Cancel safe.
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

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Inner::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            Inner::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Inner::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            Inner::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Inner::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
            Inner::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(tcp) => tcp.is_write_vectored(),
            Inner::Tls(tls) => tls.is_write_vectored(),
            Inner::Detached => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Inner::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            Inner::Detached => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Inner::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            Inner::Detached => Poll::Ready(Ok(())),
        }
    }
}
