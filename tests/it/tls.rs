//! TLS toward clients (psql and tokio-postgres, SSLRequest and direct TLS,
//! SCRAM-SHA-256-PLUS, cancel inside TLS, reload on SIGHUP) and toward
//! servers (each sslmode against real servers, one that requires TLS, prefer
//! falling back to plain text where TLS fails).

use std::sync::Arc;
use std::time::Duration;

use pgnear::backend::{connect, ConnectError, ServerLogin};
use pgnear::config::{NodeConfig, RoleSetting, SslMode};
use pgnear::lab::cluster::{AuthMethod, Cluster};
use pgnear::tls::Connector;
use pgnear::Proxy;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::certs::{server_ssl, tls_section, Ca};
use crate::support::wire::{startup_packet, Wire};
use crate::support::{start, Env, ProxyConfig, PATIENCE};

/// Runs psql; returns whether it succeeded, and what it printed.
async fn psql(conn: &str, command: &str, password: Option<&str>) -> (bool, String) {
    let mut cmd = crate::support::pg_tool("psql");
    cmd.args(["-X", "-At", "-d", conn, "-c", command]);
    cmd.env_remove("PGPASSWORD").env_remove("PGSSLMODE");
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    let output = cmd.output().await.unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// A connection string to pgnear with `host` as the name to verify.
fn conn_to(env: &Env, host: &str, user: &str, extra: &str) -> String {
    format!(
        "host={host} hostaddr=127.0.0.1 port={} user={user} dbname=postgres {extra}",
        env.proxy.addr().port()
    )
}

const APP_USER: &str = "name = \"app\"\npassword = \"secret\"\nserver_user = \"postgres\"";

#[tokio::test]
async fn psql_with_sslmode_require_and_verify_full() {
    let ca = Ca::new("ca");
    let cert = ca.server("pgnear", &["127.0.0.1", "localhost"]);
    let config = ProxyConfig::default().user(APP_USER).section(&tls_section("require", &cert));
    let env = start(Cluster::builder(), config).await;
    let root = ca.root().display().to_string();

    let (ok, out) =
        psql(&conn_to(&env, "127.0.0.1", "postgres", "sslmode=require"), "\\conninfo", None).await;
    assert!(ok && out.contains("SSL connection"), "{out}");
    let verify = format!("sslmode=verify-full sslrootcert={root}");
    for host in ["127.0.0.1", "localhost"] {
        let (ok, out) = psql(&conn_to(&env, host, "postgres", &verify), "SELECT 40 + 2", None).await;
        assert!(ok && out.trim() == "42", "{host}: {out}");
    }
    // SCRAM-SHA-256-PLUS: libpq binds the login to pgnear's certificate.
    let plus = format!("{verify} channel_binding=require");
    let (ok, out) = psql(&conn_to(&env, "localhost", "app", &plus), "SELECT 'bound'", Some("secret")).await;
    assert!(ok && out.trim() == "bound", "{out}");
    let (ok, out) = psql(&conn_to(&env, "localhost", "app", &plus), "SELECT 1", Some("wrong")).await;
    assert!(!ok && out.contains("password authentication failed"), "{out}");

    // Plain text is refused with a clear FATAL, not silence.
    let (ok, out) = psql(&conn_to(&env, "127.0.0.1", "postgres", "sslmode=disable"), "SELECT 1", None).await;
    assert!(!ok && out.contains("SSL required"), "{out}");
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("user", "postgres")])).await;
    assert_eq!(wire.expect_fatal().await, "28000");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host() {
    let ca = Ca::new("ca");
    let cert = ca.server("pgnear", &["db.example"]);
    let env = start(Cluster::builder(), ProxyConfig::default().section(&tls_section("prefer", &cert))).await;
    let verify = format!("sslmode=verify-full sslrootcert={}", ca.root().display());
    let (ok, out) = psql(&conn_to(&env, "127.0.0.1", "postgres", &verify), "SELECT 1", None).await;
    assert!(!ok && out.contains("does not match host name"), "{out}");
    let (ok, out) = psql(&conn_to(&env, "db.example", "postgres", &verify), "SELECT 1", None).await;
    assert!(ok && out.trim() == "1", "{out}");
    // verify-ca checks the chain only.
    let verify_ca = format!("sslmode=verify-ca sslrootcert={}", ca.root().display());
    let (ok, out) = psql(&conn_to(&env, "127.0.0.1", "postgres", &verify_ca), "SELECT 1", None).await;
    assert!(ok, "{out}");
    // A CA pgnear's certificate does not come from.
    let other = Ca::new("other");
    let verify = format!("sslmode=verify-ca sslrootcert={}", other.root().display());
    let (ok, out) = psql(&conn_to(&env, "127.0.0.1", "postgres", &verify), "SELECT 1", None).await;
    assert!(!ok && out.contains("certificate verify failed"), "{out}");
}

