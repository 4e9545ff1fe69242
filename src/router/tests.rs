//! The routing decision against hand-built cluster snapshots: a primary in
//! us-east, a replica in this pgnear's region (eu-west) and a farther one
//! in us-east. Each case names the reason and the node a unit gets.

#![allow(clippy::unwrap_used)] // tests fail loudly

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::classify::{classify, Classification};
use super::functions::VolatileFunctions;
use super::{
    route, ClusterView, Destination, Freshness, NodeView, Policy, Reason, RouteSetting, SessionView,
    Staleness,
};
use crate::cluster::{Lsn, NoPrimary, NodeStatus, Role};
use crate::config::Config;

/// Shared with the `route` bench.
const CONFIG: &str = include_str!("../../benches/fixtures/three_regions.toml");

/// The primary's current WAL position.
const TOP: u64 = 0x3_0000_4000;

const PRIMARY: Destination = Destination::Primary(0);
const EU: Destination = Destination::Replica(1);
const US: Destination = Destination::Replica(2);

fn config() -> Config {
    Config::parse(CONFIG, &|_| None).expect("test config is valid")
}

fn primary() -> NodeStatus {
    NodeStatus { up: true, role: Role::Primary, lsn: Some(Lsn(TOP)), ..NodeStatus::default() }
}

/// A replica `behind` bytes behind the primary, whose last replayed
/// transaction is `age` old (its lag in time unless it has replayed all).
fn replica(rtt_ms: u64, behind: u64, age: Duration) -> NodeStatus {
    let now = SystemTime::now();
    NodeStatus {
        up: true,
        role: Role::Replica,
        rtt: Some(Duration::from_millis(rtt_ms)),
        lsn: Some(Lsn(TOP - behind)),
        replay_time: Some(now - age),
        probed_at: Some(now),
        ..NodeStatus::default()
    }
}

fn near() -> NodeStatus {
    replica(1, 0, Duration::ZERO)
}

fn far() -> NodeStatus {
    replica(80, 0, Duration::ZERO)
}

fn lagging(rtt_ms: u64, age_secs: u64) -> NodeStatus {
    replica(rtt_ms, 4096, Duration::from_secs(age_secs))
}

fn down(mut status: NodeStatus) -> NodeStatus {
    status.up = false;
    status
}

fn session(freshness: Freshness) -> SessionView<'static> {
    SessionView {
        cluster: "default",
        setting: RouteSetting::Auto,
        pinned: false,
        freshness,
        schema: Freshness::Any,
        staleness: Staleness::DEFAULT,
    }
}

const FRESH: SessionView<'static> = SessionView {
    cluster: "default",
    setting: RouteSetting::Auto,
    pinned: false,
    freshness: Freshness::Any,
    schema: Freshness::Any,
    staleness: Staleness::DEFAULT,
};

/// Routes the statements `sqls` as one unit.
fn route_in(
    config: &Config,
    statuses: [NodeStatus; 3],
    session: &SessionView,
    sqls: &[&str],
) -> Result<(Destination, Reason), NoPrimary> {
    let nodes: Vec<NodeView> =
        config.nodes.iter().zip(statuses).map(|(config, status)| NodeView::new(config, status)).collect();
    let view = ClusterView::with_lag(nodes);
    let policy = Policy { routing: &config.routing, rules: &config.rules, region: &config.proxy.region };
    let volatile = VolatileFunctions::new(["audit_touch".to_string()]);
    let unit: Vec<Arc<Classification>> = sqls.iter().map(|sql| Arc::new(classify(sql))).collect();
    route(&unit, session, &view, &policy, &volatile).map(|r| (r.destination, r.reason))
}

/// One statement against a healthy cluster and a fresh session.
fn healthy(sql: &str) -> (Destination, Reason) {
    route_in(&config(), [primary(), near(), far()], &FRESH, &[sql]).expect("a primary is up")
}

