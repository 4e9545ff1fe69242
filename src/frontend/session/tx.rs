//! Which session effects (SET, PREPARE, DISCARD ...) last, given the
//! transaction control around them: effects inside a block count only if
//! it commits, a ROLLBACK TO undoes what followed its savepoint, and
//! prepared statements outlast any rollback. Pure bookkeeping, tested
//! with tables like the router's.

use std::sync::Arc;

use crate::protocol::backend::TxStatus;
use crate::router::classify::{Class, Classification, SavepointOp, SessionEffect, Tx};

/// The effects of the open transaction, waiting for it to commit.
#[derive(Debug, Default)]
pub(super) struct TxEffects {
    /// Session effects of the open transaction, applied if it commits.
    pending: Vec<Arc<Classification>>,
    /// The open transaction's savepoints: each name with how many of
    /// `pending` came before it.
    savepoints: Vec<(String, usize)>,
}

impl TxEffects {
    /// A unit ended with ReadyForQuery status `after`, having started at
    /// `before`; `failed` if it reported an error. `effects` are its
    /// statements with effects and its transaction control, in order, so
    /// that `BEGIN; SET ...; ROLLBACK` in one Query leaves nothing behind.
    /// Gives the effects that now last.
    pub(super) fn finish(
        &mut self,
        effects: Vec<Arc<Classification>>,
        failed: bool,
        before: TxStatus,
        after: TxStatus,
    ) -> Vec<Arc<Classification>> {
        if effects.is_empty() && self.pending.is_empty() && self.savepoints.is_empty() {
            // Nothing to keep, undo or carry: most units.
            return Vec::new();
        }
        let mut pending = std::mem::take(&mut self.pending);
        let mut savepoints = std::mem::take(&mut self.savepoints);
        let mut kept = Vec::new();
        let mut aborted = before == TxStatus::Failed;
        if !failed {
            let mut in_block = before.in_block();
            for step in effects.iter().flat_map(steps) {
                match step {
                    Step::Tx(Tx::Begin { .. }) => in_block = true,
                    Step::Tx(Tx::Commit) => {
                        if !aborted {
                            kept.append(&mut pending);
                        }
                        pending.clear();
                        savepoints.clear();
                        (in_block, aborted) = (false, false);
                    }
                    Step::Tx(_) => {
                        pending.clear();
                        savepoints.clear();
                        (in_block, aborted) = (false, false);
                    }
                    Step::Savepoint(op, name) if in_block => {
                        let at = savepoints.iter().rposition(|(n, _)| *n == name);
                        match (op, at) {
                            (SavepointOp::Define, _) => savepoints.push((name, pending.len())),
                            (SavepointOp::Release, Some(at)) => savepoints.truncate(at),
                            (SavepointOp::RollbackTo, Some(at)) => {
                                // The savepoint stays; what followed it is undone.
                                pending.truncate(savepoints[at].1);
                                savepoints.truncate(at + 1);
                                aborted = false;
                            }
                            // Defined in a unit that failed: nothing
                            // recorded since then to undo.
                            (_, None) => {}
                        }
                    }
                    Step::Savepoint(..) => {}
                    Step::Effects(class) if in_block => {
                        // Prepared statements are not transactional: a
                        // PREPARE or DEALLOCATE lasts whatever the block does.
                        let (lasting, transactional) = split_lasting(&class);
                        kept.extend(lasting);
                        pending.extend(transactional);
                    }
                    Step::Effects(class) => kept.push(class),
                }
            }
        }
        if after == TxStatus::Idle {
            // Ended some other way (an error outside a block ends it too):
            // what ran in it lasts unless it failed.
            if !aborted && !failed {
                kept.append(&mut pending);
            }
        } else {
            self.pending = pending;
            self.savepoints = savepoints;
        }
        kept
    }
}

/// One step of a unit's statements, for `TxEffects::finish`.
enum Step {
    /// BEGIN, COMMIT or ROLLBACK.
    Tx(Tx),
    /// SAVEPOINT, RELEASE or ROLLBACK TO a name.
    Savepoint(SavepointOp, String),
    /// Statements with effects.
    Effects(Arc<Classification>),
}

/// A classification's effects split into those that outlast a rolled-back
/// transaction (PREPARE, DEALLOCATE) and the others, each as a
/// classification of its own where there are any.
fn split_lasting(class: &Arc<Classification>) -> (Option<Arc<Classification>>, Option<Arc<Classification>>) {
    let lasting =
        |e: &SessionEffect| matches!(e, SessionEffect::Prepare { .. } | SessionEffect::Deallocate { .. });
    if !class.effects.iter().any(lasting) {
        return (None, Some(class.clone()));
    }
    let (kept, rest): (Vec<SessionEffect>, Vec<SessionEffect>) =
        class.effects.iter().cloned().partition(lasting);
    let with = |effects: Vec<SessionEffect>| {
        (!effects.is_empty()).then(|| Arc::new(Classification { effects, ..(**class).clone() }))
    };
    (with(kept), with(rest))
}

