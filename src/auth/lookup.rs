//! `proxy.auth_query`: users that `[[users]]` does not list are looked up
//! on their cluster's primary, as `proxy.auth_user`, by a query that
//! returns the stored secret (PgBouncer's `auth_query`, such as a
//! `SECURITY DEFINER` function over `pg_shadow`). The client is checked
//! against that secret, and pgnear logs in to servers by passthrough.
//!
//! Results are kept for `auth_cache_ms` (lookups that found nothing or
//! failed for `auth_failure_cache_ms`); a few lookups run at once, a
//! bounded number wait, and the rest are refused at once, so that a flood
//! of logins for unknown names cannot pile up connections to the primary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::Credential;
use crate::config::{ClientAuth, NodeConfig, Secret, SecretKind, UserConfig};

/// Lookups running at once.
const RUNNING: usize = 4;
/// Logins waiting for a lookup at most; more are refused at once.
const WAITING: usize = 64;
/// Names remembered at most; past that, entries that expired go.
const CACHED: usize = 10_000;
/// A failure's cause is logged at most once in this long.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A user found by the lookup: its stored secret as a credential, and as
/// a `[[users]]` entry would have it.
#[derive(Debug, Clone)]
pub struct Found {
    pub user: UserConfig,
    pub credential: Credential,
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("too many logins are waiting for user lookups")]
    Busy,
    /// The cause, safe to show: it names no secret.
    #[error("{0}")]
    Failed(String),
}

/// Where and how to look a user up.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: NodeConfig,
    pub database: String,
    /// The login of `proxy.auth_user` on servers.
    pub user: String,
    pub password: Option<Secret>,
    pub query: String,
    pub timeout: Duration,
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    result: Result<Option<Found>, LookupError>,
}

/// The lookups of one proxy: the cache and the limits.
#[derive(Debug)]
pub struct Lookups {
    cache: Mutex<HashMap<String, Entry>>,
    running: Semaphore,
    waiting: AtomicUsize,
    logged: Mutex<HashMap<String, Instant>>,
    found_for: Duration,
    failed_for: Duration,
}

impl Lookups {
    pub fn new(found_for: Duration, failed_for: Duration) -> Lookups {
        Lookups {
            cache: Mutex::new(HashMap::new()),
            running: Semaphore::new(RUNNING),
            waiting: AtomicUsize::new(0),
            logged: Mutex::new(HashMap::new()),
            found_for,
            failed_for,
        }
    }

    /// The user `name`, from the cache or looked up now: `None` if the
    /// query found no such user (or no secret for it).
    pub async fn find(&self, name: &str, target: Target) -> Result<Option<Found>, LookupError> {
        if let Some(result) = self.cached(name) {
            return result;
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= WAITING {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(LookupError::Busy);
        }
        let permit = self.running.acquire().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let _permit = permit.map_err(|_| LookupError::Busy)?;
        // Another login may have looked it up while this one waited.
        if let Some(result) = self.cached(name) {
            return result;
        }
        // On the service loop: tokio-postgres makes timers of its own,
        // which a session loop has no driver for.
        let node = target.node.name.clone();
        let limit = target.timeout * 2;
        let mut run = crate::clock::spawn_on_service(lookup(name.to_string(), target));
        let result = match crate::clock::timeout(limit, &mut run).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LookupError::Failed(format!("the lookup on {node} stopped"))),
            Err(_) => {
                // A server that accepts and never answers must not keep
                // the lookup (and its connection) alive.
                run.abort();
                Err(LookupError::Failed(format!("the lookup on {node} timed out")))
            }
        };
        if let Err(LookupError::Failed(cause)) = &result {
            self.log_once(cause);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED {
            let now = Instant::now();
            cache.retain(|_, e| now.saturating_duration_since(e.at) < self.found_for.max(self.failed_for));
            if cache.len() >= CACHED {
                cache.clear();
            }
        }
        cache.insert(name.to_string(), Entry { at: Instant::now(), result: result.clone() });
        result
    }

    fn cached(&self, name: &str) -> Option<Result<Option<Found>, LookupError>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(name)?;
        let keep = match entry.result {
            Ok(Some(_)) => self.found_for,
            _ => self.failed_for,
        };
        (entry.at.elapsed() < keep).then(|| entry.result.clone())
    }

    fn log_once(&self, cause: &str) {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if logged.get(cause).is_some_and(|at| now.saturating_duration_since(*at) < LOG_EVERY) {
            return;
        }
        if logged.len() > 100 {
            logged.clear();
        }
        logged.insert(cause.to_string(), now);
        tracing::warn!(cause, "user lookup (proxy.auth_query) failed");
    }
}

