//! SCRAM-SHA-256 (RFC 5802, RFC 7677) from the server's side, as a state
//! machine: client-first, then client-final. Over TLS it also offers
//! SCRAM-SHA-256-PLUS with tls-server-end-point channel binding (RFC 5929).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// A SCRAM exchange that cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding: {0}")]
    ChannelBinding(&'static str),
    #[error("the client's proof does not match")]
    BadProof,
    #[error("invalid SCRAM verifier in the config")]
    BadVerifier,
    #[error("the server's SCRAM secret is not the one configured (salt or iteration count differ)")]
    SecretMismatch,
    #[error("the server's signature does not match")]
    BadServerSignature,
    #[error("the server refused the proof: {0}")]
    Refused(String),
}

/// What the server keeps of a password: salt, iterations and two keys.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(***)")
    }
}

impl ScramVerifier {
    /// From a plaintext password (PBKDF2 runs here) or a stored
    /// `SCRAM-SHA-256$iter:salt$stored:server` verifier.
    pub fn from_secret(secret: &Secret) -> Result<ScramVerifier, ScramError> {
        let value = secret.expose();
        if value.starts_with("SCRAM-SHA-256$") {
            return Self::parse(value);
        }
        Self::parse(&postgres_protocol::password::scram_sha_256(value.as_bytes()))
    }

    /// A verifier for a user that does not exist: no password matches it,
    /// and its salt is the same at every attempt for `name` (`key` is the
    /// process's secret), so that the exchange gives nothing away.
    pub fn unknown(name: &str, key: &[u8; 32]) -> ScramVerifier {
        let derived = hmac(key, name.as_bytes());
        ScramVerifier {
            iterations: 4096,
            salt: derived[..16].to_vec(),
            stored_key: hmac(key, &derived),
            server_key: hmac(&derived, key),
        }
    }

    fn parse(text: &str) -> Result<ScramVerifier, ScramError> {
        let rest = text.strip_prefix("SCRAM-SHA-256$").ok_or(ScramError::BadVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iterations, salt) = params.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let b64 = |s: &str| STANDARD.decode(s).map_err(|_| ScramError::BadVerifier);
        Ok(ScramVerifier {
            iterations: iterations.parse().map_err(|_| ScramError::BadVerifier)?,
            salt: b64(salt)?,
            stored_key: b64(stored)?,
            server_key: b64(server)?,
        })
    }
}

impl ScramVerifier {
    /// The keys for SCRAM passthrough: this verifier's, with the client key
    /// a client proved in its own exchange.
    pub fn keys(&self, client_key: Vec<u8>) -> ScramKeys {
        ScramKeys {
            iterations: self.iterations,
            salt: self.salt.clone(),
            client_key,
            server_key: self.server_key.clone(),
        }
    }
}

/// What SCRAM passthrough needs to log in to a server that keeps the same
/// stored secret: its salt, iteration count and server key, and the client
/// key a client proved to pgnear. No password exists anywhere.
#[derive(Clone)]
pub struct ScramKeys {
    iterations: u32,
    salt: Vec<u8>,
    client_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(***)")
    }
}

/// The client side of one SCRAM exchange by passthrough: the proof is made
/// from the client key, not from a password.
pub struct ScramClient {
    keys: std::sync::Arc<ScramKeys>,
    /// The gs2 header and, with SCRAM-SHA-256-PLUS, the binding data: what
    /// client-final's `c=` carries.
    binding: Vec<u8>,
    gs2_header: &'static str,
    nonce: String,
    client_first_bare: String,
    auth_message: Option<String>,
}

impl ScramClient {
    /// A new exchange: `channel` is the server's tls-server-end-point data
    /// when it offers SCRAM-SHA-256-PLUS over TLS; `tls` whether the
    /// connection is TLS at all (then a client that does not bind says so).
    pub fn new(keys: std::sync::Arc<ScramKeys>, channel: Option<Vec<u8>>, tls: bool) -> ScramClient {
        let nonce = nonce();
        let (gs2_header, binding) = match channel {
            Some(data) => ("p=tls-server-end-point,,", data),
            None if tls => ("y,,", Vec::new()),
            None => ("n,,", Vec::new()),
        };
        let binding = [gs2_header.as_bytes(), &binding].concat();
        let client_first_bare = format!("n=,r={nonce}");
        ScramClient { keys, binding, gs2_header, nonce, client_first_bare, auth_message: None }
    }

