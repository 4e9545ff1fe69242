//! Classifies SQL text into read, write, transaction control, session state
//! or proxy-local commands, and lists what routing needs to know about it.
//!
//! [`classify`] is pure: no I/O, no clock. The text is tokenized once with
//! sqlparser's PostgreSQL tokenizer, split into statements at top-level
//! semicolons (quotes, dollar quotes, comments and parentheses respected),
//! and each statement is parsed on its own, so one statement that sqlparser
//! cannot parse does not hide the session effects of the others.
//!
//! The rule throughout: anything not provably read-only is [`Class::Write`].
//! Text matching is used only for the leading hint comment, the DDL flag (a
//! statement's first keyword), and to add pins and settings to statements
//! that failed to parse (which are writes anyway); it never makes anything a
//! read.

use std::ops::ControlFlow;
use std::ptr;

use sqlparser::ast::{
    ContextModifier, CopySource, CopyTarget, Cte, Declare, DeclareType, DiscardObject, Expr, Ident,
    ObjectName, Query, Reset, Select, Set, SetExpr, Statement, TableFactor, TransactionAccessMode,
    TransactionMode, UtilityOption, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer, Whitespace};

use super::functions::{self, VolatileFunctions};

#[cfg(test)]
mod tests;

/// Parser recursion limit: deeper input is an error (a write), never a
/// stack overflow.
const RECURSION_LIMIT: usize = 50;

/// Most operator-like tokens in one statement that is parsed. The recursion
/// limit bounds nesting written with parentheses, but operator chains
/// (`a + b + ...`, `... UNION SELECT ...`) parse in a loop into a left-deep
/// tree that the visitor and `Drop` then walk recursively, one frame per
/// operator. Longer statements are unparsed writes: this keeps that depth far
/// below what a 2 MiB thread stack holds even in debug builds, while commas,
/// literals, placeholders and plain identifiers (long IN lists) do not count.
const MAX_OPERATOR_TOKENS: usize = 10_000;

static DIALECT: PostgreSqlDialect = PostgreSqlDialect {};

// === Types ===

/// Everything routing needs to know about one SQL text (one simple Query
/// message, possibly several statements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The strictest class over all statements in the text.
    pub class: Class,
    /// From a leading `/* pgnear:primary */` or `-- pgnear:replica` comment.
    pub hint: Option<Hint>,
    /// Relations referenced anywhere (FROM, JOIN, subqueries, CTE bodies, DML
    /// targets): lowercased, unqualified, deduplicated, CTE names excluded.
    pub tables: Vec<String>,
    /// Functions called: lowercased, unqualified, deduplicated. Functions
    /// under a plain `EXPLAIN` are not called and not listed.
    pub functions: Vec<String>,
    /// Session effects to track and replay, in statement order.
    pub effects: Vec<SessionEffect>,
    /// At least one statement failed to parse (the class is then `Write`).
    pub unparsed: bool,
    /// A statement starts with CREATE, ALTER or DROP (of anything, incl.
    /// functions), or is a DO block: the proxy should refresh its
    /// volatile-function catalog.
    pub ddl: bool,
}

/// What kind of destination a statement needs.
///
/// The derived order is the declaration order; multi-statement texts are
/// combined by [`classify`]'s own rules, not by this order. `Class` is not
/// `Copy` because [`ProxyCommand`] carries strings.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Read-only as far as the text shows: any eligible replica may run it,
    /// unless [`Classification::calls_volatile`] finds a user-defined
    /// volatile function, which the router must check too.
    Read,
    /// Session state (SET, RESET, DISCARD, PREPARE, LISTEN, ...): runs where
    /// the session is and is replayed on its other backends from
    /// [`Classification::effects`]. `SET LOCAL` is here too, with no effect.
    Session,
    /// Transaction control; only `Begin { read_only: false }` needs the
    /// primary, the rest follows the open transaction.
    Transaction(Tx),
    /// A `pgnear.*` command answered by the proxy, never forwarded.
    ProxyLocal(ProxyCommand),
    /// Must run on the primary.
    Write,
}

/// Transaction-control statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tx {
    /// BEGIN / START TRANSACTION; `read_only` only when READ ONLY is
    /// explicit (a plain BEGIN under `default_transaction_read_only = on`
    /// still reads `false`).
    Begin { read_only: bool },
    /// COMMIT / END.
    Commit,
    /// ROLLBACK / ABORT.
    Rollback,
    /// SAVEPOINT.
    Savepoint,
    /// RELEASE [SAVEPOINT].
    Release,
    /// ROLLBACK TO [SAVEPOINT].
    RollbackTo,
    /// SET TRANSACTION, COMMIT/ROLLBACK AND CHAIN: stays in (or restarts)
    /// the transaction on the same backend.
    Other,
}

