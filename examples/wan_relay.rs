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
//!
//! With `--plain` it is instead the cheapest relay tokio allows, with no
//! delay: one event loop on one thread, and per connection nothing but
//! `copy_bidirectional` between the two sockets. It parses nothing, so it is
//! the floor under any proxy that reads and writes every byte on this
//! runtime: the pgbench harness's `relay` target.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use pgnear::lab::relay::Relay;
use tokio::net::{TcpListener, TcpStream};

fn usage() -> ! {
    eprintln!("usage: wan_relay --target HOST:PORT [--delay-ms N | --plain] [--port-file PATH]");
    std::process::exit(2)
}

fn fail(what: impl std::fmt::Display) -> ! {
    eprintln!("wan_relay: {what}");
    std::process::exit(1)
}

fn main() {
    let mut target: Option<SocketAddr> = None;
    let mut delay_ms: u64 = 40;
    let mut plain = false;
    let mut port_file: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--target" => target = value().parse().ok(),
            "--delay-ms" => delay_ms = value().parse().unwrap_or_else(|_| usage()),
            "--plain" => plain = true,
            "--port-file" => port_file = Some(value()),
            _ => usage(),
        }
    }
    let Some(target) = target else { usage() };
    let runtime = if plain {
        tokio::runtime::Builder::new_current_thread().enable_io().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
    };
    let runtime = runtime.unwrap_or_else(|e| fail(e));
    runtime.block_on(async move {
        // Dropping the delay relay aborts its connections; the plain one ends with the process.
        let (port, _relay) = if plain {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap_or_else(|e| fail(e));
            let port = listener.local_addr().unwrap_or_else(|e| fail(e)).port();
            tokio::spawn(pump_all(listener, target));
            (port, None)
        } else {
            let relay =
                Relay::start(target, Duration::from_millis(delay_ms)).await.unwrap_or_else(|e| fail(e));
            (relay.port(), Some(relay))
        };
        if let Some(path) = port_file {
            if let Err(e) = std::fs::write(&path, format!("{port}\n")) {
                fail(format_args!("writing {path}: {e}"))
            }
        }
        println!("port={port}");
        let _ = tokio::signal::ctrl_c().await;
    });
}

/// Accepts connections until the process ends, each pumped to `target` by its own task.
async fn pump_all(listener: TcpListener, target: SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(async move {
                    if let Err(e) = pump(client, target).await {
                        eprintln!("wan_relay: connection: {e}");
                    }
                });
            }
            Err(e) => {
                // Out of descriptors, for instance: back off rather than spin. The runtime has
                // no timer (as pgnear's event loops have none), so the pause blocks the loop.
                eprintln!("wan_relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

async fn pump(mut client: TcpStream, target: SocketAddr) -> io::Result<()> {
    let mut server = TcpStream::connect(target).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await.map(drop)
}
