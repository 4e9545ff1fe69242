//! Length-checked framing of tagged protocol messages.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A malformed byte stream. Each variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {length} in message type {tag:?}")]
    BadLength { tag: char, length: i64 },
    #[error("message type {tag:?} of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge { tag: char, length: usize, limit: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    /// A name (statement, portal, startup parameter) that is not UTF-8.
    /// SQL texts may be in any `client_encoding`; names pgnear tracks must
    /// be UTF-8.
    #[error("a name in a {what} message is not UTF-8 (pgnear reads names as UTF-8; SQL texts may use any client_encoding)")]
    NotUtf8 { what: &'static str },
    #[error("unexpected message type {tag:?} {when}")]
    Unexpected { tag: char, when: &'static str },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One tagged message, header included, exactly as it was received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Builds a frame from a tag and body (for messages pgnear writes).
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut raw = BytesMut::with_capacity(5 + body.len());
        raw.extend_from_slice(&[tag]);
        raw.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        raw.extend_from_slice(body);
        Frame { raw: raw.freeze() }
    }

    /// The same message in its own allocation. A decoded frame shares the
    /// reader's buffer; one kept for the whole session (a prepared
    /// statement's Parse, the startup ParameterStatus messages) would pin
    /// that buffer's memory and make the reader allocate a new one.
    pub fn detached(&self) -> Frame {
        Frame { raw: Bytes::copy_from_slice(&self.raw) }
    }

    /// Whether `other` is this very frame (a clone of it), not only the
    /// same bytes: a quick check before comparing contents.
    pub fn is(&self, other: &Frame) -> bool {
        self.raw.as_ptr() == other.raw.as_ptr() && self.raw.len() == other.raw.len()
    }

    /// The message type byte.
    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message contents after the length word.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// Header and body, for relaying.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Splits one frame off the front of `buf`, if a whole one is there.
pub fn decode(buf: &mut BytesMut, limit: usize) -> Result<Option<Frame>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let length = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if length < 4 {
        return Err(ProtocolError::BadLength { tag: tag as char, length: length.into() });
    }
    let total = length as usize + 1;
    if total > limit {
        return Err(ProtocolError::TooLarge { tag: tag as char, length: total, limit });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame { raw: buf.split_to(total).freeze() }))
}

/// Reads frames from one side of a connection into a reused buffer.
///
/// The buffer starts small, so that thousands of idle connections cost
/// little, and its growth step doubles (up to [`MAX_READ_CHUNK`]) while
/// reads keep filling it, so that a large result moves in few syscalls.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    limit: usize,
    chunk: usize,
    /// Bytes read from `inner` since [`FrameReader::take_read`] last ran.
    read: u64,
}

