//! Unix-domain sockets: clients on `proxy.unix_socket_dir` beside TCP,
//! and nodes reached through their servers' own sockets (a host that is
//! a directory), against a real primary and a streaming replica.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use pgnear::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

use crate::support::certs::{tls_section, Ca};
use crate::support::wire::startup_packet;
use crate::support::{connect, run_tool, sqlstate, start, ProxyConfig, PATIENCE};

/// A directory for pgnear's socket, removed with everything in it when
/// dropped.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new(name: &str) -> SocketDir {
        let dir = std::env::temp_dir().join(format!("pgnear-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SocketDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// `unix_socket_dir = "<dir>"` for `[proxy]`.
    fn setting(&self) -> String {
        format!("unix_socket_dir = \"{}\"", self.0.display())
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A client through pgnear's Unix socket.
async fn unix_client(dir: &Path, proxy: &Proxy) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host_path(dir).port(proxy.addr().port()).user("postgres").dbname("postgres");
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn scalar(client: &Client, sql: &str) -> String {
    let row = client.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.get::<_, Option<String>>(0).unwrap_or_default()
}

#[tokio::test]
async fn clients_and_servers_on_unix_sockets() {
    let dir = SocketDir::new("both");
    let cluster = Cluster::builder().replica().start().await.unwrap();
    let nodes: String = [(cluster.primary(), "us-east"), (cluster.replica(0), "eu-west")]
        .iter()
        .map(|(node, region)| {
            format!(
                "[[nodes]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\nregion = \"{region}\"\n",
                node.name(),
                node.socket_dir().display(),
                node.port()
            )
        })
        .collect();
    let config =
        ProxyConfig::default().nodes(&nodes).proxy(&dir.setting()).proxy("unix_socket_mode = \"0700\"");
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    let socket = dir.path().join(format!(".s.PGSQL.{}", proxy.addr().port()));
    assert_eq!(proxy.unix_socket(), Some(socket.as_path()));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "unix_socket_mode is applied");

    // Writes go to the primary over its socket, and the session reads
    // its own write at once.
    let client = unix_client(dir.path(), &proxy).await.unwrap();
    client.batch_execute("CREATE TABLE notes (id int, body text)").await.unwrap();
    client.execute("INSERT INTO notes VALUES (1, 'over a socket')", &[]).await.unwrap();
    assert_eq!(scalar(&client, "SELECT body FROM notes WHERE id = 1").await, "over a socket");
    // The server saw a Unix-socket client: no client address.
    assert_eq!(scalar(&client, "SELECT coalesce(inet_client_addr()::text, 'local')").await, "local");

    // Reads reach the replica, through its socket, once it has replayed.
    let reader = unix_client(dir.path(), &proxy).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // The lab names each server's cluster after its node.
        let on_replica =
            scalar(&reader, "SELECT current_setting('cluster_name')").await == cluster.replica(0).name();
        if on_replica && scalar(&reader, "SELECT count(*)::text FROM notes").await == "1" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "reads never reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A user-defined volatile function is known from the primary's
    // catalog, loaded over its socket: the replica-bound session's call
    // goes to the primary (a replica would refuse the INSERT).
    client
        .batch_execute(
            "CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE \
             AS 'INSERT INTO notes VALUES (2, ''bumped'') RETURNING id'",
        )
        .await
        .unwrap();
    assert_eq!(reader.query_one("SELECT bump()", &[]).await.unwrap().get::<_, i32>(0), 2);

    // A cancel comes in on pgnear's socket and goes out on the server's.
    let sleeper = unix_client(dir.path(), &proxy).await.unwrap();
    let token = sleeper.cancel_token();
    let running = tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(60)").await.map(|_| ()) });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !running.is_finished() {
        assert!(tokio::time::Instant::now() < deadline, "the sleep was never cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel_query(NoTls).await.unwrap();
    }
    assert_eq!(sqlstate(running.await.unwrap()), "57014", "query_canceled");

    // TCP is served beside the socket.
    let tcp = connect(&format!("host=127.0.0.1 port={} user=postgres dbname=postgres", proxy.addr().port()))
        .await
        .unwrap();
    assert_eq!(scalar(&tcp, "SELECT body FROM notes WHERE id = 1").await, "over a socket");
    // libpq finds the socket by directory and port, as it finds PostgreSQL's.
    let (dir_arg, port) = (dir.path().display().to_string(), proxy.addr().port().to_string());
    let args = ["-X", "-At", "-h", &dir_arg, "-p", &port, "-U", "postgres", "-d", "postgres"];
    let out = run_tool("psql", &[&args[..], &["-c", "SELECT body FROM notes WHERE id = 1"]].concat()).await;
    assert_eq!(out.trim(), "over a socket");

    drop((client, reader, tcp));
    tokio::time::timeout(PATIENCE, proxy.shutdown()).await.expect("the proxy drains");
    assert!(!socket.exists(), "the socket file is removed at shutdown");
}

/// PostgreSQL offers no TLS on its Unix socket, and `hostssl` lines match
/// only TCP: a Unix client gets 'N' to an SSLRequest and may log in
/// although `tls.mode = "require"` refuses plain TCP.
#[tokio::test]
async fn a_unix_client_is_not_offered_tls_and_require_applies_to_tcp() {
    let dir = SocketDir::new("tls");
    let ca = Ca::new("unix-ca");
    let cert = ca.server("pgnear", &["127.0.0.1"]);
    let config = ProxyConfig::default().proxy(&dir.setting()).section(&tls_section("require", &cert));
    let env = start(Cluster::builder(), config).await;
    let socket = env.proxy.unix_socket().unwrap().to_path_buf();

    let tcp = connect(&env.conn_string("postgres", "")).await;
    assert!(tcp.is_err(), "plain TCP is refused under require");

    let mut raw = tokio::net::UnixStream::connect(&socket).await.unwrap();
    raw.write_all(&pgnear::protocol::startup::ssl_request()).await.unwrap();
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N", "no TLS on the socket");
    // The same connection goes on in plain text to a login.
    raw.write_all(&startup_packet(&[("user", "postgres"), ("database", "postgres")])).await.unwrap();
    let mut tag = [0u8; 1];
    raw.read_exact(&mut tag).await.unwrap();
    assert_eq!(&tag, b"R", "authentication follows");
    drop(raw);

    let client = unix_client(dir.path(), &env.proxy).await.unwrap();
    assert_eq!(scalar(&client, "SELECT 'plain over the socket'").await, "plain over the socket");
}

/// A second pgnear does not take over a socket the first still serves.
#[tokio::test]
async fn a_live_socket_is_not_taken_over() {
    let dir = SocketDir::new("live");
    let env = start(Cluster::builder(), ProxyConfig::default().proxy(&dir.setting())).await;
    let port = env.proxy.addr().port();
    // Another loopback address, the same port: the same socket name.
    let second = ProxyConfig::default()
        .proxy(&dir.setting())
        .toml(&env.cluster)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.2:{port}\""));
    let config = pgnear::Config::parse(&second, &|_| None).unwrap();
    let error = Proxy::start(config).await.err().expect("the second proxy must not start");
    let text = error.to_string();
    assert!(text.contains(".s.PGSQL.") && text.contains("another server is listening"), "{text}");
    // The first is unharmed.
    let client = unix_client(dir.path(), &env.proxy).await.unwrap();
    assert_eq!(scalar(&client, "SELECT 'still here'").await, "still here");
}

/// A socket directory that does not exist stops the start with the path.
#[tokio::test]
async fn a_missing_socket_directory_is_a_start_error() {
    let missing = std::env::temp_dir().join(format!("pgnear-sock-{}-missing", std::process::id()));
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nunix_socket_dir = \"{}\"\n\
         [[nodes]]\nname = \"a\"\nhost = \"127.0.0.1\"\nport = 1\n",
        missing.display()
    );
    let config = pgnear::Config::parse(&text, &|_| None).unwrap();
    let error = Proxy::start(config).await.err().expect("no directory, no start");
    let text = error.to_string();
    assert!(text.starts_with(&format!("cannot listen on {}/.s.PGSQL.", missing.display())), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
}
