//! Optimistic transactions against a real primary and replicas: a plain
//! BEGIN whose first statement reads runs on a replica, and moves to the
//! primary, replayed and checked, when it writes.

use std::time::Duration;

use pgnear::lab::cluster::Cluster;
use tokio_postgres::Client;

use crate::support::{show, sqlstate, start, Env, ProxyConfig, PATIENCE};

async fn cluster(config: ProxyConfig) -> Env {
    let env = start(Cluster::builder().replica().replica(), config).await;
    let client = env.client().await;
    client
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL);
             INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 10) g;",
        )
        .await
        .unwrap();
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    env
}

/// `pgnear_optimistic_transactions_total` for `outcome`, as scraped.
fn count(env: &Env, outcome: &str) -> u64 {
    let shared = env.proxy.shared();
    let text = shared.metrics.render(&shared.scrape()).unwrap();
    let sample = format!("pgnear_optimistic_transactions_total{{outcome=\"{outcome}\"}} ");
    let line = text.lines().find_map(|l| l.strip_prefix(&sample));
    line.unwrap_or_else(|| panic!("no {sample} in the scrape")).parse().unwrap()
}

/// Whether the node that served the session's last statement is the primary.
async fn on_primary(env: &Env, client: &Client) -> bool {
    show(client, "pgnear.node").await == env.cluster.primary().name()
}

async fn balance(client: &Client, id: i32) -> i32 {
    client.query_one("SELECT balance FROM accounts WHERE id = $1", &[&id]).await.unwrap().get(0)
}