    /// The mechanism this exchange uses.
    pub fn mechanism(&self) -> &'static str {
        if self.gs2_header.starts_with("p=") {
            SCRAM_SHA_256_PLUS
        } else {
            SCRAM_SHA_256
        }
    }

    /// client-first.
    pub fn client_first(&self) -> String {
        format!("{}{}", self.gs2_header, self.client_first_bare)
    }

    /// Takes server-first and returns client-final with the proof.
    pub fn server_first(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let attr = |name: &str| text.split(',').find_map(|a| a.strip_prefix(name));
        let nonce = attr("r=").filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len());
        let nonce = nonce.ok_or(ScramError::Malformed("server nonce"))?;
        let salt = attr("s=").and_then(|s| STANDARD.decode(s).ok()).ok_or(ScramError::Malformed("salt"))?;
        let iterations: u32 =
            attr("i=").and_then(|i| i.parse().ok()).ok_or(ScramError::Malformed("iteration count"))?;
        if salt != self.keys.salt || iterations != self.keys.iterations {
            return Err(ScramError::SecretMismatch);
        }
        let without_proof = format!("c={},r={nonce}", STANDARD.encode(&self.binding));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key = Sha256::digest(&self.keys.client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self.keys.client_key.iter().zip(&signature).map(|(k, s)| k ^ s).collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)))
    }

    /// Checks server-final's signature.
    pub fn server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(ScramError::Refused(error.to_string()));
        }
        let auth_message =
            self.auth_message.as_ref().ok_or(ScramError::Malformed("server-final out of order"))?;
        let signature = text.strip_prefix("v=").and_then(|v| STANDARD.decode(v).ok());
        let expected = hmac(&self.keys.server_key, auth_message.as_bytes());
        match signature {
            Some(signature) if signature == expected => Ok(()),
            _ => Err(ScramError::BadServerSignature),
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The server side of one SCRAM exchange.
#[derive(Debug)]
pub enum ScramServer {
    /// Waiting for the SASLInitialResponse. `binding` is the
    /// tls-server-end-point data when SCRAM-SHA-256-PLUS is offered.
    Initial { server_nonce: String, binding: Option<Vec<u8>> },
    /// Sent server-first; waiting for client-final. `channel_binding` is
    /// what the client's `c=` must decode to: the gs2 header, plus the
    /// binding data with `p=`.
    Challenged { channel_binding: Vec<u8>, nonce: String, client_first_bare: String, server_first: String },
    /// The exchange has ended, well or badly.
    Done,
}

/// The gs2 channel binding flag of client-first.
enum Gs2Flag {
    /// `n`: the client does not support channel binding.
    NotSupported,
    /// `y`: the client supports it but thinks the server does not.
    NotOffered,
    /// `p=tls-server-end-point`.
    TlsServerEndPoint,
}

impl ScramServer {
    /// A new exchange with a random nonce, without channel binding.
    pub fn new() -> ScramServer {
        ScramServer::Initial { server_nonce: nonce(), binding: None }
    }

    /// A new exchange that also offers SCRAM-SHA-256-PLUS, binding to
    /// `end_point` (the hash of pgnear's certificate).
    pub fn with_channel_binding(end_point: Vec<u8>) -> ScramServer {
        ScramServer::Initial { server_nonce: nonce(), binding: Some(end_point) }
    }

    /// The mechanisms to advertise, best first.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        match self {
            ScramServer::Initial { binding: Some(_), .. } => &[SCRAM_SHA_256_PLUS, SCRAM_SHA_256],
            _ => &[SCRAM_SHA_256],
        }
    }

    /// Takes the client's chosen mechanism and client-first message and
    /// returns server-first.
    pub fn client_first(
        &mut self,
        mechanism: &str,
        message: &[u8],
        verifier: &ScramVerifier,
    ) -> Result<String, ScramError> {
        let ScramServer::Initial { server_nonce, binding } = std::mem::replace(self, ScramServer::Done)
        else {
            return Err(ScramError::Malformed("client-first out of order"));
        };
        let plus = match mechanism {
            SCRAM_SHA_256 => false,
            SCRAM_SHA_256_PLUS if binding.is_some() => true,
            _ => return Err(ScramError::Malformed("unsupported SASL mechanism")),
        };
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (flag, gs2_header, bare) = split_gs2(text)?;
        let channel_binding = match (flag, plus, binding) {
            (Gs2Flag::NotSupported, false, _) | (Gs2Flag::NotOffered, false, None) => {
                gs2_header.as_bytes().to_vec()
            }
            (Gs2Flag::TlsServerEndPoint, true, Some(data)) => [gs2_header.as_bytes(), &data].concat(),
            (Gs2Flag::NotOffered, false, Some(_)) => {
                return Err(ScramError::ChannelBinding("the client thinks the server does not support it"))
            }
            (Gs2Flag::TlsServerEndPoint, false, _) => {
                return Err(ScramError::ChannelBinding("requested without SCRAM-SHA-256-PLUS"))
            }
            (_, true, _) => return Err(ScramError::ChannelBinding("SCRAM-SHA-256-PLUS chosen without it")),
        };
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("no nonce"))?;
        let nonce = format!("{client_nonce}{server_nonce}");
        let salt = STANDARD.encode(&verifier.salt);
        let server_first = format!("r={nonce},s={salt},i={}", verifier.iterations);
        *self = ScramServer::Challenged {
            channel_binding,
            nonce,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
        };
        Ok(server_first)
    }

    /// Takes client-final; on a valid proof returns server-final and the
    /// client key the proof revealed (for SCRAM passthrough).
    pub fn client_final(
        &mut self,
        message: &[u8],
        verifier: &ScramVerifier,
    ) -> Result<(String, Vec<u8>), ScramError> {
        let ScramServer::Challenged { channel_binding, nonce, client_first_bare, server_first } =
            std::mem::replace(self, ScramServer::Done)
        else {
            return Err(ScramError::Malformed("client-final out of order"));
        };
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding =
            attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(ScramError::Malformed("no c="))?;
        if STANDARD.decode(binding).ok().as_deref() != Some(channel_binding.as_slice()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if attrs.next().and_then(|a| a.strip_prefix("r=")) != Some(nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = STANDARD.decode(proof).map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&verifier.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(ScramError::BadProof);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        let stored = Sha256::digest(&client_key);
        if stored.iter().zip(&verifier.stored_key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
        Ok((format!("v={}", STANDARD.encode(server_signature)), client_key))
    }
}

impl Default for ScramServer {
    fn default() -> Self {
        Self::new()
    }
}

fn nonce() -> String {
    let bytes: [u8; 18] = rand::random();
    STANDARD.encode(bytes)
}

/// Splits client-first into its channel binding flag, its whole
/// `gs2-header` and `client-first-message-bare`.
fn split_gs2(text: &str) -> Result<(Gs2Flag, &str, &str), ScramError> {
    let flag_end = text.find(',').ok_or(ScramError::Malformed("no gs2 header"))?;
    let flag = match &text[..flag_end] {
        "n" => Gs2Flag::NotSupported,
        "y" => Gs2Flag::NotOffered,
        "p=tls-server-end-point" => Gs2Flag::TlsServerEndPoint,
        flag if flag.starts_with("p=") => return Err(ScramError::ChannelBinding("unsupported type")),
        _ => return Err(ScramError::Malformed("bad channel binding flag")),
    };
    let authzid_end = text[flag_end + 1..].find(',').ok_or(ScramError::Malformed("no gs2 header"))?;
    let header_len = flag_end + 1 + authzid_end + 1;
    Ok((flag, &text[..header_len], &text[header_len..]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(client_password: &str, server_password: &str) -> Result<(), ScramError> {
        let client = ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        run(client, "SCRAM-SHA-256", ScramServer::new(), server_password)
    }

    fn run(
        mut client: ScramSha256,
        mechanism: &str,
        mut server: ScramServer,
        server_password: &str,
    ) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_secret(&Secret::new(server_password)).unwrap();
        let server_first = server.client_first(mechanism, client.message(), &verifier)?;
        client.update(server_first.as_bytes()).unwrap();
        let (server_final, _) = server.client_final(client.message(), &verifier)?;
        client.finish(server_final.as_bytes()).map_err(|_| ScramError::BadProof)
    }

    /// A client logs in with its password; pgnear then logs in to a server
    /// holding the same stored secret with the client key alone.
    #[test]
    fn passthrough_logs_in_with_the_client_key_alone() {
        let stored = postgres_protocol::password::scram_sha_256(b"s3cret");
        let verifier = ScramVerifier::from_secret(&Secret::new(stored.clone())).unwrap();
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let mut pgnear = ScramServer::new();
        let first = pgnear.client_first("SCRAM-SHA-256", client.message(), &verifier).unwrap();
        client.update(first.as_bytes()).unwrap();
        let (_, client_key) = pgnear.client_final(client.message(), &verifier).unwrap();
        let keys = std::sync::Arc::new(verifier.keys(client_key));
        // The server: the same secret, as pg_authid keeps it.
        for (binding, tls) in [(None, false), (None, true), (Some(vec![9u8; 32]), true)] {
            let mut server = match &binding {
                Some(data) => ScramServer::with_channel_binding(data.clone()),
                None => ScramServer::new(),
            };
            let mut passthrough = ScramClient::new(keys.clone(), binding.clone(), tls);
            let first = passthrough.client_first();
            let server_first =
                server.client_first(passthrough.mechanism(), first.as_bytes(), &verifier).unwrap();
            let last = passthrough.server_first(server_first.as_bytes()).unwrap();
            let (server_final, _) = server.client_final(last.as_bytes(), &verifier).unwrap();
            passthrough.server_final(server_final.as_bytes()).unwrap();
        }
        // A server whose secret was set anew (another salt) is told apart.
        let other =
            ScramVerifier::from_secret(&Secret::new(postgres_protocol::password::scram_sha_256(b"s3cret")))
                .unwrap();
        let mut server = ScramServer::new();
        let mut passthrough = ScramClient::new(keys.clone(), None, false);
        let server_first =
            server.client_first("SCRAM-SHA-256", passthrough.client_first().as_bytes(), &other).unwrap();
        assert_eq!(passthrough.server_first(server_first.as_bytes()), Err(ScramError::SecretMismatch));
        // A forged server-final is refused.
        let mut passthrough = ScramClient::new(keys, None, false);
        let mut server = ScramServer::new();
        let server_first =
            server.client_first("SCRAM-SHA-256", passthrough.client_first().as_bytes(), &verifier).unwrap();
        passthrough.server_first(server_first.as_bytes()).unwrap();
        assert_eq!(passthrough.server_final(b"v=AAAA"), Err(ScramError::BadServerSignature));
    }

    #[test]
    fn libpq_style_client_authenticates() {
        exchange("correct horse", "correct horse").unwrap();
    }

    #[test]
    fn wrong_password_is_refused() {
        assert_eq!(exchange("wrong", "correct horse"), Err(ScramError::BadProof));
    }

    #[test]
    fn stored_verifier_works() {
        let stored = postgres_protocol::password::scram_sha_256(b"pw");
        exchange("pw", &stored).unwrap();
    }

    #[test]
    fn malformed_and_out_of_order_messages_are_refused() {
        let verifier = ScramVerifier::from_secret(&Secret::new("pw")).unwrap();
        let mut server = ScramServer::new();
        assert!(server.client_final(b"c=biws,r=x,p=AAAA", &verifier).is_err());
        for bad in [&b"garbage"[..], b"n,,", b"x,,n=,r=abc", b"\xff\xfe"] {
            let mut server = ScramServer::new();
            assert!(server.client_first("SCRAM-SHA-256", bad, &verifier).is_err(), "{bad:?}");
        }
        let mut server = ScramServer::new();
        assert!(matches!(
            server.client_first("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", &verifier),
            Err(ScramError::ChannelBinding(_))
        ));
        let mut server = ScramServer::new();
        assert_eq!(
            server.client_first("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc", &verifier),
            Err(ScramError::Malformed("unsupported SASL mechanism"))
        );
        let mut server = ScramServer::new();
        server.client_first("SCRAM-SHA-256", b"n,,n=,r=abc", &verifier).unwrap();
        assert_eq!(
            server.client_final(b"c=biws,r=wrongnonce,p=AAAA", &verifier),
            Err(ScramError::Malformed("nonce does not match"))
        );
    }

    #[test]
    fn channel_binding_with_tls_server_end_point() {
        let end_point = vec![7u8; 32];
        let server = ScramServer::with_channel_binding(end_point.clone());
        assert_eq!(server.mechanisms(), ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(end_point.clone()));
        run(client, "SCRAM-SHA-256-PLUS", server, "pw").unwrap();
        // A client that binds to another certificate (a man in the middle).
        let client = ScramSha256::new(b"pw", ChannelBinding::tls_server_end_point(vec![8u8; 32]));
        let server = ScramServer::with_channel_binding(end_point.clone());
        assert_eq!(
            run(client, "SCRAM-SHA-256-PLUS", server, "pw"),
            Err(ScramError::Malformed("channel binding data does not match"))
        );
    }

    #[test]
    fn clients_without_channel_binding_still_authenticate_over_tls() {
        // libpq with channel_binding=disable, or a driver without it.
        let client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        run(client, "SCRAM-SHA-256", ScramServer::with_channel_binding(vec![1; 32]), "pw").unwrap();
        // Without TLS, "y" (supported by the client, not offered) is fine.
        let client = ScramSha256::new(b"pw", ChannelBinding::unrequested());
        run(client, "SCRAM-SHA-256", ScramServer::new(), "pw").unwrap();
    }

    #[test]
    fn a_stripped_plus_offer_is_detected() {
        // "y" while the server did offer PLUS: someone removed it in transit.
        let client = ScramSha256::new(b"pw", ChannelBinding::unrequested());
        assert!(matches!(
            run(client, "SCRAM-SHA-256", ScramServer::with_channel_binding(vec![1; 32]), "pw"),
            Err(ScramError::ChannelBinding(_))
        ));
    }
}