/// A classification as steps: transaction control, or its effects, split
/// where a text puts transaction control between them.
fn steps(class: &Arc<Classification>) -> smallvec::SmallVec<[Step; 2]> {
    if let Class::Transaction(tx @ (Tx::Begin { .. } | Tx::Commit | Tx::Rollback)) = class.class {
        if class.effects.is_empty() {
            return smallvec::smallvec![Step::Tx(tx)];
        }
    }
    let marker =
        |e: &SessionEffect| matches!(e, SessionEffect::Transaction(_) | SessionEffect::Savepoint { .. });
    if !class.effects.iter().any(marker) {
        return if class.effects.is_empty() {
            smallvec::SmallVec::new()
        } else {
            smallvec::smallvec![Step::Effects(class.clone())]
        };
    }
    let mut steps = smallvec::SmallVec::new();
    let mut run = Vec::new();
    let flush = |run: &mut Vec<SessionEffect>, steps: &mut smallvec::SmallVec<[Step; 2]>| {
        if !run.is_empty() {
            let effects = std::mem::take(run);
            steps.push(Step::Effects(Arc::new(Classification { effects, ..(**class).clone() })));
        }
    };
    for effect in &class.effects {
        match effect {
            SessionEffect::Transaction(tx) => {
                flush(&mut run, &mut steps);
                steps.push(Step::Tx(*tx));
            }
            SessionEffect::Savepoint { op, name } => {
                flush(&mut run, &mut steps);
                steps.push(Step::Savepoint(*op, name.clone()));
            }
            other => run.push(other.clone()),
        }
    }
    flush(&mut run, &mut steps);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::classify;
    use TxStatus::{Failed as E, Idle as I, InBlock as T};

    /// A unit: one Query's text (classified whole, as the session does),
    /// whether it failed, and the status it left the server in.
    struct Unit(&'static str, bool, TxStatus);

    /// Runs units in order, each starting where the last left the server;
    /// gives the SET and PREPARE names that lasted, in order.
    fn run(units: &[Unit]) -> Vec<String> {
        let mut tx = TxEffects::default();
        let mut before = I;
        let mut lasted = Vec::new();
        for Unit(sql, failed, after) in units {
            let class = Arc::new(classify(sql));
            // The session carries only statements with effects or
            // transaction control.
            let effects = if steps(&class).is_empty() { Vec::new() } else { vec![class] };
            for class in tx.finish(effects, *failed, before, *after) {
                lasted.extend(class.effects.iter().filter_map(name));
            }
            before = *after;
        }
        lasted
    }

    fn name(effect: &SessionEffect) -> Option<String> {
        match effect {
            SessionEffect::Set { name, .. } => Some(name.clone()),
            SessionEffect::Prepare { name, .. } => Some(format!("prepare {name}")),
            _ => None,
        }
    }

    #[test]
    fn effects_last_as_their_transaction_does() {
        let cases: &[(&str, &[Unit], &[&str])] = &[
            ("outside a block", &[Unit("SET a.x = 1", false, I)], &["a.x"]),
            ("a failed unit", &[Unit("SET a.x = 1", true, I)], &[]),
            (
                "committed block",
                &[Unit("BEGIN", false, T), Unit("SET a.x = 1", false, T), Unit("COMMIT", false, I)],
                &["a.x"],
            ),
            (
                "rolled-back block",
                &[Unit("BEGIN", false, T), Unit("SET a.x = 1", false, T), Unit("ROLLBACK", false, I)],
                &[],
            ),
            ("one Query that rolls back", &[Unit("BEGIN; SET a.x = 1; ROLLBACK", false, I)], &[]),
            ("one Query that commits", &[Unit("BEGIN; SET a.x = 1; COMMIT", false, I)], &["a.x"]),
            (
                "an error aborts the block; its COMMIT rolls back",
                &[
                    Unit("BEGIN", false, T),
                    Unit("SET a.x = 1", false, T),
                    Unit("SELECT 1/0", true, E),
                    Unit("COMMIT", false, I),
                ],
                &[],
            ),
            (
                "ROLLBACK TO undoes what followed its savepoint",
                &[
                    Unit("BEGIN", false, T),
                    Unit("SET a.x = 1", false, T),
                    Unit("SAVEPOINT s", false, T),
                    Unit("SET a.y = 2", false, T),
                    Unit("ROLLBACK TO SAVEPOINT s", false, T),
                    Unit("COMMIT", false, I),
                ],
                &["a.x"],
            ),
            (
                "ROLLBACK TO recovers an aborted block",
                &[
                    Unit("BEGIN", false, T),
                    Unit("SAVEPOINT s", false, T),
                    Unit("SELECT 1/0", true, E),
                    Unit("ROLLBACK TO s", false, T),
                    Unit("SET a.z = 3", false, T),
                    Unit("COMMIT", false, I),
                ],
                &["a.z"],
            ),
            (
                "RELEASE keeps what followed",
                &[
                    Unit("BEGIN", false, T),
                    Unit("SAVEPOINT s", false, T),
                    Unit("SET a.x = 1", false, T),
                    Unit("RELEASE s", false, T),
                    Unit("COMMIT", false, I),
                ],
                &["a.x"],
            ),
            (
                "a PREPARE outlasts a rollback",
                &[
                    Unit("BEGIN", false, T),
                    Unit("PREPARE p AS SELECT 1", false, T),
                    Unit("ROLLBACK", false, I),
                ],
                &["prepare p"],
            ),
        ];
        for (label, units, expected) in cases {
            assert_eq!(run(units), *expected, "{label}");
        }
    }
}
