//! The core relay through pgnear against a real primary: simple and
//! extended queries, prepared statements, COPY, LISTEN/NOTIFY, cancel,
//! errors, large results, fidelity of startup, and pgbench.

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::AsyncMessage;

use crate::support::wire::{bind, execute, parse, query, sync, Wire};
use crate::support::{primary_only, run_tool, sqlstate, PATIENCE};

#[tokio::test]
async fn simple_and_extended_queries() {
    let env = primary_only().await;
    let client = env.client().await;
    let rows = client.simple_query("SELECT 1 AS a; SELECT 'two' AS b").await.unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);
    let row = client.query_one("SELECT $1::int4 + 1, $2::text", &[&41i32, &"x"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "x");
    client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
    let n =
        client.execute("INSERT INTO t VALUES ($1, $2), ($3, $4)", &[&1i32, &"a", &2i32, &"b"]).await.unwrap();
    assert_eq!(n, 2);
}

#[tokio::test]
async fn prepared_statements_reused_many_times() {
    let env = primary_only().await;
    let client = env.client().await;
    let stmt = client.prepare("SELECT $1::int8 * 2").await.unwrap();
    for i in 0..500i64 {
        let row = client.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i * 2);
    }
    // Pipelined: tokio-postgres sends these without waiting.
    let futures = (0..50i64).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move { client.query_one(stmt, &[&i]).await.unwrap().get::<_, i64>(0) }
    });
    let results = futures_util::future::join_all(futures).await;
    assert_eq!(results, (0..50i64).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test]
async fn copy_in_and_out() {
    let env = primary_only().await;
    let client = env.client().await;
    client.batch_execute("CREATE TABLE c (id int, v text)").await.unwrap();
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\tvalue {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);
    let stream = client.copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(|c| c.unwrap()).collect().await;
    let out: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(out).unwrap(), data);
    // A failing COPY leaves the session usable.
    // (tokio-postgres itself loses sync after a failed copy_in prepare,
    // direct or not, so the failure goes through the simple protocol.)
    assert_eq!(sqlstate(client.simple_query("COPY missing FROM STDIN").await), "42P01");
    assert_eq!(client.query_one("SELECT count(*) FROM c", &[]).await.unwrap().get::<_, i64>(0), 10_000);
}

