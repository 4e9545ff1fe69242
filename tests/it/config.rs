//! Config files: the examples parse, bad files name the key at fault, and
//! `pgnear check` exits 0 or 1.

use std::path::Path;
use std::process::Command;

use pgnear::Config;

fn env(name: &str) -> Option<String> {
    match name {
        "APP_PASSWORD" => Some("from-env".into()),
        _ => None,
    }
}

#[test]
fn example_configs_parse() {
    let mut seen = 0;
    let files = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    for path in files.map(|e| e.unwrap().path()).chain([root]) {
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            Config::parse(&text, &env).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 4, "expected the example configs, found {seen}");
}

fn errors(text: &str) -> Vec<String> {
    match Config::parse(text, &env) {
        Ok(_) => panic!("config should be invalid:\n{text}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

const NODE: &str = "[[nodes]]\nname = \"a\"\nhost = \"127.0.0.1\"\n";

#[test]
fn bad_configs_name_every_key_at_fault_at_once() {
    let text = format!(
        "[proxy]\nlisten = \"nowhere\"\nbogus = 1\n\n{NODE}port = 99999\nrole = \"leader\"\n\n\
         [[users]]\nname = \"u\"\nauth = \"md5\"\n\n[routing]\ndefault = \"random\"\n\n\
         [[rules]]\ntables = [\"t\"]\n\n[extra]\nx = 1\n"
    );
    let errors = errors(&text);
    let expect = [
        "proxy.bogus",
        "nodes[0].port",
        "nodes[0].role",
        "users[0].password",
        "routing.default",
        "rules[0]",
        "extra",
    ];
    for key in expect {
        assert!(errors.iter().any(|e| e.starts_with(key)), "no error for {key}: {errors:#?}");
    }
}

#[test]
fn pool_settings_default_to_session_mode_and_are_checked() {
    let parsed = |proxy: &str| Config::parse(&format!("[proxy]\n{proxy}\n{NODE}"), &env);
    let defaults = parsed("").unwrap().proxy;
    assert_eq!(defaults.pool_mode, pgnear::config::PoolMode::Session);
    assert_eq!(defaults.pool_size, 20);
    let pooled = parsed("pool_mode = \"transaction\"\npool_size = 4\npool_timeout_ms = 250").unwrap().proxy;
    assert_eq!(pooled.pool_mode, pgnear::config::PoolMode::Transaction);
    assert_eq!((pooled.pool_size, pooled.pool_timeout.as_millis()), (4, 250));
    let errors = errors(&format!("[proxy]\npool_mode = \"statement\"\npool_size = 0\n{NODE}"));
    assert!(
        errors.iter().any(|e| e.starts_with("proxy.pool_mode") && e.contains("session, transaction")),
        "{errors:#?}"
    );
    assert!(errors.iter().any(|e| e.starts_with("proxy.pool_size")), "{errors:#?}");
}

#[test]
fn replica_wait_is_auto_by_default_a_bound_or_never() {
    use pgnear::config::ReplicaWait;
    let parsed = |consistency: &str| Config::parse(&format!("{NODE}\n[consistency]\n{consistency}\n"), &env);
    assert_eq!(parsed("").unwrap().consistency.replica_wait, ReplicaWait::Auto);
    assert_eq!(parsed("replica_wait_ms = \"auto\"").unwrap().consistency.replica_wait, ReplicaWait::Auto);
    let fixed = parsed("replica_wait_ms = 20").unwrap().consistency.replica_wait;
    assert_eq!(fixed, ReplicaWait::Fixed(std::time::Duration::from_millis(20)));
    let never = parsed("replica_wait_ms = 0").unwrap().consistency.replica_wait;
    assert_eq!(never, ReplicaWait::Fixed(std::time::Duration::ZERO));
    let errors = errors(&format!("{NODE}\n[consistency]\nreplica_wait_ms = \"soon\"\n"));
    assert!(
        errors.iter().any(|e| e.starts_with("consistency.replica_wait_ms") && e.contains("auto")),
        "{errors:#?}"
    );
    let negative = self::errors(&format!("{NODE}\n[consistency]\nreplica_wait_ms = -5\n"));
    assert!(negative.iter().any(|e| e.contains("replica_wait_ms")), "{negative:#?}");
}

#[test]
fn optimistic_transactions_are_on_by_default_and_switched_by_a_word_or_a_boolean() {
    let parsed = |routing: &str| Config::parse(&format!("{NODE}\n[routing]\n{routing}\n"), &env);
    assert!(parsed("").unwrap().routing.optimistic_transactions);
    assert!(parsed("optimistic_transactions = \"on\"").unwrap().routing.optimistic_transactions);
    assert!(!parsed("optimistic_transactions = \"OFF\"").unwrap().routing.optimistic_transactions);
    assert!(!parsed("optimistic_transactions = false").unwrap().routing.optimistic_transactions);
    assert!(parsed("optimistic_transactions = true").unwrap().routing.optimistic_transactions);
    let errors = errors(&format!("{NODE}\n[routing]\noptimistic_transactions = \"maybe\"\n"));
    assert!(
        errors.iter().any(|e| e.starts_with("routing.optimistic_transactions") && e.contains("on, off")),
        "{errors:#?}"
    );
    let wrong_type = self::errors(&format!("{NODE}\n[routing]\noptimistic_transactions = 1\n"));
    assert!(wrong_type.iter().any(|e| e.contains("optimistic_transactions")), "{wrong_type:#?}");
}

#[test]
fn worker_threads_are_sized_or_checked() {
    let parsed = |proxy: &str| Config::parse(&format!("[proxy]\n{proxy}\n{NODE}"), &env);
    let auto = parsed("").unwrap().proxy;
    assert_eq!(auto.worker_threads, None);
    assert_eq!(auto.workers(), pgnear::config::default_workers());
    let cores = std::thread::available_parallelism().expect("the core count").get();
    assert_eq!(auto.workers(), (cores / 2).max(1), "half the cores, at least one");
    assert_eq!(parsed("worker_threads = 0").unwrap().proxy.workers(), pgnear::config::default_workers());
    assert_eq!(parsed("worker_threads = 3").unwrap().proxy.workers(), 3);
    let errors = errors(&format!("[proxy]\nworker_threads = 5000\n{NODE}"));
    assert!(errors.iter().any(|e| e.starts_with("proxy.worker_threads")), "{errors:#?}");
}

#[test]
fn unix_sockets_are_checked() {
    let parsed = |proxy: &str, node: &str| Config::parse(&format!("[proxy]\n{proxy}\n{node}"), &env);
    let off = parsed("", NODE).unwrap().proxy;
    assert_eq!((off.unix_socket_dir, off.unix_socket_mode), (None, 0o777));
    let on = parsed(
        "listen = \"127.0.0.1:7000\"\nunix_socket_dir = \"/run/pgnear\"\nunix_socket_mode = \"0660\"",
        NODE,
    )
    .unwrap()
    .proxy;
    assert_eq!(on.unix_socket_dir.as_deref(), Some(Path::new("/run/pgnear")));
    assert_eq!(on.unix_socket_mode, 0o660);
    let unix_node = "[[nodes]]\nname = \"a\"\nhost = \"/var/run/postgresql\"\nport = 5433\n";
    let node = &parsed("", unix_node).unwrap().nodes[0];
    assert!(node.is_unix_socket());

    let long = format!("/{}", "d".repeat(100));
    let text = format!(
        "[proxy]\nunix_socket_dir = \"run\"\nunix_socket_mode = \"0999\"\n\
         [[nodes]]\nname = \"a\"\nhost = \"/tmp\"\nsslmode = \"require\"\n\
         [[nodes]]\nname = \"b\"\nhost = \"{long}\"\n"
    );
    let faults = errors(&text);
    let expect = [
        ("proxy.unix_socket_dir", "not an absolute path"),
        ("proxy.unix_socket_mode", "not an octal mode"),
        ("nodes[0].sslmode", "TLS is not used on a Unix socket"),
        ("nodes[1].host", "longer than 107 bytes"),
    ];
    for (key, text) in expect {
        assert!(faults.iter().any(|e| e.starts_with(key) && e.contains(text)), "no {key}: {faults:#?}");
    }
    for mode in ["+777", "", "1777", "rwx"] {
        let errors = errors(&format!("[proxy]\nunix_socket_mode = \"{mode}\"\n{NODE}"));
        assert!(errors.iter().any(|e| e.starts_with("proxy.unix_socket_mode")), "{mode}: {errors:#?}");
    }
}

#[test]
fn env_expansion_and_missing_variables() {
    let text = format!("{NODE}\n[[users]]\nname = \"app\"\npassword = \"${{APP_PASSWORD}}\"\n");
    let config = Config::parse(&text, &env).unwrap();
    assert!(
        matches!(&config.users[0].auth, pgnear::config::ClientAuth::ScramSha256(s) if s.expose() == "from-env")
    );
    let text = format!("{NODE}\n[[users]]\nname = \"app\"\npassword = \"${{NOT_SET}}\"\n");
    assert_eq!(errors(&text), ["users[0].password: environment variable NOT_SET is not set"]);
}

#[test]
fn structural_mistakes() {
    assert!(errors("[proxy\n")[0].contains("not valid TOML"));
    assert_eq!(errors("[proxy]\n"), ["nodes: at least one [[nodes]] entry is required"]);
    let twice = format!("{NODE}\n{NODE}");
    assert!(errors(&twice)[0].starts_with("nodes[1].name"));
    let wrong_type = "nodes = 3\n";
    assert!(errors(wrong_type)[0].starts_with("nodes"));
    let tenant = format!("{NODE}\n[[tenants]]\ndatabase = \"x\"\ncluster = \"mars\"\n");
    assert!(errors(&tenant)[0].starts_with("tenants[0].cluster"));
}

#[test]
fn check_command_exits_0_or_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("{NODE}\n[[users]]\nname = \"postgres\"\nauth = \"trust\"\n")).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{NODE}port = \"x\"\n")).unwrap();
    let run = |path: &Path| {
        Command::new(env!("CARGO_BIN_EXE_pgnear")).args(["check", "--config"]).arg(path).output().unwrap()
    };
    let ok = run(&good);
    assert!(ok.status.success(), "{ok:?}");
    let failed = run(&bad);
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("nodes[0].port"), "{failed:?}");
    let missing = run(&dir.path().join("missing.toml"));
    assert_eq!(missing.status.code(), Some(1));
    // Files the config names are loaded too.
    let no_cert = dir.path().join("no-cert.toml");
    let tls =
        "[tls]\nmode = \"require\"\ncert = \"/nonexistent/server.crt\"\nkey = \"/nonexistent/server.key\"\n";
    std::fs::write(&no_cert, format!("{tls}{NODE}\n[[users]]\nname = \"postgres\"\nauth = \"trust\"\n"))
        .unwrap();
    let failed = run(&no_cert);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(String::from_utf8_lossy(&failed.stderr).contains("server.crt"), "{failed:?}");
}

