//! Opening a server connection: TCP (TLS as the node's `sslmode` says) or
//! a Unix socket (never TLS, as in libpq), startup, authentication, and
//! the server's ParameterStatus and BackendKeyData, up to ReadyForQuery.

use std::time::Duration;

use bytes::BytesMut;
use std::sync::Arc;

use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::Backend;
use crate::auth::scram::{ScramClient, ScramKeys};
use crate::cluster::Endpoint;
use crate::config::{Secret, SslMode};
use crate::protocol::backend::{parse_backend_key, ErrorFields};
use crate::protocol::frame::{cstr, int32};
use crate::protocol::startup::ssl_request;
use crate::protocol::{Frame, FrameReader, ProtocolError};
use crate::tls::{Connector, ReadHalf, Split, Stream, WriteHalf};

type ServerReader = FrameReader<ReadHalf>;

/// How pgnear proves itself to a server.
#[derive(Debug, Clone, Default)]
pub enum ServerAuth {
    /// Nothing: the server is expected to trust pgnear.
    #[default]
    None,
    Password(Secret),
    /// md5 passthrough: the stored `md5...` secret answers an md5 challenge.
    Md5(Secret),
    /// SCRAM passthrough: the keys the client's own exchange proved.
    Scram(Arc<ScramKeys>),
}

/// Who to log in as, and with which parameters.
#[derive(Debug, Clone)]
pub struct ServerLogin {
    pub user: String,
    pub auth: ServerAuth,
    /// The user's `max_user_connections`, if it has its own.
    pub max_connections: Option<usize>,
    /// Startup parameters other than `user`, in the client's order.
    pub params: Vec<(String, String)>,
}

impl ServerLogin {
    /// A startup parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a server connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Io { addr: Endpoint, source: std::io::Error },
    #[error("timed out connecting to {0}")]
    Timeout(Endpoint),
    /// The node's host name does not resolve (the error names the node).
    #[error("{0}")]
    Resolve(std::io::Error),
    #[error("server at {0} does not accept TLS, which its sslmode requires")]
    TlsRefused(Endpoint),
    #[error("TLS with {addr} failed: {source}")]
    Tls { addr: Endpoint, source: std::io::Error },
    /// The server refused the login; the frame is relayed verbatim.
    #[error("server refused the connection: {}", .fields.message)]
    Server { frame: Frame, fields: ErrorFields },
    #[error("server asked for a password but none is configured for user {0:?}")]
    NoPassword(String),
    #[error("server authentication failed: {0}")]
    Auth(String),
    /// `max_user_connections` or `max_db_connections` is reached.
    #[error("{0}")]
    Limit(String),
    #[error("unsupported authentication request {0} from server")]
    UnsupportedAuth(i32),
    #[error("protocol error from server: {0}")]
    Protocol(#[from] ProtocolError),
}

impl ConnectError {
    /// A network-level failure: the node may be down.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            ConnectError::Io { .. }
                | ConnectError::Timeout(_)
                | ConnectError::Resolve(_)
                | ConnectError::Protocol(_)
        )
    }
}

/// Opens and authenticates a connection within `timeout`.
///
/// With `sslmode = prefer`, as in libpq, a TLS attempt that fails is made
/// again in plain text: a failed handshake, or a server that refuses the
/// login over TLS by its pg_hba.conf (`hostnossl` lines only, or a
/// `hostssl ... reject`).
pub async fn connect(
    addr: &Endpoint,
    tls: &Connector,
    login: &ServerLogin,
    timeout: Duration,
    limit: usize,
) -> Result<Backend, ConnectError> {
    let attempts = async {
        match connect_inner(addr, tls, login, limit, true).await {
            Err(Attempt { error, encrypted: true })
                if tls.mode() == SslMode::Prefer && error.refuses_tls() =>
            {
                tracing::debug!(%addr, %error, "TLS attempt failed; sslmode prefer tries plain text");
                connect_inner(addr, tls, login, limit, false).await.map_err(|failed| failed.error)
            }
            result => result.map_err(|failed| failed.error),
        }
    };
    crate::clock::timeout(timeout, attempts).await.map_err(|_| ConnectError::Timeout(addr.clone()))?
}