/// A `pgnear.*` setting command; `name` is lowercased without the prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProxyCommand {
    /// `SET [SESSION|LOCAL] pgnear.name = value` (value unquoted; unquoted
    /// identifiers lowercased as PostgreSQL does). LOCAL is treated as
    /// SESSION.
    Set { name: String, value: String },
    /// `RESET pgnear.name`.
    Reset { name: String },
    /// `SHOW pgnear.name`; `SHOW pgnear.all` gives name `all`.
    Show { name: String },
}

/// A per-statement routing hint from a leading comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hint {
    /// `/* pgnear:primary */`
    Primary,
    /// `/* pgnear:replica */`
    Replica,
}

/// Session state that the proxy tracks and replays across backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SessionEffect {
    /// SET / SET SESSION / SET TIME ZONE / SET ROLE ...: `statement` is the
    /// client's text (no trailing `;`), `name` the lowercased parameter.
    Set { name: String, statement: String },
    /// RESET name.
    Reset { name: String, statement: String },
    /// RESET ALL (does not touch `pgnear.*` settings).
    ResetAll,
    /// DISCARD ALL: clears everything tracked.
    DiscardAll,
    /// DISCARD PLANS / SEQUENCES / TEMP.
    Discard { statement: String },
    /// SQL-level PREPARE; `name` folded like PostgreSQL does.
    Prepare { name: String, statement: String },
    /// DEALLOCATE name; `None` is DEALLOCATE ALL.
    Deallocate { name: Option<String> },
    /// The session must stay on the primary.
    Pin(PinReason),
}

/// Why a session is pinned to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// LISTEN.
    Listen,
    /// CREATE TEMP table/view/sequence, SELECT INTO TEMP.
    TempObject,
    /// A session-level advisory lock.
    AdvisoryLock,
    /// DECLARE ... WITH HOLD.
    HoldCursor,
}

// === impl Class ===

impl Class {
    /// Whether this class alone requires the primary: `Write` and a
    /// read-write `BEGIN`. Session statements and other transaction control
    /// follow the session's current backend; proxy-local commands are never
    /// sent. Pins are effects: see [`Classification::needs_primary`].
    pub fn needs_primary(&self) -> bool {
        matches!(self, Class::Write | Class::Transaction(Tx::Begin { read_only: false }))
    }
}

// === impl Classification ===

impl Classification {
    /// Whether any called function is a user-defined volatile function.
    pub fn calls_volatile(&self, volatile: &VolatileFunctions) -> bool {
        self.functions.iter().any(|f| volatile.contains(f))
    }

    /// The pins this text sets, in statement order.
    pub fn pins(&self) -> impl Iterator<Item = PinReason> + '_ {
        self.effects.iter().filter_map(|e| match e {
            SessionEffect::Pin(reason) => Some(*reason),
            _ => None,
        })
    }

    /// [`Class::needs_primary`], or the text pins the session.
    pub fn needs_primary(&self) -> bool {
        self.class.needs_primary() || self.pins().next().is_some()
    }
}

// === classify ===

/// Classifies one SQL text (one or more statements). An empty or
/// whitespace/comment-only text is a `Read` with no statements: PostgreSQL
/// answers it with EmptyQueryResponse on any node.
pub fn classify(sql: &str) -> Classification {
    let mut tokens = Vec::new();
    let tokenized = Tokenizer::new(&DIALECT, sql).tokenize_with_location_into_buf(&mut tokens).is_ok();
    let hint = leading_hint(&tokens);
    let mut summary = Summary::default();
    for piece in split(tokens) {
        summary.piece(sql, piece, tokenized);
    }
    if !tokenized {
        summary.unparsed = true;
        summary.classes.push(Class::Write);
    }
    summary.finish(hint)
}

/// Per-text accumulator while statements are classified one by one.
#[derive(Default)]
struct Summary {
    classes: Vec<Class>,
    tables: Vec<String>,
    functions: Vec<String>,
    effects: Vec<SessionEffect>,
    unparsed: bool,
    ddl: bool,
}

