//! Walks a parsed statement with sqlparser's `Visitor`: collects relations
//! and function calls, and finds writes hidden in read-looking statements
//! (writing functions, locking clauses, SELECT INTO, DML in a CTE).

use std::ops::ControlFlow;
use std::ptr;

use sqlparser::ast::{
    Cte, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query, Select, SetExpr,
    Statement, TableFactor, Value, Visit, Visitor,
};

use super::names::{fold, last_name, push_unique};
use super::{Class, PinReason, Summary};
use crate::router::functions;

// === impl Summary ===

impl Summary {
    /// Walks `statement`, adding its relations (and, when it `executes`,
    /// its function calls) to the text's lists.
    pub(super) fn scan(&mut self, statement: &Statement, executes: bool) -> Findings {
        let mut scan = Scan::new(&mut self.tables, &mut self.functions, executes);
        // The visitor never breaks: it only collects.
        let _ = statement.visit(&mut scan);
        scan.findings
    }

    /// Records the pins the scan found; a hidden write overrides `class`.
    pub(super) fn apply(&mut self, findings: Findings, class: Class) -> Class {
        if findings.advisory_lock {
            self.pin(PinReason::AdvisoryLock);
        }
        if findings.temp_into {
            self.pin(PinReason::TempObject);
        }
        if findings.session_config {
            self.pin(PinReason::SessionConfig);
        }
        if findings.writes {
            Class::Write
        } else {
            class
        }
    }
}

// === Tree scan ===

/// What the scan of one statement found beyond names.
#[derive(Default)]
pub(super) struct Findings {
    /// A writing function, a locking clause, SELECT INTO or nested DML.
    writes: bool,
    /// A session-level advisory lock is taken.
    advisory_lock: bool,
    /// SELECT INTO TEMP creates a temporary table.
    temp_into: bool,
    /// `set_config` may change a session setting.
    session_config: bool,
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
            if self.executes && last_name(&function.name).is_some_and(|n| n == SET_CONFIG) {
                self.findings.session_config |= !is_local_set_config(function);
            }
        }
        ControlFlow::Continue(())
    }
}

/// The built-in that changes a setting from inside an expression.
pub(super) const SET_CONFIG: &str = "set_config";

/// Whether a `set_config` call's third argument is the literal `true`: the
/// setting then ends with the transaction. A parameter, an expression or a
/// string such as `'t'` counts as session-wide (a string is a literal the
/// classification cache does not look at).
fn is_local_set_config(call: &Function) -> bool {
    let FunctionArguments::List(list) = &call.args else {
        return false;
    };
    matches!(list.args.as_slice(), [_, _, third] if matches!(literal(third), Some(Value::Boolean(true))))
}

/// A function argument that is a plain literal.
pub(super) fn literal(arg: &FunctionArg) -> Option<&Value> {
    match arg {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))) => Some(&v.value),
        _ => None,
    }
}
