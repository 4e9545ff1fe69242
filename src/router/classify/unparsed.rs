//! Best effort for statements sqlparser rejects (they are writes anyway):
//! pins and session settings read from their words, erring towards pinning.

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::split::Source;
use super::{PinReason, SessionEffect, Summary};
use crate::router::functions;

impl Summary {
    /// Best effort for a statement sqlparser rejects (it is a write anyway):
    /// pins and session settings from its words, erring towards pinning.
    pub(super) fn unparsed(&mut self, tokens: &[TokenWithSpan], source: &Source) {
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
        if words.iter().any(|t| is_word(t, super::scan::SET_CONFIG)) {
            self.pin(PinReason::SessionConfig);
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
