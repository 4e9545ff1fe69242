//! A client's first moments: TLS negotiation (SSLRequest, direct TLS),
//! GSSENCRequest, the startup packet or a CancelRequest, then
//! authentication.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Shared;
use crate::auth::lookup::{LookupError, Target};
use crate::auth::md5::Md5Secret;
use crate::auth::{Credential, ScramServer, ScramVerifier};
use crate::backend::ServerAuth;
use crate::config::{ClientAuth, SecretKind, TlsMode, UserConfig};
use crate::error::ProxyError;
use crate::protocol::backend::{
    auth_md5, auth_ok, auth_sasl, auth_sasl_continue, auth_sasl_final, negotiate_protocol_version,
};
use crate::protocol::frontend::{password, sasl_initial};
use crate::protocol::startup::{read_startup, CancelKey, StartupRequest};
use crate::protocol::{Frame, FrameReader, ProtocolError};
use crate::tls::{Acceptor, Stream, ALPN_POSTGRESQL};

/// The first byte of a TLS ClientHello record: a client that starts TLS
/// without asking first (PostgreSQL 17 `sslnegotiation=direct`).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Authentication messages are small; anything larger is hostile.
const AUTH_MESSAGE_LIMIT: usize = 16 * 1024;

/// How a handshake ended.
#[derive(Debug)]
pub enum Handshake {
    /// Authenticated: AuthenticationOk has been sent.
    Authenticated(Box<Login>),
    /// The connection carried a CancelRequest, now forwarded.
    Cancelled,
    /// The client went away before starting.
    Closed,
}

/// An authenticated client's startup.
#[derive(Debug)]
pub struct Login {
    pub user: UserConfig,
    /// How pgnear logs in to servers for this client: a password, or
    /// passthrough of what the client proved.
    pub server_auth: ServerAuth,
    /// Every startup parameter except `user`, in the client's order.
    pub params: Vec<(String, String)>,
    /// Bytes the client sent after authenticating, not yet read as frames.
    pub buffered: BytesMut,
}