impl ConnectError {
    /// A failure of the TLS attempt that plain text may not meet.
    fn refuses_tls(&self) -> bool {
        match self {
            ConnectError::Tls { .. } => true,
            // invalid_authorization_specification: no pg_hba.conf line
            // lets this login in over TLS, or one rejects it.
            ConnectError::Server { fields, .. } => fields.code == "28000",
            _ => false,
        }
    }
}

/// A failed connection attempt, and whether it got as far as TLS.
struct Attempt {
    error: ConnectError,
    encrypted: bool,
}

impl From<ConnectError> for Attempt {
    fn from(error: ConnectError) -> Attempt {
        Attempt { error, encrypted: false }
    }
}

/// One attempt; `try_tls` false keeps it in plain text whatever the mode.
async fn connect_inner(
    addr: &Endpoint,
    tls: &Connector,
    login: &ServerLogin,
    limit: usize,
    try_tls: bool,
) -> Result<Backend, Attempt> {
    let io = |source| ConnectError::Io { addr: addr.clone(), source };
    let stream = match addr {
        Endpoint::Unix(path) => Stream::unix(UnixStream::connect(path).await.map_err(io)?),
        Endpoint::Tcp(socket) => {
            let tcp = TcpStream::connect(socket).await.map_err(io)?;
            tcp.set_nodelay(true).map_err(io)?;
            match try_tls {
                true => secure(tcp, addr, tls).await.map_err(|error| Attempt {
                    encrypted: matches!(error, ConnectError::Tls { .. }),
                    error,
                })?,
                false => Stream::plain(tcp),
            }
        }
    };
    let encrypted = stream.is_tls();
    startup(stream, addr, login, limit).await.map_err(|error| Attempt { error, encrypted })
}

