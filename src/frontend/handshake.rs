//! A client's first moments: the startup packet (with SSLRequest and
//! GSSENCRequest answered), a CancelRequest, or authentication.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Shared;
use crate::auth::md5::Md5Secret;
use crate::auth::{Credential, ScramServer, ScramVerifier};
use crate::config::UserConfig;
use crate::error::ProxyError;
use crate::protocol::backend::{auth_md5, auth_ok, auth_sasl, auth_sasl_continue, auth_sasl_final};
use crate::protocol::frontend::{password, sasl_initial};
use crate::protocol::startup::{read_startup, StartupRequest};
use crate::protocol::{Frame, FrameReader, ProtocolError};

/// Authentication messages are small; anything larger is hostile.
const AUTH_MESSAGE_LIMIT: usize = 16 * 1024;

/// How a handshake ended.
#[derive(Debug)]
pub enum Handshake {
    /// Authenticated: AuthenticationOk has been sent.
    Authenticated(Login),
    /// The connection carried a CancelRequest, now forwarded.
    Cancelled,
    /// The client went away before starting.
    Closed,
}

/// An authenticated client's startup.
#[derive(Debug)]
pub struct Login {
    pub user: UserConfig,
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

/// Runs the startup phase on `stream`.
pub async fn handshake<S>(stream: &mut S, shared: &Shared) -> Result<Handshake, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let params = loop {
        match read_startup(stream).await? {
            None => return Ok(Handshake::Closed),
            Some(StartupRequest::Ssl | StartupRequest::GssEnc) => {
                stream.write_all(b"N").await.map_err(ProxyError::ClientGone)?;
            }
            Some(StartupRequest::Cancel(key)) => {
                shared.cancels.cancel(key, shared.config.proxy.connect_timeout).await;
                return Ok(Handshake::Cancelled);
            }
            Some(StartupRequest::Startup(params)) => break params,
        }
    };
    let user_name =
        params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()).ok_or(ProxyError::NoUser)?;
    let user = shared.config.user(&user_name).cloned().ok_or(ProxyError::UnknownUser(user_name.clone()))?;
    let credential = shared.directory.get(&user_name).ok_or(ProxyError::UnknownUser(user_name))?;
    let mut reader = FrameReader::new(&mut *stream, AUTH_MESSAGE_LIMIT);
    authenticate(&mut reader, &user, credential).await?;
    let (stream, buffered) = reader.into_parts();
    send(stream, &auth_ok()).await?;
    let params = params.into_iter().filter(|(k, _)| k != "user").collect();
    Ok(Handshake::Authenticated(Login { user, params, buffered }))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, frame: &Frame) -> Result<(), ProxyError> {
    stream.write_all(frame.raw()).await.map_err(ProxyError::ClientGone)
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

async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
    user: &UserConfig,
    credential: &Credential,
) -> Result<(), ProxyError> {
    match credential {
        Credential::Trust => Ok(()),
        Credential::Md5(secret) => md5(reader, user, secret).await,
        Credential::Scram(verifier) => scram(reader, verifier).await.map_err(|e| match e {
            ProxyError::Scram(crate::auth::ScramError::BadProof) => {
                ProxyError::BadPassword(user.name.clone())
            }
            other => other,
        }),
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

async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    reader: &mut FrameReader<&mut S>,
    verifier: &ScramVerifier,
) -> Result<(), ProxyError> {
    send(reader.get_mut(), &auth_sasl(&["SCRAM-SHA-256"])).await?;
    let initial = read_password(reader).await?;
    let (mechanism, client_first) = sasl_initial(&initial)?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(ProxyError::Scram(crate::auth::ScramError::Malformed("unsupported SASL mechanism")));
    }
    let mut exchange = ScramServer::new();
    let server_first = exchange.client_first(client_first, verifier).map_err(ProxyError::Scram)?;
    send(reader.get_mut(), &auth_sasl_continue(server_first.as_bytes())).await?;
    let response = read_password(reader).await?;
    let server_final = exchange.client_final(response.body(), verifier).map_err(ProxyError::Scram)?;
    send(reader.get_mut(), &auth_sasl_final(server_final.as_bytes())).await
}