impl Login {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What a connection asked for once TLS was settled.
#[derive(Debug)]
pub enum Opening {
    Startup(Vec<(String, String)>),
    Cancel(CancelKey),
    /// The client went away before asking.
    Closed,
}

/// Reads packets until a StartupMessage or CancelRequest, answering
/// SSLRequest and GSSENCRequest and switching to TLS on the way.
///
/// With `tls.mode = "require"` a plaintext StartupMessage is refused; a
/// plaintext CancelRequest is still honoured, since its key is the secret
/// and libpq before 17 never encrypts one.
///
/// A Unix-socket client is never offered TLS, and `require` does not
/// apply to it, as in PostgreSQL (`hostssl` lines match only TCP): the
/// socket does not leave the host, and its file mode guards it.
pub async fn negotiate(stream: &mut Stream, tls: Option<&Acceptor>) -> Result<Opening, ProxyError> {
    let tls = tls.filter(|_| !stream.is_unix());
    if let Some(acceptor) = tls {
        direct_tls(stream, acceptor).await?;
    }
    loop {
        match read_startup(stream).await? {
            None => return Ok(Opening::Closed),
            Some(StartupRequest::Ssl | StartupRequest::GssEnc) if stream.is_tls() => {
                return Err(ProxyError::TlsNegotiation("encryption requested on an encrypted connection"));
            }
            Some(StartupRequest::Ssl) => ssl_request(stream, tls).await?,
            Some(StartupRequest::GssEnc) => stream.write_all(b"N").await.map_err(ProxyError::ClientGone)?,
            Some(StartupRequest::Cancel(key)) => return Ok(Opening::Cancel(key)),
            Some(StartupRequest::Startup { minor, params }) => {
                if tls.is_some_and(|a| a.mode() == TlsMode::Require) && !stream.is_tls() {
                    return Err(ProxyError::TlsRequired);
                }
                // Protocol options are for pgnear, which knows none; they
                // never reach a server.
                let (options, params): (Vec<_>, Vec<_>) =
                    params.into_iter().partition(|(name, _)| name.starts_with("_pq_."));
                if minor > 0 || !options.is_empty() {
                    let names: Vec<&str> = options.iter().map(|(name, _)| name.as_str()).collect();
                    let answer = negotiate_protocol_version(&names);
                    stream.write_all(answer.raw()).await.map_err(ProxyError::ClientGone)?;
                }
                return Ok(Opening::Startup(params));
            }
        }
    }
}

/// Starts TLS at once if the client's first byte begins a TLS record
/// (PostgreSQL 17 `sslnegotiation=direct`). As in PostgreSQL, that needs
/// ALPN `postgresql`, so that TLS meant for another protocol is refused.
async fn direct_tls(stream: &mut Stream, acceptor: &Acceptor) -> Result<(), ProxyError> {
    if stream.peek_first().await.map_err(ProxyError::ClientGone)? != Some(TLS_HANDSHAKE_RECORD) {
        return Ok(());
    }
    stream.accept(acceptor).await.map_err(ProxyError::ClientTls)?;
    if stream.alpn() != Some(ALPN_POSTGRESQL) {
        return Err(ProxyError::TlsNegotiation("direct TLS connection without ALPN \"postgresql\""));
    }
    Ok(())
}

/// Answers SSLRequest: 'S' and the TLS handshake, or 'N' without TLS.
async fn ssl_request(stream: &mut Stream, tls: Option<&Acceptor>) -> Result<(), ProxyError> {
    let Some(acceptor) = tls else {
        return stream.write_all(b"N").await.map_err(ProxyError::ClientGone);
    };
    stream.write_all(b"S").await.map_err(ProxyError::ClientGone)?;
    stream.accept(acceptor).await.map_err(ProxyError::ClientTls)
}

/// Runs the startup phase on `stream`.
pub async fn handshake(stream: &mut Stream, shared: &Shared) -> Result<Handshake, ProxyError> {
    let params = match negotiate(stream, shared.tls.acceptor.as_ref()).await? {
        Opening::Closed => return Ok(Handshake::Closed),
        Opening::Cancel(key) => {
            shared.cancels.cancel(key, &shared.topology, shared.config().proxy.connect_timeout).await;
            return Ok(Handshake::Cancelled);
        }
        Opening::Startup(params) => params,
    };
    refuse_replication(&params)?;
    let user_name =
        params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()).ok_or(ProxyError::NoUser)?;
    let end_point = stream.end_point();
    let mut reader = FrameReader::new(&mut *stream, AUTH_MESSAGE_LIMIT);
    let known = shared.config().user(&user_name).cloned().zip(shared.directory().get(&user_name).cloned());
    let known = match known {
        Some(known) => Some(known),
        None => look_up(shared, &user_name, &params).await?,
    };
    let Some((user, credential)) = known else {
        // An unknown user goes through the same exchange as a wrong
        // password, and gets the same error.
        return Err(unknown_user(&mut reader, shared, &user_name, end_point).await);
    };
    let server_auth = authenticate(&mut reader, &user, &credential, end_point).await?;
    let (stream, buffered) = reader.into_parts();
    send(stream, &auth_ok()).await?;
    let params = params.into_iter().filter(|(k, _)| k != "user").collect();
    Ok(Handshake::Authenticated(Box::new(Login { user, server_auth, params, buffered })))
}

/// A replication connection (`replication=true` or `database`, as
/// pg_basebackup, pg_receivewal and logical replication subscribers open)
/// is refused: pgnear does not model the walsender's CopyBoth stream, and
/// routing has nothing to offer it. PgBouncer before 1.23 refuses it too.
fn refuse_replication(params: &[(String, String)]) -> Result<(), ProxyError> {
    let Some((_, value)) = params.iter().find(|(k, _)| k == "replication") else { return Ok(()) };
    if crate::protocol::parse_bool(value) == Some(false) {
        return Ok(());
    }
    Err(ProxyError::Unsupported(format!(
        "pgnear does not proxy replication connections (replication={value}): connect to the server itself"
    )))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, frame: &Frame) -> Result<(), ProxyError> {
    stream.write_all(frame.raw()).await.map_err(ProxyError::ClientGone)?;
    stream.flush().await.map_err(ProxyError::ClientGone)
}

/// Reads the next password-family message ('p').
async fn read_password<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
) -> Result<Frame, ProxyError> {
    match reader.next().await? {
        Some(frame) if frame.tag() == b'p' => Ok(frame),
        Some(frame) => {
            Err(ProtocolError::Unexpected { tag: frame.tag() as char, when: "during authentication" }.into())
        }
        None => Err(ProxyError::ClientGone(std::io::ErrorKind::UnexpectedEof.into())),
    }
}

