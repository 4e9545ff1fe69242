//! The admin console (`psql ... pgnear`), PAUSE and RESUME, and a planned
//! switchover under pgbench with no failed transaction.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{connect, pg_tool, show, sqlstate, start, Env, ProxyConfig, PATIENCE};

fn console_config() -> ProxyConfig {
    console_with_pause_timeout(20_000)
}

fn console_with_pause_timeout(ms: u64) -> ProxyConfig {
    ProxyConfig::default()
        .proxy(&format!("admin_users = [\"postgres\"]\npause_timeout_ms = {ms}"))
        .user("name = \"app\"\nauth = \"trust\"\nserver_user = \"postgres\"")
        .monitor("interval_ms = 20\nfailures_before_down = 2")
}

fn conn(env: &Env, user: &str, database: &str) -> String {
    let addr = env.proxy.addr();
    format!("host={} port={} user={user} dbname={database}", addr.ip(), addr.port())
}

async fn console(env: &Env) -> Client {
    connect(&conn(env, "postgres", "pgnear")).await.unwrap()
}

/// A console command's rows, as text.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<String>> {
    let messages = client.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).unwrap_or_default().to_string()).collect())
            }
            _ => None,
        })
        .collect()
}

/// Whether a plain read runs on the primary.
async fn reads_on_primary(env: &Env, client: &Client) -> bool {
    client.simple_query("SELECT 1").await.unwrap();
    show(client, "pgnear.node").await == env.cluster.primary().name()
}

