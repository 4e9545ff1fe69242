//! The one error type of the lab: failed tools, nodes that did not start, queries and timeouts.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use super::PG_BIN_ENV;

/// Everything that can go wrong while running a lab cluster.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A PostgreSQL tool (or `runuser`, `chown`, `id`) exited unsuccessfully.
    #[error("`{command}` exited with {status}: {output}")]
    Tool {
        /// The command line that was run.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr followed by its stdout, trimmed.
        output: String,
    },
    /// A node did not come up; `log_tail` is the end of its server log.
    #[error("node {node} failed to start: {reason}\n--- end of {node}'s log ---\n{log_tail}")]
    Start {
        /// The node's name.
        node: String,
        /// The underlying failure.
        reason: Box<LabError>,
        /// The last few kilobytes of the node's server log.
        log_tail: String,
    },
    /// The PostgreSQL server tools are not where we looked.
    #[error("PostgreSQL tools not found in {}; set {PG_BIN_ENV}", dir.display())]
    MissingTools {
        /// The directory that lacks `initdb`.
        dir: PathBuf,
    },
    /// A filesystem or process-spawning operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to or querying a node failed.
    #[error("node {node}: {source}")]
    Postgres {
        /// The node's name.
        node: String,
        /// The driver error (its Display includes the server's message).
        #[source]
        source: tokio_postgres::Error,
    },
    /// A query that should return a row returned none.
    #[error("node {node}: `{sql}` returned no rows")]
    NoRows {
        /// The node's name.
        node: String,
        /// The query.
        sql: String,
    },
    /// A polled condition did not hold in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// The condition, with the last result or error seen.
        what: String,
        /// The timeout that expired.
        after: Duration,
    },
}

impl LabError {
    /// Wraps an I/O error with what was being done, for `map_err`.
    pub(super) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}