/// Checks the client against `credential` and gives how pgnear then logs
/// in to servers for it: the user's password toward servers if it has
/// one, else passthrough of the stored secret (md5), or of the client key
/// the client's SCRAM proof revealed.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
    user: &UserConfig,
    credential: &Credential,
    end_point: Option<Arc<[u8]>>,
) -> Result<ServerAuth, ProxyError> {
    let bad_proof = |e| match e {
        ProxyError::Scram(crate::auth::ScramError::BadProof) => ProxyError::BadPassword(user.name.clone()),
        other => other,
    };
    let passthrough = match credential {
        Credential::Trust => ServerAuth::None,
        Credential::Md5(secret) => {
            md5(reader, user, secret).await?;
            match &user.auth {
                ClientAuth::Md5(stored) if stored.kind() == SecretKind::Md5 => {
                    ServerAuth::Md5(stored.clone())
                }
                _ => ServerAuth::None,
            }
        }
        Credential::Scram(verifier) => {
            let client_key = scram(reader, verifier, end_point).await.map_err(bad_proof)?;
            ServerAuth::Scram(Arc::new(verifier.keys(client_key)))
        }
    };
    Ok(match &user.server_password {
        Some(password) => ServerAuth::Password(password.clone()),
        None => passthrough,
    })
}

/// A user `[[users]]` does not list, looked up with `proxy.auth_query` on
/// the primary of the cluster the connection belongs to, if configured.
async fn look_up(
    shared: &Shared,
    name: &str,
    params: &[(String, String)],
) -> Result<Option<(UserConfig, Credential)>, ProxyError> {
    let config = shared.config.load_full();
    let proxy = &config.proxy;
    let Some(auth_user) = proxy.auth_user.as_deref().and_then(|u| config.user(u)) else {
        return Ok(None);
    };
    let database = params.iter().find(|(k, _)| k == "database").map_or(name, |(_, v)| v.as_str());
    let cluster = super::cluster_for(&config, database, name).unwrap_or(&proxy.default_cluster);
    let cannot = |cause: String| ProxyError::Lookup { user: name.to_string(), cause };
    let node = shared.topology.primary(cluster).map_err(|e| cannot(e.to_string()))?;
    let target = Target {
        node: shared.topology.node(node).config.clone(),
        database: database.to_string(),
        user: auth_user.server_user.clone(),
        password: auth_user.server_password.clone(),
        query: proxy.auth_query.clone(),
        timeout: proxy.connect_timeout,
    };
    match shared.lookups.find(name, target).await {
        Ok(found) => Ok(found.map(|f| (f.user, f.credential))),
        Err(LookupError::Busy) => Err(ProxyError::LookupBusy),
        Err(LookupError::Failed(cause)) => Err(cannot(cause)),
    }
}

/// A user pgnear does not know: a SCRAM exchange against a verifier no
/// password matches (its salt stable per name, as a real one's is), then
/// the error a wrong password gets.
async fn unknown_user<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
    shared: &Shared,
    name: &str,
    end_point: Option<Arc<[u8]>>,
) -> ProxyError {
    let verifier = ScramVerifier::unknown(name, shared.directory().decoy_key());
    match scram(reader, &verifier, end_point).await {
        Err(ProxyError::Scram(crate::auth::ScramError::BadProof)) | Ok(_) => {
            tracing::info!(user = name, "login for an unknown user refused");
            ProxyError::BadPassword(name.to_string())
        }
        Err(other) => other,
    }
}

async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
    user: &UserConfig,
    secret: &Md5Secret,
) -> Result<(), ProxyError> {
    let salt: [u8; 4] = rand::random();
    send(reader.get_mut(), &auth_md5(salt)).await?;
    let frame = read_password(reader).await?;
    if secret.verify(password(&frame)?, salt) {
        Ok(())
    } else {
        Err(ProxyError::BadPassword(user.name.clone()))
    }
}

/// SCRAM-SHA-256, and SCRAM-SHA-256-PLUS (tls-server-end-point) when the
/// connection is TLS and the certificate allows channel binding.
async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
    verifier: &ScramVerifier,
    end_point: Option<Arc<[u8]>>,
) -> Result<Vec<u8>, ProxyError> {
    let mut exchange = match end_point {
        Some(data) => ScramServer::with_channel_binding(data.to_vec()),
        None => ScramServer::new(),
    };
    send(reader.get_mut(), &auth_sasl(exchange.mechanisms())).await?;
    let initial = read_password(reader).await?;
    let (mechanism, client_first) = sasl_initial(&initial)?;
    let server_first = exchange.client_first(mechanism, client_first, verifier).map_err(ProxyError::Scram)?;
    send(reader.get_mut(), &auth_sasl_continue(server_first.as_bytes())).await?;
    let response = read_password(reader).await?;
    let (server_final, client_key) =
        exchange.client_final(response.body(), verifier).map_err(ProxyError::Scram)?;
    send(reader.get_mut(), &auth_sasl_final(server_final.as_bytes())).await?;
    Ok(client_key)
}
