//! What a session has set up on the server side that must exist on every
//! server connection it uses: settings (SET/RESET), protocol-level named
//! prepared statements, SQL-level ones (PREPARE), and pins. Pure bookkeeping; the relay loop turns
//! it into replayed messages.

pub(super) use crate::backend::server::HashMap;
use std::sync::Arc;

use crate::backend::server::{ServerState, SettingsKey};
use crate::protocol::Frame;
use crate::router::classify::{Classification, SessionEffect};

/// A named prepared statement: its Parse message and its classification.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub parse: Frame,
    pub class: Arc<Classification>,
}

/// A SQL-level prepared statement: the PREPARE that made it, replayed
/// where the session executes it, and the classification of its body.
#[derive(Debug, Clone)]
pub struct SqlPrepared {
    pub statement: Arc<str>,
    pub body: Arc<Classification>,
}

/// DateStyle SETs kept for replay (each may change only part of it).
const DATESTYLE_HISTORY: usize = 8;

/// Session ids for [`SettingsKey`]s: 0 is no session.
static NEXT_OWNER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The session's settings, as the statements that produced them.
#[derive(Debug, Default)]
pub struct Settings {
    /// `SET` statements by lowercased parameter name, in first-set order.
    statements: Vec<(String, String)>,
    /// Bumped on every change; servers record the version they have.
    pub version: u64,
}

impl Settings {
    /// The query that brings a server from any earlier state to this one.
    /// `RESET ALL` leaves the role and session authorization alone, so
    /// those are reset first. In transaction pooling `app_name` is the
    /// session's startup `application_name`: `RESET ALL` brings back the
    /// one the connection was opened with, which may be another client's.
    pub fn replay_sql(&self, app_name: Option<&str>) -> String {
        let mut sql = String::from("RESET SESSION AUTHORIZATION;\nRESET ROLE;\nRESET ALL");
        if let Some(name) = app_name {
            sql.push_str(";\nSET application_name = ");
            push_literal(&mut sql, name);
        }
        for (_, statement) in &self.statements {
            sql.push_str(";\n");
            sql.push_str(statement);
        }
        sql
    }

    /// Whether the session's own setting `name` (lowercased), if it set
    /// one, mentions `word` (lowercase): `None` if it set none.
    pub fn mentions(&self, name: &str, word: &str) -> Option<bool> {
        let (_, statement) = self.statements.iter().rev().find(|(n, _)| n == name)?;
        Some(statement.to_ascii_lowercase().contains(word))
    }

    /// Records a SET, replayed in execution order: `SET SESSION
    /// AUTHORIZATION` clears an earlier `SET ROLE`, so order matters.
    /// DateStyle merges partial values with the current ones, so its
    /// history is kept (bounded) instead of only its last value.
    fn set(&mut self, name: &str, statement: &str) {
        if name == "datestyle" {
            let history = self.statements.iter().filter(|(n, _)| n == name).count();
            if history >= DATESTYLE_HISTORY {
                if let Some(first) = self.statements.iter().position(|(n, _)| n == name) {
                    self.statements.remove(first);
                }
            }
        } else {
            self.statements.retain(|(n, _)| n != name);
        }
        if name == "session_authorization" {
            self.statements.retain(|(n, _)| n != "role");
        }
        self.statements.push((name.to_string(), statement.to_string()));
        self.version += 1;
    }

    /// Records a RESET. A custom (dotted) setting stays defined, with an
    /// empty value, where it was reset: the RESET itself is replayed, which
    /// defines it the same way on other servers.
    fn reset(&mut self, name: &str, statement: &str) {
        self.statements.retain(|(n, _)| n != name);
        if name == "session_authorization" {
            self.statements.retain(|(n, _)| n != "role");
        }
        if name.contains('.') {
            self.statements.push((name.to_string(), statement.to_string()));
        }
        self.version += 1;
    }

    /// Forgets placeholder settings of a library just loaded: `LOAD`
    /// removes those the library does not define, so replaying them would
    /// bring back what the server dropped.
    pub fn forget_prefix(&mut self, library: &str) {
        let prefix = format!("{library}.");
        let before = self.statements.len();
        self.statements.retain(|(n, _)| !n.starts_with(&prefix));
        if self.statements.len() != before {
            self.version += 1;
        }
    }

    fn clear(&mut self) {
        self.statements.clear();
        self.version += 1;
    }
}

/// Appends `value` as a string literal that reads the same whatever
/// `standard_conforming_strings` is.
fn push_literal(sql: &mut String, value: &str) {
    if value.contains('\\') {
        sql.push('E');
    }
    sql.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            sql.push(c);
        }
        sql.push(c);
    }
    sql.push('\'');
}