const MIN_READ_CHUNK: usize = 2 * 1024;
const MAX_READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, limit: usize) -> Self {
        Self::with_buffered(inner, limit, BytesMut::with_capacity(MIN_READ_CHUNK))
    }

    /// Bytes already read but not yet taken as frames.
    pub fn with_buffered(inner: R, limit: usize, buffered: BytesMut) -> Self {
        FrameReader { inner, buf: buffered, limit, chunk: MIN_READ_CHUNK, read: 0 }
    }

    /// The bytes read since the last call.
    pub fn take_read(&mut self) -> u64 {
        std::mem::take(&mut self.read)
    }

    /// Whether no bytes are buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The tag of the next frame, if its first byte is buffered.
    pub fn next_tag(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// A frame already in the buffer, without reading.
    pub fn buffered(&mut self) -> Result<Option<Frame>, ProtocolError> {
        decode(&mut self.buf, self.limit)
    }

    /// The next frame; `None` at a clean end of stream.
    ///
    /// Cancel safe: bytes move only into the internal buffer, so a frame
    /// is never lost when this future is dropped in a `select!`.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.fill().await? {
            decode(&mut self.buf, self.limit)
        } else {
            Ok(None)
        }
    }

    /// Reads until the buffer holds a whole frame (or a malformed header,
    /// which [`FrameReader::buffered`] then reports): `true`, or `false`
    /// at a clean end of stream. Decodes nothing, so a relay can take the
    /// frames in place.
    ///
    /// Cancel safe, like [`FrameReader::next`].
    pub async fn fill(&mut self) -> Result<bool, ProtocolError> {
        loop {
            if self.has_frame() {
                return Ok(true);
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(self.chunk);
            }
            let spare = self.buf.capacity() - self.buf.len();
            let read = self.inner.read_buf(&mut self.buf).await?;
            self.read += read as u64;
            if read == 0 {
                return if self.buf.is_empty() { Ok(false) } else { Err(ProtocolError::Truncated) };
            }
            if read == spare {
                self.chunk = (self.chunk * 2).min(MAX_READ_CHUNK);
            }
        }
    }

    /// Whether `buffered` has something to return: a whole frame or an
    /// error. Reserves room for a large frame's remainder.
    fn has_frame(&mut self) -> bool {
        let Some(&[_, a, b, c, d]) = self.buf.get(..5) else { return false };
        let length = i32::from_be_bytes([a, b, c, d]);
        let Some(total) = usize::try_from(length).ok().filter(|&l| l >= 4).map(|l| l + 1) else {
            return true;
        };
        if total > self.limit || self.buf.len() >= total {
            return true;
        }
        self.buf.reserve(total - self.buf.len());
        false
    }

    /// Moves the whole frames at the front of the buffer into `out` as
    /// they are, as long as `pass` accepts their tags and `out` is shorter
    /// than `until`, with one copy for the run. Returns the bytes moved.
    /// A frame `pass` refuses, an incomplete one or a malformed header
    /// stops the run, and is left for [`FrameReader::buffered`].
    pub fn pass_through(&mut self, out: &mut BytesMut, until: usize, pass: impl Fn(u8) -> bool) -> usize {
        let mut end = 0;
        while out.len() + end < until {
            let Some(&[tag, a, b, c, d]) = self.buf.get(end..end + 5) else { break };
            let length = i32::from_be_bytes([a, b, c, d]);
            let Some(total) = usize::try_from(length).ok().filter(|&l| l >= 4).map(|l| l + 1) else {
                break;
            };
            if !pass(tag) || total > self.limit || self.buf.len() - end < total {
                break;
            }
            end += total;
        }
        if end > 0 {
            out.extend_from_slice(&self.buf[..end]);
            self.buf.advance(end);
        }
        end
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

/// Reads a NUL-terminated string from the front of `buf`.
pub fn cstr<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a str, ProtocolError> {
    let bytes = cstr_bytes(buf, what)?;
    std::str::from_utf8(bytes).map_err(|_| ProtocolError::NotUtf8 { what })
}

/// Reads a NUL-terminated string of any encoding from the front of `buf`:
/// texts in the client's encoding (`client_encoding`), which need not be
/// UTF-8.
pub fn cstr_bytes<'a>(buf: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], ProtocolError> {
    // Most strings are short names, quicker to scan than to set up a
    // vector search for; a query text is not.
    let head = buf.len().min(16);
    let end = match buf[..head].iter().position(|&b| b == 0) {
        Some(end) => end,
        None => head + memchr::memchr(0, &buf[head..]).ok_or(ProtocolError::Malformed { what })?,
    };
    let bytes = &buf[..end];
    *buf = &buf[end + 1..];
    Ok(bytes)
}

/// Reads a big-endian i32 from the front of `buf`.
pub fn int32(buf: &mut &[u8], what: &'static str) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed { what });
    }
    Ok(buf.get_i32())
}

