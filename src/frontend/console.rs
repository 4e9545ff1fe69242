//! The admin console over the PostgreSQL protocol, as PgBouncer has it:
//! `psql -h <pgnear> -p 6432 -U <admin> pgnear`, for the users listed in
//! `proxy.admin_users`. Simple queries only; each is one command:
//! `SHOW NODES | CLIENTS | SERVERS | POOLS | STATS | CONFIG | VERSION`,
//! `RELOAD`, `PAUSE [node]`, `RESUME [node]`, `DISABLE <node>`, `ENABLE <node>`,
//! `KILL <client id>`.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::reload::Reloaded;
use super::Shared;
use crate::error::ProxyError;
use crate::protocol::backend::{
    backend_key_data, command_complete, data_row, error_response, parameter_status, ready_for_query,
    row_description, Severity, TxStatus,
};
use crate::protocol::{frontend, Frame, FrameReader, SqlState};
use crate::router::ClusterView;

/// The database name that opens the console instead of a session.
pub const DATABASE: &str = "pgnear";

/// A command's answer: rows under column names, and a command tag.
struct Answer {
    columns: &'static [&'static str],
    rows: Vec<Vec<String>>,
    tag: String,
}

impl Answer {
    fn done(tag: &str) -> Answer {
        Answer { columns: &[], rows: Vec::new(), tag: tag.to_string() }
    }
}

/// Serves one console connection until the client leaves.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buffered: bytes::BytesMut,
    shared: &Arc<Shared>,
) -> Result<(), ProxyError> {
    let mut out = Vec::new();
    for (name, value) in [
        ("server_version", "15.0 (pgnear console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgnear"),
    ] {
        out.extend_from_slice(parameter_status(name, value).raw());
    }
    let key = crate::protocol::startup::CancelKey { pid: 0, secret: 0 };
    out.extend_from_slice(backend_key_data(key).raw());
    out.extend_from_slice(ready_for_query(TxStatus::Idle).raw());
    stream.write_all(&out).await.map_err(ProxyError::ClientGone)?;
    let mut reader = FrameReader::with_buffered(&mut *stream, 64 * 1024, buffered);
    loop {
        let Some(frame) = reader.next().await? else { return Ok(()) };
        let mut out = Vec::new();
        match frame.tag() {
            b'X' => return Ok(()),
            b'Q' => {
                let text = String::from_utf8_lossy(frontend::query_text(&frame)?).into_owned();
                match run(shared, &text).await {
                    Ok(answer) => write_answer(&mut out, &answer),
                    Err(error) => out.extend_from_slice(error.raw()),
                }
                out.extend_from_slice(ready_for_query(TxStatus::Idle).raw());
            }
            b'S' => out.extend_from_slice(ready_for_query(TxStatus::Idle).raw()),
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                // Answered once, at the Sync that ends the batch.
                if frame.tag() == b'P' {
                    let message =
                        "the pgnear console takes simple queries only (psql, or a driver's simple protocol)";
                    out.extend_from_slice(
                        error_response(Severity::Error, SqlState::FeatureNotSupported, message).raw(),
                    );
                }
            }
            tag => {
                let message = format!("unexpected message {:?} on the pgnear console", tag as char);
                out.extend_from_slice(
                    error_response(Severity::Fatal, SqlState::ProtocolViolation, &message).raw(),
                );
                reader.get_mut().write_all(&out).await.map_err(ProxyError::ClientGone)?;
                return Ok(());
            }
        }
        reader.get_mut().write_all(&out).await.map_err(ProxyError::ClientGone)?;
    }
}

fn write_answer(out: &mut Vec<u8>, answer: &Answer) {
    if !answer.columns.is_empty() {
        out.extend_from_slice(row_description(answer.columns).raw());
        for row in &answer.rows {
            let values: Vec<&str> = row.iter().map(String::as_str).collect();
            out.extend_from_slice(data_row(&values).raw());
        }
    }
    out.extend_from_slice(command_complete(&answer.tag).raw());
}