#[tokio::test]
async fn tokio_postgres_over_tls_with_channel_binding_and_cancel() {
    let ca = Ca::new("ca");
    let cert = ca.server("pgnear", &["127.0.0.1"]);
    let config = ProxyConfig::default().user(APP_USER).section(&tls_section("prefer", &cert));
    let env = start(Cluster::builder(), config).await;
    let conn = env.conn_string("app", "password=secret sslmode=require channel_binding=require");
    let (client, connection) = tokio_postgres::connect(&conn, ca.postgres_tls()).await.unwrap();
    tokio::spawn(connection);
    let row = client.query_one("SELECT $1::text || ' over TLS'", &[&"hello"]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "hello over TLS");

    // tokio-postgres sends its CancelRequest inside TLS, as libpq 17 does.
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    let sql =
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'";
    let observer = env.client().await;
    poll(|| async { observer.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) == 1 }).await;
    token.cancel_query(ca.postgres_tls()).await.unwrap();
    let error = tokio::time::timeout(PATIENCE, sleeping).await.unwrap().unwrap().unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error}");

    // `prefer` still serves plain text.
    let plain = env.client_with("app", "password=secret").await;
    assert_eq!(plain.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

/// Polls `check` until it holds.
async fn poll<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "condition did not hold in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads one message (tag and body) from any stream; `None` at the end.
async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    tokio::time::timeout(PATIENCE, r.read_exact(&mut header)).await.unwrap().ok()?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body).await.ok()?;
    Some((header[0], body))
}

/// TLS straight away, as PostgreSQL 17's `sslnegotiation=direct` does.
async fn direct_tls(env: &Env, ca: &Ca, alpn: bool) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = ca.client_config();
    if alpn {
        config.alpn_protocols = vec![b"postgresql".to_vec()];
    }
    let tcp = TcpStream::connect(env.proxy.addr()).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    let ca = Ca::new("ca");
    let cert = ca.server("pgnear", &["127.0.0.1"]);
    let env = start(Cluster::builder(), ProxyConfig::default().section(&tls_section("require", &cert))).await;

    let mut tls = direct_tls(&env, &ca, true).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    tls.write_all(&startup_packet(&[("user", "postgres"), ("database", "postgres")])).await.unwrap();
    let mut tags = Vec::new();
    while let Some((tag, _)) = read_message(&mut tls).await {
        tags.push(tag);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags.first(), Some(&b'R'), "{tags:?}");
    assert_eq!(tags.last(), Some(&b'Z'), "{tags:?}");

    // Without ALPN PostgreSQL refuses direct TLS, and so does pgnear.
    let mut tls = direct_tls(&env, &ca, false).await;
    let (tag, body) = read_message(&mut tls).await.unwrap();
    assert_eq!(tag, b'E');
    assert!(String::from_utf8_lossy(&body).contains("C08P01"), "{}", String::from_utf8_lossy(&body));
}