impl Summary {
    /// Classifies one statement; `tokenized` is false when the text did not
    /// tokenize, and the statement is then only scanned for pins.
    fn piece(&mut self, sql: &str, piece: Piece, tokenized: bool) {
        let source = Source { sql, span: piece.span };
        let lead = leading_keyword(&piece.tokens);
        // DO blocks count: they often create or replace functions.
        self.ddl |= matches!(lead, Keyword::CREATE | Keyword::ALTER | Keyword::DROP | Keyword::DO);
        let parsed = if tokenized { parse(piece.tokens, lead) } else { Err(piece.tokens) };
        match parsed {
            Ok(statement) => {
                let class = self.statement(&statement, &source);
                self.classes.push(class);
            }
            Err(tokens) => {
                self.unparsed(&tokens, &source);
                self.classes.push(Class::Write);
            }
        }
    }

    fn finish(self, hint: Option<Hint>) -> Classification {
        let class = if self.unparsed { Class::Write } else { combine(self.classes) };
        Classification {
            class,
            hint,
            tables: self.tables,
            functions: self.functions,
            effects: self.effects,
            unparsed: self.unparsed,
            ddl: self.ddl,
        }
    }

    fn pin(&mut self, reason: PinReason) {
        let effect = SessionEffect::Pin(reason);
        if !self.effects.contains(&effect) {
            self.effects.push(effect);
        }
    }

    fn set_effect(&mut self, name: &str, source: &Source) {
        let (name, statement) = (name.to_owned(), source.text());
        self.effects.push(SessionEffect::Set { name, statement });
    }
}

/// Combines per-statement classes: Write > Transaction/Session > Read. A
/// read-write BEGIN or a proxy-local command among other statements makes
/// the whole text a write (mixing `pgnear.*` commands with other statements
/// is not supported: they are forwarded and the server answers them).
fn combine(classes: Vec<Class>) -> Class {
    if classes.len() <= 1 {
        return classes.into_iter().next().unwrap_or(Class::Read);
    }
    let forces_write = |c: &Class| matches!(c, Class::ProxyLocal(_)) || c.needs_primary();
    if classes.iter().any(forces_write) {
        return Class::Write;
    }
    let is_begin = |c: &&Class| matches!(c, Class::Transaction(Tx::Begin { .. }));
    let is_tx = |c: &&Class| matches!(c, Class::Transaction(_));
    let tx = classes.iter().find(is_begin).or_else(|| classes.iter().rev().find(is_tx));
    match tx {
        Some(tx) => tx.clone(),
        None if classes.contains(&Class::Session) => Class::Session,
        None => Class::Read,
    }
}

// === Statements ===

impl Summary {
    /// Classifies one parsed statement and records its tables, functions
    /// and effects.
    fn statement(&mut self, statement: &Statement, source: &Source) -> Class {
        match statement {
            Statement::Explain { analyze, options, statement, .. } => {
                self.explain(*analyze || analyze_option(options), statement, source)
            }
            Statement::Prepare { name, .. } => {
                let (name, statement) = (fold(name), source.text());
                self.effects.push(SessionEffect::Prepare { name, statement });
                Class::Session
            }
            _ => {
                let scan = self.scan(statement, true);
                let class = self.kind(statement, source);
                self.apply(scan, class)
            }
        }
    }

    /// EXPLAIN runs nothing unless ANALYZE: then it is as strict as the
    /// explained statement.
    fn explain(&mut self, analyze: bool, inner: &Statement, source: &Source) -> Class {
        if !analyze {
            self.scan(inner, false);
            return Class::Read;
        }
        match self.statement(inner, source) {
            Class::Read => Class::Read,
            _ => Class::Write,
        }
    }

    fn scan(&mut self, statement: &Statement, executes: bool) -> Findings {
        let mut scan = Scan::new(&mut self.tables, &mut self.functions, executes);
        // The visitor never breaks: it only collects.
        let _ = statement.visit(&mut scan);
        scan.findings
    }

    fn apply(&mut self, findings: Findings, class: Class) -> Class {
        if findings.advisory_lock {
            self.pin(PinReason::AdvisoryLock);
        }
        if findings.temp_into {
            self.pin(PinReason::TempObject);
        }
        if findings.writes {
            Class::Write
        } else {
            class
        }
    }