#[tokio::test]
async fn the_console_shows_and_controls_the_proxy() {
    let env = start(Cluster::builder().replica(), console_config()).await;
    let admin = console(&env).await;
    let nodes = rows(&admin, "SHOW NODES").await;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let replica = env.cluster.replica(0).name();
    assert!(
        nodes.iter().any(|n| n[0] == env.cluster.primary().name() && n[3] == "primary" && n[4] == "true"),
        "{nodes:?}"
    );
    assert!(nodes.iter().any(|n| n[0] == replica && n[3] == "replica"), "{nodes:?}");
    assert!(rows(&admin, "show version;").await[0][0].starts_with("pgnear "));
    let config = rows(&admin, "SHOW CONFIG").await;
    assert!(config.iter().any(|kv| kv[0] == "routing.default" && kv[1] == "auto"), "{config:?}");
    rows(&admin, "SHOW POOLS").await;
    assert_eq!(sqlstate(admin.simple_query("SHOW EVERYTHING").await), "42601");
    assert_eq!(sqlstate(admin.simple_query("DISABLE nowhere").await), "42704");
    // Only admins.
    assert_eq!(sqlstate(connect(&conn(&env, "app", "pgnear")).await), "42501");
    // Clients, their servers, and KILL.
    let victim = connect(&conn(&env, "app", "postgres")).await.unwrap();
    let bystander = env.client().await;
    victim.simple_query("SELECT 1").await.unwrap();
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let mine = clients.iter().find(|c| c[1] == "app").unwrap_or_else(|| panic!("{clients:?}"));
    assert_eq!(mine[2], "postgres", "{clients:?}");
    assert!(!mine[4].is_empty(), "{clients:?}");
    // One row per server connection: the victim's primary connection,
    // held by its session, with the server's process id.
    let servers = rows(&admin, "SHOW SERVERS").await;
    let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let row = servers.iter().find(|s| s[7] == pid.to_string()).unwrap_or_else(|| panic!("{servers:?}"));
    assert_eq!(row[1], env.cluster.primary().name(), "{row:?}");
    assert_eq!((row[3].as_str(), row[4].as_str()), ("postgres", "active"), "{row:?}");
    assert!(row[5].ends_with(&format!(":{}", env.cluster.primary().port())), "{row:?}");
    // Per node: units, transactions, bytes both ways, time, routing by reason.
    bystander.batch_execute("CREATE TABLE counted (x int); INSERT INTO counted VALUES (1)").await.unwrap();
    let stats = rows(&admin, "SHOW STATS").await;
    let primary =
        stats.iter().find(|s| s[0] == env.cluster.primary().name()).unwrap_or_else(|| panic!("{stats:?}"));
    let number = |i: usize| primary[i].parse::<u64>().unwrap_or_else(|_| panic!("{stats:?}"));
    assert!(number(1) >= 2 && number(2) >= 2 && number(3) > 0 && number(4) > 0 && number(5) > 0, "{stats:?}");
    assert!(primary[7].contains("write="), "{stats:?}");
    assert_eq!(sqlstate(admin.simple_query("KILL 999999").await), "42704");
    admin.simple_query(&format!("KILL {}", mine[0])).await.unwrap();
    let error = tokio::time::timeout(PATIENCE, victim.simple_query("SELECT 1")).await.unwrap();
    assert!(error.is_err(), "a killed client went on");
    bystander.simple_query("SELECT 1").await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while rows(&admin, "SHOW CLIENTS").await.iter().any(|c| c[0] == mine[0]) {
        assert!(tokio::time::Instant::now() < deadline, "a killed client is still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // DISABLE drains a replica of reads; ENABLE brings it back.
    let client = env.client().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while reads_on_primary(&env, &client).await {
        assert!(tokio::time::Instant::now() < deadline, "no read reached the replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin.simple_query(&format!("DISABLE {replica}")).await.unwrap();
    for _ in 0..5 {
        assert!(reads_on_primary(&env, &client).await, "a read reached a disabled replica");
    }
    assert!(rows(&admin, "SHOW NODES").await.iter().any(|n| n[0] == replica && n[8] == "no: disabled"));
    admin.simple_query(&format!("ENABLE {replica}")).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while reads_on_primary(&env, &client).await {
        assert!(tokio::time::Instant::now() < deadline, "reads never came back to the enabled replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn pause_waits_for_open_transactions_and_holds_new_work_until_resume() {
    let config = console_with_pause_timeout(1500);
    let env = start(Cluster::builder(), config).await;
    let admin = console(&env).await;
    let busy = env.client().await;
    busy.batch_execute("CREATE TABLE t (x int); BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    // PAUSE completes once the open transaction ends.
    let pausing = tokio::spawn(async move {
        admin.simple_query("PAUSE").await.unwrap();
        admin
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pausing.is_finished(), "PAUSE did not wait for the open transaction");
    busy.batch_execute("INSERT INTO t VALUES (2); COMMIT").await.unwrap();
    let admin = tokio::time::timeout(PATIENCE, pausing).await.unwrap().unwrap();
    // New work waits, with no error, until RESUME.
    let waiting =
        tokio::spawn(async move { busy.simple_query("SELECT count(*) FROM t").await.map(|_| busy) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a unit ran while paused");
    admin.simple_query("RESUME").await.unwrap();
    let busy = tokio::time::timeout(PATIENCE, waiting).await.unwrap().unwrap().unwrap();
    // Past proxy.pause_timeout_ms a held unit gets a clear error; the session stays.
    admin.simple_query("PAUSE").await.unwrap();
    let error = busy.simple_query("SELECT 1").await.unwrap_err();
    let db = error.as_db_error().unwrap_or_else(|| panic!("{error}"));
    assert_eq!(db.code().code(), "57P03");
    assert!(db.message().contains("pause_timeout_ms"), "{}", db.message());
    admin.simple_query("RESUME").await.unwrap();
    busy.simple_query("SELECT 1").await.unwrap();
    // One node: PAUSE waits for its open transactions, then its work
    // waits until that node resumes.
    let primary = env.cluster.primary().name().to_string();
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (3)").await.unwrap();
    let pausing = tokio::spawn({
        let primary = primary.clone();
        async move {
            admin.simple_query(&format!("PAUSE {primary}")).await.unwrap();
            admin
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pausing.is_finished(), "PAUSE <node> did not wait for the node's open transaction");
    busy.batch_execute("COMMIT").await.unwrap();
    let admin = tokio::time::timeout(PATIENCE, pausing).await.unwrap().unwrap();
    let waiting =
        tokio::spawn(async move { busy.simple_query("INSERT INTO t VALUES (3)").await.map(|_| busy) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a write ran on a paused node");
    admin.simple_query(&format!("RESUME {primary}")).await.unwrap();
    tokio::time::timeout(PATIENCE, waiting).await.unwrap().unwrap().unwrap();
}

/// pgbench's TPC-B through pgnear while the operator pauses, promotes the
/// replica, stops the old primary and resumes: no transaction fails.
async fn switchover(pool_mode: &str) {
    let config = console_config().proxy(&format!("pool_mode = \"{pool_mode}\"\npool_size = 10"));
    let env = start(Cluster::builder().replica(), config).await;
    let (primary, replica) = (env.cluster.primary(), env.cluster.replica(0));
    let init = pg_tool("pgbench")
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .output()
        .await
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let addr = env.proxy.addr();
    let bench = pg_tool("pgbench")
        .args(["-n", "-c", "8", "-j", "2", "-T", "8", "-M", "simple", "-h", &addr.ip().to_string()])
        .args(["-p", &addr.port().to_string(), "-U", "postgres", "postgres"])
        .output();
    let bench = tokio::spawn(bench);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let admin = console(&env).await;
    admin.simple_query("PAUSE").await.unwrap();
    replica.promote().await.unwrap();
    primary.stop().unwrap();
    // Resume once pgnear sees the new primary.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let nodes = rows(&admin, "SHOW NODES").await;
        let promoted = nodes.iter().any(|n| n[0] == replica.name() && n[3] == "primary" && n[4] == "true");
        let gone = nodes.iter().any(|n| n[0] == primary.name() && n[4] == "false");
        if promoted && gone {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "pgnear never saw the new primary: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin.simple_query("RESUME").await.unwrap();
    let output = tokio::time::timeout(PATIENCE * 3, bench).await.unwrap().unwrap().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "pgbench failed ({pool_mode}):\n{text}");
    assert!(text.contains("number of failed transactions: 0 (0.000%)"), "({pool_mode}):\n{text}");
    // Writes now run on the new primary.
    let client = env.client().await;
    let port: i32 = client
        .query_one("INSERT INTO pgbench_history (tid, bid, aid, delta) VALUES (1, 1, 1, 0) RETURNING inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port as u16, replica.port(), "({pool_mode})");
}

#[tokio::test]
async fn a_switchover_under_pgbench_fails_no_transaction_in_session_pooling() {
    switchover("session").await;
}

#[tokio::test]
async fn a_switchover_under_pgbench_fails_no_transaction_in_transaction_pooling() {
    switchover("transaction").await;
}
