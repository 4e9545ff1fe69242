//! md5 password authentication toward clients.

use md5::{Digest, Md5};

use crate::config::Secret;

/// The stored form `md5(password || user)` in hex, as pg_authid keeps it.
#[derive(Clone)]
pub struct Md5Secret(String);

impl std::fmt::Debug for Md5Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Md5Secret(***)")
    }
}

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for p in parts {
        hasher.update(p);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Md5Secret {
    /// Accepts a plaintext password or an `md5...` hash from the config.
    pub fn new(user: &str, secret: &Secret) -> Md5Secret {
        let value = secret.expose();
        match value.strip_prefix("md5") {
            Some(hash) if hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Md5Secret(hash.to_ascii_lowercase())
            }
            _ => Md5Secret(hex_md5(&[value.as_bytes(), user.as_bytes()])),
        }
    }

    /// Checks a client's `md5...` response to `salt` in constant time.
    pub fn verify(&self, response: &str, salt: [u8; 4]) -> bool {
        let expected = format!("md5{}", hex_md5(&[self.0.as_bytes(), &salt]));
        expected.len() == response.len()
            && expected.bytes().zip(response.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libpq_md5_response() {
        let salt = [1, 2, 3, 4];
        let client = postgres_protocol::authentication::md5_hash(b"app", b"s3cret", salt);
        let secret = Md5Secret::new("app", &Secret::new("s3cret"));
        assert!(secret.verify(&client, salt));
        assert!(!secret.verify(&client, [4, 3, 2, 1]));
        let stored = Md5Secret::new("app", &Secret::new(format!("md5{}", secret.0)));
        assert!(stored.verify(&client, salt));
        let wrong = postgres_protocol::authentication::md5_hash(b"app", b"guess", salt);
        assert!(!secret.verify(&wrong, salt));
    }
}
