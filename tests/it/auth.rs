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
async fn wrong_password_is_28p01_and_unknown_user_is_28000() {
    let env = start(Cluster::builder(), proxy_users()).await;
    assert_eq!(sqlstate(connect(&env.conn_string("scram_user", "password=nope")).await), "28P01");
    assert_eq!(sqlstate(connect(&env.conn_string("md5_user", "password=nope")).await), "28P01");
    assert_eq!(sqlstate(connect(&env.conn_string("nobody", "password=x")).await), "28000");
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
