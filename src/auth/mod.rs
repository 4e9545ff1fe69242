//! Authentication: clients proving themselves to pgnear (`scram`, `md5`),
//! and the verifiers pgnear derives once from the configured passwords.

pub mod lookup;
pub mod md5;
pub mod scram;

use std::collections::HashMap;

use crate::config::{ClientAuth, Config};

pub use scram::{ScramError, ScramServer, ScramVerifier};

/// How one configured user is checked, with secrets already derived.
#[derive(Debug, Clone)]
pub enum Credential {
    Trust,
    Md5(md5::Md5Secret),
    Scram(ScramVerifier),
}

/// Every configured user's credential, derived once at startup so that no
/// PBKDF2 runs on the request path.
#[derive(Debug, Default)]
pub struct Directory {
    users: HashMap<String, Credential>,
    /// The secret that makes the decoy verifiers of unknown users.
    decoy: [u8; 32],
}

impl Directory {
    /// Derives credentials for every user. CPU-heavy (PBKDF2 per SCRAM
    /// user): call it off the reactor.
    pub fn build(config: &Config) -> Result<Directory, ScramError> {
        let mut users = HashMap::new();
        for user in &config.users {
            let credential = match &user.auth {
                ClientAuth::Trust => Credential::Trust,
                ClientAuth::Md5(secret) => Credential::Md5(md5::Md5Secret::new(&user.name, secret)),
                ClientAuth::ScramSha256(secret) => Credential::Scram(ScramVerifier::from_secret(secret)?),
            };
            users.insert(user.name.clone(), credential);
        }
        Ok(Directory { users, decoy: rand::random() })
    }

    /// The process's secret for decoy verifiers (`ScramVerifier::unknown`).
    pub fn decoy_key(&self) -> &[u8; 32] {
        &self.decoy
    }

    pub fn get(&self, user: &str) -> Option<&Credential> {
        self.users.get(user)
    }
}
