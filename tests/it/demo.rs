//! `pgnear demo`, the README's first command, run as a newcomer runs it:
//! the binary starts a primary and two replicas, routes through pgnear,
//! prints its node table, and on Ctrl-C stops everything it started.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Starting three servers (initdb, two base backups) on a loaded machine.
const START: Duration = Duration::from_secs(120);
/// Reads, replication and a node-table refresh (every 2 s).
const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn the_demo_routes_reads_to_the_local_replica_and_cleans_up_on_ctrl_c() {
    let logs = tempfile::NamedTempFile::new().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgnear"))
        .args(["demo", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(logs.reopen().unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut demo = Demo(child);
    let mut lines = BufReader::new(demo.0.stdout.take().unwrap()).lines();
    let printed = Arc::new(Mutex::new(String::new()));
    let addr = tokio::time::timeout(START, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.strip_prefix("pgnear is listening on ") {
                return rest.split_whitespace().next().unwrap().trim_end_matches('.').to_string();
            }
        }
        panic!("the demo ended before listening: {}", std::fs::read_to_string(logs.path()).unwrap())
    })
    .await
    .unwrap_or_else(|_| panic!("the demo did not start in {START:?}"));
    let addr: SocketAddr = addr.parse().unwrap();
    let reader = {
        let printed = printed.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                printed.lock().unwrap().push_str(&format!("{line}\n"));
            }
        })
    };

    let conn = format!("host={} port={} user=postgres dbname=postgres", addr.ip(), addr.port());
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("CREATE TABLE demo_check (id int)").await.unwrap();
    let row = client.query_one("INSERT INTO demo_check VALUES (1) RETURNING inet_server_port()", &[]).await;
    let primary: i32 = row.unwrap().get(0);
    // Reads reach a replica once the write has replayed there, and then
    // the local one: the far replica applies commits 500 ms late, 110 ms
    // away.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let replica = loop {
        let row = client.query_one("SELECT inet_server_port(), count(*) FROM demo_check", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(1), 1, "a stale read");
        let port: i32 = row.get(0);
        if port != primary {
            break port;
        }
        assert!(tokio::time::Instant::now() < deadline, "reads never left the primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for _ in 0..20 {
        let port: i32 = client.query_one("SELECT inet_server_port()", &[]).await.unwrap().get(0);
        assert_eq!(port, replica, "reads stay on the nearest replica");
    }
    // The node table shows the roles, and the queries on the local
    // replica and none on the far one.
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let table = last_table(&printed.lock().unwrap());
        let row = |name: &str| table.iter().find(|r| r[0] == name).cloned().unwrap_or_default();
        let (us, eu, ap) = (row("us-primary"), row("eu-replica"), row("ap-replica"));
        let ready = us.get(1).is_some_and(|r| r == "primary")
            && eu.get(1).is_some_and(|r| r == "replica")
            && ap.get(1).is_some_and(|r| r == "replica")
            && eu.last().is_some_and(|share| share != "0%" && share != "-");
        if ready {
            assert_eq!(ap.last().map(String::as_str), Some("0%"), "{table:?}");
            assert!([&us, &eu, &ap].iter().all(|r| r.get(3).is_some_and(|up| up == "true")), "{table:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the node table never showed it: {table:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Ctrl-C stops it at once, though a client is still connected.
    assert!(demo.interrupt(), "Ctrl-C did not reach the demo");
    let status = tokio::time::timeout(SETTLE, demo.0.wait()).await.expect("the demo did not stop").unwrap();
    assert!(status.success(), "{status}: {}", std::fs::read_to_string(logs.path()).unwrap());
    reader.await.unwrap();
    let printed = printed.lock().unwrap().clone();
    assert!(printed.contains("stopping pgnear and the cluster"));
    assert!(printed.contains("reads right after a write: "), "{printed}");
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "the session outlived the demo");
    // Everything it started is gone.
    for port in [addr.port(), primary as u16, replica as u16] {
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err();
        assert!(refused, "port {port} still accepts connections after the demo stopped");
    }
}

/// The demo's process. A test that fails part way still stops it with
/// Ctrl-C, so that it stops its servers too (a kill would leave them).
struct Demo(tokio::process::Child);

impl Demo {
    /// Sends SIGINT, as Ctrl-C in a terminal does.
    fn interrupt(&self) -> bool {
        let Some(pid) = self.0.id() else { return false };
        let kill = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
        kill.is_ok_and(|status| status.success())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) || !self.interrupt() {
            return;
        }
        for _ in 0..300 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The rows of the last complete node table printed, split on whitespace.
fn last_table(printed: &str) -> Vec<Vec<String>> {
    let blocks: Vec<&str> = printed.split("\n\n").filter(|b| b.starts_with("node ")).collect();
    let Some(block) = blocks.last() else { return Vec::new() };
    block.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}
