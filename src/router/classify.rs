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
//!
//! Layout: this file holds the public types, [`classify`] itself and how
//! statements combine; `split` cuts the token stream into statements and
//! reads the hint, `statements` classifies a parsed statement, `scan` walks
//! its tree for tables, functions and hidden writes, `unparsed` handles
//! statements sqlparser rejects, and `names` folds identifiers and values.

use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

pub use self::split::parse_millis;
use self::split::{leading_hint, leading_keyword, split, Piece, Source};
use super::functions::{is_node_state_relation, reads_node_state, VolatileFunctions};

mod names;
mod scan;
mod split;
mod statements;
#[cfg(test)]
mod tests;
mod unparsed;

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
    /// From a leading `/* pgnear:primary */`, `-- pgnear:replica` or
    /// `/* pgnear:max_staleness_ms=5000 */` comment.
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
    /// A statement changes what other sessions' statements may name: DDL
    /// (as for `ddl`) other than the creation of a temporary object, or a
    /// GRANT or REVOKE. Once it commits, no session reads from a replica
    /// that has not replayed it (the proxy-wide schema watermark).
    pub schema_change: bool,
    /// A function or relation whose answer differs between nodes
    /// (`pg_backend_pid()`, `pg_stat_*` ...): worked out once, here, since
    /// routing asks for every unit.
    pub node_state: bool,
    /// SQL-level prepared statements the text runs (`EXECUTE name`, folded).
    /// Such a text is classed by its own arguments alone: the session adds
    /// the class of each statement as it was prepared, and routes a name it
    /// does not know like a write.
    pub executes: Vec<String>,
    /// DDL that may define or replace a function (a function, procedure,
    /// aggregate, language or extension named in it, or a DO block): the
    /// volatile-function catalog is reloaded once it commits.
    pub defines_functions: bool,
    /// DDL that names a database (CREATE, ALTER or DROP DATABASE).
    pub names_databases: bool,
    /// The library a `LOAD 'path'` loads: its base name, lowercased.
    pub loads: Option<String>,
    /// Where the text leaves the session's transaction block.
    pub block: Block,
    /// How many `COPY ... FROM STDIN` (or its synonym `FROM STDOUT`) the
    /// text runs: the server waits for CopyData at each, and anything else
    /// it is sent meanwhile fails the COPY.
    pub copies_in: u8,
}

/// What a text does to the transaction block it runs in, statement by
/// statement: the last BEGIN, COMMIT or ROLLBACK decides. The session uses
/// it to know, before the server says so, whether a unit will leave it
/// outside a block (where pgnear may pipeline a statement of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Block {
    /// No BEGIN, COMMIT or ROLLBACK: the block is as it was.
    #[default]
    Same,
    /// Ends inside a block it opened (BEGIN last).
    Opens,
    /// Ends outside a block (COMMIT, END or ROLLBACK last).
    Closes,
    /// Cannot tell: COMMIT AND CHAIN, PREPARE TRANSACTION, a statement
    /// that did not parse.
    Unknown,
}

impl Block {
    /// The state after `self`, given whether a block was open before;
    /// `None` when it cannot be told.
    pub fn after(self, in_block: Option<bool>) -> Option<bool> {
        match self {
            Block::Same => in_block,
            Block::Opens => Some(true),
            Block::Closes => Some(false),
            Block::Unknown => None,
        }
    }

    /// `self` followed by `next`.
    fn then(self, next: Block) -> Block {
        match (self, next) {
            (Block::Unknown, _) | (_, Block::Unknown) => Block::Unknown,
            (earlier, Block::Same) => earlier,
            (_, later) => later,
        }
    }
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
    /// explicit and the isolation level is not SERIALIZABLE, which a hot
    /// standby refuses (a plain BEGIN under `default_transaction_read_only
    /// = on` still reads `false`: the session knows the defaults).
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
    /// `/* pgnear:max_staleness_ms=5000 */`, optionally with
    /// `,read_your_writes=off` (either may come alone, in either order).
    Staleness(StalenessHint),
}