/// Session state tracked across server connections.
#[derive(Debug)]
pub struct SessionState {
    /// This session, as the owner of the settings it puts on servers.
    owner: u64,
    pub settings: Settings,
    /// Protocol-level named prepared statements by name.
    pub prepared: HashMap<String, Prepared>,
    /// SQL-level prepared statements by (folded) name. PostgreSQL keeps
    /// both kinds in one namespace.
    pub sql_prepared: HashMap<String, SqlPrepared>,
    /// LISTEN, a temp object, a session advisory lock or a WITH HOLD
    /// cursor: the session stays on the primary until DISCARD ALL.
    pub pinned: bool,
    /// Effects waiting for the open transaction to commit.
    pub(super) tx: super::tx::TxEffects,
}

impl Default for SessionState {
    fn default() -> SessionState {
        SessionState {
            owner: NEXT_OWNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            settings: Settings::default(),
            prepared: HashMap::default(),
            sql_prepared: HashMap::default(),
            pinned: false,
            tx: super::tx::TxEffects::default(),
        }
    }
}

impl SessionState {
    /// This session's id (never 0): what pooled connections record as
    /// their holder.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// The settings a server needs for this session. A session that never
    /// changed a setting matches any connection that has none.
    pub fn settings_key(&self) -> SettingsKey {
        match self.settings.version {
            0 => SettingsKey::default(),
            version => SettingsKey::new(self.owner, version),
        }
    }

    /// Applies the effects of statements that ran on `ran_on`; `others`
    /// are the session's other server connections.
    pub fn apply(
        &mut self,
        class: &Classification,
        ran_on: &mut ServerState,
        others: &mut [&mut ServerState],
    ) {
        for effect in &class.effects {
            match effect {
                SessionEffect::Set { name, statement } => self.settings.set(name, statement),
                SessionEffect::Reset { name, statement } => {
                    if name == "application_name" {
                        ran_on.app_name = None;
                    }
                    self.settings.reset(name, statement)
                }
                SessionEffect::ResetAll => {
                    ran_on.app_name = None;
                    self.settings.clear()
                }
                SessionEffect::DiscardAll => {
                    ran_on.app_name = None;
                    self.settings.clear();
                    self.pinned = false;
                    self.deallocate_all(ran_on, others);
                }
                SessionEffect::Pin(_) => self.pinned = true,
                SessionEffect::Prepare { name, statement, body } => {
                    let statement: Arc<str> = Arc::from(statement.as_str());
                    ran_on.sql_prepared.insert(name.clone(), statement.clone());
                    self.sql_prepared.insert(name.clone(), SqlPrepared { statement, body: body.clone() });
                }
                SessionEffect::Deallocate { name: Some(name) } => {
                    self.sql_prepared.remove(name);
                    ran_on.sql_prepared.remove(name);
                    // DEALLOCATE drops a protocol-level statement too.
                    self.closed(name, ran_on, others);
                }
                SessionEffect::Deallocate { name: None } => self.deallocate_all(ran_on, others),
                SessionEffect::Discard { .. }
                | SessionEffect::Transaction(_)
                | SessionEffect::Savepoint { .. } => {}
            }
        }
        if !class.effects.is_empty() {
            ran_on.settings = self.settings_key();
        }
    }

    /// DEALLOCATE ALL (and DISCARD ALL) on `ran_on`: no prepared statement
    /// of either kind is left there, and the session has none.
    fn deallocate_all(&mut self, ran_on: &mut ServerState, others: &mut [&mut ServerState]) {
        self.prepared.clear();
        self.sql_prepared.clear();
        ran_on.statements.clear();
        ran_on.stale.clear();
        ran_on.sql_prepared.clear();
        for other in others.iter_mut() {
            let names: Vec<String> = other.statements.keys().cloned().collect();
            other.stale.extend(names);
        }
    }

