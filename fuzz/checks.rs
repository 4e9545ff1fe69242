//! What each fuzz target asserts, shared by the cargo-fuzz targets (through
//! `#[path]`) and the stable replay in `tests/it/fuzz_corpus.rs`, so that
//! both check exactly the same properties. Beyond "never panics":
//!
//! - `frame_decode`: frames are whole, in order, within the limit, and the
//!   buffer never grows past what the limit allows;
//! - `startup_parse`: a parsed StartupMessage re-encodes to itself;
//! - `classify`: deterministic (the statement cache relies on it), and a
//!   text that did not parse needs the primary.

use bytes::BytesMut;
use pgnear::protocol::frame::decode;
use pgnear::protocol::startup::{parse_startup, StartupRequest};

/// The frame limit the frame target decodes with.
pub const FRAME_LIMIT: usize = 64 * 1024;

pub fn frame_decode(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut consumed = 0;
    loop {
        match decode(&mut buf, FRAME_LIMIT) {
            Ok(Some(frame)) => {
                assert!(frame.len() >= 5 && frame.len() <= FRAME_LIMIT, "frame of {} bytes", frame.len());
                assert_eq!(frame.raw(), &data[consumed..consumed + frame.len()]);
                assert_eq!(frame.body().len() + 5, frame.len());
                consumed += frame.len();
            }
            Ok(None) => {
                assert_eq!(&buf[..], &data[consumed..]);
                break;
            }
            Err(_) => break,
        }
    }
    let bound = 2 * FRAME_LIMIT.max(data.len()) + 64;
    assert!(buf.capacity() <= bound, "buffer grew to {} bytes", buf.capacity());
}

pub fn startup_parse(data: &[u8]) {
    if let Ok(Some(StartupRequest::Startup { minor, params })) = parse_startup(data) {
        let mut body = (3 << 16 | i32::from(minor)).to_be_bytes().to_vec();
        for (name, value) in &params {
            assert!(!name.is_empty());
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let again = parse_startup(&body).ok().flatten();
        assert_eq!(again, Some(StartupRequest::Startup { minor, params }));
    }
}

pub fn classify(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    let first = pgnear::router::classify::classify(&sql);
    assert_eq!(first, pgnear::router::classify::classify(&sql), "not deterministic: {sql:?}");
    if first.unparsed {
        assert!(first.needs_primary(), "unparsed text routed to a replica: {sql:?}");
    }
    // A text that was not UTF-8 is a lossy copy: nothing of it is replayed.
    if sql.contains(char::REPLACEMENT_CHARACTER) {
        let replayable =
            first.effects.iter().any(|e| !matches!(e, pgnear::router::classify::SessionEffect::Pin(_)));
        assert!(!replayable, "a lossy copy would be replayed: {sql:?}");
    }
}
