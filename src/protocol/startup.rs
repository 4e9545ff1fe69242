//! The untagged first packet of a connection: StartupMessage, SSLRequest,
//! GSSENCRequest or CancelRequest.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::{cstr, int32, ProtocolError};

/// PostgreSQL's own limit for a startup packet.
pub const MAX_STARTUP_PACKET: usize = 10_000;
const PROTOCOL_MAJOR_3: i32 = 3;
const CANCEL_CODE: i32 = 80_877_102;
const SSL_CODE: i32 = 80_877_103;
const GSSENC_CODE: i32 = 80_877_104;

/// A backend's cancel key: process ID and secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

/// What a client asked for in its first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    /// Protocol 3.x startup with its parameters, in the order sent (any
    /// `_pq_.` protocol options among them). pgnear speaks 3.0: a client
    /// asking for a later minor version, or for protocol options, is told
    /// so with NegotiateProtocolVersion, as PostgreSQL does.
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
    Ssl,
    GssEnc,
    Cancel(CancelKey),
}

/// Why a first packet was refused.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet")]
    BadLength,
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: i32, minor: i32 },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Reads one startup packet; `None` if the client closed first.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<StartupRequest>, StartupError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ProtocolError::Io(e).into()),
    }
    let len = i32::from_be_bytes(len);
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(StartupError::BadLength);
    }
    let mut body = vec![0u8; len as usize - 4];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    parse_startup(&body)
}

/// Parses a startup packet body (after the length word).
pub fn parse_startup(body: &[u8]) -> Result<Option<StartupRequest>, StartupError> {
    let mut buf = body;
    let code = int32(&mut buf, "startup")?;
    let request = match code {
        SSL_CODE if buf.is_empty() => StartupRequest::Ssl,
        GSSENC_CODE if buf.is_empty() => StartupRequest::GssEnc,
        CANCEL_CODE if buf.len() == 8 => {
            let pid = int32(&mut buf, "CancelRequest")?;
            StartupRequest::Cancel(CancelKey { pid, secret: int32(&mut buf, "CancelRequest")? })
        }
        SSL_CODE | GSSENC_CODE | CANCEL_CODE => return Err(StartupError::BadLength),
        code if code >> 16 == PROTOCOL_MAJOR_3 => {
            StartupRequest::Startup { minor: (code & 0xffff) as u16, params: parameters(buf)? }
        }
        other => return Err(StartupError::UnsupportedVersion { major: other >> 16, minor: other & 0xffff }),
    };
    Ok(Some(request))
}

fn parameters(mut buf: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let name = cstr(&mut buf, "startup")?;
        if name.is_empty() {
            break;
        }
        let value = cstr(&mut buf, "startup")?;
        params.push((name.to_string(), value.to_string()));
    }
    if !buf.is_empty() {
        return Err(ProtocolError::Malformed { what: "startup" });
    }
    Ok(params)
}

/// Encodes an SSLRequest packet.
pub fn ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[0..4].copy_from_slice(&8i32.to_be_bytes());
    out[4..8].copy_from_slice(&SSL_CODE.to_be_bytes());
    out
}

/// Encodes a CancelRequest packet.
pub fn cancel_request(key: CancelKey) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&key.pid.to_be_bytes());
    out[12..16].copy_from_slice(&key.secret.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    #[tokio::test]
    async fn reads_a_libpq_startup_packet() {
        // Recorded from psql 15: user=app database=shop application_name=psql.
        let packet: &[u8] = b"\0\0\0\x36\0\x03\0\0user\0app\0database\0shop\0application_name\0psql\0\0";
        let mut r = packet;
        let req = read_startup(&mut r).await.unwrap().unwrap();
        let StartupRequest::Startup { minor: 0, params } = req else { panic!("not a 3.0 startup") };
        assert_eq!(params[0], ("user".into(), "app".into()));
        assert_eq!(params[2], ("application_name".into(), "psql".into()));
    }

    #[test]
    fn accepts_later_minor_versions_and_protocol_options() {
        // Protocol 3.2 (libpq 18 with max_protocol_version=3.2).
        let body = b"\0\x03\0\x02user\0app\0_pq_.compression\0on\0\0";
        let req = parse_startup(body).unwrap().unwrap();
        let StartupRequest::Startup { minor: 2, params } = req else { panic!("not a 3.2 startup: {req:?}") };
        assert_eq!(params[1], ("_pq_.compression".into(), "on".into()));
        assert!(matches!(
            parse_startup(b"\0\x04\0\0user\0app\0\0"),
            Err(StartupError::UnsupportedVersion { major: 4, minor: 0 })
        ));
    }

    #[tokio::test]
    async fn recognises_ssl_gss_and_cancel() {
        let mut ssl: &[u8] = b"\0\0\0\x08\x04\xd2\x16\x2f";
        assert_eq!(read_startup(&mut ssl).await.unwrap(), Some(StartupRequest::Ssl));
        let mut gss: &[u8] = b"\0\0\0\x08\x04\xd2\x16\x30";
        assert_eq!(read_startup(&mut gss).await.unwrap(), Some(StartupRequest::GssEnc));
        let key = CancelKey { pid: 4242, secret: -7 };
        let packet = cancel_request(key);
        let mut cancel: &[u8] = &packet;
        assert_eq!(read_startup(&mut cancel).await.unwrap(), Some(StartupRequest::Cancel(key)));
    }

    #[tokio::test]
    async fn refuses_bad_packets() {
        let mut huge: &[u8] = b"\0\x01\0\0\0\x03\0\0";
        assert!(matches!(read_startup(&mut huge).await, Err(StartupError::BadLength)));
        let mut v2: &[u8] = b"\0\0\0\x08\0\x02\0\0";
        assert!(matches!(
            read_startup(&mut v2).await,
            Err(StartupError::UnsupportedVersion { major: 2, .. })
        ));
        let mut cut: &[u8] = b"\0\0\0\x20\0\x03\0\0user\0";
        assert!(matches!(
            read_startup(&mut cut).await,
            Err(StartupError::Protocol(ProtocolError::Truncated))
        ));
        let mut unterminated: &[u8] = b"\0\0\0\x0e\0\x03\0\0user\0a";
        assert!(read_startup(&mut unterminated).await.is_err());
        let mut empty: &[u8] = b"";
        assert!(read_startup(&mut empty).await.unwrap().is_none());
    }
}
