//! The shape of a statement: its text with numeric and string literals
//! replaced by `?`, so that `... WHERE aid = 17` and `... WHERE aid = 42`
//! share one cache entry. Only classifications that do not depend on
//! literal values (no session effects, no pgnear command) are shared.

/// Bytes where a literal, quoted identifier or comment may start; all
/// others are copied as they are.
static SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = b'0';
    while b <= b'9' {
        table[b as usize] = true;
        b += 1;
    }
    table[b'\'' as usize] = true;
    table[b'"' as usize] = true;
    table[b'-' as usize] = true;
    table[b'/' as usize] = true;
    table[b'$' as usize] = true;
    table
};

/// Writes the shape of `sql` into `out` (cleared first) when it replaces
/// a literal: `Some(true)`. `Some(false)` when there is no literal (`out`
/// is then left empty), `None` when the text cannot be scanned with
/// certainty. A caller's `out` is reused, so a lookup allocates nothing.
pub fn shape_into(sql: &[u8], out: &mut Vec<u8>) -> Option<bool> {
    out.clear();
    let bytes = sql;
    let mut i = 0;
    let mut replaced = false;
    let mut last = 0; // start of the text not yet copied
    while let Some(at) = next_special(bytes, i) {
        i = at;
        let b = bytes[i];
        let prev_ident = i > 0 && is_ident(bytes[i - 1]);
        let end = match b {
            b'\'' => {
                let escapes =
                    i > 0 && matches!(bytes[i - 1], b'E' | b'e') && !(i > 1 && is_ident(bytes[i - 2]));
                let start = if escapes { i - 1 } else { i };
                let close = quoted_end(bytes, i, escapes)?;
                Some((start, close))
            }
            b'"' => {
                i = closing(bytes, i + 1, b'"')? + 1;
                continue;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..].iter().position(|&c| c == b'\n').map_or(bytes.len(), |p| i + p);
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = block_comment_end(bytes, i)?;
                continue;
            }
            b'$' if !prev_ident => {
                let tag_end = i + 1 + bytes[i + 1..].iter().position(|&c| !is_ident(c) || c == b'$')?;
                if bytes.get(tag_end) != Some(&b'$') {
                    i = tag_end; // a $1 parameter, digits and all
                    continue;
                }
                let tag = &sql[i..=tag_end];
                let body = memchr::memmem::find(&sql[tag_end + 1..], tag)?;
                Some((i, tag_end + 1 + body + tag.len()))
            }
            // A sign after an operator, a comma or a parenthesis is the
            // literal's own: `+ -5` has the shape of `+ 5` (pgbench's
            // deltas are either, and a session would keep both shapes).
            b'-' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) && after_operator(bytes, i) => {
                Some((i, number_end(bytes, i + 1)))
            }
            b'0'..=b'9' if !prev_ident => Some((i, number_end(bytes, i))),
            _ => None,
        };
        match end {
            Some((start, stop)) => {
                if !replaced {
                    out.reserve(sql.len());
                }
                out.extend_from_slice(&sql[last..start]);
                out.push(b'?');
                replaced = true;
                last = stop;
                i = stop;
            }
            None => i += 1,
        }
    }
    if replaced {
        out.extend_from_slice(&sql[last..]);
    }
    Some(replaced)
}

/// A one in every byte of a word.
const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `word` that lies in `"`..=`9`
/// (0x22..=0x39): every special byte does, so a word without any is
/// skipped whole. No carry or borrow crosses a byte.
fn candidates(word: u64) -> u64 {
    let low7 = word & (ONES * 0x7f);
    let below = (ONES * (0x7f + 0x3a)) - low7;
    let above = low7 + ONES * (0x7f - 0x21);
    below & above & !word & (ONES * 0x80)
}

/// The index of the first byte at or after `from` where a literal, quoted
/// identifier or comment may start. Most of a statement is plain text, so
/// it is scanned eight bytes at a time.
fn next_special(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let mut mask = candidates(u64::from_le_bytes(word));
        while mask != 0 {
            let at = i + (mask.trailing_zeros() / 8) as usize;
            if SPECIAL[bytes[at] as usize] {
                return Some(at);
            }
            mask &= mask - 1;
        }
        i += 8;
    }
    bytes.get(i..)?.iter().position(|&c| SPECIAL[c as usize]).map(|p| i + p)
}

/// The index just past the number starting at `from`.
fn number_end(bytes: &[u8], from: usize) -> usize {
    let len = bytes[from..].iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'.' || c == b'_'));
    len.map_or(bytes.len(), |l| from + l)
}