/// Runs read-only units of work, each opened with a plain BEGIN as an ORM
/// opens them, until one reads on a replica; gives how many ran.
async fn until_a_unit_reads_on_a_replica(env: &Env, client: &mut Client) -> usize {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for tried in 1.. {
        let tx = client.transaction().await.unwrap();
        let row = tx.query_one("SELECT balance FROM accounts WHERE id = $1", &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 100);
        let replica = show(tx.client(), "pgnear.node").await != env.cluster.primary().name();
        tx.commit().await.unwrap();
        if replica {
            return tried;
        }
        assert!(tokio::time::Instant::now() < deadline, "no unit of work ever reached a replica");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

#[tokio::test]
async fn read_only_units_of_work_run_on_a_replica() {
    let env = cluster(ProxyConfig::default()).await;
    let mut client = env.client().await;
    until_a_unit_reads_on_a_replica(&env, &mut client).await;
    // Caught up: every read-only unit from now on reads on a replica.
    let before = count(&env, "replica");
    for id in 1..=10 {
        let tx = client.transaction().await.unwrap();
        let one = tx.query_one("SELECT balance FROM accounts WHERE id = $1", &[&id]).await.unwrap();
        let all = tx.query("SELECT id FROM accounts ORDER BY id", &[]).await.unwrap();
        assert_eq!((one.get::<_, i32>(0), all.len()), (100, 10));
        assert!(!on_primary(&env, tx.client()).await, "unit {id} read on the primary");
        // Savepoints stay where the transaction runs.
        tx.batch_execute("SAVEPOINT s; RELEASE s").await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(count(&env, "replica") - before, 10);
    // A rolled-back one too; and one that ran nothing is answered by pgnear.
    let tx = client.transaction().await.unwrap();
    tx.query("SELECT 1 FROM accounts", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    client.batch_execute("BEGIN; COMMIT").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    client.batch_execute("START TRANSACTION").await.unwrap();
    assert_eq!(show(&client, "transaction_isolation").await, "read committed");
    client.batch_execute("ROLLBACK").await.unwrap();
    // The session is idle again: the next write runs outside any block.
    client.batch_execute("UPDATE accounts SET balance = balance WHERE id = 1").await.unwrap();
    assert!(on_primary(&env, &client).await);
    // SERIALIZABLE (refused by a standby) and FOR UPDATE go to the primary.
    env.cluster.wait_for_catchup(PATIENCE).await.unwrap();
    let tx = client.build_transaction().isolation_level(tokio_postgres::IsolationLevel::Serializable);
    let tx = tx.start().await.unwrap();
    tx.query("SELECT balance FROM accounts WHERE id = 1", &[]).await.unwrap();
    assert!(on_primary(&env, tx.client()).await, "a serializable transaction read on a replica");
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.query("SELECT balance FROM accounts WHERE id = 2 FOR UPDATE", &[]).await.unwrap();
    assert!(on_primary(&env, tx.client()).await, "FOR UPDATE ran on a replica");
    tx.commit().await.unwrap();
    // A read whose result differs per run opens the transaction there too.
    let tx = client.transaction().await.unwrap();
    tx.query("SELECT now(), balance FROM accounts WHERE id = 3", &[]).await.unwrap();
    assert!(on_primary(&env, tx.client()).await, "now() ran on a replica");
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_unit_that_writes_moves_to_the_primary_unnoticed_and_the_next_start_there() {
    let env = cluster(ProxyConfig::default()).await;
    let mut client = env.client().await;
    until_a_unit_reads_on_a_replica(&env, &mut client).await;
    let matched = count(&env, "replay_matched");
    // Read-modify-write, as an ORM does it: read, compute, write.
    let tx = client.transaction().await.unwrap();
    let read = "SELECT balance FROM accounts WHERE id = $1 AND balance >= 0";
    let seen: i32 = tx.query_one(read, &[&4i32]).await.unwrap().get(0);
    assert!(!on_primary(&env, tx.client()).await, "the read ran on the primary");
    tx.execute("UPDATE accounts SET balance = $1 WHERE id = 4", &[&(seen + 5)]).await.unwrap();
    assert!(on_primary(&env, tx.client()).await);
    // It goes on there, inside the same transaction.
    assert_eq!(
        tx.query_one("SELECT balance FROM accounts WHERE id = 4", &[]).await.unwrap().get::<_, i32>(0),
        105
    );
    tx.commit().await.unwrap();
    assert_eq!(count(&env, "replay_matched"), matched + 1);
    assert_eq!(balance(&client, 4).await, 105);
    // The same unit again: learned, it starts on the primary.
    let learned = count(&env, "learned_primary");
    for round in 1..=5 {
        let tx = client.transaction().await.unwrap();
        let seen: i32 = tx.query_one(read, &[&4i32]).await.unwrap().get(0);
        assert!(on_primary(&env, tx.client()).await, "round {round} read on a replica");
        tx.execute("UPDATE accounts SET balance = $1 WHERE id = 4", &[&(seen + 5)]).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(count(&env, "learned_primary"), learned + 5);
    assert_eq!(count(&env, "replay_matched"), matched + 1, "it moved again");
    assert_eq!(balance(&client, 4).await, 130);
    // Read your writes: a unit that reads right after another wrote sees it.
    for round in 0..20 {
        client.execute("UPDATE accounts SET balance = $1 WHERE id = 5", &[&round]).await.unwrap();
        let tx = client.transaction().await.unwrap();
        let seen: i32 =
            tx.query_one("SELECT balance FROM accounts WHERE id = $1", &[&5i32]).await.unwrap().get(0);
        assert_eq!(seen, round, "a stale read after a write");
        tx.commit().await.unwrap();
    }
}

#[tokio::test]
async fn a_unit_whose_reads_changed_gets_40001_and_writes_nothing() {
    let env = cluster(ProxyConfig::default()).await;
    let mut client = env.client().await;
    until_a_unit_reads_on_a_replica(&env, &mut client).await;
    let direct = env.cluster.primary().connect().await.unwrap();
    let mismatched = count(&env, "replay_mismatched");
    let tx = client.transaction().await.unwrap();
    let read = "SELECT balance FROM accounts WHERE id = 6 AND balance > -1";
    let seen: i32 = tx.query_one(read, &[]).await.unwrap().get(0);
    assert!(!on_primary(&env, tx.client()).await, "the read ran on the primary");
    // Someone else changes what it read, on the primary.
    direct.execute("UPDATE accounts SET balance = 7 WHERE id = 6", &[]).await.unwrap();
    let write = tx.execute("UPDATE accounts SET balance = $1 WHERE id = 6", &[&(seen - 50)]).await;
    assert_eq!(sqlstate(write), "40001");
    // Aborted until it ends: as PostgreSQL has it.
    assert_eq!(sqlstate(tx.query("SELECT 1", &[]).await), "25P02");
    tx.rollback().await.unwrap();
    assert_eq!(count(&env, "replay_mismatched"), mismatched + 1);
    assert_eq!(balance(&direct, 6).await, 7, "the aborted unit's write persisted");
    // The retry, which standard retry logic makes, commits.
    let tx = client.transaction().await.unwrap();
    let seen: i32 = tx.query_one(read, &[]).await.unwrap().get(0);
    tx.execute("UPDATE accounts SET balance = $1 WHERE id = 6", &[&(seen + 1)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(balance(&direct, 6).await, 8);
    // Through the simple protocol too, where the error ends the Query.
    let sql = "SELECT balance FROM accounts WHERE id = 7 AND 1 = 1";
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.batch_execute("BEGIN").await.unwrap();
        client.simple_query(sql).await.unwrap();
        if !on_primary(&env, &client).await {
            break;
        }
        client.batch_execute("ROLLBACK").await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "never on a replica");
    }
    direct.execute("UPDATE accounts SET balance = 1 WHERE id = 7", &[]).await.unwrap();
    let write = client.simple_query("UPDATE accounts SET balance = 0 WHERE id = 7").await;
    assert_eq!(sqlstate(write), "40001");
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(balance(&direct, 7).await, 1);
}

#[tokio::test]
async fn concurrent_read_modify_write_units_lose_no_update() {
    let env = cluster(ProxyConfig::default()).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(env.client().await);
    }
    until_a_unit_reads_on_a_replica(&env, &mut clients[0]).await;
    let tasks = clients.into_iter().map(|mut client| {
        tokio::spawn(async move {
            let mut retries = 0;
            for _ in 0..15 {
                loop {
                    let tx = client
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                        .start()
                        .await
                        .unwrap();
                    let attempt = async {
                        let seen: i32 =
                            tx.query_one("SELECT balance FROM accounts WHERE id = 8", &[]).await?.get(0);
                        tx.execute("UPDATE accounts SET balance = $1 WHERE id = 8", &[&(seen + 1)]).await?;
                        tx.commit().await
                    };
                    match attempt.await {
                        Ok(()) => break,
                        Err(e) if e.code().map(|c| c.code()) == Some("40001") => retries += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            retries
        })
    });
    for task in tasks {
        task.await.unwrap();
    }
    let client = env.client().await;
    assert_eq!(balance(&client, 8).await, 160, "an update was lost");
}

#[tokio::test]
async fn a_replica_lost_mid_transaction_costs_no_error_when_the_replay_matches() {
    let env = cluster(ProxyConfig::default()).await;
    let mut client = env.client().await;
    until_a_unit_reads_on_a_replica(&env, &mut client).await;
    let matched = count(&env, "replay_matched");
    let tx = client.transaction().await.unwrap();
    let seen: i32 = tx.query_one("SELECT balance FROM accounts WHERE id = 9", &[]).await.unwrap().get(0);
    let node = show(tx.client(), "pgnear.node").await;
    let replica = env.cluster.replicas().iter().position(|r| r.name() == node).expect("read on a replica");
    env.cluster.replica(replica).kill().unwrap();
    // Reads go on, on the primary, replayed and checked first.
    let again: i32 = tx.query_one("SELECT balance FROM accounts WHERE id = 9", &[]).await.unwrap().get(0);
    assert_eq!(again, seen);
    assert!(on_primary(&env, tx.client()).await);
    tx.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 9", &[]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&env, "replay_matched"), matched + 1);
    assert_eq!(balance(&client, 9).await, seen + 1);
}

#[tokio::test]
async fn the_switch_turns_it_off() {
    let env = cluster(ProxyConfig::default().section("[routing]\noptimistic_transactions = \"off\"")).await;
    let client = env.client().await;
    for _ in 0..5 {
        client.batch_execute("BEGIN").await.unwrap();
        client.query("SELECT balance FROM accounts WHERE id = 1", &[]).await.unwrap();
        assert!(on_primary(&env, &client).await);
        client.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(count(&env, "replica"), 0);
}

#[tokio::test]
async fn pgnear_answers_a_deferred_begin_and_an_empty_transaction_as_postgres_would() {
    use crate::support::wire::{bind, execute, message, parse, query, sync, Msg, Wire};
    let env = cluster(ProxyConfig::default()).await;
    let (mut wire, _) = Wire::login(env.proxy.addr(), "postgres").await;
    let shape = |msgs: &[Msg]| -> Vec<(char, Vec<u8>)> {
        msgs.iter().map(|m| (m.tag as char, m.body.clone())).collect()
    };
    // psycopg's BEGIN: the unnamed statement, described, then executed.
    let describe = message(b'D', b"P\0");
    let begin = [parse("", "BEGIN"), bind("", ""), describe.clone(), execute(""), sync()].concat();
    wire.send(&begin).await;
    let expected =
        vec![('1', vec![]), ('2', vec![]), ('n', vec![]), ('C', b"BEGIN\0".to_vec()), ('Z', b"T".to_vec())];
    assert_eq!(shape(&wire.until_ready().await), expected);
    let commit = [parse("", "COMMIT"), bind("", ""), describe, execute(""), sync()].concat();
    wire.send(&commit).await;
    let msgs = wire.until_ready().await;
    assert_eq!(msgs[3].body, b"COMMIT\0");
    assert_eq!(msgs[4].body, b"I");
    // The simple protocol: START TRANSACTION's own tag.
    wire.send(&query("start transaction")).await;
    assert_eq!(
        shape(&wire.until_ready().await),
        vec![('C', b"START TRANSACTION\0".to_vec()), ('Z', b"T".to_vec())]
    );
    wire.send(&query("ABORT")).await;
    assert_eq!(shape(&wire.until_ready().await), vec![('C', b"ROLLBACK\0".to_vec()), ('Z', b"I".to_vec())]);
    // A deferred BEGIN shows in the status of pgnear's own answers too.
    wire.send(&query("BEGIN")).await;
    wire.until_ready().await;
    wire.send(&query("SHOW pgnear.node")).await;
    assert_eq!(wire.until_ready().await.last().unwrap().body, b"T");
    // The first statement runs inside the transaction the BEGIN opened.
    wire.send(&query("SELECT count(*) FROM accounts")).await;
    let msgs = wire.until_ready().await;
    assert_eq!(msgs.last().unwrap().body, b"T", "{msgs:?}");
    wire.send(&query("SELECT 1 FROM nowhere")).await;
    let msgs = wire.until_ready().await;
    assert_eq!(msgs[0].sqlstate().as_deref(), Some("42P01"));
    assert_eq!(msgs.last().unwrap().body, b"E");
    wire.send(&query("ROLLBACK")).await;
    assert_eq!(wire.until_ready().await.last().unwrap().body, b"I");
}

#[tokio::test]
async fn a_transaction_that_read_too_much_to_replay_gets_40001() {
    let env = cluster(ProxyConfig::default()).await;
    let mut client = env.client().await;
    until_a_unit_reads_on_a_replica(&env, &mut client).await;
    // More statement text than pgnear keeps to replay (256 KiB).
    let long = format!("SELECT count(*) FROM accounts /* {} */", "x".repeat(300 * 1024));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.batch_execute("BEGIN").await.unwrap();
        client.simple_query(&long).await.unwrap();
        if !on_primary(&env, &client).await {
            break;
        }
        client.batch_execute("ROLLBACK").await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "never on a replica");
    }
    let too_large = count(&env, "replay_too_large");
    let write = client.simple_query("UPDATE accounts SET balance = 0 WHERE id = 10").await;
    assert_eq!(sqlstate(write), "40001");
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&env, "replay_too_large"), too_large + 1);
    assert_eq!(balance(&client, 10).await, 100);
}

#[tokio::test]
async fn optimistic_transactions_under_transaction_pooling() {
    let env = cluster(ProxyConfig::default().proxy("pool_mode = \"transaction\"\npool_size = 2")).await;
    let mut client = env.client().await;
    until_a_unit_reads_on_a_replica(&env, &mut client).await;
    let tx = client.transaction().await.unwrap();
    let seen: i32 =
        tx.query_one("SELECT balance FROM accounts WHERE id = 3 AND 2 = 2", &[]).await.unwrap().get(0);
    assert!(!on_primary(&env, tx.client()).await);
    tx.execute("UPDATE accounts SET balance = $1 WHERE id = 3", &[&(seen * 2)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(balance(&client, 3).await, 200);
    // Another session reads its result, through the same pools.
    let other = env.client().await;
    let tx_rows = other.query("SELECT balance FROM accounts WHERE id = 3", &[]).await.unwrap();
    assert_eq!(tx_rows[0].get::<_, i32>(0), 200);
}

#[tokio::test]
async fn a_unit_of_work_right_after_a_write_never_reads_a_replica_that_lacks_it() {
    // The only replica replays 2 s late: every unit that reads right after
    // a write must run where the write is.
    let builder = Cluster::builder().delayed_replica(Duration::from_secs(2));
    let env = start(builder, ProxyConfig::default()).await;
    let client = env.client().await;
    client.batch_execute("CREATE TABLE counters (id int PRIMARY KEY, n int)").await.unwrap();
    client.batch_execute("INSERT INTO counters VALUES (1, 0)").await.unwrap();
    let mut client = client;
    for round in 1..=10 {
        client.execute("UPDATE counters SET n = $1 WHERE id = 1", &[&round]).await.unwrap();
        let tx = client.transaction().await.unwrap();
        let n: i32 = tx.query_one("SELECT n FROM counters WHERE id = 1", &[]).await.unwrap().get(0);
        assert_eq!(n, round, "a stale read in the unit of work after a write");
        tx.commit().await.unwrap();
    }
}

/// The probe's count, by result, as scraped.
fn probes(env: &Env, result: &str) -> u64 {
    let shared = env.proxy.shared();
    let text = shared.metrics.render(&shared.scrape()).unwrap();
    let sample = format!("pgnear_watermark_probes_total{{result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&sample)).map_or(0, |v| v.parse().unwrap())
}

#[tokio::test]
async fn a_deferred_begin_opens_a_block_no_watermark_probe_runs_inside() {
    let env = cluster(ProxyConfig::default()).await;
    let client = env.client().await;
    let (lsn, failed) = (probes(&env, "lsn"), probes(&env, "failed"));
    for round in 0..10 {
        // TPC-B's shape in pgbench's simple mode: BEGIN alone (deferred),
        // then a write sent with it in one flight, COMMIT.
        client.batch_execute("BEGIN").await.unwrap();
        client.batch_execute(&format!("UPDATE accounts SET balance = {round} WHERE id = 1")).await.unwrap();
        client.batch_execute("COMMIT").await.unwrap();
    }
    // The last probe's answer comes right behind the client's: wait for it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while probes(&env, "lsn") - lsn < 10 {
        assert!(tokio::time::Instant::now() < deadline, "a commit had no probe");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(probes(&env, "lsn") - lsn, 10, "one probe per commit");
    assert_eq!(probes(&env, "failed"), failed, "a probe ran inside the transaction");
}
