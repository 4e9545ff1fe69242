//! Server-to-client messages: the ones pgnear writes itself, and readers
//! for the few server messages a session must look inside.

use bytes::{BufMut, BytesMut};

use super::frame::{cstr, cstr_bytes, int32, Frame, ProtocolError};
use super::startup::CancelKey;
use super::SqlState;

/// The severity of an ErrorResponse pgnear writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

fn frame(tag: u8, build: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut body = BytesMut::new();
    build(&mut body);
    Frame::new(tag, &body)
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

/// NegotiateProtocolVersion: the newest protocol version supported (3.0),
/// written as PostgreSQL writes it (major and minor in one word), and the
/// protocol options (`_pq_.*`) not recognised.
pub fn negotiate_protocol_version(unrecognised: &[&str]) -> Frame {
    frame(b'v', |b| {
        b.put_i32(3 << 16);
        b.put_i32(unrecognised.len() as i32);
        for option in unrecognised {
            put_cstr(b, option);
        }
    })
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, code: SqlState, message: &str) -> Frame {
    frame(b'E', |b| {
        for (field, value) in [(b'S', severity.as_str()), (b'V', severity.as_str()), (b'C', code.code())] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    })
}

pub fn auth_ok() -> Frame {
    Frame::new(b'R', &0i32.to_be_bytes())
}

pub fn auth_md5(salt: [u8; 4]) -> Frame {
    frame(b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    })
}

pub fn auth_sasl(mechanisms: &[&str]) -> Frame {
    frame(b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    })
}

pub fn auth_sasl_continue(data: &[u8]) -> Frame {
    frame(b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    })
}

pub fn auth_sasl_final(data: &[u8]) -> Frame {
    frame(b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    })
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    frame(b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    })
}

pub fn backend_key_data(key: CancelKey) -> Frame {
    frame(b'K', |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    })
}

/// Where a server is after a ReadyForQuery: its transaction status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// Outside a transaction block (`I`).
    #[default]
    Idle,
    /// Inside one (`T`).
    InBlock,
    /// Inside a failed one, which only a ROLLBACK ends (`E`).
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }

    /// Inside a block, failed or not.
    pub fn in_block(self) -> bool {
        self != TxStatus::Idle
    }
}

pub fn ready_for_query(status: TxStatus) -> Frame {
    Frame::new(b'Z', &[status.byte()])
}

/// RowDescription for text columns of type `text`.
pub fn row_description(columns: &[&str]) -> Frame {
    frame(b'T', |b| {
        b.put_i16(columns.len() as i16);
        for name in columns {
            put_cstr(b, name);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    })
}

pub fn data_row(values: &[&str]) -> Frame {
    frame(b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            b.put_i32(v.len() as i32);
            b.put_slice(v.as_bytes());
        }
    })
}

pub fn command_complete(tag: &str) -> Frame {
    frame(b'C', |b| put_cstr(b, tag))
}

pub fn empty_query_response() -> Frame {
    Frame::new(b'I', &[])
}

pub fn parse_complete() -> Frame {
    Frame::new(b'1', &[])
}

pub fn no_data() -> Frame {
    Frame::new(b'n', &[])
}

/// The only column of a one-column DataRow, as its bytes (`None` for
/// NULL or any other shape).
pub fn single_value(frame: &Frame) -> Option<&[u8]> {
    let body = frame.body();
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let len = usize::try_from(i32::from_be_bytes(body.get(2..6)?.try_into().ok()?)).ok()?;
    (count == 1 && body.len() == 6 + len).then(|| &body[6..])
}

/// The transaction status byte of a ReadyForQuery: `I`, `T` or `E`.
pub fn ready_status(frame: &Frame) -> Result<TxStatus, ProtocolError> {
    match frame.body() {
        [b'I'] => Ok(TxStatus::Idle),
        [b'T'] => Ok(TxStatus::InBlock),
        [b'E'] => Ok(TxStatus::Failed),
        _ => Err(ProtocolError::Malformed { what: "ReadyForQuery" }),
    }
}