/// Runs one command.
async fn run(shared: &Arc<Shared>, text: &str) -> Result<Answer, Frame> {
    let words: Vec<String> =
        text.trim().trim_end_matches(';').split_whitespace().map(|w| w.to_ascii_lowercase()).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["show", "nodes"] => Ok(nodes(shared)),
        ["show", "pools"] => Ok(pools(shared)),
        ["show", "clients"] => Ok(clients(shared)),
        ["show", "servers"] => Ok(servers(shared)),
        ["kill", id] => {
            let killed = id.parse().ok().is_some_and(|id| shared.cancels.kill(id));
            if killed {
                tracing::warn!(client = id, "KILL: closing the client's session");
                Ok(Answer::done("KILL"))
            } else {
                let message = format!("no client with id {id:?} (SHOW CLIENTS lists them)");
                Err(error_response(Severity::Error, SqlState::UndefinedObject, &message))
            }
        }
        ["show", "stats"] => Ok(stats(shared)),
        ["show", "config"] => Ok(config(shared)),
        ["show", "version"] => Ok(Answer {
            columns: &["version"],
            rows: vec![vec![format!("pgnear {}", env!("CARGO_PKG_VERSION"))]],
            tag: "SHOW".into(),
        }),
        ["reload"] => match super::reload::reload(shared).await {
            Reloaded::Applied { .. } => Ok(Answer::done("RELOAD")),
            Reloaded::Refused(faults) => {
                let message =
                    format!("reload refused, the running configuration stays: {}", faults.join("; "));
                Err(error_response(Severity::Error, SqlState::InvalidParameterValue, &message))
            }
            Reloaded::NoFile => Err(error_response(
                Severity::Error,
                SqlState::ObjectNotInPrerequisiteState,
                "the configuration was not read from a file: nothing to reload",
            )),
        },
        ["pause"] => {
            shared.paused.set(true);
            tracing::warn!("PAUSE: new units of work wait until RESUME");
            // Done once no transaction is open on any server: the primary
            // can then be moved without failing anyone's.
            transactions_done(shared, &shared.transactions).await?;
            Ok(Answer::done("PAUSE"))
        }
        ["resume"] => {
            shared.paused.set(false);
            tracing::info!("RESUME: units of work go on");
            Ok(Answer::done("RESUME"))
        }
        [verb @ ("pause" | "resume"), _] => {
            let node = named_node(shared, text)?;
            node.pause(*verb == "pause");
            shared.paused.notify();
            tracing::warn!(node = node.config.name.as_str(), "{} for one node", verb.to_ascii_uppercase());
            if *verb == "pause" {
                transactions_done(shared, &node.transactions).await?;
            }
            Ok(Answer::done(&verb.to_ascii_uppercase()))
        }
        [verb @ ("disable" | "enable"), _] => {
            let node = named_node(shared, text)?;
            let disable = *verb == "disable";
            node.disable(disable);
            tracing::warn!(node = node.config.name.as_str(), disabled = disable, "node {}d for reads", verb);
            Ok(Answer::done(&verb.to_ascii_uppercase()))
        }
        _ => {
            let message = format!(
                "unknown pgnear console command {:?}: SHOW NODES | CLIENTS | SERVERS | POOLS | STATS | \
                 CONFIG | VERSION, RELOAD, PAUSE [node], RESUME [node], DISABLE <node>, ENABLE <node>, \
                 KILL <client id>",
                text.trim()
            );
            Err(error_response(Severity::Error, SqlState::SyntaxError, &message))
        }
    }
}

/// Waits until `open` (server connections inside a transaction block) is
/// 0, for at most `proxy.pause_timeout_ms`; the pause stays either way.
async fn transactions_done(shared: &Shared, open: &std::sync::atomic::AtomicUsize) -> Result<(), Frame> {
    let limit = shared.config().proxy.pause_timeout;
    let until = std::time::Instant::now() + limit;
    loop {
        let left = open.load(std::sync::atomic::Ordering::Relaxed);
        if left == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            let message = format!(
                "paused, but {left} transactions are still open after proxy.pause_timeout_ms ({} ms)",
                limit.as_millis()
            );
            return Err(error_response(Severity::Error, SqlState::ObjectNotInPrerequisiteState, &message));
        }
        crate::clock::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The node a command's second word names (as configured, any case).
fn named_node<'s>(shared: &'s Shared, text: &str) -> Result<&'s crate::cluster::Node, Frame> {
    let name = text.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(';');
    let node = shared.topology.find(name).map(|(_, node)| node);
    node.ok_or_else(|| {
        let message = format!("no node named {name:?}");
        error_response(Severity::Error, SqlState::UndefinedObject, &message)
    })
}

fn nodes(shared: &Shared) -> Answer {
    let view = ClusterView::capture(&shared.topology);
    let config = shared.config();
    let rows = shared
        .topology
        .live()
        .map(|(id, node)| (node, &view.nodes[id]))
        .map(|(node, seen)| {
            let status = node.status.load();
            let role = format!("{:?}", status.role).to_ascii_lowercase();
            let readable = match (node.disabled(), status.up, seen.lag) {
                (true, _, _) => "no: disabled".to_string(),
                (_, false, _) => "no: down".to_string(),
                (_, _, _) if status.role != crate::cluster::Role::Replica => "primary".to_string(),
                (_, _, Some(lag)) if lag > config.routing.max_replica_lag => "no: lagging".to_string(),
                _ => "yes".to_string(),
            };
            let ms = |d: Option<std::time::Duration>| d.map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0));
            vec![
                node.config.name.clone(),
                node.config.region.clone(),
                node.config.cluster.clone(),
                role,
                status.up.to_string(),
                ms(status.rtt).unwrap_or_default(),
                seen.lag_bytes.map(|b| b.to_string()).unwrap_or_default(),
                ms(seen.lag).unwrap_or_default(),
                readable,
                node.outstanding.load(std::sync::atomic::Ordering::Relaxed).to_string(),
            ]
        })
        .collect();
    Answer {
        columns: &[
            "name",
            "region",
            "cluster",
            "role",
            "up",
            "rtt_ms",
            "lag_bytes",
            "lag_ms",
            "reads",
            "active",
        ],
        rows,
        tag: "SHOW".into(),
    }
}