    /// The SQL-level statements `names` (executed by a unit) that `server`
    /// lacks, or has as another PREPARE made them. Names the session does
    /// not know are left out: their units run on the primary.
    pub fn missing_sql_prepared<'a>(
        &'a self,
        names: impl Iterator<Item = &'a String>,
        server: &ServerState,
    ) -> Vec<(&'a String, &'a SqlPrepared)> {
        names
            .filter_map(|name| self.sql_prepared.get_key_value(name))
            .filter(|(name, prepared)| server.sql_prepared.get(*name) != Some(&prepared.statement))
            .collect()
    }

    /// Records a client Parse of a named statement sent to `sent_to`.
    pub fn parsed(&mut self, name: &str, prepared: Prepared, sent_to: &mut ServerState) {
        sent_to.add_statement(name.to_string(), prepared.parse.clone());
        self.prepared.insert(name.to_string(), prepared);
    }

    /// Records a client Close of a named statement sent to `sent_to`; the
    /// other connections close theirs before their next use.
    pub fn closed(&mut self, name: &str, sent_to: &mut ServerState, others: &mut [&mut ServerState]) {
        self.prepared.remove(name);
        sent_to.statements.remove(name);
        for other in others.iter_mut() {
            if other.statements.contains_key(name) {
                other.stale.push(name.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::{classify, Class};

    #[test]
    fn settings_replay_in_order_with_resets() {
        let mut state = SessionState::default();
        let (mut a, mut b) = (ServerState::default(), ServerState::default());
        for sql in ["SET search_path = app, public", "SET TIME ZONE 'UTC'", "SET search_path TO other"] {
            state.apply(&classify(sql), &mut a, &mut [&mut b]);
        }
        assert_eq!(a.settings, state.settings_key());
        assert_ne!(b.settings, state.settings_key());
        assert_ne!(state.settings_key(), SessionState::default().settings_key(), "keys are per session");
        let prefix = "RESET SESSION AUTHORIZATION;\nRESET ROLE;\nRESET ALL";
        assert_eq!(
            state.settings.replay_sql(None),
            format!("{prefix};\nSET TIME ZONE 'UTC';\nSET search_path TO other")
        );
        state.apply(&classify("RESET timezone"), &mut a, &mut [&mut b]);
        assert_eq!(state.settings.replay_sql(None), format!("{prefix};\nSET search_path TO other"));
        // A custom setting stays defined where it was reset.
        state.apply(&classify("SET app.tenant = 'x'"), &mut a, &mut [&mut b]);
        state.apply(&classify("RESET app.tenant"), &mut a, &mut [&mut b]);
        assert_eq!(
            state.settings.replay_sql(None),
            format!("{prefix};\nSET search_path TO other;\nRESET app.tenant")
        );
        state.apply(&classify("RESET app.tenant"), &mut a, &mut [&mut b]);
        state.apply(&classify("RESET search_path"), &mut a, &mut [&mut b]);
        assert_eq!(state.settings.replay_sql(None), format!("{prefix};\nRESET app.tenant"));
        state.apply(&classify("SET app.tenant = 'y'"), &mut a, &mut [&mut b]);
        assert_eq!(state.settings.replay_sql(None), format!("{prefix};\nSET app.tenant = 'y'"));
        for sql in
            ["SET datestyle TO iso", "SET datestyle TO ymd", "SET ROLE r1", "SET SESSION AUTHORIZATION u1"]
        {
            state.apply(&classify(sql), &mut a, &mut [&mut b]);
        }
        let replay = state.settings.replay_sql(None);
        assert!(replay.contains("SET datestyle TO iso;\nSET datestyle TO ymd"), "{replay}");
        assert!(!replay.contains("\nSET ROLE r1"), "{replay}");
    }

    #[test]
    fn the_pooled_replay_sets_the_sessions_application_name_before_its_sets() {
        let mut state = SessionState::default();
        let (mut a, mut b) = (ServerState::default(), ServerState::default());
        state.apply(&classify("SET application_name = 'mine'"), &mut a, &mut [&mut b]);
        let replay = state.settings.replay_sql(Some("it's \\ app"));
        assert!(
            replay.ends_with(
                "RESET ALL;\nSET application_name = E'it''s \\\\ app';\nSET application_name = 'mine'"
            ),
            "{replay}"
        );
        assert!(SessionState::default().settings.replay_sql(Some("plain")).ends_with("= 'plain'"));
        // A RESET may bring back another client's startup name.
        a.app_name = Some("x".into());
        state.apply(&classify("RESET application_name"), &mut a, &mut [&mut b]);
        assert_eq!(a.app_name, None);
        a.app_name = Some("x".into());
        state.apply(&classify("RESET search_path"), &mut a, &mut [&mut b]);
        assert_eq!(a.app_name.as_deref(), Some("x"));
        state.apply(&classify("RESET ALL"), &mut a, &mut [&mut b]);
        assert_eq!(a.app_name, None);
    }

    #[test]
    fn the_least_recently_used_statements_are_evicted() {
        let mut server = ServerState::default();
        let parse = |i: usize| Frame::new(b'P', format!("s{i}\0SELECT {i}\0\0\0").as_bytes());
        for i in 0..10 {
            server.add_statement(format!("s{i}"), parse(i));
        }
        for i in [0, 2, 4] {
            assert!(server.use_statement(&format!("s{i}")).is_some());
        }
        server.evict_statements(5);
        let mut left: Vec<&String> = server.statements.keys().collect();
        left.sort();
        assert_eq!(left, ["s0", "s2", "s4", "s8", "s9"]);
        let mut stale = server.stale.clone();
        stale.sort();
        assert_eq!(stale, ["s1", "s3", "s5", "s6", "s7"]);
        assert!(server.use_statement("s1").is_none());
        server.evict_statements(5);
        assert_eq!(server.stale.len(), 5, "nothing more to evict");
    }

    #[test]
    fn pins_and_discard_all() {
        let mut state = SessionState::default();
        let (mut a, mut b) = (ServerState::default(), ServerState::default());
        state.apply(&classify("LISTEN jobs"), &mut a, &mut [&mut b]);
        assert!(state.pinned);
        let parse = Frame::new(b'P', b"s1\0SELECT 1\0\0\0");
        state.parsed("s1", Prepared { parse: parse.clone(), class: Arc::new(classify("SELECT 1")) }, &mut a);
        b.add_statement("s1".into(), parse.clone());
        state.apply(&classify("DISCARD ALL"), &mut a, &mut [&mut b]);
        assert!(!state.pinned);
        assert!(state.prepared.is_empty() && a.statements.is_empty());
        assert_eq!(b.stale, ["s1"]);
    }

    #[test]
    fn sql_prepared_statements_are_tracked_per_server() {
        let mut state = SessionState::default();
        let (mut a, mut b) = (ServerState::default(), ServerState::default());
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        state.apply(&classify("PREPARE r AS SELECT 1"), &mut a, &mut [&mut b]);
        let executed = names(&["r", "unknown"]);
        assert!(state.missing_sql_prepared(executed.iter(), &a).is_empty());
        let missing = state.missing_sql_prepared(executed.iter(), &b);
        assert_eq!(missing.len(), 1, "an unknown name is not replayed");
        assert_eq!((missing[0].0.as_str(), &*missing[0].1.statement), ("r", "PREPARE r AS SELECT 1"));
        assert_eq!(missing[0].1.body.class, Class::Read);
        b.sql_prepared.insert("r".into(), missing[0].1.statement.clone());

        // Deallocated and prepared again as something else: `b` still has
        // the old one, which a replay must replace.
        state.apply(&classify("DEALLOCATE r"), &mut a, &mut [&mut b]);
        assert!(state.sql_prepared.is_empty() && a.sql_prepared.is_empty());
        assert!(state.missing_sql_prepared(executed.iter(), &b).is_empty(), "nothing to replay");
        state.apply(&classify("PREPARE r AS INSERT INTO t VALUES (1)"), &mut a, &mut [&mut b]);
        let missing = state.missing_sql_prepared(executed.iter(), &b);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].1.body.class, Class::Write);

        // DEALLOCATE names protocol-level statements too; ALL drops both kinds.
        let parse = Frame::new(b'P', b"s\0SELECT 1\0\0\0");
        state.parsed("s", Prepared { parse: parse.clone(), class: Arc::new(classify("SELECT 1")) }, &mut a);
        b.add_statement("s".into(), parse);
        state.apply(&classify("DEALLOCATE s"), &mut a, &mut [&mut b]);
        assert!(state.prepared.is_empty() && a.statements.is_empty());
        assert_eq!(b.stale, ["s"]);
        state.apply(&classify("DEALLOCATE ALL"), &mut a, &mut [&mut b]);
        assert!(state.sql_prepared.is_empty() && a.sql_prepared.is_empty());
        state.apply(&classify("PREPARE q AS SELECT 2"), &mut a, &mut [&mut b]);
        state.apply(&classify("DISCARD ALL"), &mut b, &mut [&mut a]);
        assert!(state.sql_prepared.is_empty() && b.sql_prepared.is_empty());
        assert_eq!(a.sql_prepared.len(), 1, "still there, for a later replay to replace");
    }

    #[test]
    fn closing_a_statement_marks_other_copies_stale() {
        let mut state = SessionState::default();
        let (mut a, mut b) = (ServerState::default(), ServerState::default());
        let parse = Frame::new(b'P', b"s\0SELECT 1\0\0\0");
        state.parsed("s", Prepared { parse, class: Arc::new(classify("SELECT 1")) }, &mut a);
        b.add_statement("s".into(), Frame::new(b'P', b"s\0SELECT 1\0\0\0"));
        state.closed("s", &mut a, &mut [&mut b]);
        assert!(state.prepared.is_empty());
        assert_eq!(b.stale, ["s"]);
    }
}