/// What a staleness hint says; what it leaves out, the session's
/// `pgnear.max_staleness_ms` and `pgnear.read_your_writes` decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StalenessHint {
    /// `max_staleness_ms=N`: replicas lagging more serve none of it.
    pub max: Option<std::time::Duration>,
    /// `read_your_writes=on|off`: `off` lets a replica within the bounds
    /// serve it even before it replays the session's writes.
    pub read_your_writes: Option<bool>,
}

/// Session state that the proxy tracks and replays across backends.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// SQL-level PREPARE; `name` folded like PostgreSQL does, `statement`
    /// the client's text (replayed where the session executes it), `body`
    /// the classification of the statement prepared.
    Prepare { name: String, statement: String, body: std::sync::Arc<Classification> },
    /// DEALLOCATE name; `None` is DEALLOCATE ALL.
    Deallocate { name: Option<String> },
    /// The session must stay on the primary.
    Pin(PinReason),
    /// BEGIN, COMMIT or ROLLBACK between statements with effects in one
    /// text (`BEGIN; SET ...; ROLLBACK`): where the effects before it
    /// end up depends on it. Present only beside other effects.
    Transaction(Tx),
    /// SAVEPOINT, RELEASE or ROLLBACK TO `name` (folded): a ROLLBACK TO
    /// undoes the effects since the savepoint, in this text or earlier ones.
    Savepoint { op: SavepointOp, name: String },
}

/// What a savepoint statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SavepointOp {
    /// SAVEPOINT.
    Define,
    /// RELEASE [SAVEPOINT].
    Release,
    /// ROLLBACK TO [SAVEPOINT].
    RollbackTo,
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
    /// `set_config(name, value, is_local)` whose `is_local` is not the
    /// literal `true`: a session setting pgnear cannot replay.
    SessionConfig,
    /// A SET, PREPARE or other session statement whose text is not UTF-8
    /// (a `client_encoding` other than UTF8): pgnear classified a copy and
    /// cannot replay the client's bytes.
    NotUtf8,
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
    let mut classification = summary.finish(hint);
    if sql.contains(char::REPLACEMENT_CHARACTER) {
        not_utf8(&mut classification);
    }
    classification
}

/// The text held U+FFFD: most likely it was not UTF-8 and this is a lossy
/// copy of it (`ClassifyCache::classify`), in which ASCII, and so every
/// keyword, quote and comment, is as the client sent it. Two things of the
/// copy cannot be trusted: names that held other bytes (a function named
/// so is not found among the volatile ones, and could write) and the text
/// of session statements (a replay would send the copy, not the client's
/// bytes). Such a function makes the text a write; such a statement pins
/// the session.
fn not_utf8(c: &mut Classification) {
    let replaced = |name: &String| name.contains(char::REPLACEMENT_CHARACTER);
    if c.class == Class::Read && c.functions.iter().any(replaced) {
        c.class = Class::Write;
    }
    if c.effects.iter().any(|e| !matches!(e, SessionEffect::Pin(_))) {
        c.effects.retain(|e| matches!(e, SessionEffect::Pin(_)));
        c.effects.push(SessionEffect::Pin(PinReason::NotUtf8));
    }
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
    schema_change: bool,
    defines_functions: bool,
    names_databases: bool,
    loads: Option<String>,
    executes: Vec<String>,
    block: Block,
    copies_in: u8,
}