fn pools(shared: &Shared) -> Answer {
    let rows = shared
        .pools
        .stats()
        .into_iter()
        .map(|p| {
            vec![
                shared.topology.node(p.node).config.name.clone(),
                p.active.to_string(),
                p.idle.to_string(),
                p.waiting.to_string(),
                p.timeouts.to_string(),
            ]
        })
        .collect();
    Answer { columns: &["node", "sv_active", "sv_idle", "cl_waiting", "timeouts"], rows, tag: "SHOW".into() }
}

fn clients(shared: &Shared) -> Answer {
    let rows = shared
        .cancels
        .clients()
        .into_iter()
        .map(|c| {
            let since = c.info.since.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let server = c.server.map(|s| shared.topology.node(s.node).config.name.clone());
            let state = if server.is_some() { "active" } else { "idle" };
            vec![
                c.info.id.to_string(),
                c.info.user,
                c.info.database,
                state.to_string(),
                c.info.peer,
                since.to_string(),
                server.unwrap_or_default(),
            ]
        })
        .collect();
    Answer {
        columns: &["id", "user", "database", "state", "addr", "connect_time", "server"],
        rows,
        tag: "SHOW".into(),
    }
}

/// One row per server connection, PgBouncer's columns where they apply:
/// `active` while a session holds it, `idle` in a transaction pool.
fn servers(shared: &Shared) -> Answer {
    let rows = shared
        .limits
        .servers()
        .into_iter()
        .map(|s| {
            let since = s.since.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let state = if s.idle.load(std::sync::atomic::Ordering::Relaxed) { "idle" } else { "active" };
            vec![
                s.id.to_string(),
                shared.topology.node(s.node).config.name.clone(),
                s.user.clone(),
                s.database.clone(),
                state.to_string(),
                s.addr.clone(),
                since.to_string(),
                s.pid.to_string(),
                s.tls.to_string(),
            ]
        })
        .collect();
    Answer {
        columns: &["id", "node", "user", "database", "state", "addr", "connect_time", "remote_pid", "tls"],
        rows,
        tag: "SHOW".into(),
    }
}

/// Per node since start, with PgBouncer's column names: units of work
/// (`total_query_count`), transactions ended, bytes from clients to the
/// node (`total_received`) and from the node to clients (`total_sent`),
/// time in microseconds, and units routed there by reason.
fn stats(shared: &Shared) -> Answer {
    use std::sync::atomic::Ordering::Relaxed;
    let rows = shared
        .metrics
        .node_stats()
        .into_iter()
        .map(|(node, stats)| {
            let routed = shared.metrics.routed_by_reason(&node);
            let queries: u64 = routed.iter().map(|(_, n)| n).sum();
            let (timed, time) = shared.metrics.latency_of(&node);
            let time = u64::try_from(time.as_micros()).unwrap_or(u64::MAX);
            let routed: Vec<String> = routed.iter().map(|(reason, n)| format!("{reason}={n}")).collect();
            vec![
                node,
                stats.transactions.load(Relaxed).to_string(),
                queries.to_string(),
                stats.received.load(Relaxed).to_string(),
                stats.sent.load(Relaxed).to_string(),
                time.to_string(),
                time.checked_div(timed).unwrap_or(0).to_string(),
                routed.join(" "),
            ]
        })
        .collect();
    Answer {
        columns: &[
            "node",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_query_time",
            "avg_query_time",
            "routed",
        ],
        rows,
        tag: "SHOW".into(),
    }
}

fn config(shared: &Shared) -> Answer {
    let config = shared.config();
    let p = &config.proxy;
    let ms = |d: std::time::Duration| d.as_millis().to_string();
    let pairs: Vec<(&str, String)> = vec![
        ("proxy.listen", p.listen.to_string()),
        ("proxy.region", p.region.clone()),
        ("proxy.pool_mode", format!("{:?}", p.pool_mode).to_ascii_lowercase()),
        ("proxy.pool_size", p.pool_size.to_string()),
        ("proxy.max_client_connections", p.max_client_connections.to_string()),
        ("proxy.max_user_connections", p.max_user_connections.to_string()),
        ("proxy.max_db_connections", p.max_db_connections.to_string()),
        ("proxy.pause_timeout_ms", ms(p.pause_timeout)),
        ("proxy.dns_max_ttl_ms", ms(p.dns_max_ttl)),
        ("proxy.auth_user", p.auth_user.clone().unwrap_or_default()),
        ("routing.default", format!("{:?}", config.routing.default).to_ascii_lowercase()),
        ("routing.max_replica_lag_ms", ms(config.routing.max_replica_lag)),
        ("routing.optimistic_transactions", config.routing.optimistic_transactions.to_string()),
        (
            "consistency.read_your_writes",
            format!("{:?}", config.consistency.read_your_writes).to_ascii_lowercase(),
        ),
        ("monitor.interval_ms", ms(config.monitor.interval)),
        ("paused", shared.paused.is_on().to_string()),
    ];
    let rows = pairs.into_iter().map(|(k, v)| vec![k.to_string(), v]).collect();
    Answer { columns: &["key", "value"], rows, tag: "SHOW".into() }
}
