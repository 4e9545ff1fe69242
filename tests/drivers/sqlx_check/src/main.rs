//! sqlx through pgnear, used the ordinary way: a pool, binds (sqlx
//! prepares every statement by name and caches it per connection),
//! transactions, errors, COPY, LISTEN/NOTIFY and multi-statement text.
//!
//! Connects as PGNEAR_USER/PGNEAR_PASSWORD (SCRAM-SHA-256 against pgnear).
//! Every step runs even if an earlier one failed; prints "sqlx: ok" when all
//! pass, else each failure, and exits 1.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Row};

const TABLE: &str = "drv_sqlx";
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

type Outcome = Result<(), String>;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn options() -> PgConnectOptions {
    PgConnectOptions::new()
        .host(&env("PGNEAR_HOST", "127.0.0.1"))
        .port(env("PGNEAR_PORT", "6432").parse().expect("PGNEAR_PORT"))
        .username(&env("PGNEAR_USER", "app"))
        .password(&env("PGNEAR_PASSWORD", "apppw"))
        .database(&env("PGNEAR_DB", "postgres"))
        .application_name("sqlx_check")
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Outcome {
    if ok {
        Ok(())
    } else {
        Err(format!("assertion failed: {}", what()))
    }
}

fn sql(error: sqlx::Error) -> String {
    match error.as_database_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().unwrap_or_default()),
        None => error.to_string(),
    }
}

fn sqlstate(error: &sqlx::Error) -> String {
    error.as_database_error().and_then(|db| db.code()).map(|c| c.into_owned()).unwrap_or_default()
}

async fn connect() -> Result<PgConnection, String> {
    PgConnection::connect_with(&options()).await.map_err(sql)
}

/// The port of the server that ran a statement.
async fn server_port(conn: &mut PgConnection, query: &str) -> Result<String, String> {
    let row = sqlx::query(query).fetch_one(&mut *conn).await.map_err(sql)?;
    Ok(row.try_get::<i32, _>(0).map_err(sql)?.to_string())
}

