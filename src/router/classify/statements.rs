//! Classifies one parsed statement: its own class (SET, BEGIN, COPY, EXPLAIN,
//! DECLARE, ...) and the session effects and pins it has.

use sqlparser::ast::{
    ContextModifier, CopySource, CopyTarget, Declare, DeclareType, DiscardObject, Expr, FunctionArguments,
    GroupByExpr, Ident, ObjectName, Reset, SelectItem, Set, SetExpr, Statement, TransactionAccessMode,
    TransactionIsolationLevel, TransactionMode, UtilityOption, Value,
};

use super::names::{fold, last_name, push_unique, setting_name, setting_value};
use super::scan::{literal, SET_CONFIG};
use super::split::Source;
use super::{Class, PinReason, ProxyCommand, SavepointOp, SessionEffect, Summary, Tx};

// === Statements ===

impl Summary {
    /// Classifies one parsed statement and records its tables, functions
    /// and effects.
    pub(super) fn statement(&mut self, statement: &Statement, source: &Source) -> Class {
        match statement {
            Statement::Explain { analyze, options, statement, .. } => {
                self.explain(*analyze || analyze_option(options), statement, source)
            }
            Statement::Prepare { name, statement: prepared, .. } => {
                let mut inner = Summary::default();
                let class = inner.statement(prepared, source);
                inner.classes.push(class);
                let body = std::sync::Arc::new(inner.finish(None));
                let (name, statement) = (fold(name), source.text());
                self.effects.push(SessionEffect::Prepare { name, statement, body });
                Class::Session
            }
            _ => {
                if let Some(name) = plain_set_config(statement) {
                    // A built-in writer, so it runs on the primary, and
                    // replayable elsewhere like the SET it amounts to; any
                    // other session-wide set_config pins (see `scan`).
                    self.set_effect(&name, source);
                    push_unique(&mut self.functions, SET_CONFIG.to_owned());
                    return Class::Write;
                }
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
            if let Statement::Execute { .. } = inner {
                // Planning it needs the prepared statement where it runs.
                self.execute(inner);
            }
            return Class::Read;
        }
        match self.statement(inner, source) {
            Class::Read => Class::Read,
            _ => Class::Write,
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
            | Statement::ReleaseSavepoint { .. } => {
                self.savepoint(statement);
                transaction_class(statement)
            }
            Statement::Set(set) => self.set(set, source),
            Statement::Reset(reset) => self.reset(&reset.reset, source),
            Statement::Discard { object_type } => self.discard(object_type, source),
            Statement::Deallocate { name, .. } => self.deallocate(name),
            Statement::Execute { .. } => self.execute(statement),
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
        if !to && matches!(target, CopyTarget::Stdin | CopyTarget::Stdout) {
            self.copies_in = self.copies_in.saturating_add(1);
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

    /// `EXECUTE name`: a read as far as this text shows (its arguments are
    /// scanned like any expression); the session adds the class of what
    /// `name` prepared. `EXECUTE IMMEDIATE` and qualified names are not
    /// PostgreSQL's: writes.
    fn execute(&mut self, statement: &Statement) -> Class {
        let Statement::Execute { name: Some(name), immediate: false, .. } = statement else {
            return Class::Write;
        };
        match &name.0[..] {
            [part] => match part.as_ident() {
                Some(ident) => {
                    push_unique(&mut self.executes, fold(ident));
                    Class::Read
                }
                None => Class::Write,
            },
            _ => Class::Write,
        }
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

/// The parameter name of `SELECT [pg_catalog.]set_config('name', 'value',
/// false) [AS alias]`, a statement that does nothing but change one
/// setting for the session.
fn plain_set_config(statement: &Statement) -> Option<String> {
    let Statement::Query(query) = statement else { return None };
    let bare = query.with.is_none()
        && query.order_by.is_none()
        && query.limit_clause.is_none()
        && query.fetch.is_none()
        && query.locks.is_empty();
    let SetExpr::Select(select) = query.body.as_ref() else { return None };
    let alone = select.from.is_empty()
        && select.selection.is_none()
        && select.having.is_none()
        && select.into.is_none()
        && select.distinct.is_none()
        && matches!(&select.group_by, GroupByExpr::Expressions(e, _) if e.is_empty());
    let [SelectItem::UnnamedExpr(Expr::Function(call))
    | SelectItem::ExprWithAlias { expr: Expr::Function(call), .. }] = select.projection.as_slice()
    else {
        return None;
    };
    let qualified = match call.name.0.as_slice() {
        [_] => true,
        [schema, _] => schema.as_ident().is_some_and(|s| fold(s) == "pg_catalog"),
        _ => false,
    };
    let named = last_name(&call.name).is_some_and(|n| n == SET_CONFIG);
    if !(bare && alone && qualified && named) || call.filter.is_some() || call.over.is_some() {
        return None;
    }
    let FunctionArguments::List(list) = &call.args else { return None };
    let args: Vec<&Value> = list.args.iter().map(literal).collect::<Option<_>>()?;
    match args.as_slice() {
        [Value::SingleQuotedString(name), Value::SingleQuotedString(_), Value::Boolean(false)]
            if list.clauses.is_empty() && list.duplicate_treatment.is_none() =>
        {
            Some(name.to_lowercase())
        }
        _ => None,
    }
}

impl Summary {
    /// Records SAVEPOINT, RELEASE and ROLLBACK TO with their names.
    fn savepoint(&mut self, statement: &Statement) {
        let (op, name) = match statement {
            Statement::Savepoint { name } => (SavepointOp::Define, name),
            Statement::ReleaseSavepoint { name } => (SavepointOp::Release, name),
            Statement::Rollback { chain: false, savepoint: Some(name) } => (SavepointOp::RollbackTo, name),
            _ => return,
        };
        self.effects.push(SessionEffect::Savepoint { op, name: fold(name) });
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

/// The last access mode wins, as in PostgreSQL. A SERIALIZABLE one is
/// not read-only for routing: a hot standby refuses serializable mode.
fn begins_read_only(modes: &[TransactionMode]) -> bool {
    let access = modes.iter().rev().find_map(|mode| match mode {
        TransactionMode::AccessMode(access) => Some(access),
        TransactionMode::IsolationLevel(_) => None,
    });
    let serializable = modes.iter().rev().find_map(|mode| match mode {
        TransactionMode::IsolationLevel(level) => Some(*level == TransactionIsolationLevel::Serializable),
        TransactionMode::AccessMode(_) => None,
    });
    matches!(access, Some(TransactionAccessMode::ReadOnly)) && serializable != Some(true)
}

/// `EXPLAIN (ANALYZE [boolean])`: anything but an explicit false counts.
fn analyze_option(options: &Option<Vec<UtilityOption>>) -> bool {
    let Some(options) = options else {
        return false;
    };
    let is_false =
        |arg: &Expr| crate::protocol::parse_bool(&setting_value(std::slice::from_ref(arg))) == Some(false);
    options
        .iter()
        .filter(|o| o.name.value.eq_ignore_ascii_case("analyze"))
        .any(|o| !o.arg.as_ref().is_some_and(is_false))
}
