//! The monitor: one loop per node, every `monitor.interval` (50 ms by
//! default), so that routing decisions see lag and health at most one
//! interval old.
//!
//! Each loop keeps one connection to its node and runs a single probe query
//! that returns the node's role (`pg_is_in_recovery()`), its WAL position
//! (`pg_current_wal_lsn()` on a primary, `pg_last_wal_replay_lsn()` on a
//! replica), the receive LSN and the last replay timestamp. The probe's
//! round trip feeds an EWMA of the node's RTT. A node goes down after
//! `failures_before_down` consecutive failures and comes back after
//! `successes_before_up` consecutive successes. Each loop publishes a new
//! immutable [`NodeStatus`]; nothing else writes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::{Lsn, Node, NodeStatus, Role, Topology};
use crate::config::MonitorConfig;

const PROBE: &str = "SELECT pg_is_in_recovery()::text, \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text, \
     pg_last_wal_receive_lsn()::text, \
     (extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8::text, \
     (extract(epoch FROM clock_timestamp()) * 1000000)::int8::text, \
     (CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END)::text";

/// The weight of the newest RTT sample in the EWMA.
const RTT_ALPHA: f64 = 0.3;

/// What one probe measured.
#[derive(Debug, Clone)]
struct Sample {
    in_recovery: bool,
    lsn: Option<Lsn>,
    receive_lsn: Option<Lsn>,
    replay_time: Option<SystemTime>,
    probed_at: Option<SystemTime>,
    insert_lsn: Option<Lsn>,
    sent_at: Instant,
    rtt: Duration,
}

/// The running monitor: a loop per live node. Dropping it stops them.
#[derive(Debug)]
pub struct Monitor {
    topology: Arc<Topology>,
    loops: Mutex<Loops>,
}

#[derive(Debug)]
struct Loops {
    config: MonitorConfig,
    connect_timeout: Duration,
    /// By node id.
    tasks: HashMap<usize, JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Probes every node once, concurrently, so that a proxy starts with a
/// verified view. Bounded by `timeout`.
pub async fn probe_all(topology: &Arc<Topology>, config: &MonitorConfig, timeout: Duration) {
    let probes = topology.live().map(|(_, node)| async move {
        let mut conn = None;
        probe_and_publish(node, &mut conn, config, timeout, true).await;
    });
    futures_util::future::join_all(probes).await;
}

impl Monitor {
    /// Starts one loop per live node.
    pub fn spawn(topology: Arc<Topology>, config: MonitorConfig, connect_timeout: Duration) -> Monitor {
        let monitor =
            Monitor { topology, loops: Mutex::new(Loops { config, connect_timeout, tasks: HashMap::new() }) };
        monitor.follow(None);
        monitor
    }

    /// Follows a reload: a loop for each node without one, none for a
    /// retired node, and with new `[monitor]` settings every loop started
    /// again with them (statuses carry over: they live in the nodes).
    pub fn follow(&self, config: Option<&MonitorConfig>) {
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(config) = config.filter(|c| **c != loops.config) {
            loops.config = config.clone();
            for (_, task) in loops.tasks.drain() {
                task.abort();
            }
        }
        loops.tasks.retain(|id, task| {
            let keep = !self.topology.node(*id).retired();
            if !keep {
                task.abort();
            }
            keep
        });
        let live: Vec<usize> = self.topology.live().map(|(id, _)| id).collect();
        for id in live {
            if loops.tasks.contains_key(&id) {
                continue;
            }
            let (topology, config, timeout) =
                (self.topology.clone(), loops.config.clone(), loops.connect_timeout);
            let task = crate::clock::spawn_on_service(async move {
                node_loop(topology.node(id), &config, timeout).await
            });
            loops.tasks.insert(id, task);
        }
    }

    /// Stops every loop.
    pub fn stop(&self) {
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        for (_, task) in loops.tasks.drain() {
            task.abort();
        }
    }
}

/// Probes every `interval`; between probes, while reads wait on the node
/// to replay a write, polls its replay position back to back (see
/// [`super::replay`]).
async fn node_loop(node: &Node, config: &MonitorConfig, connect_timeout: Duration) {
    let mut conn: Option<Client> = None;
    let timeout = connect_timeout.max(config.interval);
    loop {
        let next = tokio::time::Instant::now() + config.interval;
        probe_and_publish(node, &mut conn, config, timeout, false).await;
        loop {
            if node.replay.is_wanted() && node.status.load().role == Role::Replica {
                replay_polls(node, &mut conn, next).await;
            }
            #[allow(clippy::disallowed_methods)] // monitors run on the service loop
            let tick = tokio::time::sleep_until(next);
            tokio::select! {
                biased;
                () = tick => break,
                () = node.replay.wanted() => {}
            }
        }
    }
}

/// The replay position alone, for the polls between probes.
const REPLAY_POLL: &str = "SELECT pg_last_wal_replay_lsn()::text";

/// Polls the replica's replay position one round trip after the other
/// while reads wait on it, until `until` (the next regular probe).
async fn replay_polls(node: &Node, conn: &mut Option<Client>, until: tokio::time::Instant) {
    while node.replay.is_wanted() && tokio::time::Instant::now() < until {
        let Some(client) = conn.as_ref().filter(|c| !c.is_closed()) else { return };
        let poll = client.simple_query(REPLAY_POLL);
        #[allow(clippy::disallowed_methods)] // monitors run on the service loop
        let answer = tokio::time::timeout_at(until, poll).await;
        let lsn = match answer {
            Ok(Ok(rows)) => rows.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<Lsn>().ok()),
                _ => None,
            }),
            // The regular probe finds out what is wrong.
            Ok(Err(_)) | Err(_) => return,
        };
        match lsn {
            Some(lsn) => node.publish_replay(lsn),
            None => return,
        }
    }
}