#[test]
fn reads_go_to_the_replica_in_this_region_and_the_rest_to_the_primary() {
    let cases = [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 7", (EU, Reason::Read)),
        ("BEGIN READ ONLY", (EU, Reason::Read)),
        ("UPDATE pgbench_accounts SET abalance = 0 WHERE aid = 7", (PRIMARY, Reason::Write)),
        ("SELECT * FROM t WHERE id = 1 FOR UPDATE", (PRIMARY, Reason::Write)),
        ("SELECT nextval('ids')", (PRIMARY, Reason::Write)),
        ("SELECT audit_touch(1)", (PRIMARY, Reason::Write)),
        ("WITH d AS (DELETE FROM t RETURNING id) SELECT count(*) FROM d", (PRIMARY, Reason::Write)),
        ("BEGIN", (PRIMARY, Reason::Transaction)),
        ("SET work_mem = '8MB'", (PRIMARY, Reason::SessionState)),
        ("SELEC 1", (PRIMARY, Reason::Unparsed)),
        ("SELECT pg_backend_pid()", (PRIMARY, Reason::Rule)),
        ("SELECT name FROM pg_prepared_statements", (PRIMARY, Reason::Rule)),
        ("SELECT name FROM pg_cursors", (PRIMARY, Reason::Rule)),
        ("SELECT id, amount FROM payments WHERE id = 3", (PRIMARY, Reason::Rule)),
        ("/* pgnear:primary */ SELECT 1", (PRIMARY, Reason::Hint)),
    ];
    for (sql, expected) in cases {
        assert_eq!(healthy(sql), expected, "{sql}");
    }
}

#[test]
fn a_unit_goes_where_its_strictest_statement_must() {
    let config = config();
    let route = |sqls: &[&str]| route_in(&config, [primary(), near(), far()], &FRESH, sqls).unwrap();
    assert_eq!(route(&["SELECT 1", "SELECT 2"]), (EU, Reason::Read));
    assert_eq!(route(&["SELECT 1", "INSERT INTO t VALUES (1)"]), (PRIMARY, Reason::Write));
    assert_eq!(route(&["SELECT 1", "SELECT * FROM payments"]), (PRIMARY, Reason::Rule));
    // A whole read-only transaction in one unit, savepoints and all.
    let read_only = ["BEGIN READ ONLY", "SAVEPOINT a", "SELECT 1", "ROLLBACK TO a", "RELEASE a", "COMMIT"];
    assert_eq!(route(&read_only), (EU, Reason::Read));
    assert_eq!(route(&["BEGIN READ ONLY", "SELECT 1", "ROLLBACK"]), (EU, Reason::Read));
    // Ending a transaction the unit did not begin, or beginning another
    // after it, stays on the primary.
    assert_eq!(route(&["COMMIT"]), (PRIMARY, Reason::Transaction));
    assert_eq!(route(&["SELECT 1", "ROLLBACK"]), (PRIMARY, Reason::Transaction));
    assert_eq!(route(&["BEGIN READ ONLY", "COMMIT", "BEGIN"]), (PRIMARY, Reason::Transaction));
    assert_eq!(route(&["BEGIN READ ONLY", "COMMIT", "SAVEPOINT a"]), (PRIMARY, Reason::Transaction));
    assert_eq!(route(&["BEGIN READ ONLY", "SELECT 1", "COMMIT AND CHAIN"]), (PRIMARY, Reason::Transaction));
}

#[test]
fn a_lagging_replica_is_passed_over_then_the_primary_serves() {
    let config = config();
    let read = ["SELECT 1 FROM t"];
    let route = |statuses| route_in(&config, statuses, &FRESH, &read).unwrap();
    // Over max_replica_lag_ms (10 s): the farther replica serves.
    assert_eq!(route([primary(), lagging(1, 20), far()]), (US, Reason::Read));
    // Behind in bytes, but within the limit in time: still the nearest.
    assert_eq!(route([primary(), lagging(1, 3), far()]), (EU, Reason::Read));
    assert_eq!(route([primary(), lagging(1, 20), lagging(80, 20)]), (PRIMARY, Reason::ReplicaLagging));
    // Down, or never measured, is not eligible either.
    assert_eq!(route([primary(), down(near()), far()]), (US, Reason::Read));
    assert_eq!(route([primary(), down(near()), down(far())]), (PRIMARY, Reason::FallbackNoReplica));
    let unmeasured = NodeStatus { replay_time: None, ..lagging(1, 0) };
    assert_eq!(route([primary(), unmeasured, far()]), (US, Reason::Read));
}