/// Runs the lookup query once.
async fn lookup(name: String, target: Target) -> Result<Option<Found>, LookupError> {
    let name = name.as_str();
    let node = &target.node;
    let mut pg = tokio_postgres::Config::new();
    pg.host(&node.host).port(node.port).user(&target.user).dbname(&target.database);
    pg.application_name("pgnear-auth-query").connect_timeout(target.timeout);
    if let Some(password) = &target.password {
        pg.password(password.expose());
    }
    let failed = |what: &str, error: tokio_postgres::Error| {
        // The server's own message, or the client library's: neither
        // carries the password.
        let cause = error.as_db_error().map_or_else(|| error.to_string(), |db| db.message().to_string());
        LookupError::Failed(format!("cannot {what} on {} as {:?}: {cause}", node.name, target.user))
    };
    let client = crate::tls::connect_postgres(&mut pg, node).await.map_err(|e| failed("connect", e))?;
    let rows = client.query(&target.query, &[&name]).await.map_err(|e| failed("run proxy.auth_query", e))?;
    let Some(row) = rows.first() else { return Ok(None) };
    let secret: Option<String> = row.try_get(1).map_err(|e| failed("read the secret", e))?;
    let Some(secret) = secret.map(Secret::new) else { return Ok(None) };
    let (auth, credential) = match secret.kind() {
        SecretKind::Scram => {
            let verifier = super::ScramVerifier::from_secret(&secret).map_err(|_| {
                LookupError::Failed(format!("the stored secret of {name:?} is not valid SCRAM"))
            })?;
            (ClientAuth::ScramSha256(secret), Credential::Scram(verifier))
        }
        SecretKind::Md5 => {
            let md5 = super::md5::Md5Secret::new(name, &secret);
            (ClientAuth::Md5(secret), Credential::Md5(md5))
        }
        SecretKind::Plain => {
            return Err(LookupError::Failed(format!(
                "proxy.auth_query returned something other than a stored SCRAM or md5 secret for {name:?}"
            )))
        }
    };
    let user = UserConfig {
        name: name.to_string(),
        auth,
        server_user: name.to_string(),
        server_password: None,
        max_user_connections: None,
    };
    Ok(Some(Found { user, credential }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;
    use crate::config::{RoleSetting, SslMode};

    /// A server that accepts connections and never answers.
    fn silent_target(port: u16) -> Target {
        Target {
            node: NodeConfig {
                name: "silent".into(),
                host: "127.0.0.1".into(),
                port,
                region: "local".into(),
                role: RoleSetting::Auto,
                cluster: "default".into(),
                sslmode: SslMode::Disable,
                sslrootcert: None,
            },
            database: "postgres".into(),
            user: "lookup".into(),
            password: None,
            query: crate::config::DEFAULT_AUTH_QUERY.into(),
            timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn a_flood_of_logins_for_unknown_names_is_refused_not_queued() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::sync::Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                keep.lock().unwrap().push(socket);
            }
        });
        let lookups = std::sync::Arc::new(Lookups::new(Duration::from_secs(60), Duration::from_secs(60)));
        let started = Instant::now();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let lookups = lookups.clone();
                tokio::spawn(async move { lookups.find(&format!("made_up_{i}"), silent_target(port)).await })
            })
            .collect();
        let mut busy = 0;
        let mut failed = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Err(LookupError::Busy) => busy += 1,
                Err(LookupError::Failed(_)) => failed.push(i),
                Ok(found) => panic!("a silent server answered: {found:?}"),
            }
        }
        // Four ran and 64 waited, each until its timeout; the rest were
        // refused at once instead of queueing for minutes.
        assert_eq!(busy + failed.len(), 200);
        assert!(busy >= 200 - RUNNING - WAITING, "only {busy} refused");
        assert!(held.lock().unwrap().len() <= RUNNING + WAITING, "connections piled up");
        assert!(started.elapsed() < Duration::from_secs(120));
        // A failure is remembered briefly: asked again, no new connection.
        let before = held.lock().unwrap().len();
        let name = format!("made_up_{}", failed[0]);
        assert!(lookups.find(&name, silent_target(port)).await.is_err());
        assert_eq!(held.lock().unwrap().len(), before);
    }
}