impl Summary {
    /// Classifies one statement; `tokenized` is false when the text did not
    /// tokenize, and the statement is then only scanned for pins.
    fn piece(&mut self, sql: &str, piece: Piece, tokenized: bool) {
        let source = Source { sql, span: piece.span };
        let lead = leading_keyword(&piece.tokens);
        // DO blocks count: they often create or replace functions.
        let ddl = matches!(lead, Keyword::CREATE | Keyword::ALTER | Keyword::DROP | Keyword::DO);
        self.schema_change |=
            (ddl && !creates_temporary(&piece.tokens)) || matches!(lead, Keyword::GRANT | Keyword::REVOKE);
        if ddl {
            self.ddl = true;
            let names = |keywords: &[Keyword]| {
                piece
                    .tokens
                    .iter()
                    .any(|t| matches!(&t.token, Token::Word(w) if keywords.contains(&w.keyword)))
            };
            let defining = [
                Keyword::FUNCTION,
                Keyword::PROCEDURE,
                Keyword::AGGREGATE,
                Keyword::LANGUAGE,
                Keyword::EXTENSION,
            ];
            self.defines_functions |= lead == Keyword::DO || names(&defining);
            self.names_databases |= names(&[Keyword::DATABASE]);
        }
        if lead == Keyword::LOAD {
            self.loads = self.loads.take().or_else(|| loaded_library(&piece.tokens));
        }
        let parsed = if tokenized { parse(piece.tokens, lead) } else { Err(piece.tokens) };
        match parsed {
            Ok(statement) => {
                let class = self.statement(&statement, &source);
                if let Class::Transaction(tx @ (Tx::Begin { .. } | Tx::Commit | Tx::Rollback)) = class {
                    self.effects.push(SessionEffect::Transaction(tx));
                }
                self.block = self.block.then(block_of(&class));
                self.classes.push(class);
            }
            Err(tokens) => {
                self.unparsed(&tokens, &source);
                self.block = Block::Unknown;
                self.classes.push(Class::Write);
            }
        }
    }

    fn finish(mut self, hint: Option<Hint>) -> Classification {
        let class = if self.unparsed { Class::Write } else { combine(self.classes) };
        if self.effects.iter().all(|e| matches!(e, SessionEffect::Transaction(_))) {
            // Only transaction control: nothing to place.
            self.effects.clear();
        }
        let node_state = self.functions.iter().any(|f| reads_node_state(f))
            || self.tables.iter().any(|t| is_node_state_relation(t));
        Classification {
            class,
            hint,
            node_state,
            tables: self.tables,
            functions: self.functions,
            effects: self.effects,
            unparsed: self.unparsed,
            ddl: self.ddl,
            schema_change: self.schema_change,
            defines_functions: self.defines_functions,
            names_databases: self.names_databases,
            loads: self.loads,
            executes: self.executes,
            block: if self.unparsed { Block::Unknown } else { self.block },
            copies_in: self.copies_in,
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

/// Whether a statement creates a temporary object (`CREATE [OR REPLACE]
/// [LOCAL | GLOBAL] TEMP[ORARY] ...`), which no other session can see.
fn creates_temporary(tokens: &[TokenWithSpan]) -> bool {
    let mut words = tokens.iter().filter_map(|t| match &t.token {
        Token::Word(w) if w.quote_style.is_none() => Some(w.keyword),
        Token::Whitespace(_) => None,
        _ => Some(Keyword::NoKeyword),
    });
    if words.next() != Some(Keyword::CREATE) {
        return false;
    }
    let skip = [Keyword::OR, Keyword::REPLACE, Keyword::LOCAL, Keyword::GLOBAL];
    words.find(|k| !skip.contains(k)).is_some_and(|k| matches!(k, Keyword::TEMP | Keyword::TEMPORARY))
}

/// The base name, lowercased, of the library a `LOAD 'path'` names.
fn loaded_library(tokens: &[TokenWithSpan]) -> Option<String> {
    let path = tokens.iter().find_map(|t| match &t.token {
        Token::SingleQuotedString(path) => Some(path.as_str()),
        _ => None,
    })?;
    let base = path.rsplit('/').next()?.split('.').next()?;
    (!base.is_empty()).then(|| base.to_ascii_lowercase())
}

/// What one statement's class does to the transaction block.
fn block_of(class: &Class) -> Block {
    match class {
        Class::Transaction(Tx::Begin { .. }) => Block::Opens,
        Class::Transaction(Tx::Commit | Tx::Rollback) => Block::Closes,
        // AND CHAIN restarts a block, SET TRANSACTION keeps it: not told apart.
        Class::Transaction(Tx::Other) => Block::Unknown,
        _ => Block::Same,
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

// === Parsing ===

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