#[test]
fn after_a_write_reads_wait_for_a_replica_that_has_replayed_it() {
    let config = config();
    let read = ["SELECT 1 FROM t"];
    // The near replica is 512 bytes behind; the far one has replayed all.
    let behind = replica(1, 512, Duration::from_millis(5));
    let statuses = || [primary(), behind.clone(), far()];
    let route = |session: &SessionView| route_in(&config, statuses(), session, &read).unwrap();
    assert_eq!(route(&session(Freshness::AtLeast(Lsn(TOP - 512)))), (EU, Reason::Read));
    assert_eq!(route(&session(Freshness::AtLeast(Lsn(TOP)))), (US, Reason::Read));
    assert_eq!(route(&session(Freshness::AtLeast(Lsn(TOP + 1)))), (PRIMARY, Reason::PinnedAfterWrite));
    // A write whose LSN is not known yet allows no replica at all.
    assert_eq!(route(&session(Freshness::Unknown)), (PRIMARY, Reason::PinnedAfterWrite));
    // A replica hint waives the freshness, never the lag limit.
    let hinted = ["/* pgnear:replica */ SELECT 1 FROM t"];
    let unknown = session(Freshness::Unknown);
    assert_eq!(route_in(&config, statuses(), &unknown, &hinted).unwrap(), (EU, Reason::Read));
    let stale = [primary(), lagging(1, 20), lagging(80, 20)];
    assert_eq!(route_in(&config, stale, &unknown, &hinted).unwrap(), (PRIMARY, Reason::ReplicaLagging));
}

#[test]
fn a_staleness_rule_bounds_the_replicas_for_its_tables() {
    let config = config();
    let products = ["SELECT price FROM products WHERE id = 1"];
    let route = |statuses| route_in(&config, statuses, &FRESH, &products).unwrap();
    // 3 s behind is within max_replica_lag_ms but over the rule's 2 s.
    assert_eq!(route([primary(), lagging(1, 3), far()]), (US, Reason::Read));
    assert_eq!(route([primary(), lagging(1, 3), lagging(80, 3)]), (PRIMARY, Reason::Rule));
    // Other tables still take the near replica.
    let other = route_in(&config, [primary(), lagging(1, 3), far()], &FRESH, &["SELECT 1 FROM t"]);
    assert_eq!(other.unwrap(), (EU, Reason::Read));
}

#[test]
fn a_staleness_bound_keeps_reads_off_lagging_replicas_and_keeps_read_your_writes_unless_told() {
    let config = config();
    // The near replica is 3 s behind (512 bytes), the far one 20 s.
    let statuses = || [primary(), replica(1, 512, Duration::from_secs(3)), lagging(80, 20)];
    let route = |session: &SessionView, sql: &str| route_in(&config, statuses(), session, &[sql]).unwrap();
    let read = "SELECT 1 FROM t";
    // A bound over the lag: the near replica serves; under it: the primary,
    // for the reason staleness rules give.
    assert_eq!(route(&FRESH, "/* pgnear:max_staleness_ms=5000 */ SELECT 1 FROM t"), (EU, Reason::Read));
    assert_eq!(route(&FRESH, "/* pgnear:max_staleness_ms=1000 */ SELECT 1 FROM t"), (PRIMARY, Reason::Rule));
    // Right after a write the bound alone does not waive read-your-writes...
    let wrote = session(Freshness::AtLeast(Lsn(TOP)));
    let bounded = "/* pgnear:max_staleness_ms=5000 */ SELECT 1 FROM t";
    assert_eq!(route(&wrote, bounded), (PRIMARY, Reason::PinnedAfterWrite));
    assert_eq!(route(&session(Freshness::Unknown), bounded), (PRIMARY, Reason::PinnedAfterWrite));
    // ... an explicit opt-out does, within the bound only.
    let opted_out = "/* pgnear: max_staleness_ms = 5000, read_your_writes = off */ SELECT 1 FROM t";
    assert_eq!(route(&wrote, opted_out), (EU, Reason::Read));
    let too_tight = "/* pgnear:read_your_writes=off,max_staleness_ms=1000 */ SELECT 1 FROM t";
    assert_eq!(route(&wrote, too_tight), (PRIMARY, Reason::Rule));
    // The schema watermark is never waived.
    let migrated = SessionView { schema: Freshness::AtLeast(Lsn(TOP)), ..wrote };
    assert_eq!(route(&migrated, opted_out), (PRIMARY, Reason::PinnedAfterWrite));
    let hinted = "/* pgnear:replica */ SELECT 1 FROM t";
    assert_eq!(route(&migrated, hinted), (PRIMARY, Reason::PinnedAfterWrite));
    // The session's settings, which a hint overrides item by item.
    let set = |max: u64, read_your_writes| SessionView {
        staleness: Staleness { max: Some(Duration::from_millis(max)), read_your_writes },
        ..wrote
    };
    assert_eq!(route(&set(5000, true), read), (PRIMARY, Reason::PinnedAfterWrite));
    assert_eq!(route(&set(5000, false), read), (EU, Reason::Read));
    assert_eq!(route(&set(1000, false), read), (PRIMARY, Reason::Rule));
    assert_eq!(route(&set(1000, false), "/* pgnear:max_staleness_ms=5000 */ SELECT 1"), (EU, Reason::Read));
    let back_on = "/* pgnear:read_your_writes=on */ SELECT 1 FROM t";
    assert_eq!(route(&set(5000, false), back_on), (PRIMARY, Reason::PinnedAfterWrite));
    // A table's rule still bounds a hinted read: the strictest bound wins.
    let products = "/* pgnear:max_staleness_ms=5000 */ SELECT price FROM products";
    assert_eq!(route(&FRESH, products), (PRIMARY, Reason::Rule));
    // A bound never sends a read to a replica the defaults keep off them.
    let primary_default =
        Config::parse(&CONFIG.replace("[routing]\n", "[routing]\ndefault = \"primary\"\n"), &|_| None)
            .expect("test config is valid");
    let kept = route_in(&primary_default, statuses(), &set(5000, false), &[read]).unwrap();
    assert_eq!(kept, (PRIMARY, Reason::Rule));
}