    /// The statement's own class, before hidden writes found by the scan.
    fn kind(&mut self, statement: &Statement, source: &Source) -> Class {
        match statement {
            Statement::Query(_) | Statement::Fetch { .. } | Statement::Close { .. } => Class::Read,
            Statement::Copy { source, to, target, .. } => self.copy(source, *to, target),
            Statement::ShowVariable { variable } => show_class(variable),
            Statement::StartTransaction { .. }
            | Statement::Commit { .. }
            | Statement::Rollback { .. }
            | Statement::Savepoint { .. }
            | Statement::ReleaseSavepoint { .. } => transaction_class(statement),
            Statement::Set(set) => self.set(set, source),
            Statement::Reset(reset) => self.reset(&reset.reset, source),
            Statement::Discard { object_type } => self.discard(object_type, source),
            Statement::Deallocate { name, .. } => self.deallocate(name),
            Statement::LISTEN { .. } => {
                self.pin(PinReason::Listen);
                Class::Session
            }
            Statement::UNLISTEN { .. } | Statement::Load { .. } => Class::Session,
            Statement::Declare { stmts } => self.declare(stmts),
            Statement::CreateTable(table) => self.create(table.temporary),
            Statement::CreateView(view) => self.create(view.temporary),
            Statement::CreateSequence { temporary, .. } => self.create(*temporary),
            _ => Class::Write,
        }
    }

    /// COPY TO STDOUT reads; COPY FROM writes; COPY TO a server file or
    /// program acts on the node's file system, which is meant to be the
    /// primary's. The visitor does not report COPY's table: it is added here.
    fn copy(&mut self, source: &CopySource, to: bool, target: &CopyTarget) -> Class {
        if let CopySource::Table { table_name, .. } = source {
            if let Some(name) = last_name(table_name) {
                push_unique(&mut self.tables, name);
            }
        }
        match (to, target) {
            (true, CopyTarget::Stdout) => Class::Read,
            _ => Class::Write,
        }
    }

    fn create(&mut self, temporary: bool) -> Class {
        if temporary {
            self.pin(PinReason::TempObject);
        }
        Class::Write
    }

    /// A cursor without HOLD lives in its transaction and is as strict as
    /// its query; WITH HOLD outlives it and pins the session.
    fn declare(&mut self, declares: &[Declare]) -> Class {
        if declares.iter().any(|d| d.declare_type != Some(DeclareType::Cursor)) {
            return Class::Write;
        }
        if declares.iter().any(|d| d.hold == Some(true)) {
            self.pin(PinReason::HoldCursor);
            return Class::Write;
        }
        Class::Read
    }

    fn deallocate(&mut self, name: &Ident) -> Class {
        let all = name.quote_style.is_none() && name.value.eq_ignore_ascii_case("all");
        let name = (!all).then(|| fold(name));
        self.effects.push(SessionEffect::Deallocate { name });
        Class::Session
    }

    fn discard(&mut self, object: &DiscardObject, source: &Source) -> Class {
        let effect = match object {
            DiscardObject::ALL => SessionEffect::DiscardAll,
            _ => SessionEffect::Discard { statement: source.text() },
        };
        self.effects.push(effect);
        Class::Session
    }
}

// === SET and RESET ===

impl Summary {
    fn set(&mut self, set: &Set, source: &Source) -> Class {
        match set {
            Set::SingleAssignment { scope, hivevar: false, variable, values } => {
                self.assign(scope.as_ref(), variable, values, source)
            }
            Set::SetTimeZone { local, .. } => self.session_set(*local, "timezone", source),
            Set::SetRole { context_modifier, .. } => {
                let local = *context_modifier == Some(ContextModifier::Local);
                self.session_set(local, "role", source)
            }
            Set::SetSessionAuthorization(param) => {
                let local = param.scope == ContextModifier::Local;
                self.session_set(local, "session_authorization", source)
            }
            Set::SetNames { .. } | Set::SetNamesDefault {} => {
                self.session_set(false, "client_encoding", source)
            }
            Set::SetTransaction { session: false, .. } => Class::Transaction(Tx::Other),
            Set::SetTransaction { modes, session: true, .. } => self.characteristics(modes, source),
            _ => Class::Write,
        }
    }

    fn assign(
        &mut self,
        scope: Option<&ContextModifier>,
        variable: &ObjectName,
        values: &[Expr],
        source: &Source,
    ) -> Class {
        let name = setting_name(variable);
        if let Some(name) = name.strip_prefix("pgnear.") {
            let (name, value) = (name.to_owned(), setting_value(values));
            return Class::ProxyLocal(ProxyCommand::Set { name, value });
        }
        match scope {
            Some(ContextModifier::Global) => Class::Write,
            scope => self.session_set(scope == Some(&ContextModifier::Local), &name, source),
        }
    }

    fn session_set(&mut self, local: bool, name: &str, source: &Source) -> Class {
        if !local {
            self.set_effect(name, source);
        }
        Class::Session
    }

