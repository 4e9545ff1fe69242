//! Names and values as PostgreSQL spells them: identifiers folded to lower
//! case, qualified names, configuration parameters and SET values.

use sqlparser::ast::{Expr, Ident, ObjectName, Value};

/// An identifier folded as PostgreSQL does: unquoted to lowercase.
pub(super) fn fold(ident: &Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_lowercase(),
        Some(_) => ident.value.clone(),
    }
}

/// The last part of a possibly qualified name, lowercased.
pub(super) fn last_name(name: &ObjectName) -> Option<String> {
    let ident = name.0.last()?.as_ident()?;
    Some(ident.value.to_lowercase())
}

/// A configuration parameter name: parts joined with `.`, lowercased
/// (parameter names are case-insensitive).
pub(super) fn setting_name(name: &ObjectName) -> String {
    let parts = name.0.iter().filter_map(|p| p.as_ident());
    parts.map(|i| i.value.to_lowercase()).collect::<Vec<_>>().join(".")
}

/// A SET value as text, unquoted: `'primary'` and `primary` give `primary`.
pub(super) fn setting_value(values: &[Expr]) -> String {
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

/// Appends `name` unless the list already holds it.
pub(super) fn push_unique(list: &mut Vec<String>, name: String) {
    if !list.contains(&name) {
        list.push(name);
    }
}