async fn probe_and_publish(
    node: &Node,
    conn: &mut Option<Client>,
    config: &MonitorConfig,
    timeout: Duration,
    first: bool,
) {
    let result = crate::clock::timeout(timeout, probe(node, conn, config)).await;
    let sample = match result {
        Ok(Ok(sample)) => Ok(sample),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("probe timed out".to_string()),
    };
    if sample.is_err() {
        *conn = None;
    }
    let old = node.status.load();
    let new = next_status(&old, sample.as_ref(), config, first);
    log_changes(node, &old, &new, sample.as_ref().err());
    node.publish(new);
    // Reads waiting on the node look again (it may be down now).
    node.replay.wake();
}

async fn probe(
    node: &Node,
    conn: &mut Option<Client>,
    config: &MonitorConfig,
) -> Result<Sample, tokio_postgres::Error> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        // Boxed: tokio-postgres's connect future is kilobytes, and inline
        // it would make every probe's future (built and moved 20 times a
        // second per node) as large, although a probe rarely connects.
        *conn = Some(Box::pin(connect(node, config)).await?);
    }
    let Some(client) = conn.as_ref() else { unreachable!("connected above") };
    let started = Instant::now();
    let rows = client.simple_query(PROBE).await?;
    let rtt = started.elapsed();
    let row = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let col = |i: usize| row.and_then(|r| r.get(i));
    let micros = |i: usize| {
        col(i).and_then(|v| v.parse::<u64>().ok()).map(|us| UNIX_EPOCH + Duration::from_micros(us))
    };
    Ok(Sample {
        in_recovery: col(0) == Some("true"),
        lsn: col(1).and_then(|v| v.parse().ok()),
        receive_lsn: col(2).and_then(|v| v.parse().ok()),
        replay_time: micros(3),
        probed_at: micros(4),
        insert_lsn: col(5).and_then(|v| v.parse().ok()),
        sent_at: started,
        rtt,
    })
}

async fn connect(node: &Node, config: &MonitorConfig) -> Result<Client, tokio_postgres::Error> {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&node.config.host)
        .port(node.config.port)
        .user(&config.user)
        .dbname(&config.database)
        .application_name("pgnear-monitor")
        .connect_timeout(Duration::from_secs(5));
    if let Some(password) = &config.password {
        pg.password(password.expose());
    }
    crate::tls::connect_postgres(&mut pg, &node.config).await
}

/// The pure health and measurement update.
fn next_status(
    old: &NodeStatus,
    sample: Result<&Sample, &String>,
    config: &MonitorConfig,
    first: bool,
) -> NodeStatus {
    match sample {
        Ok(s) => {
            let successes = old.consecutive_successes.saturating_add(1);
            let never_seen = old.role == Role::Unknown;
            let rtt = match old.rtt {
                Some(prev) => prev.mul_f64(1.0 - RTT_ALPHA) + s.rtt.mul_f64(RTT_ALPHA),
                None => s.rtt,
            };
            NodeStatus {
                up: old.up || first || never_seen || successes >= config.successes_before_up,
                role: if s.in_recovery { Role::Replica } else { Role::Primary },
                rtt: Some(rtt),
                lsn: s.lsn,
                receive_lsn: s.receive_lsn,
                replay_time: s.replay_time,
                probed_at: s.probed_at,
                insert_lsn: s.insert_lsn,
                probe_sent: Some(s.sent_at),
                consecutive_failures: 0,
                consecutive_successes: successes,
            }
        }
        Err(_) => {
            let failures = old.consecutive_failures.saturating_add(1);
            NodeStatus {
                up: old.up && !first && failures < config.failures_before_down,
                consecutive_failures: failures,
                consecutive_successes: 0,
                ..old.clone()
            }
        }
    }
}

/// Logs each state change once, when the published status flips: up,
/// down, never reached, promoted, demoted. A steady state logs nothing, so
/// a node that stays down costs one line, not one per probe.
fn log_changes(node: &Node, old: &NodeStatus, new: &NodeStatus, error: Option<&String>) {
    let name = node.config.name.as_str();
    let error = error.map(String::as_str);
    if old.up != new.up {
        if new.up {
            tracing::info!(node = name, role = new.role.as_str(), "node is up");
        } else {
            tracing::warn!(node = name, error, failures = new.consecutive_failures, "node is down");
        }
    } else if !new.up && new.role == Role::Unknown && new.consecutive_failures == 1 {
        // Never reached: `up` has nothing to flip from, so say it once here.
        tracing::warn!(node = name, error, "node is unreachable");
    }
    if old.role != new.role && old.role != Role::Unknown {
        let (from, to) = (old.role.as_str(), new.role.as_str());
        match new.role {
            Role::Primary => tracing::warn!(node = name, from, to, "node was promoted"),
            _ => tracing::warn!(node = name, from, to, "node changed role"),
        }
    }
}