    /// SET SESSION CHARACTERISTICS AS TRANSACTION ...: one effect per
    /// parameter it sets, each carrying the whole statement.
    fn characteristics(&mut self, modes: &[TransactionMode], source: &Source) -> Class {
        let mut names: Vec<&str> = modes
            .iter()
            .map(|mode| match mode {
                TransactionMode::AccessMode(_) => "default_transaction_read_only",
                TransactionMode::IsolationLevel(_) => "default_transaction_isolation",
            })
            .collect();
        names.dedup();
        for name in names {
            self.set_effect(name, source);
        }
        Class::Session
    }

    fn reset(&mut self, reset: &Reset, source: &Source) -> Class {
        let name = match reset {
            Reset::ALL => {
                self.effects.push(SessionEffect::ResetAll);
                return Class::Session;
            }
            Reset::SessionAuthorization => "session_authorization".to_owned(),
            Reset::ConfigurationParameter(name) => setting_name(name),
        };
        if let Some(name) = name.strip_prefix("pgnear.") {
            let name = name.to_owned();
            return Class::ProxyLocal(ProxyCommand::Reset { name });
        }
        let statement = source.text();
        self.effects.push(SessionEffect::Reset { name, statement });
        Class::Session
    }
}

fn show_class(variable: &[Ident]) -> Class {
    let name = variable.iter().map(|i| i.value.to_lowercase()).collect::<Vec<_>>().join(".");
    match name.strip_prefix("pgnear.") {
        Some(name) => Class::ProxyLocal(ProxyCommand::Show { name: name.to_owned() }),
        None => Class::Read,
    }
}

fn transaction_class(statement: &Statement) -> Class {
    let tx = match statement {
        Statement::StartTransaction { modes, statements, exception, .. } => {
            if !statements.is_empty() || exception.is_some() {
                return Class::Write; // a procedural BEGIN ... END block
            }
            Tx::Begin { read_only: begins_read_only(modes) }
        }
        Statement::Commit { chain: false, .. } => Tx::Commit,
        Statement::Rollback { chain: false, savepoint: None } => Tx::Rollback,
        Statement::Rollback { chain: false, savepoint: Some(_) } => Tx::RollbackTo,
        Statement::Savepoint { .. } => Tx::Savepoint,
        Statement::ReleaseSavepoint { .. } => Tx::Release,
        _ => Tx::Other,
    };
    Class::Transaction(tx)
}

/// The last access mode wins, as in PostgreSQL.
fn begins_read_only(modes: &[TransactionMode]) -> bool {
    let access = modes.iter().rev().find_map(|mode| match mode {
        TransactionMode::AccessMode(access) => Some(access),
        TransactionMode::IsolationLevel(_) => None,
    });
    matches!(access, Some(TransactionAccessMode::ReadOnly))
}

/// `EXPLAIN (ANALYZE [boolean])`: anything but an explicit false counts.
fn analyze_option(options: &Option<Vec<UtilityOption>>) -> bool {
    let Some(options) = options else {
        return false;
    };
    let is_false = |arg: &Expr| {
        let text = setting_value(std::slice::from_ref(arg));
        matches!(text.to_lowercase().as_str(), "false" | "off" | "0" | "no")
    };
    options
        .iter()
        .filter(|o| o.name.value.eq_ignore_ascii_case("analyze"))
        .any(|o| !o.arg.as_ref().is_some_and(is_false))
}

// === Names and values ===

/// An identifier folded as PostgreSQL does: unquoted to lowercase.
fn fold(ident: &Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_lowercase(),
        Some(_) => ident.value.clone(),
    }
}

/// The last part of a possibly qualified name, lowercased.
fn last_name(name: &ObjectName) -> Option<String> {
    let ident = name.0.last()?.as_ident()?;
    Some(ident.value.to_lowercase())
}

/// A configuration parameter name: parts joined with `.`, lowercased
/// (parameter names are case-insensitive).
fn setting_name(name: &ObjectName) -> String {
    let parts = name.0.iter().filter_map(|p| p.as_ident());
    parts.map(|i| i.value.to_lowercase()).collect::<Vec<_>>().join(".")
}

/// A SET value as text, unquoted: `'primary'` and `primary` give `primary`.
fn setting_value(values: &[Expr]) -> String {
    let text = |value: &Expr| match value {
        Expr::Identifier(ident) => fold(ident),
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.clone(),
            Value::Boolean(b) => b.to_string(),
            other => other.clone().into_string().unwrap_or_else(|| other.to_string()),
        },
        other => other.to_string(),
    };
    values.iter().map(text).collect::<Vec<_>>().join(", ")
}

// === Tree scan ===

