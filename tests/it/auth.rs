//! Client authentication to pgnear, and pgnear's authentication to servers.

use pgnear::lab::cluster::{AuthMethod, Cluster};

use crate::support::wire::{startup_packet, Wire};
use crate::support::{connect, primary_only, sqlstate, start, ProxyConfig};

fn proxy_users() -> ProxyConfig {
    ProxyConfig::default()
        .user("name = \"scram_user\"\npassword = \"s3cret\"\nserver_user = \"postgres\"")
        .user("name = \"md5_user\"\npassword = \"m5pw\"\nauth = \"md5\"\nserver_user = \"postgres\"")
}

#[tokio::test]
async fn scram_and_md5_clients_authenticate() {
    let env = start(Cluster::builder(), proxy_users()).await;
    let scram = connect(&env.conn_string("scram_user", "password=s3cret")).await.unwrap();
    assert_eq!(
        scram.query_one("SELECT current_user::text", &[]).await.unwrap().get::<_, String>(0),
        "postgres"
    );
    let md5 = connect(&env.conn_string("md5_user", "password=m5pw")).await.unwrap();
    assert_eq!(md5.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_are_told_apart_by_nothing() {
    let env = start(Cluster::builder(), proxy_users()).await;
    let refused = async |user: &str| {
        let error = connect(&env.conn_string(user, "password=nope")).await.unwrap_err();
        let db = error.as_db_error().unwrap_or_else(|| panic!("{user}: {error}"));
        (db.code().code().to_string(), db.message().replace(user, "<user>"))
    };
    let wrong = refused("scram_user").await;
    assert_eq!(
        wrong,
        ("28P01".to_string(), "password authentication failed for user \"<user>\"".to_string())
    );
    assert_eq!(refused("md5_user").await, wrong);
    assert_eq!(refused("nobody").await, wrong, "an unknown user is refused as a wrong password is");
    // The unknown user's exchange is SCRAM with a salt that stays put.
    let salt = async || {
        let mut wire = Wire::connect(env.proxy.addr()).await;
        wire.send(&startup_packet(&[("user", "nobody")])).await;
        let sasl = wire.recv().await.unwrap();
        assert_eq!(&sasl.body[..4], &10i32.to_be_bytes(), "AuthenticationSASL");
        let first = b"n,,n=,r=abcdefghijkl";
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&(first.len() as i32).to_be_bytes());
        body.extend_from_slice(first);
        wire.send(&crate::support::wire::message(b'p', &body)).await;
        let server_first = wire.recv().await.unwrap();
        let text = String::from_utf8_lossy(&server_first.body[4..]).into_owned();
        text.split(',').find_map(|a| a.strip_prefix("s=").map(str::to_string)).unwrap()
    };
    assert_eq!(salt().await, salt().await);
    // A startup packet without a user.
    let mut wire = Wire::connect(env.proxy.addr()).await;
    wire.send(&startup_packet(&[("database", "postgres")])).await;
    assert_eq!(wire.expect_fatal().await, "28000");
}

async fn server_auth(method: AuthMethod) {
    let builder = Cluster::builder().auth(method).user("app", "server-pw");
    let config = ProxyConfig::default()
        .user("name = \"app\"\npassword = \"client-pw\"\nserver_password = \"server-pw\"")
        .user("name = \"nopw\"\nauth = \"trust\"\nserver_user = \"app\"")
        .monitor("interval_ms = 20\nuser = \"app\"\npassword = \"server-pw\"");
    let env = start(builder, config).await;
    let client = connect(&env.conn_string("app", "password=client-pw")).await.unwrap();
    let row = client.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "app");
    // The server wants a password that the config does not have.
    assert_eq!(sqlstate(connect(&env.conn_string("nopw", "")).await), "08001");
}

#[tokio::test]
async fn server_scram_authentication() {
    server_auth(AuthMethod::Scram).await;
}

#[tokio::test]
async fn server_md5_authentication() {
    server_auth(AuthMethod::Md5).await;
}

#[tokio::test]
async fn server_login_errors_are_relayed_verbatim() {
    let env = primary_only().await;
    let error = connect(&env.conn_string("postgres", "dbname=no_such_db")).await;
    assert_eq!(sqlstate(error), "3D000");
}