/// Polls until a read reaches the replica (reads go there once the
/// session's earlier writes have replayed); skipped in DIRECT=1 runs.
async fn wait_for_replica_read(conn: &mut PgConnection, query: &str) -> Outcome {
    if env("PGNEAR_REQUIRE_REPLICA", "1") != "1" {
        return Ok(());
    }
    let replica = env("PGNEAR_REPLICA_PORT", "");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if server_port(conn, query).await? == replica {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{query}: never ran on the replica"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scram_login() -> Outcome {
    let mut conn = connect().await?;
    let user: String =
        sqlx::query_scalar("SELECT current_user::text").fetch_one(&mut conn).await.map_err(sql)?;
    let expected = env("PGNEAR_SERVER_USER", "postgres");
    check(user == expected, || format!("current_user {user}, expected {expected}"))?;
    conn.close().await.map_err(sql)
}

async fn wrong_password_refused() -> Outcome {
    match PgConnection::connect_with(&options().password("not-the-password")).await {
        Ok(_) => Err("a wrong password was accepted".into()),
        Err(error) => check(sqlstate(&error) == "28P01", || format!("expected 28P01, got {}", sql(error))),
    }
}

async fn create_table() -> Outcome {
    let mut conn = connect().await?;
    let ddl = format!("DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int PRIMARY KEY, v text)");
    sqlx::raw_sql(&ddl).execute(&mut conn).await.map_err(sql)?;
    Ok(())
}

async fn binds_and_cached_statements() -> Outcome {
    let mut conn = connect().await?;
    let insert = format!("INSERT INTO {TABLE} (id, v) VALUES ($1, $2)");
    for id in 1..=100 {
        sqlx::query(&insert).bind(id).bind(format!("v{id}")).execute(&mut conn).await.map_err(sql)?;
    }
    // The same named statement, many times; reads may run on the replica
    // (pgnear prepares the statement there first).
    let select = format!("SELECT v FROM {TABLE} WHERE id = $1");
    for id in 1..=100 {
        let v: String = sqlx::query_scalar(&select).bind(id).fetch_one(&mut conn).await.map_err(sql)?;
        check(v == format!("v{id}"), || format!("row {id} read back as {v}"))?;
    }
    let typed = sqlx::query("SELECT $1::int8 * 2, $2::text || '!', $3::bool")
        .bind(21i64)
        .bind("hi")
        .bind(true)
        .fetch_one(&mut conn)
        .await
        .map_err(sql)?;
    check(
        typed.get::<i64, _>(0) == 42 && typed.get::<String, _>(1) == "hi!" && typed.get::<bool, _>(2),
        || "typed binds came back wrong".into(),
    )
}

async fn reads_on_the_replica_see_own_writes() -> Outcome {
    let mut conn = connect().await?;
    wait_for_replica_read(&mut conn, "SELECT inet_server_port()").await?;
    let primary = env("PGNEAR_PRIMARY_PORT", "");
    for round in 0..20 {
        let id = 1000 + round;
        let write = format!("INSERT INTO {TABLE} VALUES ($1, 'fresh') RETURNING inet_server_port()");
        let port: i32 = sqlx::query_scalar(&write).bind(id).fetch_one(&mut conn).await.map_err(sql)?;
        if env("PGNEAR_REQUIRE_REPLICA", "1") == "1" {
            check(port.to_string() == primary, || format!("a write ran on port {port}"))?;
        }
        // At once, on the same connection: the write must be visible.
        let read = format!("SELECT count(*) FROM {TABLE} WHERE id = $1");
        let count: i64 = sqlx::query_scalar(&read).bind(id).fetch_one(&mut conn).await.map_err(sql)?;
        check(count == 1, || format!("round {round}: a stale read after a write"))?;
    }
    wait_for_replica_read(&mut conn, "SELECT inet_server_port()").await
}

async fn transactions() -> Outcome {
    let mut conn = connect().await?;
    let mut tx = conn.begin().await.map_err(sql)?;
    sqlx::query(&format!("INSERT INTO {TABLE} VALUES (2000, 'rolled back')"))
        .execute(&mut *tx)
        .await
        .map_err(sql)?;
    tx.rollback().await.map_err(sql)?;
    let mut tx = conn.begin().await.map_err(sql)?;
    sqlx::query(&format!("INSERT INTO {TABLE} VALUES (2001, 'committed')"))
        .execute(&mut *tx)
        .await
        .map_err(sql)?;
    let inside: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {TABLE} WHERE id = 2001"))
        .fetch_one(&mut *tx)
        .await
        .map_err(sql)?;
    check(inside == 1, || "a transaction did not see its own insert".into())?;
    tx.commit().await.map_err(sql)?;
    let ids: Vec<i32> = sqlx::query_scalar(&format!("SELECT id FROM {TABLE} WHERE id IN (2000, 2001)"))
        .fetch_all(&mut conn)
        .await
        .map_err(sql)?;
    check(ids == [2001], || format!("after rollback and commit: {ids:?}"))
}

async fn error_then_continue() -> Outcome {
    let mut conn = connect().await?;
    let duplicate =
        sqlx::query(&format!("INSERT INTO {TABLE} VALUES ($1, 'dup')")).bind(1).execute(&mut conn).await;
    match duplicate {
        Ok(_) => return Err("a duplicate key was accepted".into()),
        Err(error) => check(sqlstate(&error) == "23505", || format!("expected 23505, got {}", sql(error)))?,
    }
    let missing = sqlx::query("SELECT * FROM drv_sqlx_missing").fetch_all(&mut conn).await;
    check(missing.as_ref().err().map(sqlstate).as_deref() == Some("42P01"), || format!("{missing:?}"))?;
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.map_err(sql)?;
    check(one == 1, || "the connection is unusable after errors".into())
}

async fn copy_in_and_out() -> Outcome {
    let mut conn = connect().await?;
    let mut copy = conn.copy_in_raw(&format!("COPY {TABLE} (id, v) FROM STDIN")).await.map_err(sql)?;
    let data: String = (3000..4000).map(|i| format!("{i}\tcopied {i}\n")).collect();
    copy.send(data.as_bytes()).await.map_err(sql)?;
    let rows = copy.finish().await.map_err(sql)?;
    check(rows == 1000, || format!("COPY FROM STDIN: {rows} rows"))?;
    let query = format!("COPY (SELECT id, v FROM {TABLE} WHERE id >= 3000 ORDER BY id) TO STDOUT");
    let mut out = Vec::new();
    let mut stream = conn.copy_out_raw(&query).await.map_err(sql)?;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(sql)?);
    }
    drop(stream);
    check(out == data.as_bytes(), || {
        format!("COPY TO STDOUT returned {} bytes, not {}", out.len(), data.len())
    })
}