/// What the scan of one statement found beyond names.
#[derive(Default)]
struct Findings {
    /// A writing function, a locking clause, SELECT INTO or nested DML.
    writes: bool,
    /// A session-level advisory lock is taken.
    advisory_lock: bool,
    /// SELECT INTO TEMP creates a temporary table.
    temp_into: bool,
}

/// The CTE names of one query, and which of them are hidden while one of
/// its own CTE bodies is visited (a non-recursive CTE sees only earlier
/// ones; a same-named reference there is the real table).
struct CteScope {
    names: Vec<(String, *const Query)>,
    recursive: bool,
    visible: usize,
}

/// Collects relations and function calls, and finds hidden writes.
struct Scan<'a> {
    tables: &'a mut Vec<String>,
    functions: &'a mut Vec<String>,
    /// False under a plain EXPLAIN: nothing runs, relations only.
    executes: bool,
    findings: Findings,
    scopes: Vec<CteScope>,
    /// The name of a table function (`FROM generate_series(...)`), which the
    /// visitor also reports as a relation.
    table_function: Option<*const ObjectName>,
    statement_depth: usize,
}

impl<'a> Scan<'a> {
    fn new(tables: &'a mut Vec<String>, functions: &'a mut Vec<String>, executes: bool) -> Self {
        Scan {
            tables,
            functions,
            executes,
            findings: Findings::default(),
            scopes: Vec::new(),
            table_function: None,
            statement_depth: 0,
        }
    }

    fn call(&mut self, name: &ObjectName) {
        let Some(name) = last_name(name).filter(|_| self.executes) else {
            return;
        };
        self.findings.writes |= functions::is_builtin_writer(&name);
        self.findings.advisory_lock |= functions::is_session_advisory_lock(&name);
        push_unique(self.functions, name);
    }

    fn relation(&mut self, name: &ObjectName) {
        if self.table_function.take().is_some_and(|f| ptr::eq(f, name)) || self.is_cte(name) {
            return;
        }
        if let Some(name) = last_name(name) {
            push_unique(self.tables, name);
        }
    }

    fn is_cte(&self, name: &ObjectName) -> bool {
        let [part] = name.0.as_slice() else {
            return false;
        };
        let Some(name) = part.as_ident().map(fold) else {
            return false;
        };
        let visible = |s: &CteScope| s.names.iter().take(s.visible).any(|(n, _)| *n == name);
        self.scopes.iter().any(visible)
    }

    fn enter_query(&mut self, query: &Query) {
        if let Some(parent) = self.scopes.last_mut() {
            let own = parent.names.iter().position(|(_, q)| ptr::eq(*q, query));
            if let Some(index) = own.filter(|_| !parent.recursive) {
                parent.visible = index;
            }
        }
        let (names, recursive) = match &query.with {
            Some(with) => {
                let cte = |c: &Cte| (fold(&c.alias.name), &*c.query as *const Query);
                (with.cte_tables.iter().map(cte).collect(), with.recursive)
            }
            None => (Vec::new(), false),
        };
        let visible = names.len();
        self.scopes.push(CteScope { names, recursive, visible });
    }

    fn leave_query(&mut self, query: &Query) {
        self.scopes.pop();
        if let Some(parent) = self.scopes.last_mut() {
            if parent.names.iter().any(|(_, q)| ptr::eq(*q, query)) {
                parent.visible = parent.names.len();
            }
        }
    }

    /// `TABLE name` keeps its name as strings, out of the visitor's reach.
    fn table_commands(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Table(table) => {
                if let Some(name) = &table.table_name {
                    push_unique(self.tables, name.to_lowercase());
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.table_commands(left);
                self.table_commands(right);
            }
            _ => {}
        }
    }
}

impl Visitor for Scan<'_> {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        // A statement inside a statement is DML in a CTE or a COPY query.
        if self.statement_depth > 0 && !matches!(statement, Statement::Query(_)) {
            self.findings.writes = true;
        }
        self.statement_depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _: &Statement) -> ControlFlow<()> {
        self.statement_depth = self.statement_depth.saturating_sub(1);
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.findings.writes |= !query.locks.is_empty();
        self.enter_query(query);
        self.table_commands(&query.body);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        self.leave_query(query);
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if let Some(into) = &select.into {
            self.findings.writes = true;
            self.findings.temp_into |= into.temporary;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table { name, args: Some(_), .. } => {
                self.call(name);
                self.table_function = Some(name);
            }
            TableFactor::Function { name, .. } => self.call(name),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.relation(relation);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(function) = expr {
            self.call(&function.name);
        }
        ControlFlow::Continue(())
    }
}

fn push_unique(list: &mut Vec<String>, name: String) {
    if !list.contains(&name) {
        list.push(name);
    }
}