/// Reads a big-endian i16 from the front of `buf`.
pub fn int16(buf: &mut &[u8], what: &'static str) -> Result<i16, ProtocolError> {
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed { what });
    }
    Ok(buf.get_i16())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    #[test]
    fn decodes_whole_frames_only() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x0dSELECT 1\0Q\0\0"[..]);
        let frame = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(frame.tag(), b'Q');
        assert_eq!(frame.body(), b"SELECT 1\0");
        assert!(decode(&mut buf, 1024).unwrap().is_none());
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn rejects_short_negative_and_oversized_lengths() {
        for header in [&b"Q\0\0\0\0"[..], b"Q\0\0\0\x03", b"Q\xff\xff\xff\xff", b"Q\x80\0\0\0"] {
            let mut buf = BytesMut::from(header);
            assert!(matches!(decode(&mut buf, 1024), Err(ProtocolError::BadLength { .. })), "{header:?}");
        }
        let mut buf = BytesMut::from(&b"d\x7f\xff\xff\xff"[..]);
        assert!(matches!(decode(&mut buf, 1 << 20), Err(ProtocolError::TooLarge { .. })));
    }

    #[test]
    fn frame_new_round_trips() {
        let frame = Frame::new(b'Z', b"I");
        assert_eq!(frame.raw(), b"Z\0\0\0\x05I");
        let mut buf = BytesMut::from(frame.raw());
        assert_eq!(decode(&mut buf, 64).unwrap().unwrap(), frame);
    }

    #[test]
    fn pass_through_moves_runs_of_accepted_frames() {
        let data = [
            Frame::new(b'D', b"row one").raw(),
            Frame::new(b'D', b"row two").raw(),
            Frame::new(b'C', b"SELECT 2\0").raw(),
            Frame::new(b'Z', b"I").raw(),
        ]
        .concat();
        let plain = |tag: u8| tag != b'Z';
        let mut reader = FrameReader::with_buffered(&b""[..], 1024, BytesMut::from(&data[..]));
        let mut out = BytesMut::new();
        // Bounded by `until`: the first frame passes, then out is full.
        assert_eq!(reader.pass_through(&mut out, 1, plain), 12);
        assert_eq!(reader.pass_through(&mut out, 1024, plain), 12 + 14);
        assert_eq!(&out[..], &data[..38]);
        // ReadyForQuery is refused: it stays for `buffered`.
        assert_eq!(reader.pass_through(&mut out, 1024, plain), 0);
        assert_eq!(reader.buffered().unwrap().unwrap(), Frame::new(b'Z', b"I"));
        assert!(reader.buffered().unwrap().is_none());
    }

    #[test]
    fn pass_through_leaves_partial_and_malformed_frames() {
        let mut partial = BytesMut::from(Frame::new(b'D', b"row").raw());
        partial.truncate(6);
        let mut reader = FrameReader::with_buffered(&b""[..], 1024, partial);
        let mut out = BytesMut::new();
        assert_eq!(reader.pass_through(&mut out, 1024, |_| true), 0);
        assert!(reader.buffered().unwrap().is_none());

        for bad in [&b"D\0\0\0\x02xx"[..], b"D\x7f\0\0\0"] {
            let mut reader = FrameReader::with_buffered(&b""[..], 1024, BytesMut::from(bad));
            assert_eq!(reader.pass_through(&mut out, 1024, |_| true), 0);
            assert!(reader.buffered().is_err(), "{bad:?}");
        }
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn fill_waits_for_a_whole_frame_and_reports_errors() {
        let data = [Frame::new(b'C', b"SELECT 1\0").raw(), &b"Z\0\0"[..]].concat();
        let mut reader = FrameReader::new(&data[..], 1024);
        assert!(reader.fill().await.unwrap());
        assert_eq!(reader.buffered().unwrap().unwrap().tag(), b'C');
        assert!(matches!(reader.fill().await, Err(ProtocolError::Truncated)));

        let mut oversized = FrameReader::new(&b"D\x7f\0\0\0"[..], 1024);
        assert!(oversized.fill().await.unwrap());
        assert!(matches!(oversized.buffered(), Err(ProtocolError::TooLarge { .. })));
        assert!(!FrameReader::new(&b""[..], 1024).fill().await.unwrap());
    }

    #[tokio::test]
    async fn reader_reports_truncation() {
        let data: &[u8] = b"Q\0\0\0\x0dSELE";
        let mut reader = FrameReader::new(data, 1024);
        assert!(matches!(reader.next().await, Err(ProtocolError::Truncated)));
        let mut empty = FrameReader::new(&b""[..], 1024);
        assert!(empty.next().await.unwrap().is_none());
    }
}
