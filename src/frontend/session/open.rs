//! Opening the session's server connections: its first one, and each
//! later one from its pool (transaction pooling) or anew.

use std::sync::Arc;

use crate::backend::pool::{Pool, PoolError};
use crate::backend::server::{open, Server};
use crate::backend::ServerLogin;
use crate::error::ProxyError;
use crate::frontend::Shared;

/// The session's first server: the primary, or, while no primary is
/// reachable, a replica so that reads keep working.
pub(super) async fn first_server(
    shared: &Shared,
    cluster: &str,
    login: &ServerLogin,
    holder: u64,
) -> Result<(Option<Box<Server>>, Option<Box<Server>>), ProxyError> {
    let view = crate::router::ClusterView::capture(&shared.topology);
    let pooling = shared.config().proxy.pool_mode == crate::config::PoolMode::Transaction;
    let pool = |node| pooling.then(|| shared.pools.pool(node, login));
    match view.primary(cluster) {
        Ok(node) => Ok((Some(acquire(shared, node, login, pool(node), holder).await?), None)),
        Err(no_primary) => match view.any_replica(cluster) {
            Some(node) => {
                tracing::warn!(error = %no_primary, "starting the session on a replica: writes will fail until a primary is back");
                Ok((None, Some(acquire(shared, node, login, pool(node), holder).await?)))
            }
            None => Err(no_primary.into()),
        },
    }
}

/// A connection to `node` for the session: from its pool in transaction
/// pooling (`pool`, the session's pool for that node), else a new one.
pub(super) async fn acquire(
    shared: &Shared,
    node: usize,
    login: &ServerLogin,
    pool: Option<Arc<Pool>>,
    holder: u64,
) -> Result<Box<Server>, ProxyError> {
    let Some(pool) = pool else { return Ok(open(shared.dial(), node, login).await?) };
    match pool.take(shared.dial(), login, holder).await {
        Ok(mut server) => {
            server.pool = Some(pool);
            Ok(server)
        }
        Err(PoolError::Open(error)) => Err(error.into()),
        Err(PoolError::Exhausted(after)) => Err(ProxyError::PoolExhausted(after)),
    }
}