/// A cluster whose servers want SCRAM from every TCP login, with a
/// monitor role and an application role, and one streaming replica.
fn scram_fleet() -> pgnear::lab::cluster::ClusterBuilder {
    Cluster::builder().auth(AuthMethod::Scram).replica().user("mon", "monpw").user("app", "apppass")
}

fn monitored() -> ProxyConfig {
    ProxyConfig::default().monitor("interval_ms = 20\nuser = \"mon\"\npassword = \"monpw\"")
}

/// Runs `SELECT 1` until a replica serves it; the session must log in there too.
async fn reads_on_a_replica(env: &crate::support::Env, client: &tokio_postgres::Client) {
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    loop {
        client.simple_query("SELECT 1").await.unwrap();
        if crate::support::show(client, "pgnear.node").await != env.cluster.primary().name() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no read reached the replica");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The secret PostgreSQL stores for `role`.
async fn stored_secret(env: &crate::support::Env, role: &str) -> String {
    let primary = env.cluster.primary().connect().await.unwrap();
    let row =
        primary.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = $1", &[&role]).await.unwrap();
    row.get(0)
}

#[tokio::test]
async fn a_plain_text_password_is_used_toward_servers_too() {
    let env = start(scram_fleet(), monitored().user("name = \"app\"\npassword = \"apppass\"")).await;
    let client = connect(&env.conn_string("app", "password=apppass")).await.unwrap();
    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "app");
    reads_on_a_replica(&env, &client).await;
    assert_eq!(sqlstate(connect(&env.conn_string("app", "password=nope")).await), "28P01");
}

#[tokio::test]
async fn scram_passthrough_logs_in_everywhere_with_no_password_in_the_config() {
    // The config holds only the secret copied from pg_authid.
    let mut env = start(scram_fleet(), monitored()).await;
    let secret = stored_secret(&env, "app").await;
    assert!(secret.starts_with("SCRAM-SHA-256$"));
    for pooling in ["session", "transaction"] {
        let config = monitored()
            .proxy(&format!("pool_mode = \"{pooling}\""))
            .user(&format!("name = \"app\"\npassword = \"{secret}\""));
        let crate::support::Env { proxy, cluster } = env;
        proxy.shutdown_now().await;
        let proxy = pgnear::Proxy::start(config.build(&cluster)).await.unwrap();
        env = crate::support::Env { proxy, cluster };
        let client = connect(&env.conn_string("app", "password=apppass")).await.unwrap();
        let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
        assert_eq!(user, "app", "{pooling}");
        reads_on_a_replica(&env, &client).await;
        assert_eq!(sqlstate(connect(&env.conn_string("app", "password=nope")).await), "28P01");
    }
}

/// The lookup role and function PgBouncer's docs describe: a `SECURITY
/// DEFINER` function over `pg_authid` that only the lookup role may run.
const LOOKUP_SETUP: &str = "
    CREATE ROLE lookup LOGIN PASSWORD 'lookpw';
    CREATE FUNCTION public.user_secret(u name) RETURNS TABLE (usename name, passwd text)
        LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog
        AS $$ SELECT rolname, rolpassword::text FROM pg_authid WHERE rolname = u AND rolcanlogin $$;
    REVOKE ALL ON FUNCTION public.user_secret(name) FROM public;
    GRANT EXECUTE ON FUNCTION public.user_secret(name) TO lookup;";

fn looked_up() -> ProxyConfig {
    monitored()
        .proxy(
            "auth_user = \"lookup\"\nauth_query = \"SELECT * FROM public.user_secret($1)\"\n\
             auth_cache_ms = 300\nauth_failure_cache_ms = 100",
        )
        .user("name = \"lookup\"\npassword = \"lookpw\"")
}

#[tokio::test]
async fn users_not_in_the_config_are_looked_up_with_auth_query() {
    let cluster = scram_fleet().start().await.unwrap();
    let primary = cluster.primary().connect().await.unwrap();
    primary.batch_execute(LOOKUP_SETUP).await.unwrap();
    cluster.wait_for_catchup(crate::support::PATIENCE).await.unwrap();
    let proxy = pgnear::Proxy::start(looked_up().build(&cluster)).await.unwrap();
    let env = crate::support::Env { proxy, cluster };
    // A role created after pgnear started.
    primary.batch_execute("CREATE ROLE late LOGIN PASSWORD 'latepw'").await.unwrap();
    let client = connect(&env.conn_string("late", "password=latepw")).await.unwrap();
    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "late");
    // Passthrough reaches the replica too.
    env.cluster.wait_for_catchup(crate::support::PATIENCE).await.unwrap();
    reads_on_a_replica(&env, &client).await;
    // A wrong password and an unknown name: the same refusal.
    let message = async |user: &str| {
        let error = connect(&env.conn_string(user, "password=nope")).await.unwrap_err();
        let db = error.as_db_error().cloned().unwrap_or_else(|| panic!("{error}"));
        (db.code().code().to_string(), db.message().replace(user, "<user>"))
    };
    let wrong = message("late").await;
    assert_eq!(wrong.0, "28P01");
    assert_eq!(message("ghost").await, wrong);
    // A password changed on the server: the old one is refused once the
    // cache expires, the new one works.
    primary.batch_execute("ALTER ROLE late PASSWORD 'newpw'").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(sqlstate(connect(&env.conn_string("late", "password=latepw")).await), "28P01");
    connect(&env.conn_string("late", "password=newpw")).await.unwrap();
    // The lookup role gone: a clear error that names no secret.
    primary.batch_execute("DROP OWNED BY lookup; DROP ROLE lookup").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let error = connect(&env.conn_string("someone", "password=x")).await.unwrap_err();
    let db = error.as_db_error().unwrap_or_else(|| panic!("{error}"));
    assert_eq!(db.code().code(), "08001", "{}", db.message());
    assert!(db.message().starts_with("cannot look up user \"someone\""), "{}", db.message());
    assert!(!db.message().contains("lookpw"), "{}", db.message());
}