async fn listen_notify(pool: &PgPool) -> Outcome {
    let mut listener = PgListener::connect_with(pool).await.map_err(sql)?;
    listener.listen("drv_sqlx_channel").await.map_err(sql)?;
    sqlx::query("SELECT pg_notify('drv_sqlx_channel', 'hello')").execute(pool).await.map_err(sql)?;
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .map_err(|_| "no notification".to_string())?
        .map_err(sql)?;
    check(note.payload() == "hello", || format!("payload {:?}", note.payload()))
}

async fn pool_usage(pool: &PgPool) -> Outcome {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40i64 {
        let pool = pool.clone();
        tasks.spawn(async move {
            let row =
                sqlx::query("SELECT $1::int8 + 1, pg_sleep(0.01)::text").bind(i).fetch_one(&pool).await?;
            Ok::<_, sqlx::Error>((i, row.get::<i64, _>(0)))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, got) = joined.map_err(|e| e.to_string())?.map_err(sql)?;
        check(got == i + 1, || format!("query {i} returned {got}"))?;
    }
    Ok(())
}

async fn multi_statement_text() -> Outcome {
    let mut conn = connect().await?;
    let rows =
        sqlx::raw_sql("SELECT 1 AS a; SELECT 2 AS b, 3 AS c").fetch_all(&mut conn).await.map_err(sql)?;
    check(rows.len() == 2, || format!("{} rows", rows.len()))
}

async fn cleanup() -> Outcome {
    let mut conn = connect().await?;
    sqlx::query(&format!("DROP TABLE {TABLE}")).execute(&mut conn).await.map_err(sql)?;
    Ok(())
}

async fn step(failures: &mut Vec<String>, name: &str, run: impl Future<Output = Outcome>) {
    let outcome = match tokio::time::timeout(STEP_TIMEOUT, run).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("timed out after {STEP_TIMEOUT:?}")),
    };
    match outcome {
        Ok(()) => println!("  {name}: ok"),
        Err(error) => {
            println!("  {name}: FAILED: {error}");
            failures.push(name.to_string());
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut failures = Vec::new();
    let pool = PgPoolOptions::new().max_connections(5).connect_lazy_with(options());
    step(&mut failures, "scram_login", scram_login()).await;
    step(&mut failures, "wrong_password_refused", wrong_password_refused()).await;
    step(&mut failures, "create_table", create_table()).await;
    step(&mut failures, "binds_and_cached_statements", binds_and_cached_statements()).await;
    step(&mut failures, "reads_on_the_replica_see_own_writes", reads_on_the_replica_see_own_writes()).await;
    step(&mut failures, "transactions", transactions()).await;
    step(&mut failures, "error_then_continue", error_then_continue()).await;
    step(&mut failures, "copy_in_and_out", copy_in_and_out()).await;
    step(&mut failures, "listen_notify", listen_notify(&pool)).await;
    step(&mut failures, "pool_usage", pool_usage(&pool)).await;
    step(&mut failures, "multi_statement_text", multi_statement_text()).await;
    step(&mut failures, "cleanup", cleanup()).await;
    pool.close().await;
    if failures.is_empty() {
        println!("sqlx: ok");
    } else {
        println!("sqlx: {} failed: {}", failures.len(), failures.join(", "));
        std::process::exit(1);
    }
}