// === Statements that did not parse ===

impl Summary {
    /// Best effort for a statement sqlparser rejects (it is a write anyway):
    /// pins and session settings from its words, erring towards pinning.
    fn unparsed(&mut self, tokens: &[TokenWithSpan], source: &Source) {
        self.unparsed = true;
        let words: Vec<&Token> =
            tokens.iter().map(|t| &t.token).filter(|t| !matches!(t, Token::Whitespace(_))).collect();
        let first = |w: &str| words.first().is_some_and(|t| is_word(t, w));
        let pair = |a: &str, b: &str| words.windows(2).any(|p| is_word(p[0], a) && is_word(p[1], b));
        let temp = |t: &&Token| is_word(t, "temp") || is_word(t, "temporary");
        let create_temp = first("create") && words.iter().take(5).any(temp);
        if create_temp || pair("into", "temp") || pair("into", "temporary") {
            self.pin(PinReason::TempObject);
        }
        if first("listen") {
            self.pin(PinReason::Listen);
        }
        if first("declare") && pair("with", "hold") {
            self.pin(PinReason::HoldCursor);
        }
        let lock = |t: &&Token| matches!(t, Token::Word(w) if functions::is_session_advisory_lock(&w.value.to_lowercase()));
        if words.iter().any(lock) {
            self.pin(PinReason::AdvisoryLock);
        }
        self.unparsed_setting(&words, source);
    }

    /// SET / RESET that sqlparser rejects (SET SCHEMA, SET XML OPTION, RESET
    /// TIME ZONE, ...): still tracked so replicas get the same state.
    fn unparsed_setting(&mut self, words: &[&Token], source: &Source) {
        let (reset, rest) = match words {
            [verb, rest @ ..] if is_word(verb, "set") => (false, rest),
            [verb, rest @ ..] if is_word(verb, "reset") => (true, rest),
            _ => return,
        };
        let rest = match rest {
            [session, rest @ ..] if is_word(session, "session") => rest,
            rest => rest,
        };
        let Some(name) = fallback_setting_name(rest) else {
            return;
        };
        let statement = source.text();
        self.effects.push(match (reset, name.as_str()) {
            (true, "all") => SessionEffect::ResetAll,
            (true, _) => SessionEffect::Reset { name, statement },
            (false, _) => SessionEffect::Set { name, statement },
        });
    }
}

/// The parameter a SET/RESET names, from its words; `None` for forms that
/// set nothing session-wide (LOCAL, CONSTRAINTS, TRANSACTION) and `pgnear.*`.
fn fallback_setting_name(words: &[&Token]) -> Option<String> {
    let word = |i: usize| match words.get(i) {
        Some(Token::Word(w)) => Some(w.value.to_lowercase()),
        _ => None,
    };
    let first = word(0)?;
    let special = match (first.as_str(), word(1).as_deref()) {
        ("local" | "constraints" | "transaction", _) => return None,
        ("time", Some("zone")) => "timezone",
        ("schema", _) => "search_path",
        ("xml", Some("option")) => "xmloption",
        ("names", _) => "client_encoding",
        ("authorization", _) => "session_authorization",
        _ => "",
    };
    if !special.is_empty() {
        return Some(special.to_owned());
    }
    let mut name = first;
    let mut index = 1;
    while let (Some(Token::Period), Some(part)) = (words.get(index), word(index + 1)) {
        name = format!("{name}.{part}");
        index += 2;
    }
    (!name.starts_with("pgnear.")).then_some(name)
}

fn is_word(token: &Token, word: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

// === Tokens ===

/// One statement's tokens (without the `;`) and the span from its first to
/// its last non-whitespace token.
struct Piece {
    tokens: Vec<TokenWithSpan>,
    span: Span,
}

/// Splits tokens at top-level semicolons: not inside parentheses, nor
/// inside a `BEGIN ATOMIC ... END` function body (where CASE ... END nests).
/// Empty statements are dropped.
fn split(tokens: Vec<TokenWithSpan>) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut current = Vec::new();
    let (mut parens, mut atomic, mut after_begin) = (0usize, 0usize, false);
    for token in tokens {
        match &token.token {
            Token::SemiColon if parens == 0 && atomic == 0 => {
                push_piece(&mut pieces, std::mem::take(&mut current));
                continue;
            }
            Token::LParen => parens += 1,
            Token::RParen => parens = parens.saturating_sub(1),
            Token::Word(w) if after_begin && w.keyword == Keyword::ATOMIC => atomic += 1,
            Token::Word(w) if atomic > 0 && w.keyword == Keyword::CASE => atomic += 1,
            Token::Word(w) if atomic > 0 && w.keyword == Keyword::END => atomic -= 1,
            _ => {}
        }
        if !matches!(token.token, Token::Whitespace(_)) {
            after_begin = matches!(&token.token, Token::Word(w) if w.keyword == Keyword::BEGIN);
        }
        current.push(token);
    }
    push_piece(&mut pieces, current);
    pieces
}

