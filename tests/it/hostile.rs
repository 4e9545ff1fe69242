//! Malformed and out-of-order input, one test per kind: each gets the
//! exact SQLSTATE (or the close the protocol calls for), and a concurrent
//! well-behaved session is unaffected. The last row of the matrix, 10,000
//! connections that never speak, is in `limits.rs`.
//!
//! Cancel keys follow PostgreSQL: the key is the secret, so whoever
//! presents a session's key may cancel that session's query, from any
//! connection; a wrong key cancels nothing and gets no answer.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::support::wire::{bind, execute, message, query, startup_packet, sync, Msg, Wire};
use crate::support::{primary_only, start, Env, ProxyConfig, PATIENCE};
use pgnear::lab::cluster::Cluster;
use pgnear::protocol::startup::{cancel_request, CancelKey};

/// Checks that the bystander's session and a fresh one both still work.
async fn still_serving(env: &Env, bystander: &tokio_postgres::Client) {
    assert_eq!(bystander.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let fresh = env.client().await;
    assert_eq!(fresh.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

/// Logs in with the raw client, then sends `bytes`, expecting FATAL `code`.
async fn after_login(env: &Env, bytes: &[u8], code: &str, what: &str) {
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    wire.send(bytes).await;
    assert_eq!(wire.expect_fatal().await, code, "{what}");
}

/// Sends `bytes` as the first thing on a new connection, expecting FATAL `code`.
async fn before_startup(env: &Env, bytes: &[u8], code: &str, what: &str) {
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(bytes).await;
    assert_eq!(wire.expect_fatal().await, code, "{what}");
}

/// Sends `bytes` where the startup packet belongs, with a length that is no
/// startup packet's: pgnear, like PostgreSQL, closes without a word (the
/// client may not be ready to read one).
async fn bad_length_before_startup(env: &Env, bytes: &[u8], what: &str) {
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(bytes).await;
    if let Some(msg) = wire.recv().await {
        panic!("{what}: expected a close without a message, got {msg:?}");
    }
}

#[tokio::test]
async fn garbage_bytes() {
    let env = primary_only().await;
    let bystander = env.client().await;
    bad_length_before_startup(&env, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP instead of startup").await;
    before_startup(&env, &[0, 0, 0, 8, 0, 2, 0, 0], "0A000", "protocol 2.0").await;
    // Read as a frame, "GET " claims a length far over max_message_bytes.
    after_login(&env, b"GET / HTTP/1.1\r\n\r\n", "08P01", "HTTP after login").await;
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn length_fields_zero_negative_and_two_to_the_31() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let lengths: [(&str, [u8; 4]); 3] =
        [("0", [0, 0, 0, 0]), ("negative", [0xff, 0xff, 0xff, 0xf0]), ("2^31", [0x80, 0, 0, 0])];
    for (name, length) in lengths {
        let mut frame = vec![b'Q'];
        frame.extend_from_slice(&length);
        after_login(&env, &frame, "08P01", &format!("message length {name}")).await;
        bad_length_before_startup(
            &env,
            &[length.as_slice(), &[0, 3, 0, 0]].concat(),
            &format!("startup {name}"),
        )
        .await;
    }
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn truncated_frame() {
    let env = primary_only().await;
    let bystander = env.client().await;
    // Half a message, then the client hangs up: nothing to answer, a close.
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    wire.send(&query("SELECT 1")[..6]).await;
    wire.stream.shutdown().await.ok();
    wire.expect_closed().await;
    // The same before startup.
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("user", "postgres")])[..10]).await;
    wire.stream.shutdown().await.ok();
    wire.expect_closed().await;
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn unknown_message_type_and_oversized_message() {
    let env = start(Cluster::builder(), ProxyConfig::default().proxy("max_message_bytes = 4096")).await;
    let bystander = env.client().await;
    after_login(&env, &message(b'@', b""), "08P01", "unknown type").await;
    after_login(&env, &message(b'p', b"secret\0"), "08P01", "password message after login").await;
    after_login(&env, &query(&"x".repeat(10_000)), "08P01", "over max_message_bytes").await;
    after_login(&env, &message(b'Q', b"SELECT 1"), "08P01", "unterminated query string").await;
    still_serving(&env, &bystander).await;
}

/// Sends `bytes` and expects the server's ERROR `code`, then
/// ReadyForQuery; then checks the session still answers a query.
async fn server_error_then_continue(wire: &mut Wire, bytes: &[u8], code: &str) {
    wire.send(bytes).await;
    let msgs = wire.until_ready().await;
    let error = msgs.iter().find(|m| m.tag == b'E').unwrap_or_else(|| panic!("no error in {msgs:?}"));
    assert_eq!(error.sqlstate().as_deref(), Some(code), "{error:?}");
    assert_eq!(error.field(b'V').as_deref(), Some("ERROR"), "{error:?}");
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'));
    wire.send(&query("SELECT 'still here'")).await;
    let msgs = wire.until_ready().await;
    assert!(msgs.iter().any(|m| m.tag == b'D'), "{msgs:?}");
}

#[tokio::test]
async fn wrong_phase_bind_before_parse_and_execute_of_unknown_portal() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    // The server's own answers, relayed; the session goes on.
    server_error_then_continue(&mut wire, &[bind("", ""), sync()].concat(), "26000").await;
    server_error_then_continue(&mut wire, &[bind("", "never_parsed"), sync()].concat(), "26000").await;
    server_error_then_continue(&mut wire, &[execute("no_such_portal"), sync()].concat(), "34000").await;
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn wrong_phase_data_before_startup() {
    let env = primary_only().await;
    let bystander = env.client().await;
    // A Query where the startup packet belongs: its tag reads as a length.
    bad_length_before_startup(&env, &query("SELECT 1"), "query before startup").await;
    bad_length_before_startup(&env, &message(b'p', b"secret\0"), "password before startup").await;
    // node-postgres, ended while still connecting, sends Terminate before
    // its startup packet, and has no handler for an ErrorResponse then.
    bad_length_before_startup(&env, &message(b'X', b""), "Terminate before startup").await;
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn oversized_startup_packet() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let mut huge = 20_000i32.to_be_bytes().to_vec();
    huge.extend(196_608i32.to_be_bytes());
    huge.extend(vec![b'a'; 19_992]);
    bad_length_before_startup(&env, &huge, "20 kB startup packet").await;
    // Within the limit but with parameters that never end.
    let mut unterminated = 100i32.to_be_bytes().to_vec();
    unterminated.extend(196_608i32.to_be_bytes());
    unterminated.extend(vec![b'a'; 92]);
    before_startup(&env, &unterminated, "08P01", "unterminated parameters").await;
    still_serving(&env, &bystander).await;
}

/// The key pgnear gave a raw session.
fn backend_key(msgs: &[Msg]) -> CancelKey {
    let key = msgs.iter().find(|m| m.tag == b'K').expect("no BackendKeyData");
    let int = |i: usize| i32::from_be_bytes([key.body[i], key.body[i + 1], key.body[i + 2], key.body[i + 3]]);
    CancelKey { pid: int(0), secret: int(4) }
}

/// Sends a CancelRequest on a new connection; pgnear closes it without a word.
async fn send_cancel(env: &Env, key: CancelKey) {
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&cancel_request(key)).await;
    wire.expect_closed().await;
}

/// Starts `sql` on a raw session and waits until the server runs it.
async fn start_sleep(env: &Env, wire: &mut Wire, seconds: &str) {
    let sql = format!("SELECT pg_sleep({seconds})");
    wire.send(&query(&sql)).await;
    let observer = env.client().await;
    let count = "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while observer.query_one(count, &[&sql]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "{sql} never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cancel_request_with_a_wrong_key() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let (mut running, msgs) = Wire::login(env.proxy.addr(), "postgres").await;
    let key = backend_key(&msgs);
    start_sleep(&env, &mut running, "0.5").await;
    // The right process ID with the wrong secret, and a key nobody holds.
    send_cancel(&env, CancelKey { pid: key.pid, secret: key.secret.wrapping_add(1) }).await;
    send_cancel(&env, CancelKey { pid: 1234, secret: 5678 }).await;
    let msgs = running.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "the query was cancelled: {msgs:?}");
    assert!(msgs.iter().any(|m| m.tag == b'D'));
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn replayed_cancel_key_cancels_only_its_own_session() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let (mut victim, msgs) = Wire::login(env.proxy.addr(), "postgres").await;
    let key = backend_key(&msgs);
    let (mut other, _) = Wire::login(env.proxy.addr(), "postgres").await;
    start_sleep(&env, &mut victim, "30").await;
    start_sleep(&env, &mut other, "0.5").await;
    // Another connection replays the victim's key: as in PostgreSQL, the
    // key is the secret, so the victim's query (and only it) is cancelled.
    send_cancel(&env, key).await;
    let msgs = victim.until_ready().await;
    let error = msgs.iter().find(|m| m.tag == b'E').expect("not cancelled");
    assert_eq!(error.sqlstate().as_deref(), Some("57014"));
    let msgs = other.until_ready().await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "the other session was cancelled: {msgs:?}");
    // Both sessions go on.
    for wire in [&mut victim, &mut other] {
        wire.send(&query("SELECT 1")).await;
        assert!(wire.until_ready().await.iter().any(|m| m.tag == b'D'));
    }
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn too_many_clients_get_53300() {
    let env = start(Cluster::builder(), ProxyConfig::default().proxy("max_client_connections = 2")).await;
    let a = env.client().await;
    let _b = env.client().await;
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("user", "postgres")])).await;
    assert_eq!(wire.expect_fatal().await, "53300");
    assert_eq!(a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}
