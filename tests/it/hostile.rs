//! Malformed and out-of-order input: each gets a clear error (or the close
//! the protocol calls for), and a concurrent well-behaved session is
//! unaffected.

use crate::support::wire::{message, query, startup_packet, Wire};
use crate::support::{primary_only, start, Env, ProxyConfig};
use pgnear::lab::cluster::Cluster;

/// Checks that a normal session still works.
async fn still_serving(env: &Env, bystander: &tokio_postgres::Client) {
    assert_eq!(bystander.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let fresh = env.client().await;
    assert_eq!(fresh.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test]
async fn garbage_and_bad_startup_packets() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(wire.expect_fatal().await, "08P01");
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&[0, 0, 0, 8, 0, 2, 0, 0]).await; // protocol 2.0
    assert_eq!(wire.expect_fatal().await, "0A000");
    let mut wire = Wire::connect(env.proxy.addr()).await;
    let mut huge = 20_000i32.to_be_bytes().to_vec();
    huge.extend(vec![0u8; 20_000]);
    wire.send(&huge).await;
    assert_eq!(wire.expect_fatal().await, "08P01");
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("user", "postgres")])[..10]).await;
    wire.stream.shutdown().await.ok();
    wire.expect_closed().await;
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn bad_lengths_unknown_types_and_oversized_messages() {
    let env = start(Cluster::builder(), ProxyConfig::default().proxy("max_message_bytes = 4096")).await;
    let bystander = env.client().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 0", vec![b'Q', 0, 0, 0, 0]),
        ("negative length", vec![b'Q', 0xff, 0xff, 0xff, 0xf0]),
        ("length 2^31", vec![b'Q', 0x80, 0, 0, 0]),
        ("unknown type", message(b'@', b"")),
        ("password outside auth", message(b'p', b"secret\0")),
        ("oversized query", query(&"x".repeat(10_000))),
        ("unterminated query", message(b'Q', b"SELECT 1")),
    ];
    for (name, bytes) in cases {
        let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
        wire.send(&bytes).await;
        assert_eq!(wire.expect_fatal().await, "08P01", "{name}");
    }
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn truncated_frame_and_wrong_cancel_key() {
    let env = primary_only().await;
    let bystander = env.client().await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    wire.send(&query("SELECT 1")[..6]).await;
    wire.stream.shutdown().await.ok();
    wire.expect_closed().await;
    // A cancel with a key nobody holds: closed, nothing cancelled.
    let mut cancel = Wire::connect(env.proxy.addr()).await;
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend(80_877_102i32.to_be_bytes());
    packet.extend(1234i32.to_be_bytes());
    packet.extend(5678i32.to_be_bytes());
    cancel.send(&packet).await;
    cancel.expect_closed().await;
    still_serving(&env, &bystander).await;
}

#[tokio::test]
async fn too_many_clients_get_53300() {
    let env = start(Cluster::builder(), ProxyConfig::default().proxy("max_client_connections = 2")).await;
    let _a = env.client().await;
    let _b = env.client().await;
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("user", "postgres")])).await;
    assert_eq!(wire.expect_fatal().await, "53300");
}

use tokio::io::AsyncWriteExt;