#[tokio::test]
async fn certificate_reloads_on_sighup_without_dropping_sessions() {
    let first = Ca::new("first");
    let cert = first.server("pgnear", &["127.0.0.1"]);
    let env = start(Cluster::builder(), ProxyConfig::default().section(&tls_section("require", &cert))).await;
    let conn = env.conn_string("postgres", "sslmode=require");
    let (old, connection) = tokio_postgres::connect(&conn, first.postgres_tls()).await.unwrap();
    tokio::spawn(connection);

    let second = Ca::new("second");
    let renewed = second.server("pgnear", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &cert.cert).unwrap();
    std::fs::copy(&renewed.key, &cert.key).unwrap();
    let pid = std::process::id().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    poll(|| async { tokio_postgres::connect(&conn, second.postgres_tls()).await.is_ok() }).await;
    assert!(tokio_postgres::connect(&conn, first.postgres_tls()).await.is_err());
    // The session that started before the reload goes on.
    assert_eq!(old.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);

    // A broken file is reported and the current certificate stays.
    std::fs::write(&cert.key, "not a key").unwrap();
    let acceptor = env.proxy.shared().tls.acceptor.as_ref().unwrap();
    let error = acceptor.reload().unwrap_err().to_string();
    assert!(error.starts_with("tls.key:"), "{error}");
    let (client, connection) = tokio_postgres::connect(&conn, second.postgres_tls()).await.unwrap();
    tokio::spawn(connection);
    assert_eq!(client.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

fn node(host: &str, port: u16, sslmode: SslMode, root: Option<&Ca>) -> NodeConfig {
    NodeConfig {
        name: "n".into(),
        host: host.into(),
        port,
        region: "local".into(),
        role: RoleSetting::Auto,
        cluster: "default".into(),
        sslmode,
        sslrootcert: root.map(|ca| ca.root()),
    }
}

/// Opens a server connection as `postgres` with the node's TLS policy.
async fn open(
    addr: std::net::SocketAddr,
    node: &NodeConfig,
) -> Result<pgnear::backend::Backend, ConnectError> {
    let connector = Connector::for_node(node, "nodes[0]").unwrap();
    let login = ServerLogin {
        user: "postgres".into(),
        auth: pgnear::backend::ServerAuth::None,
        max_connections: None,
        params: vec![("database".into(), "postgres".into())],
    };
    connect(&pgnear::cluster::Endpoint::Tcp(addr), &connector, &login, PATIENCE, 1 << 20).await
}

#[tokio::test]
async fn every_sslmode_against_servers_with_and_without_tls() {
    let ca = Ca::new("servers");
    let cert = ca.server("server", &["db.example"]);
    let secure = server_ssl(Cluster::builder(), &cert).start().await.unwrap();
    let plain = Cluster::builder().start().await.unwrap();
    let (tls_addr, plain_addr) = (secure.primary().addr(), plain.primary().addr());
    let port = tls_addr.port();

    let encrypted =
        |b: Result<pgnear::backend::Backend, ConnectError>| b.map(|b| b.tls).map_err(|e| e.to_string());
    assert_eq!(encrypted(open(tls_addr, &node("127.0.0.1", port, SslMode::Disable, None)).await), Ok(false));
    assert_eq!(encrypted(open(tls_addr, &node("127.0.0.1", port, SslMode::Prefer, None)).await), Ok(true));
    assert_eq!(encrypted(open(tls_addr, &node("127.0.0.1", port, SslMode::Require, None)).await), Ok(true));
    // verify-ca ignores the name; verify-full checks it.
    assert_eq!(
        encrypted(open(tls_addr, &node("127.0.0.1", port, SslMode::VerifyCa, Some(&ca))).await),
        Ok(true)
    );
    assert_eq!(
        encrypted(open(tls_addr, &node("db.example", port, SslMode::VerifyFull, Some(&ca))).await),
        Ok(true)
    );
    let wrong_name =
        open(tls_addr, &node("127.0.0.1", port, SslMode::VerifyFull, Some(&ca))).await.unwrap_err();
    assert!(matches!(wrong_name, ConnectError::Tls { .. }), "{wrong_name}");
    assert!(wrong_name.to_string().contains("not valid for name"), "{wrong_name}");
    // Roots that did not sign the server's certificate, for every
    // checking mode (require with a root file checks like verify-ca).
    let other = Ca::new("other");
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let error = open(tls_addr, &node("db.example", port, mode, Some(&other))).await.unwrap_err();
        assert!(error.to_string().contains("UnknownIssuer"), "{mode:?}: {error}");
    }

    // A server without TLS: prefer falls back, require refuses.
    let port = plain_addr.port();
    assert_eq!(encrypted(open(plain_addr, &node("127.0.0.1", port, SslMode::Prefer, None)).await), Ok(false));
    let refused = open(plain_addr, &node("127.0.0.1", port, SslMode::Require, None)).await.unwrap_err();
    assert!(matches!(refused, ConnectError::TlsRefused(_)), "{refused}");
}

#[tokio::test]
async fn a_server_that_requires_tls() {
    let ca = Ca::new("servers");
    let cert = ca.server("server", &["127.0.0.1"]);
    let builder = Cluster::builder().auth(AuthMethod::Scram).user("app", "secret");
    let cluster = server_ssl(builder, &cert).start().await.unwrap();
    // hostssl only: the server refuses every plain-text TCP login.
    let primary = cluster.primary();
    let hba = "local all all trust\n\
               local replication all trust\n\
               host replication all 127.0.0.1/32 trust\n\
               hostssl all all 127.0.0.1/32 scram-sha-256\n\
               hostnossl all all 127.0.0.1/32 reject\n";
    std::fs::write(primary.data_dir().join("pg_hba.conf"), hba).unwrap();
    primary.query_scalar("SELECT pg_reload_conf()").await.unwrap();
    let direct = format!("host=127.0.0.1 port={} user=app password=secret dbname=postgres", primary.port());
    poll(|| async { tokio_postgres::connect(&direct, tokio_postgres::NoTls).await.is_err() }).await;

    let nodes = format!(
        "[[nodes]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nsslmode = \"verify-full\"\nsslrootcert = \"{}\"\n",
        primary.name(),
        primary.port(),
        ca.root().display()
    );
    let config = ProxyConfig::default()
        .nodes(&nodes)
        .user("name = \"app\"\npassword = \"secret\"\nserver_password = \"secret\"")
        .monitor("interval_ms = 20\nuser = \"app\"\npassword = \"secret\"");
    let proxy = Proxy::start(config.build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let client = env.client_with("app", "password=secret").await;
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert!(client.query_one(sql, &[]).await.unwrap().get::<_, bool>(0));
}

#[tokio::test]
async fn prefer_falls_back_to_plain_text_where_tls_fails() {
    let ca = Ca::new("servers");
    let cert = ca.server("server", &["127.0.0.1"]);
    let cluster = server_ssl(Cluster::builder(), &cert).start().await.unwrap();
    let primary = cluster.primary();
    let (addr, port) = (primary.addr(), primary.port());
    let prefer = node("127.0.0.1", port, SslMode::Prefer, None);
    let require = node("127.0.0.1", port, SslMode::Require, None);

    // The server speaks TLS, but pg_hba.conf lets logins in only without it.
    let hba = "local all all trust\n\
               local replication all trust\n\
               host replication all 127.0.0.1/32 trust\n\
               hostssl all all 127.0.0.1/32 reject\n\
               hostnossl all all 127.0.0.1/32 trust\n";
    std::fs::write(primary.data_dir().join("pg_hba.conf"), hba).unwrap();
    primary.query_scalar("SELECT pg_reload_conf()").await.unwrap();
    poll(|| async { open(addr, &require).await.is_err() }).await;
    let refused = open(addr, &require).await.unwrap_err();
    assert!(matches!(&refused, ConnectError::Server { fields, .. } if fields.code == "28000"), "{refused}");
    assert!(!open(addr, &prefer).await.unwrap().tls);

    // Through the proxy, whose nodes default to prefer: the sessions' server
    // connections and the monitor's both fall back (without the monitor
    // the primary is never known and the query cannot be routed).
    let proxy = Proxy::start(ProxyConfig::default().build(&cluster)).await.unwrap();
    let env = Env { proxy, cluster };
    let client = env.client().await;
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    assert!(!client.query_one(sql, &[]).await.unwrap().get::<_, bool>(0));
    drop(client);

    // A handshake that fails: the server offers only TLS 1.0 and 1.1, which
    // pgnear's TLS stack refuses. pg_hba.conf takes either again.
    let primary = env.cluster.primary();
    let hba = "local all all trust\nlocal replication all trust\nhost all all 127.0.0.1/32 trust\n";
    std::fs::write(primary.data_dir().join("pg_hba.conf"), hba).unwrap();
    let admin = primary.connect().await.unwrap();
    for sql in [
        "ALTER SYSTEM SET ssl_min_protocol_version = 'TLSv1'",
        "ALTER SYSTEM SET ssl_max_protocol_version = 'TLSv1.1'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    poll(|| async { matches!(open(addr, &require).await, Err(ConnectError::Tls { .. })) }).await;
    assert!(!open(addr, &prefer).await.unwrap().tls);
}
