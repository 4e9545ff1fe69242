//! Which SQL functions force a statement onto the primary: the built-in
//! writers known here, and the user-defined volatile functions learned from
//! the primary's catalog.
//!
//! A function call can make an otherwise read-only `SELECT` unsafe on a
//! replica: the call fails there (a hot standby refuses to write), or it
//! succeeds but acts on the wrong node (a lock, a sequence, a backend pid).
//! Names are compared unqualified and lowercased, so a user function that
//! shares a name with a writer is also sent to the primary; that errs on the
//! safe side.

pub use crate::cluster::catalog::{VolatileFunctions, VOLATILE_FUNCTIONS_QUERY};

/// Built-in writers matched by exact name.
const WRITER_NAMES: &[&str] = &[
    // Sequences. nextval/setval write. currval/lastval only read session
    // state, but that state exists only on the backend where nextval ran,
    // which is the primary: on a replica they fail with "currval of
    // sequence is not yet defined in this session".
    "nextval",
    "currval",
    "lastval",
    "setval",
    // Asynchronous notification: NOTIFY is refused on a standby.
    "pg_notify",
    // Session configuration: set_config changes state on the backend that
    // runs it; keep it with the session's primary connection.
    "set_config",
    // setseed seeds the backend's random(); later random() calls only see it
    // on the same backend.
    "setseed",
    // Large objects through the old two-name API (the rest share `lo_`).
    "loread",
    "lowrite",
    // Transaction ids: assigning one is a write, refused on a standby.
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    // Remote execution: dblink can run anything on the other side.
    "dblink",
    "dblink_exec",
    // WAL and replication control: these only make sense on the primary,
    // and the replay controls must never hit a replica by accident.
    "pg_switch_wal",
    "pg_drop_replication_slot",
    "pg_replication_slot_advance",
    "pg_logical_emit_message",
    "pg_promote",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    // Backend signalling: the pid belongs to one node, and pgnear's clients
    // see pids of their primary connection.
    "pg_cancel_backend",
    "pg_terminate_backend",
    // Node administration: act on the node that runs them; the primary is
    // the one the operator means.
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_import_system_collations",
];

/// Built-in writers matched by prefix.
const WRITER_PREFIXES: &[&str] = &[
    // Advisory locks live on one node; the _xact_ variants still need the
    // same node for the rest of the transaction, and unlock must reach the
    // node holding the lock.
    "pg_advisory_",
    "pg_try_advisory_",
    // Large objects: lo_create, lo_import, lo_unlink, lo_open, lo_put, ...
    "lo_",
    // Statistics resets write the node's stats.
    "pg_stat_reset",
    // pg_create_restore_point, pg_create_*_replication_slot.
    "pg_create_",
    // pg_copy_*_replication_slot.
    "pg_copy_",
    // Logical decoding consumes or inspects a node-local slot.
    "pg_logical_slot_",
    // Replication origins are written on the node that owns them.
    "pg_replication_origin_",
    // dblink_connect, dblink_send_query, ...: conservative.
    "dblink_",
];

/// Session-level advisory locks: they outlive the statement and the
/// transaction, so the session stays on the primary until it ends.
const SESSION_ADVISORY_LOCKS: &[&str] =
    &["pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"];

/// Whether a built-in function (lowercased, unqualified name) writes or
/// must otherwise run on the primary.
///
/// Read-only built-ins such as `now()`, `random()` or
/// `pg_sequence_last_value()` are not listed.
pub fn is_builtin_writer(name: &str) -> bool {
    WRITER_NAMES.contains(&name) || WRITER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether `name` takes a session-level advisory lock, which pins the
/// session to the primary (the `_xact_` variants end with the transaction
/// and do not pin).
pub fn is_session_advisory_lock(name: &str) -> bool {
    SESSION_ADVISORY_LOCKS.contains(&name)
}

/// Functions whose answer belongs to one node (its process, its recovery
/// state, its statistics): a session asking them means its own primary
/// backend, the one whose PID it was given, so they run on the primary.
/// (`inet_server_port()` stays a read: it names whichever node answered.)
pub fn reads_node_state(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "pg_backend_pid",
        "pg_is_in_recovery",
        "pg_blocking_pids",
        "pg_safe_snapshot_blocking_pids",
        "pg_postmaster_start_time",
        "pg_conf_load_time",
        "pg_get_wal_replay_pause_state",
        "pg_is_wal_replay_paused",
        "pg_last_xact_replay_timestamp",
        "pg_my_temp_schema",
        "pg_current_snapshot",
        "txid_current_snapshot",
    ];
    const PREFIXES: &[&str] = &["pg_stat_", "pg_current_wal", "pg_last_wal", "pg_ls_"];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// System views that describe one node or one backend rather than the
/// data: activity, statistics, locks, prepared transactions, replication,
/// and the session's prepared statements and cursors (a replica connection
/// has only those pgnear replayed there).
pub fn is_node_state_relation(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "pg_locks",
        "pg_prepared_xacts",
        "pg_replication_slots",
        "pg_backend_memory_contexts",
        "pg_prepared_statements",
        "pg_cursors",
    ];
    const PREFIXES: &[&str] = &["pg_stat_", "pg_statio_"];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}