#[tokio::test]
async fn server_connections_are_limited_per_user_and_per_database() {
    let config = ProxyConfig::default()
        .proxy("max_db_connections = 3")
        .user("name = \"capped\"\nauth = \"trust\"\nmax_user_connections = 2");
    let env = start(Cluster::builder().user("capped", "unused"), config).await;
    let first = connect(&env.conn_string("capped", "")).await.unwrap();
    let _second = connect(&env.conn_string("capped", "")).await.unwrap();
    let third = connect(&env.conn_string("capped", "")).await;
    let error = third.unwrap_err();
    let db = error.as_db_error().unwrap_or_else(|| panic!("{error}"));
    assert_eq!(db.code().code(), "53300");
    assert!(db.message().contains("max_user_connections = 2"), "{}", db.message());
    // One more as another user, then the database is full.
    let _other = connect(&env.conn_string("postgres", "")).await.unwrap();
    let error = connect(&env.conn_string("postgres", "")).await.unwrap_err();
    assert!(error.as_db_error().is_some_and(|db| db.message().contains("max_db_connections = 3")), "{error}");
    // A session that ends frees its place.
    drop(first);
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    while let Err(error) = connect(&env.conn_string("capped", "")).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was never freed: {:?}",
            error.as_db_error().map(|d| d.message().to_string())
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn md5_passthrough_logs_in_with_the_stored_hash() {
    let builder =
        Cluster::builder().auth(AuthMethod::Md5).replica().user("mon", "monpw").user("app", "apppass");
    let mut env = start(builder, monitored()).await;
    let secret = stored_secret(&env, "app").await;
    assert!(secret.starts_with("md5"), "{secret}");
    let crate::support::Env { proxy, cluster } = env;
    proxy.shutdown_now().await;
    let config = monitored().user(&format!("name = \"app\"\nauth = \"md5\"\npassword = \"{secret}\""));
    env = crate::support::Env { proxy: pgnear::Proxy::start(config.build(&cluster)).await.unwrap(), cluster };
    let client = connect(&env.conn_string("app", "password=apppass")).await.unwrap();
    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, "app");
    reads_on_a_replica(&env, &client).await;
    assert_eq!(sqlstate(connect(&env.conn_string("app", "password=nope")).await), "28P01");
}