#[tokio::test]
async fn listen_notify_across_two_clients() {
    let env = primary_only().await;
    let (listener, mut connection) =
        tokio_postgres::connect(&env.conn_string("postgres", ""), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("LISTEN events").await.unwrap();
    let notifier = env.client().await;
    notifier.batch_execute("NOTIFY events, 'hello'").await.unwrap();
    let got = tokio::time::timeout(PATIENCE, rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, ("events".to_string(), "hello".to_string()));
}

#[tokio::test]
async fn cancel_reaches_the_running_query() {
    let env = primary_only().await;
    let client = env.client().await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(30)").await;
        (sqlstate(result), client)
    });
    // Cancel as soon as the backend is really running the sleep.
    env.cluster
        .primary()
        .poll_query_until(
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
            "1",
            PATIENCE,
        )
        .await
        .unwrap();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (code, client) = tokio::time::timeout(PATIENCE, sleeper).await.unwrap().unwrap();
    assert_eq!(code, "57014");
    assert_eq!(client.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn errors_leave_the_session_usable() {
    let env = primary_only().await;
    let client = env.client().await;
    assert_eq!(sqlstate(client.simple_query("SELECT * FROM nowhere").await), "42P01");
    assert_eq!(sqlstate(client.query("SELECT 1/0", &[]).await), "22012");
    assert_eq!(sqlstate(client.prepare("SELEC 1").await), "42601");
    client.batch_execute("BEGIN").await.unwrap();
    assert_eq!(sqlstate(client.simple_query("SELECT 1/0").await), "22012");
    assert_eq!(sqlstate(client.simple_query("SELECT 1").await), "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(client.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

#[tokio::test]
async fn large_results_stream_through() {
    let env = primary_only().await;
    let client = env.client().await;
    let rows =
        client.query("SELECT g, repeat('x', 1000) FROM generate_series(1, 200000) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 200_000);
    assert_eq!(rows[199_999].get::<_, i32>(0), 200_000);
    assert_eq!(rows[0].get::<_, &str>(1).len(), 1000);
}

#[tokio::test]
async fn startup_parameters_reach_the_server() {
    let env = primary_only().await;
    let extra = "application_name=itest options='-c statement_timeout=1234 -c DateStyle=SQL,DMY'";
    let client = env.client_with("postgres", extra).await;
    let get = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, String>(0) }
    };
    assert_eq!(get("SHOW statement_timeout").await, "1234ms");
    assert_eq!(get("SHOW DateStyle").await, "SQL, DMY");
    assert_eq!(get("SELECT current_setting('application_name')").await, "itest");
}

#[tokio::test]
async fn backend_key_carries_the_real_pid_and_fatal_is_forwarded() {
    let env = primary_only().await;
    let (mut wire, startup) = Wire::login(env.proxy.addr(), "postgres").await;
    let key = startup.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes(key.body[0..4].try_into().unwrap());
    assert!(startup.iter().any(|m| m.tag == b'S'), "ParameterStatus relayed");
    wire.send(&query("SELECT pg_backend_pid()")).await;
    let msgs = wire.until_ready().await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    assert_eq!(String::from_utf8_lossy(&row.body[6..]), pid.to_string());
    wire.send(&query("SELECT pg_terminate_backend(pg_backend_pid())")).await;
    assert_eq!(wire.expect_fatal().await, "57P01");
}

#[tokio::test]
async fn pgbench_in_all_three_modes() {
    let env = primary_only().await;
    let addr = env.proxy.addr();
    let port = addr.port().to_string();
    let common = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let mut init = common.to_vec();
    init.extend(["-i", "-s", "1", "-q", "postgres"]);
    run_tool("pgbench", &init).await;
    for mode in ["simple", "extended", "prepared"] {
        let mut args = common.to_vec();
        args.extend(["-c", "4", "-j", "2", "-T", "3", "-M", mode, "postgres"]);
        let out = run_tool("pgbench", &args).await;
        let failed = out.lines().find(|l| l.contains("number of failed transactions")).unwrap_or("");
        assert!(failed.contains(": 0 "), "mode {mode}: {out}");
        let processed =
            out.lines().find(|l| l.contains("number of transactions actually processed")).unwrap();
        assert!(!processed.contains(": 0/"), "mode {mode} ran nothing: {out}");
    }
}

#[tokio::test]
async fn psql_works_through_pgnear() {
    let env = primary_only().await;
    let conn = env.conn_string("postgres", "");
    let out = run_tool("psql", &["-X", "-A", "-t", "-d", &conn, "-c", "SELECT 40 + 2"]).await;
    assert_eq!(out.trim(), "42");
    let out =
        run_tool("psql", &["-X", "-d", &conn, "-c", "CREATE TABLE p(x int)", "-c", "\\copy p FROM stdin"])
            .await;
    assert!(out.contains("CREATE TABLE"), "{out}");
}

#[tokio::test]
async fn a_client_leaving_mid_query_cancels_its_server_work() {
    let env = primary_only().await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    wire.send(&query("SELECT pg_sleep(60) /* abandoned */")).await;
    let active = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%abandoned%' AND state = 'active' AND pid <> pg_backend_pid()";
    env.cluster.primary().poll_query_until(active, "1", PATIENCE).await.unwrap();
    drop(wire);
    env.cluster.primary().poll_query_until(active, "0", PATIENCE).await.unwrap();
}

/// A client asking for protocol 3.2 (libpq 18's `max_protocol_version`)
/// and for a protocol option is answered as PostgreSQL answers it:
/// NegotiateProtocolVersion naming 3.0 and the option, then the session.
#[tokio::test]
async fn later_protocol_versions_are_negotiated_down_as_postgresql_does() {
    let env = primary_only().await;
    let mut body = (3i32 << 16 | 2).to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0_pq_.test_option\0on\0\0");
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    let primary = std::net::SocketAddr::from(([127, 0, 0, 1], env.cluster.primary().port()));
    let mut answers = Vec::new();
    for addr in [primary, env.proxy.addr()] {
        let mut wire = Wire::connect(addr).await;
        wire.send(&packet).await;
        let msgs = wire.until_ready().await;
        assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
        let negotiated = msgs.iter().find(|m| m.tag == b'v').unwrap_or_else(|| panic!("{msgs:?}")).clone();
        wire.send(&query("SELECT 1")).await;
        assert!(wire.until_ready().await.iter().any(|m| m.tag == b'D'));
        answers.push(negotiated.body);
    }
    assert_eq!(answers[1], answers[0], "pgnear's NegotiateProtocolVersion differs from PostgreSQL's");
    assert_eq!(answers[1], b"\0\x03\0\0\0\0\0\x01_pq_.test_option\0");
}

/// Replication connections (pg_basebackup, pg_receivewal, subscribers)
/// are refused with a clear error; `replication=off` is an ordinary one.
#[tokio::test]
async fn replication_connections_are_refused_clearly() {
    use crate::support::wire::startup_packet;
    let env = primary_only().await;
    for value in ["database", "true", "1"] {
        let mut wire = Wire::connect(env.proxy.addr()).await;
        let params = [("user", "postgres"), ("database", "postgres"), ("replication", value)];
        wire.send(&startup_packet(&params)).await;
        let msgs = wire.until_ready().await;
        let fatal = msgs.iter().find(|m| m.tag == b'E').unwrap_or_else(|| panic!("{value}: {msgs:?}"));
        assert_eq!(fatal.sqlstate().as_deref(), Some("0A000"), "{value}");
        assert!(fatal.field(b'M').unwrap().contains("replication connections"), "{fatal:?}");
        wire.expect_closed().await;
    }
    let mut wire = Wire::connect(env.proxy.addr()).await;
    // PostgreSQL's spellings of false, prefixes included.
    wire.send(&startup_packet(&[("user", "postgres"), ("database", "postgres"), ("replication", "of")]))
        .await;
    assert_eq!(wire.until_ready().await.last().map(|m| m.tag), Some(b'Z'));
    wire.send(&query("SELECT 1")).await;
    assert!(wire.until_ready().await.iter().any(|m| m.tag == b'D'));
    // What a newcomer sees from the tool itself.
    let port = env.proxy.addr().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = crate::support::pg_tool("pg_receivewal")
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-n", "-D"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("pgnear does not proxy replication connections"), "{stderr}");
}

/// PostgreSQL sends an error as soon as it happens, whether or not a Sync
/// or Flush came: a client that reads while it writes (libpq's pipeline
/// mode, asyncpg's `executemany`) stops there. Messages whose server is
/// settled (inside a transaction, or a write) go ahead without waiting for
/// their Sync, so the error reaches the client before it is sent.
#[tokio::test]
async fn an_error_mid_batch_arrives_before_the_batch_is_synced() {
    let env = primary_only().await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    wire.send(&query("CREATE TABLE keyed (id int PRIMARY KEY); INSERT INTO keyed VALUES (1)")).await;
    wire.until_ready().await;

    // Outside a transaction: a duplicate key, no Sync yet.
    wire.send(&[parse("ins", "INSERT INTO keyed VALUES (1)"), bind("", "ins"), execute("")].concat()).await;
    let error = until_error(&mut wire).await;
    assert_eq!(error.as_deref(), Some("23505"));
    wire.send(&sync()).await;
    let after = wire.until_ready().await;
    assert_eq!(after.last().map(|m| m.body.clone()), Some(b"I".to_vec()), "{after:?}");

    // Inside a block: a read, then the duplicate, answered up to the error.
    wire.send(&query("BEGIN")).await;
    wire.until_ready().await;
    let select = [parse("", "SELECT 1"), bind("", ""), execute("")].concat();
    wire.send(&[select, bind("", "ins"), execute("")].concat()).await;
    assert_eq!(until_error(&mut wire).await.as_deref(), Some("23505"));
    wire.send(&sync()).await;
    let after = wire.until_ready().await;
    assert_eq!(after.last().map(|m| m.body.clone()), Some(b"E".to_vec()), "{after:?}");
    wire.send(&query("ROLLBACK; SELECT count(*) FROM keyed")).await;
    let rows: Vec<_> = wire.until_ready().await.into_iter().filter(|m| m.tag == b'D').collect();
    assert_eq!(rows[0].columns(), [Some(b"1".to_vec())]);
}

/// Reads up to an ErrorResponse (which must come before any
/// ReadyForQuery) and gives its SQLSTATE.
async fn until_error(wire: &mut Wire) -> Option<String> {
    loop {
        let msg = wire.recv().await?;
        assert_ne!(msg.tag, b'Z', "ReadyForQuery before the error");
        if msg.tag == b'E' {
            return msg.sqlstate();
        }
    }
}