#[test]
fn the_session_can_pin_itself_or_ask_for_replicas() {
    let config = config();
    let read = ["SELECT 1 FROM t"];
    let route =
        |session: &SessionView| route_in(&config, [primary(), near(), far()], session, &read).unwrap();
    assert_eq!(route(&SessionView { pinned: true, ..FRESH }), (PRIMARY, Reason::SessionState));
    assert_eq!(route(&SessionView { setting: RouteSetting::Primary, ..FRESH }), (PRIMARY, Reason::Hint));
    let replica = SessionView { setting: RouteSetting::Replica, freshness: Freshness::Unknown, ..FRESH };
    assert_eq!(route(&replica), (EU, Reason::Read));
    // pgnear.route = replica never sends a write to a replica.
    let write = ["DELETE FROM t"];
    assert_eq!(
        route_in(&config, [primary(), near(), far()], &replica, &write).unwrap(),
        (PRIMARY, Reason::Write)
    );
}

#[test]
fn routing_default_primary_keeps_reads_there_unless_hinted() {
    let config = config();
    let primary_default =
        Config::parse(&CONFIG.replace("[routing]\n", "[routing]\ndefault = \"primary\"\n"), &|_| None)
            .expect("test config is valid");
    assert_ne!(config.routing.default, primary_default.routing.default);
    let route = |sqls: &[&str]| route_in(&primary_default, [primary(), near(), far()], &FRESH, sqls).unwrap();
    assert_eq!(route(&["SELECT 1 FROM t"]), (PRIMARY, Reason::Rule));
    assert_eq!(route(&["/* pgnear:replica */ SELECT 1 FROM t"]), (EU, Reason::Read));
}

#[test]
fn without_a_primary_reads_use_any_replica_and_writes_fail() {
    let config = config();
    let statuses = || [down(primary()), near(), far()];
    // No primary, so no lag to measure: any replica that is up serves.
    let read = route_in(&config, statuses(), &FRESH, &["SELECT 1 FROM t"]);
    assert!(matches!(read, Ok((Destination::Replica(_), Reason::Read))), "{read:?}");
    let write = route_in(&config, statuses(), &FRESH, &["INSERT INTO t VALUES (1)"]);
    assert!(matches!(write, Err(NoPrimary::Unreachable)), "{write:?}");
    let nothing = route_in(&config, [down(primary()), down(near()), down(far())], &FRESH, &["SELECT 1"]);
    assert!(matches!(nothing, Err(NoPrimary::Unreachable)), "{nothing:?}");
    // Two nodes claiming the primary role, neither named so in the config.
    let promoted = NodeStatus { role: Role::Primary, ..near() };
    let split = route_in(&config, [primary(), promoted, far()], &FRESH, &["INSERT INTO t VALUES (1)"]);
    assert!(matches!(split, Err(NoPrimary::Conflict(_))), "{split:?}");
}

#[test]
fn a_session_of_another_cluster_sees_none_of_these_nodes() {
    let config = config();
    let elsewhere = SessionView { cluster: "eu", ..FRESH };
    let read = route_in(&config, [primary(), near(), far()], &elsewhere, &["SELECT 1"]);
    assert!(matches!(read, Err(NoPrimary::Unreachable)), "{read:?}");
}
