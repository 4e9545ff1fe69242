//! A WAN link on loopback: relays 127.0.0.1:<port> to a target, delaying
//! each direction by `--delay-ms`, until killed. Used by
//! `benches/pgbench/run.sh` to put a primary 40 ms (each way) away.
//!
//! ```text
//! cargo run --release --example wan_relay -- --target 127.0.0.1:5432 --delay-ms 40
//! ```
//!
//! [`pgnear::lab::relay::Relay`] listens on a free port of its choosing; the
//! port is printed on stdout as `port=<n>` (and written to `--port-file`
//! if given) once the relay accepts connections.

use std::net::SocketAddr;
use std::time::Duration;

use pgnear::lab::relay::Relay;

fn usage() -> ! {
    eprintln!("usage: wan_relay --target HOST:PORT [--delay-ms N] [--port-file PATH]");
    std::process::exit(2)
}

fn main() {
    let mut target: Option<SocketAddr> = None;
    let mut delay_ms: u64 = 40;
    let mut port_file: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--target" => target = value().parse().ok(),
            "--delay-ms" => delay_ms = value().parse().unwrap_or_else(|_| usage()),
            "--port-file" => port_file = Some(value()),
            _ => usage(),
        }
    }
    let Some(target) = target else { usage() };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap_or_else(
            |e| {
                eprintln!("wan_relay: {e}");
                std::process::exit(1)
            },
        );
    runtime.block_on(async move {
        let relay = match Relay::start(target, Duration::from_millis(delay_ms)).await {
            Ok(relay) => relay,
            Err(e) => {
                eprintln!("wan_relay: {e}");
                std::process::exit(1)
            }
        };
        if let Some(path) = port_file {
            if let Err(e) = std::fs::write(&path, format!("{}\n", relay.port())) {
                eprintln!("wan_relay: writing {path}: {e}");
                std::process::exit(1)
            }
        }
        println!("port={}", relay.port());
        let _ = tokio::signal::ctrl_c().await;
        drop(relay);
    });
}