/// Whether the text before `at`, spaces aside, ends with an operator, a
/// comma or an opening parenthesis: a `-` at `at` is then a sign.
fn after_operator(bytes: &[u8], at: usize) -> bool {
    let before = bytes[..at].iter().rev().find(|c| !c.is_ascii_whitespace());
    before.is_some_and(|c| b"+-*/%^<>=(,|&~!".contains(c))
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80
}

/// The index just past a single-quoted string starting at `open`.
fn quoted_end(bytes: &[u8], open: usize, escapes: bool) -> Option<usize> {
    let mut i = open + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if escapes => i += 2,
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn closing(bytes: &[u8], from: usize, quote: u8) -> Option<usize> {
    bytes[from..].iter().position(|&c| c == quote).map(|p| from + p)
}

/// The index just past a (possibly nested) block comment at `open`.
fn block_comment_end(bytes: &[u8], open: usize) -> Option<usize> {
    let (mut depth, mut i) = (0usize, open);
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{next_special, shape_into, SPECIAL};

    #[test]
    fn the_word_scan_finds_what_the_byte_scan_finds() {
        let naive =
            |b: &[u8], from: usize| b[from..].iter().position(|&c| SPECIAL[c as usize]).map(|p| from + p);
        // Every byte value at every offset of a word, and texts of every
        // length around a word's.
        for value in 0..=255u8 {
            for at in 0..19 {
                let mut text = vec![b'a'; 19];
                text[at] = value;
                for from in [0, 1, 7, 8, 9, at] {
                    assert_eq!(
                        next_special(&text, from),
                        naive(&text, from),
                        "byte {value:#x} at {at} from {from}"
                    );
                }
            }
        }
        let sql = "UPDATE pgbench_accounts SET abalance = abalance + -4230 WHERE aid = 63711; (é,*)";
        let bytes = sql.as_bytes();
        for from in 0..bytes.len() {
            assert_eq!(next_special(bytes, from), naive(bytes, from), "from {from}");
        }
    }

    /// The shape, when the text has one.
    fn shape(sql: &str) -> Option<String> {
        let mut out = Vec::new();
        shape_into(sql.as_bytes(), &mut out)?
            .then(|| String::from_utf8(out).expect("a shape of UTF-8 is UTF-8"))
    }

    #[test]
    fn literals_become_placeholders() {
        let a = shape("UPDATE pgbench_accounts SET abalance = abalance + -4230 WHERE aid = 63711;");
        let b = shape("UPDATE pgbench_accounts SET abalance = abalance + -12 WHERE aid = 5;");
        let c = shape("UPDATE pgbench_accounts SET abalance = abalance + 4230 WHERE aid = 63711;");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.as_deref(), Some("UPDATE pgbench_accounts SET abalance = abalance + ? WHERE aid = ?;"));
        assert_eq!(shape("SELECT f(-1, -2.5) = -3").as_deref(), Some("SELECT f(?, ?) = ?"));
        // A minus after an operand subtracts: it stays.
        assert_eq!(shape("SELECT a-1, b - 2, c -3").as_deref(), Some("SELECT a-?, b - ?, c -?"));
        assert_eq!(shape("SELECT 1 - -1").as_deref(), Some("SELECT ? - ?"));
        assert_eq!(
            shape("SELECT * FROM t WHERE s = 'it''s' AND e = E'a\\'b'").as_deref(),
            Some("SELECT * FROM t WHERE s = ? AND e = ?")
        );
        assert_eq!(shape("SELECT $$a;b$$, $x$q$x$").as_deref(), Some("SELECT ?, ?"));
    }

    #[test]
    fn identifiers_comments_and_parameters_stay() {
        assert_eq!(shape("SELECT t1.c2 FROM \"t 3\" WHERE x = $1"), None);
        assert_eq!(shape("SELECT a FROM t WHERE x = $1;"), None);
        assert_eq!(
            shape("SELECT a FROM t WHERE x = $12 AND y = 5").as_deref(),
            Some("SELECT a FROM t WHERE x = $12 AND y = ?")
        );
        assert_eq!(shape("/* pgnear:primary */ SELECT 1").as_deref(), Some("/* pgnear:primary */ SELECT ?"));
        assert_eq!(shape("SELECT 1 -- 2 'x\nFROM t").as_deref(), Some("SELECT ? -- 2 'x\nFROM t"));
        assert_eq!(shape("SELECT \"a'b\", 5").as_deref(), Some("SELECT \"a'b\", ?"));
    }

    #[test]
    fn uncertain_text_has_no_shape() {
        assert_eq!(shape("SELECT 'unterminated; DELETE FROM t"), None);
        assert_eq!(shape("SELECT 1 /* open"), None);
        assert_eq!(shape("SELECT $a$ never closed"), None);
        assert_eq!(shape("SELECT \"open"), None);
    }
}