/// Startup and authentication on an open stream, up to ReadyForQuery.
async fn startup(
    stream: Stream,
    addr: &Endpoint,
    login: &ServerLogin,
    limit: usize,
) -> Result<Backend, ConnectError> {
    let io = |source| ConnectError::Io { addr: addr.clone(), source };
    let encrypted = stream.is_tls();
    let binding = match (encrypted, stream.end_point()) {
        (true, Some(end_point)) => Binding::Available(end_point),
        // TLS, but the certificate allows no binding: as if unsupported.
        (true, None) | (false, _) => Binding::Unsupported,
    };
    let (read, mut write) = stream.split();
    let mut reader = FrameReader::new(read, limit);
    let mut buf = BytesMut::new();
    let params = std::iter::once(("user", login.user.as_str()))
        .chain(login.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    frontend::startup_message(params, &mut buf).map_err(io)?;
    write.write_all(&buf).await.map_err(io)?;
    write.flush().await.map_err(io)?;
    authenticate(&mut reader, &mut write, addr, login, &binding).await?;
    let mut startup = Vec::new();
    let mut key = None;
    loop {
        let frame = next(&mut reader).await?;
        match frame.tag() {
            b'S' => startup.push(frame),
            b'K' => key = Some(parse_backend_key(&frame)?),
            b'N' => {}
            b'E' => return Err(server_error(frame)?),
            b'Z' => break,
            tag => {
                return Err(
                    ProtocolError::Unexpected { tag: tag as char, when: "during server startup" }.into()
                )
            }
        }
    }
    let key = key.ok_or(ProtocolError::Malformed { what: "server startup without BackendKeyData" })?;
    Ok(Backend::new(key, encrypted, reader, write, startup))
}

/// Asks for TLS with an SSLRequest unless `sslmode = disable`, and starts
/// it when the server agrees. A server that declines is used in plain text
/// only with `prefer`.
async fn secure(mut tcp: TcpStream, addr: &Endpoint, tls: &Connector) -> Result<Stream, ConnectError> {
    if tls.mode() == SslMode::Disable {
        return Ok(Stream::plain(tcp));
    }
    let io = |source| ConnectError::Io { addr: addr.clone(), source };
    tcp.write_all(&ssl_request()).await.map_err(io)?;
    // Exactly one byte: anything the server sent after it would be
    // unencrypted data injected ahead of the handshake.
    let answer = tcp.read_u8().await.map_err(io)?;
    match answer {
        b'S' => tls.connect(tcp).await.map_err(|source| ConnectError::Tls { addr: addr.clone(), source }),
        b'N' if tls.mode() == SslMode::Prefer => Ok(Stream::plain(tcp)),
        b'N' => Err(ConnectError::TlsRefused(addr.clone())),
        other => {
            Err(ProtocolError::Unexpected { tag: other as char, when: "in answer to SSLRequest" }.into())
        }
    }
}

/// What SCRAM channel binding this connection can offer the server.
enum Binding {
    /// Plain text, or a certificate without a usable hash.
    Unsupported,
    /// TLS with tls-server-end-point data.
    Available(Arc<[u8]>),
}

async fn next(reader: &mut ServerReader) -> Result<Frame, ConnectError> {
    reader.next().await?.ok_or(ConnectError::Protocol(ProtocolError::Truncated))
}

fn server_error(frame: Frame) -> Result<ConnectError, ProtocolError> {
    let fields = ErrorFields::parse(&frame)?;
    Ok(ConnectError::Server { frame, fields })
}

/// Answers the server's authentication requests until AuthenticationOk.
async fn authenticate(
    reader: &mut ServerReader,
    write: &mut WriteHalf,
    addr: &Endpoint,
    login: &ServerLogin,
    binding: &Binding,
) -> Result<(), ConnectError> {
    let mut scram: Option<Exchange> = None;
    loop {
        let frame = next(reader).await?;
        match frame.tag() {
            b'R' => {}
            b'E' => return Err(server_error(frame)?),
            tag => {
                return Err(
                    ProtocolError::Unexpected { tag: tag as char, when: "during authentication" }.into()
                )
            }
        }
        let mut body = frame.body();
        let code = int32(&mut body, "Authentication")?;
        let password = || match &login.auth {
            ServerAuth::Password(password) => Ok(password),
            _ => Err(ConnectError::NoPassword(login.user.clone())),
        };
        let mut out = BytesMut::new();
        let wrap = |e: std::io::Error| ConnectError::Auth(e.to_string());
        match code {
            0 => return Ok(()),
            3 => frontend::password_message(password()?.expose().as_bytes(), &mut out).map_err(wrap)?,
            5 => {
                let salt: [u8; 4] = body
                    .try_into()
                    .map_err(|_| ProtocolError::Malformed { what: "AuthenticationMD5Password" })?;
                let hash = match &login.auth {
                    ServerAuth::Md5(stored) => md5_answer(stored.expose(), salt),
                    _ => postgres_protocol::authentication::md5_hash(
                        login.user.as_bytes(),
                        password()?.expose().as_bytes(),
                        salt,
                    ),
                };
                frontend::password_message(hash.as_bytes(), &mut out).map_err(wrap)?;
            }
            10 => {
                let mut offers = (false, false);
                loop {
                    let mechanism = cstr(&mut body, "AuthenticationSASL")?;
                    if mechanism.is_empty() {
                        break;
                    }
                    offers.0 |= mechanism == SCRAM_SHA_256;
                    offers.1 |= mechanism == SCRAM_SHA_256_PLUS;
                }
                if let ServerAuth::Scram(keys) = &login.auth {
                    let (channel, tls) = match (binding, offers) {
                        (Binding::Available(data), (_, true)) => (Some(data.to_vec()), true),
                        (Binding::Available(_), (true, false)) => (None, true),
                        (Binding::Unsupported, (true, _)) => (None, false),
                        _ => return Err(ConnectError::Auth("server offers no SCRAM-SHA-256".into())),
                    };
                    let client = ScramClient::new(keys.clone(), channel, tls);
                    let first = client.client_first();
                    frontend::sasl_initial_response(client.mechanism(), first.as_bytes(), &mut out)
                        .map_err(wrap)?;
                    scram = Some(Exchange::Passthrough(client));
                } else {
                    let (mechanism, channel_binding) = match (binding, offers) {
                        (Binding::Available(data), (_, true)) => {
                            (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(data.to_vec()))
                        }
                        (Binding::Available(_), (true, false)) => {
                            (SCRAM_SHA_256, ChannelBinding::unrequested())
                        }
                        (Binding::Unsupported, (true, _)) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => return Err(ConnectError::Auth("server offers no SCRAM-SHA-256".into())),
                    };
                    let client = ScramSha256::new(password()?.expose().as_bytes(), channel_binding);
                    frontend::sasl_initial_response(mechanism, client.message(), &mut out).map_err(wrap)?;
                    scram = Some(Exchange::Password(Box::new(client)));
                }
            }
            11 => match scram.as_mut().ok_or(ConnectError::Auth("SASL continue out of order".into()))? {
                Exchange::Password(client) => {
                    client.update(body).map_err(wrap)?;
                    frontend::sasl_response(client.message(), &mut out).map_err(wrap)?;
                }
                Exchange::Passthrough(client) => {
                    let last = client.server_first(body).map_err(passthrough)?;
                    frontend::sasl_response(last.as_bytes(), &mut out).map_err(wrap)?;
                }
            },
            12 => {
                match scram.as_mut().ok_or(ConnectError::Auth("SASL final out of order".into()))? {
                    Exchange::Password(client) => client.finish(body).map_err(wrap)?,
                    Exchange::Passthrough(client) => client.server_final(body).map_err(passthrough)?,
                }
                continue;
            }
            other => return Err(ConnectError::UnsupportedAuth(other)),
        }
        let io = |source| ConnectError::Io { addr: addr.clone(), source };
        write.write_all(&out).await.map_err(io)?;
        write.flush().await.map_err(io)?;
    }
}

/// A SCRAM exchange toward a server: with a password, or by passthrough.
enum Exchange {
    Password(Box<ScramSha256>),
    Passthrough(ScramClient),
}

fn passthrough(error: crate::auth::ScramError) -> ConnectError {
    ConnectError::Auth(format!("SCRAM passthrough: {error}"))
}

/// The answer to an md5 challenge from the stored `md5...` secret:
/// `md5` + md5(hex digest + salt), as libpq computes it from the password.
fn md5_answer(stored: &str, salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let hex = stored.strip_prefix("md5").unwrap_or(stored);
    let mut hasher = Md5::new();
    hasher.update(hex.as_bytes());
    hasher.update(salt);
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("md5{digest}")
}

/// Sends a CancelRequest for `key` to the server at `addr`.
pub async fn send_cancel(addr: &Endpoint, key: crate::protocol::startup::CancelKey, timeout: Duration) {
    let attempt = async {
        let mut stream = match addr {
            Endpoint::Tcp(socket) => Stream::plain(TcpStream::connect(socket).await?),
            Endpoint::Unix(path) => Stream::unix(UnixStream::connect(path).await?),
        };
        stream.write_all(&crate::protocol::startup::cancel_request(key)).await?;
        // The server closes the connection once it has the request.
        let mut sink = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await;
        Ok::<(), std::io::Error>(())
    };
    match crate::clock::timeout(timeout, attempt).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%addr, %error, "cancel request failed"),
        Err(_) => tracing::warn!(%addr, "cancel request timed out"),
    }
}
