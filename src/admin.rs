//! The admin HTTP listener on `proxy.admin_listen`: `/metrics` (Prometheus
//! text format), `/health` (every node as JSON) and `/ready`.
//!
//! Every answer is computed from what the monitor last published and from
//! the metrics registry: a request does no I/O toward the servers, so a
//! scrape costs the same whether a node is up or hanging.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cluster::Role;
use crate::frontend::Shared;
use crate::router::ClusterView;

/// Admin connections served at once; more are closed on accept. Scrapers
/// and probes hold one or two each.
const MAX_CONNECTIONS: usize = 64;

/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

type Body = Full<Bytes>;

/// What the handlers read. `ready` latches: once a primary has been
/// verified, reads keep working through a failover, so the proxy stays
/// ready.
struct Admin {
    shared: Arc<Shared>,
    ready: AtomicBool,
}

/// Serves admin requests until `shutdown` turns true (or its sender is
/// dropped); open admin connections are closed then.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let admin = Arc::new(Admin { shared, ready: AtomicBool::new(false) });
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if connections.len() < MAX_CONNECTIONS => {
                    connections.spawn(serve(stream, admin.clone()));
                }
                Ok(_) => tracing::warn!(limit = MAX_CONNECTIONS, "admin connection refused: too many open"),
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    crate::clock::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
}

/// One HTTP/1.1 connection, with keep-alive.
async fn serve(stream: TcpStream, admin: Arc<Admin>) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = admin.respond(request.method(), request.uri());
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(error) = connection.await {
        tracing::debug!(%error, "admin connection ended with an error");
    }
}

// === impl Admin ===

impl Admin {
    fn respond(&self, method: &Method, uri: &hyper::Uri) -> Response<Body> {
        let path = uri.path();
        if !matches!(path, "/metrics" | "/health" | "/ready") {
            return text(StatusCode::NOT_FOUND, "not found\n");
        }
        if method != Method::GET && method != Method::HEAD {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match path {
            "/metrics" => self.metrics(),
            "/health" => self.health(uri.query()),
            _ => self.ready(),
        }
    }

    fn metrics(&self) -> Response<Body> {
        match self.shared.metrics.render(&self.shared.scrape()) {
            Ok(body) => with_type(StatusCode::OK, crate::metrics::CONTENT_TYPE, body),
            Err(error) => {
                tracing::error!(%error, "cannot encode metrics");
                text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
            }
        }
    }

    fn health(&self, query: Option<&str>) -> Response<Body> {
        let max_lag = match max_lag_ms(query) {
            Ok(max) => max,
            Err(message) => return text(StatusCode::BAD_REQUEST, message),
        };
        let config = &self.shared.config();
        let view = ClusterView::capture(&self.shared.topology);
        let topology = &self.shared.topology;
        let live = view.nodes.iter().enumerate().filter(|(id, _)| !topology.node(*id).retired());
        let nodes: Vec<NodeHealth> = live.map(|(_, node)| NodeHealth::of(node)).collect();
        let healthy = nodes.iter().all(|n| n.up) && view.primary(&config.proxy.default_cluster).is_ok();
        let report =
            Health { status: if healthy { "ok" } else { "degraded" }, region: &config.proxy.region, nodes };
        let status = match max_lag {
            Some(max) if !report.has_local_replica_within(&config.proxy.region, max) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::OK,
        };
        match serde_json::to_string(&report) {
            Ok(body) => with_type(status, "application/json", body),
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode health: {error}\n")),
        }
    }

    fn ready(&self) -> Response<Body> {
        if self.ready.load(Ordering::Relaxed) {
            return text(StatusCode::OK, "ready\n");
        }
        let cluster = &self.shared.config().proxy.default_cluster;
        match self.shared.topology.primary(cluster) {
            Ok(_) => {
                self.ready.store(true, Ordering::Relaxed);
                text(StatusCode::OK, "ready\n")
            }
            Err(why) => {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: cluster {cluster}: {why}\n"))
            }
        }
    }
}

/// The `/health` document.
#[derive(Debug, Serialize)]
struct Health<'a> {
    /// `ok` when every node is up and the default cluster has a verified
    /// primary; `degraded` otherwise.
    status: &'static str,
    region: &'a str,
    nodes: Vec<NodeHealth<'a>>,
}

/// One node in `/health`; unknown measurements are `null`.
#[derive(Debug, Serialize)]
struct NodeHealth<'a> {
    name: &'a str,
    region: &'a str,
    cluster: &'a str,
    role: &'static str,
    up: bool,
    rtt_ms: Option<f64>,
    lag_bytes: Option<u64>,
    lag_ms: Option<f64>,
}

impl<'a> NodeHealth<'a> {
    fn of(node: &crate::router::NodeView<'a>) -> NodeHealth<'a> {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        NodeHealth {
            name: &node.config.name,
            region: &node.config.region,
            cluster: &node.config.cluster,
            role: node.status.role.as_str(),
            up: node.status.up,
            rtt_ms: node.status.rtt.map(ms),
            lag_bytes: node.lag_bytes,
            lag_ms: node.lag.map(ms),
        }
    }
}

impl Health<'_> {
    /// Whether a replica in `region` is up and at most `max` behind.
    fn has_local_replica_within(&self, region: &str, max: Duration) -> bool {
        let max_ms = max.as_secs_f64() * 1000.0;
        self.nodes.iter().any(|n| {
            n.region == region
                && n.up
                && n.role == Role::Replica.as_str()
                && n.lag_ms.is_some_and(|l| l <= max_ms)
        })
    }
}

/// The `max_lag_ms` query parameter, if given.
fn max_lag_ms(query: Option<&str>) -> Result<Option<Duration>, &'static str> {
    let Some(query) = query else { return Ok(None) };
    let mut max = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("max_lag_ms", value)) => {
                let ms: u64 =
                    value.parse().map_err(|_| "max_lag_ms must be a whole number of milliseconds\n")?;
                max = Some(Duration::from_millis(ms));
            }
            _ => return Err("the only query parameter is max_lag_ms\n"),
        }
    }
    Ok(max)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    with_type(status, "text/plain; charset=utf-8", body.into())
}

fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_lag_ms_is_parsed_strictly() {
        assert_eq!(max_lag_ms(None), Ok(None));
        assert_eq!(max_lag_ms(Some("")), Ok(None));
        assert_eq!(max_lag_ms(Some("max_lag_ms=250")), Ok(Some(Duration::from_millis(250))));
        assert!(max_lag_ms(Some("max_lag_ms=-1")).is_err());
        assert!(max_lag_ms(Some("max_lag_ms=1.5")).is_err());
        assert!(max_lag_ms(Some("other=1")).is_err());
    }
}
