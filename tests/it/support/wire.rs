//! A raw protocol client for tests that need to send exactly the bytes a
//! driver would not (or read what a driver hides, like BackendKeyData).

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;

/// One message from the server.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The `C` field of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    /// The columns of a DataRow (`None` for NULL).
    pub fn columns(&self) -> Vec<Option<Vec<u8>>> {
        assert_eq!(self.tag, b'D', "not a DataRow: {self:?}");
        let count = i16::from_be_bytes([self.body[0], self.body[1]]);
        let mut rest = &self.body[2..];
        (0..count)
            .map(|_| {
                let len = i32::from_be_bytes(rest[..4].try_into().unwrap());
                rest = &rest[4..];
                let len = usize::try_from(len).ok()?;
                let value = rest[..len].to_vec();
                rest = &rest[len..];
                Some(value)
            })
            .collect()
    }

    pub fn field(&self, kind: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&k, tail)) = rest.split_first() {
            if k == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if k == kind {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }
}

pub struct Wire {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn query(sql: &str) -> Vec<u8> {
    query_bytes(sql.as_bytes())
}

/// A Query of a text in any encoding.
pub fn query_bytes(sql: &[u8]) -> Vec<u8> {
    let mut body = sql.to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Parse of `sql` as statement `name`, no parameter types.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    message(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

/// Bind of statement `statement` to portal `portal`, no parameters.
pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for name in [portal, statement] {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
    }
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // no formats, parameters or result formats
    message(b'B', &body)
}

pub fn execute(portal: &str) -> Vec<u8> {
    let mut body = portal.as_bytes().to_vec();
    body.extend_from_slice(&[0, 0, 0, 0, 0]);
    message(b'E', &body)
}

pub fn sync() -> Vec<u8> {
    message(b'S', b"")
}

impl Wire {
    pub async fn connect(addr: SocketAddr) -> Wire {
        Wire { stream: TcpStream::connect(addr).await.unwrap(), buf: BytesMut::new() }
    }

    /// Connects and logs in as a trust user; returns the startup messages.
    pub async fn login(addr: SocketAddr, user: &str) -> (Wire, Vec<Msg>) {
        let mut wire = Wire::connect(addr).await;
        wire.send(&startup_packet(&[("user", user), ("database", "postgres")])).await;
        let msgs = wire.until_ready().await;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "login failed: {msgs:?}");
        (wire, msgs)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next message, or `None` once the server closed.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some(Msg { tag, body });
                }
            }
            let read = tokio::time::timeout(PATIENCE, self.stream.read_buf(&mut self.buf))
                .await
                .expect("server neither answered nor closed");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Messages up to and including ReadyForQuery (or the close).
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut msgs = Vec::new();
        while let Some(msg) = self.recv().await {
            let done = msg.tag == b'Z';
            msgs.push(msg);
            if done {
                break;
            }
        }
        msgs
    }

    /// Reads until an ErrorResponse, asserts the server then closes, and
    /// returns the error's SQLSTATE.
    pub async fn expect_fatal(&mut self) -> String {
        let error = loop {
            match self.recv().await {
                Some(msg) if msg.tag == b'E' => break msg,
                Some(_) => continue,
                None => panic!("connection closed without an ErrorResponse"),
            }
        };
        assert_eq!(error.field(b'V').as_deref(), Some("FATAL"), "{error:?}");
        assert!(self.recv().await.is_none(), "connection stayed open after FATAL");
        error.sqlstate().unwrap_or_default()
    }

    /// Asserts the server closed without sending anything more.
    pub async fn expect_closed(&mut self) {
        if let Some(msg) = self.recv().await {
            panic!("expected a close, got {msg:?}");
        }
    }
}
