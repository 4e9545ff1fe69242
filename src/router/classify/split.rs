//! Cuts one tokenized SQL text into statements at top-level semicolons,
//! reads the routing hint in its leading comments, and maps a statement's
//! span back to the client's text.

use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Whitespace};

use super::{Hint, StalenessHint};

/// One statement's tokens (without the `;`) and the span from its first to
/// its last non-whitespace token.
pub(super) struct Piece {
    pub(super) tokens: Vec<TokenWithSpan>,
    pub(super) span: Span,
}

/// Splits tokens at top-level semicolons: not inside parentheses, nor
/// inside a `BEGIN ATOMIC ... END` function body (where CASE ... END nests).
/// Empty statements are dropped.
pub(super) fn split(tokens: Vec<TokenWithSpan>) -> Vec<Piece> {
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

/// The statement's first keyword (`NoKeyword` if it starts otherwise).
pub(super) fn leading_keyword(tokens: &[TokenWithSpan]) -> Keyword {
    match tokens.iter().map(|t| &t.token).find(|t| !matches!(t, Token::Whitespace(_))) {
        Some(Token::Word(word)) if word.quote_style.is_none() => word.keyword,
        _ => Keyword::NoKeyword,
    }
}

/// The hint in the comments before the first statement, if any.
pub(super) fn leading_hint(tokens: &[TokenWithSpan]) -> Option<Hint> {
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

/// `pgnear:primary`, `pgnear:replica`, or `pgnear:` and a comma-separated
/// list of `max_staleness_ms=N` and `read_your_writes=<boolean>` (each at
/// most once), ignoring case and whitespace. Anything else, a malformed
/// value included, is an ordinary comment.
fn parse_hint(comment: &str) -> Option<Hint> {
    let squeezed: String =
        comment.chars().filter(|c| !c.is_whitespace()).map(|c| c.to_ascii_lowercase()).collect();
    match squeezed.strip_prefix("pgnear:")? {
        "primary" => Some(Hint::Primary),
        "replica" => Some(Hint::Replica),
        list => staleness_hint(list).map(Hint::Staleness),
    }
}

/// The items of a staleness hint; `None` if any is malformed or repeated.
fn staleness_hint(list: &str) -> Option<StalenessHint> {
    let mut hint = StalenessHint::default();
    for item in list.split(',') {
        match item.split_once('=')? {
            ("max_staleness_ms", ms) if hint.max.is_none() => {
                hint.max = Some(parse_millis(ms)?);
            }
            ("read_your_writes", on) if hint.read_your_writes.is_none() => {
                hint.read_your_writes = Some(crate::protocol::parse_bool(on)?);
            }
            _ => return None,
        }
    }
    Some(hint)
}

/// A whole number of milliseconds, digits only (no sign, no unit).
pub fn parse_millis(text: &str) -> Option<std::time::Duration> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().map(std::time::Duration::from_millis)
}

/// Where one statement sits in the client's text.
pub(super) struct Source<'a> {
    pub(super) sql: &'a str,
    pub(super) span: Span,
}

impl Source<'_> {
    /// The statement exactly as the client wrote it, without the `;`.
    pub(super) fn text(&self) -> String {
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
