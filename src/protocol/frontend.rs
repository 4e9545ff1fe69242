//! Client-to-server messages that routing or session tracking looks inside.

use super::frame::{cstr, cstr_bytes, int32, Frame, ProtocolError};

/// The SQL text of a simple Query, in the client's encoding.
pub fn query_text(frame: &Frame) -> Result<&[u8], ProtocolError> {
    let mut buf = frame.body();
    let text = cstr_bytes(&mut buf, "Query")?;
    if !buf.is_empty() {
        return Err(ProtocolError::Malformed { what: "Query" });
    }
    Ok(text)
}

/// A Parse message: statement name and SQL text (in the client's
/// encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub query: &'a [u8],
}

pub fn parse(frame: &Frame) -> Result<Parse<'_>, ProtocolError> {
    let mut buf = frame.body();
    let name = cstr(&mut buf, "Parse")?;
    let query = cstr_bytes(&mut buf, "Parse")?;
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed { what: "Parse" });
    }
    let count = i16::from_be_bytes([buf[0], buf[1]]);
    if count < 0 || buf.len() != 2 + 4 * count as usize {
        return Err(ProtocolError::Malformed { what: "Parse" });
    }
    Ok(Parse { name, query })
}

/// The statement name of a Parse, without checking the rest (for the
/// relay's bookkeeping; the Parse was validated when it arrived).
pub fn parse_name(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut buf = frame.body();
    cstr(&mut buf, "Parse")
}

/// A Bind message: portal and statement names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
}

pub fn bind(frame: &Frame) -> Result<Bind<'_>, ProtocolError> {
    let mut buf = frame.body();
    let portal = cstr(&mut buf, "Bind")?;
    Ok(Bind { portal, statement: cstr(&mut buf, "Bind")? })
}

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Statement(&'a str),
    Portal(&'a str),
}

/// The target of a Describe ('D') or Close ('C').
pub fn target(frame: &Frame) -> Result<Target<'_>, ProtocolError> {
    let what = if frame.tag() == b'D' { "Describe" } else { "Close" };
    let (&kind, mut buf) = frame.body().split_first().ok_or(ProtocolError::Malformed { what })?;
    let name = cstr(&mut buf, what)?;
    match kind {
        b'S' => Ok(Target::Statement(name)),
        b'P' => Ok(Target::Portal(name)),
        _ => Err(ProtocolError::Malformed { what }),
    }
}

/// The portal an Execute runs.
pub fn execute_portal(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut buf = frame.body();
    let portal = cstr(&mut buf, "Execute")?;
    int32(&mut buf, "Execute")?;
    Ok(portal)
}

/// A SASLInitialResponse: mechanism and the client-first message.
pub fn sasl_initial(frame: &Frame) -> Result<(&str, &[u8]), ProtocolError> {
    let what = "SASLInitialResponse";
    let mut buf = frame.body();
    let mechanism = cstr(&mut buf, what)?;
    let len = int32(&mut buf, what)?;
    if len < 0 || len as usize != buf.len() {
        return Err(ProtocolError::Malformed { what });
    }
    Ok((mechanism, buf))
}

/// A PasswordMessage's password.
pub fn password(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut buf = frame.body();
    cstr(&mut buf, "PasswordMessage")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    #[test]
    fn reads_recorded_extended_messages() {
        // Recorded from pgbench -M prepared.
        let p = Frame::new(b'P', b"P0_1\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0");
        assert_eq!(parse(&p).unwrap().name, "P0_1");
        let b = Frame::new(b'B', b"\0P0_1\0\0\x01\0\0\0\x01\0\0\0\x0512345\0\x01\0\0");
        assert_eq!(bind(&b).unwrap(), Bind { portal: "", statement: "P0_1" });
        assert_eq!(target(&Frame::new(b'D', b"P\0")).unwrap(), Target::Portal(""));
        assert_eq!(target(&Frame::new(b'C', b"Sstmt\0")).unwrap(), Target::Statement("stmt"));
        assert_eq!(execute_portal(&Frame::new(b'E', b"\0\0\0\0\0")).unwrap(), "");
    }

    #[test]
    fn rejects_malformed_messages() {
        assert!(query_text(&Frame::new(b'Q', b"SELECT 1")).is_err());
        assert!(query_text(&Frame::new(b'Q', b"SELECT 1\0junk")).is_err());
        assert!(parse(&Frame::new(b'P', b"\0SELECT 1\0\0\x05")).is_err());
        assert!(target(&Frame::new(b'D', b"X\0")).is_err());
        assert!(target(&Frame::new(b'D', b"")).is_err());
        assert!(execute_portal(&Frame::new(b'E', b"\0\0")).is_err());
        assert!(sasl_initial(&Frame::new(b'p', b"SCRAM-SHA-256\0\0\0\0\x09n,,")).is_err());
    }

    #[test]
    fn texts_may_use_any_encoding_names_must_be_utf8() {
        // 'café' in LATIN1.
        assert_eq!(query_text(&Frame::new(b'Q', b"SELECT 'caf\xe9'\0")).unwrap(), b"SELECT 'caf\xe9'");
        let frame = Frame::new(b'P', b"s\0SELECT 'caf\xe9'\0\0\0");
        assert_eq!(parse(&frame).unwrap(), Parse { name: "s", query: b"SELECT 'caf\xe9'" });
        let error = parse(&Frame::new(b'P', b"caf\xe9\0SELECT 1\0\0\0")).unwrap_err();
        assert!(matches!(error, ProtocolError::NotUtf8 { what: "Parse" }), "{error}");
        assert!(bind(&Frame::new(b'B', b"\0caf\xe9\0\0\0\0\0\0\0")).is_err());
    }
}