/// The fields of a server ErrorResponse or NoticeResponse that pgnear reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// The non-localized severity (`V`), or `S` from old servers.
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn parse(frame: &Frame) -> Result<ErrorFields, ProtocolError> {
        let mut buf = frame.body();
        let mut fields = ErrorFields::default();
        while let Some((&kind, rest)) = buf.split_first() {
            if kind == 0 {
                break;
            }
            buf = rest;
            // In the client's encoding: a message may quote the client's
            // text.
            let value = cstr_bytes(&mut buf, "ErrorResponse")?;
            let text = || String::from_utf8_lossy(value).into_owned();
            match kind {
                b'V' => fields.severity = text(),
                b'S' if fields.severity.is_empty() => fields.severity = text(),
                b'C' => fields.code = text(),
                b'M' => fields.message = text(),
                _ => {}
            }
        }
        Ok(fields)
    }

    /// FATAL or PANIC: the server ends the connection after this.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }
}

/// The key in a server's BackendKeyData.
pub fn parse_backend_key(frame: &Frame) -> Result<CancelKey, ProtocolError> {
    let mut buf = frame.body();
    let pid = int32(&mut buf, "BackendKeyData")?;
    Ok(CancelKey { pid, secret: int32(&mut buf, "BackendKeyData")? })
}

/// Name and value of a ParameterStatus. The value is in the client's
/// encoding (`application_name` may hold any text).
pub fn parse_parameter_status(frame: &Frame) -> Result<(&str, &[u8]), ProtocolError> {
    let mut buf = frame.body();
    let name = cstr(&mut buf, "ParameterStatus")?;
    Ok((name, cstr_bytes(&mut buf, "ParameterStatus")?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    #[test]
    fn a_single_value_is_read_back_and_other_shapes_are_not() {
        assert_eq!(single_value(&data_row(&["0/16B3748"])), Some(&b"0/16B3748"[..]));
        assert_eq!(single_value(&data_row(&["a", "b"])), None);
        let null = Frame::new(b'D', &[0, 1, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(single_value(&null), None);
        let short = Frame::new(b'D', &[0, 1, 0, 0, 0, 9, b'x']);
        assert_eq!(single_value(&short), None);
    }

    #[test]
    fn error_response_round_trips() {
        let frame =
            error_response(Severity::Fatal, SqlState::InvalidPassword, "password authentication failed");
        let fields = ErrorFields::parse(&frame).unwrap();
        assert_eq!(fields.code, "28P01");
        assert!(fields.is_fatal());
        assert_eq!(fields.message, "password authentication failed");
    }

    #[test]
    fn reads_a_recorded_server_error() {
        // Recorded from PostgreSQL 15 after pg_terminate_backend.
        let body = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0Fpostgres.c\0L3202\0RProcessInterrupts\0\0";
        let fields = ErrorFields::parse(&Frame::new(b'E', body)).unwrap();
        assert_eq!(fields.code, "57P01");
        assert!(fields.is_fatal());
    }

    #[test]
    fn reads_server_texts_in_any_encoding() {
        // A LATIN1 client's error quotes its text: 'café'.
        let body = b"SERROR\0VERROR\0C22P02\0Minvalid input syntax for type integer: \"caf\xe9\"\0\0";
        let fields = ErrorFields::parse(&Frame::new(b'E', body)).unwrap();
        assert_eq!(fields.code, "22P02");
        assert_eq!(fields.message, "invalid input syntax for type integer: \"caf\u{FFFD}\"");
        let status = Frame::new(b'S', b"application_name\0caf\xe9\0");
        assert_eq!(parse_parameter_status(&status).unwrap(), ("application_name", &b"caf\xe9"[..]));
    }

    #[test]
    fn ready_status_is_checked() {
        for status in [TxStatus::Idle, TxStatus::InBlock, TxStatus::Failed] {
            assert_eq!(ready_status(&ready_for_query(status)).unwrap(), status);
        }
        assert!(ready_status(&Frame::new(b'Z', b"X")).is_err());
        assert!(ready_status(&Frame::new(b'Z', b"")).is_err());
    }
}
