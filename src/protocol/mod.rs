//! PostgreSQL protocol 3.0: bytes to messages and back, nothing more.
//!
//! Frames that routing does not inspect stay opaque [`Frame`]s and are
//! relayed as they arrived. `frontend` reads what clients send, `backend`
//! writes what pgnear itself answers and reads the few server messages the
//! session must understand.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;

pub use frame::{Frame, FrameReader, ProtocolError};
pub use sqlstate::SqlState;

/// A boolean as PostgreSQL spells one (its `parse_bool`: startup
/// parameters such as `replication`, settings, utility options): `true`,
/// `false`, `yes`, `no`, `on`, `off`, `1`, `0` in any case, and unique
/// prefixes of the words (`t`, `fa`, `of` ...; `o` alone is ambiguous).
pub fn parse_bool(text: &str) -> Option<bool> {
    let text = text.to_ascii_lowercase();
    let prefix_of = |word: &str, shortest: usize| text.len() >= shortest && word.starts_with(text.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || text == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || text == "0" {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bool;

    #[test]
    fn booleans_are_spelled_as_postgresql_spells_them() {
        for yes in ["true", "T", "tr", "yes", "Y", "on", "ON", "1"] {
            assert_eq!(parse_bool(yes), Some(true), "{yes}");
        }
        for no in ["false", "f", "FAL", "no", "n", "off", "of", "0"] {
            assert_eq!(parse_bool(no), Some(false), "{no}");
        }
        for neither in ["", "o", "database", "truer", "2", "offf"] {
            assert_eq!(parse_bool(neither), None, "{neither}");
        }
    }
}