fn push_piece(pieces: &mut Vec<Piece>, tokens: Vec<TokenWithSpan>) {
    let mut solid = tokens.iter().filter(|t| !matches!(t.token, Token::Whitespace(_)));
    let Some(first) = solid.next() else {
        return;
    };
    let last = solid.next_back().unwrap_or(first);
    let span = Span::new(first.span.start, last.span.end);
    pieces.push(Piece { tokens, span });
}

/// Parses one statement's tokens; on failure gives the tokens back for the
/// fallback scan. `TABLE name` is parsed as a query, which sqlparser
/// accepts only there.
fn parse(tokens: Vec<TokenWithSpan>, lead: Keyword) -> Result<Statement, Vec<TokenWithSpan>> {
    if tokens.iter().filter(|t| is_operator_like(&t.token)).count() > MAX_OPERATOR_TOKENS {
        return Err(tokens);
    }
    let mut parser =
        Parser::new(&DIALECT).with_recursion_limit(RECURSION_LIMIT).with_tokens_with_locations(tokens);
    let parsed = match lead {
        Keyword::TABLE => parser.parse_query().map(Statement::Query),
        _ => parser.parse_statement(),
    };
    match parsed {
        Ok(statement) if parser.peek_token_ref().token == Token::EOF => Ok(statement),
        _ => Err(parser.into_tokens()),
    }
}

/// The statement's first keyword (`NoKeyword` if it starts otherwise).
fn leading_keyword(tokens: &[TokenWithSpan]) -> Keyword {
    match tokens.iter().map(|t| &t.token).find(|t| !matches!(t, Token::Whitespace(_))) {
        Some(Token::Word(word)) if word.quote_style.is_none() => word.keyword,
        _ => Keyword::NoKeyword,
    }
}

/// Tokens that can add a level to a left-deep expression or query tree.
fn is_operator_like(token: &Token) -> bool {
    match token {
        Token::Whitespace(_)
        | Token::Comma
        | Token::Number(..)
        | Token::SingleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::Placeholder(_) => false,
        Token::Word(word) => word.keyword != Keyword::NoKeyword,
        _ => true,
    }
}

/// The hint in the comments before the first statement, if any.
fn leading_hint(tokens: &[TokenWithSpan]) -> Option<Hint> {
    for token in tokens {
        let comment = match &token.token {
            Token::Whitespace(Whitespace::SingleLineComment { comment, .. }) => comment,
            Token::Whitespace(Whitespace::MultiLineComment(comment)) => comment,
            Token::Whitespace(_) => continue,
            _ => return None,
        };
        if let Some(hint) = parse_hint(comment) {
            return Some(hint);
        }
    }
    None
}

/// `pgnear:primary` / `pgnear:replica`, ignoring case and whitespace.
fn parse_hint(comment: &str) -> Option<Hint> {
    let squeezed = || comment.chars().filter(|c| !c.is_whitespace()).map(|c| c.to_ascii_lowercase());
    if squeezed().eq("pgnear:primary".chars()) {
        Some(Hint::Primary)
    } else if squeezed().eq("pgnear:replica".chars()) {
        Some(Hint::Replica)
    } else {
        None
    }
}

/// Where one statement sits in the client's text.
struct Source<'a> {
    sql: &'a str,
    span: Span,
}

impl Source<'_> {
    /// The statement exactly as the client wrote it, without the `;`.
    fn text(&self) -> String {
        let start = byte_offset(self.sql, self.span.start);
        let end = byte_offset(self.sql, self.span.end);
        self.sql.get(start..end).unwrap_or_default().to_owned()
    }
}

/// Converts the tokenizer's 1-based line and character column to a byte
/// offset.
fn byte_offset(sql: &str, location: Location) -> usize {
    let mut offset = 0;
    for (index, line) in sql.split_inclusive('\n').enumerate() {
        if index as u64 + 1 == location.line {
            let column = (location.column as usize).saturating_sub(1);
            let within = line.char_indices().nth(column).map_or(line.len(), |(b, _)| b);
            return offset + within;
        }
        offset += line.len();
    }
    sql.len()
}