#[test]
fn users_log_in_to_servers_as_their_secret_allows_and_check_says_how() {
    let scram = postgres_protocol::password::scram_sha_256(b"pw");
    let text = format!(
        "[proxy]\nauth_user = \"plain\"\nmax_user_connections = 10\nmax_db_connections = 50\n{NODE}\n\
         [[users]]\nname = \"plain\"\npassword = \"pw\"\n\n\
         [[users]]\nname = \"stored\"\npassword = \"{scram}\"\nmax_user_connections = 3\n\n\
         [[users]]\nname = \"hashed\"\nauth = \"md5\"\npassword = \"md5{}\"\n\n\
         [[users]]\nname = \"other\"\npassword = \"pw\"\nserver_password = \"spw\"\n\n\
         [[users]]\nname = \"trusted\"\nauth = \"trust\"\n",
        "0".repeat(32)
    );
    let config = Config::parse(&text, &env).unwrap();
    let user = |name: &str| config.user(name).unwrap();
    assert_eq!(user("plain").server_password.as_ref().map(|p| p.expose().to_string()), Some("pw".into()));
    assert!(user("stored").server_password.is_none(), "a stored secret is passed through, not sent");
    assert!(user("hashed").server_password.is_none());
    assert_eq!(user("other").server_password.as_ref().map(|p| p.expose().to_string()), Some("spw".into()));
    assert_eq!(user("stored").max_user_connections, Some(3));
    assert_eq!((config.proxy.max_user_connections, config.proxy.max_db_connections), (10, 50));
    assert_eq!(config.proxy.auth_query, pgnear::config::DEFAULT_AUTH_QUERY);
    assert!(user("plain").describe().contains("with its own password"), "{}", user("plain").describe());
    assert!(user("stored").describe().contains("SCRAM passthrough"));
    assert!(user("hashed").describe().contains("md5 passthrough"));
    assert!(user("other").describe().contains("server_password"));
    assert!(user("trusted").describe().contains("must trust pgnear"));
    // `pgnear check` says so.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.toml");
    std::fs::write(&path, &text).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_pgnear")).args(["check", "--config"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("stored: clients scram-sha-256; servers as \"stored\" by SCRAM passthrough"),
        "{stdout}"
    );
    assert!(stdout.contains("users not listed: looked up with proxy.auth_query as \"plain\""), "{stdout}");
    assert!(!stdout.contains("pw\""), "a password in the output: {stdout}");
    // The monitor logs in as a listed user with that user's password.
    let text =
        format!("{NODE}\n[monitor]\nuser = \"plain\"\n\n[[users]]\nname = \"plain\"\npassword = \"pw\"\n");
    let monitor = Config::parse(&text, &env).unwrap().monitor;
    assert_eq!(monitor.password.map(|p| p.expose().to_string()), Some("pw".into()));
}

#[test]
fn auth_settings_are_checked_with_their_key_paths() {
    let scram = postgres_protocol::password::scram_sha_256(b"pw");
    let text = format!(
        "[proxy]\nauth_user = \"nobody\"\nauth_query = \"SELECT 1\"\n{NODE}\n\
         [[users]]\nname = \"a\"\nauth = \"md5\"\npassword = \"{scram}\"\n\n\
         [[users]]\nname = \"b\"\npassword = \"md5{}\"\n",
        "1".repeat(32)
    );
    let errors = errors(&text);
    for key in ["proxy.auth_user", "proxy.auth_query", "users[0].password", "users[1].password"] {
        assert!(errors.iter().any(|e| e.starts_with(key)), "no error for {key}: {errors:#?}");
    }
    // A lookup user with only a stored secret cannot log in to look up.
    let text =
        format!("[proxy]\nauth_user = \"a\"\n{NODE}\n[[users]]\nname = \"a\"\npassword = \"{scram}\"\n");
    let errors = self::errors(&text);
    assert!(
        errors.iter().any(|e| e.starts_with("proxy.auth_user") && e.contains("stored secret")),
        "{errors:#?}"
    );
}
