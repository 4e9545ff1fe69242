//! TLS through rustls with the ring provider: the acceptor toward clients
//! (`tls.mode`, certificate reloadable on SIGHUP) and one connector per
//! server node (`sslmode`, `sslrootcert`).
//!
//! `stream` is the connection type that is plain TCP or TLS, `verify` the
//! certificate checks behind libpq's sslmodes, and `end_point` the
//! tls-server-end-point channel binding hash of a certificate.

mod end_point;
mod split;
mod stream;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{Config, NodeConfig, SslMode, TlsConfig, TlsMode};
pub use end_point::end_point;
pub use split::{send_all, ReadHalf, Split, WriteHalf, WriteNow};
pub use stream::Stream;

/// The ALPN protocol name PostgreSQL 17 uses, and requires for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A certificate, key or root file that cannot be used. Each names the
/// config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}: {source}", .path.display())]
    Read { key: String, path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("{key}: {} holds no certificate", .path.display())]
    Empty { key: String, path: PathBuf },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// Everything TLS that sessions share toward clients, built at startup.
/// (Each node has its own [`Connector`] toward its server.)
#[derive(Debug)]
pub struct Tls {
    /// Toward clients; `None` with `tls.mode = "disable"`.
    pub acceptor: Option<Acceptor>,
}

impl Tls {
    /// Loads the certificate and key files the config names.
    pub fn load(config: &Config) -> Result<Tls, TlsError> {
        Ok(Tls { acceptor: Acceptor::load(&config.tls)? })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(key: &str) -> impl FnOnce(rustls::Error) -> TlsError + '_ {
    move |error| TlsError::Invalid { key: key.to_string(), message: error.to_string() }
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read { key: key.to_string(), path: path.to_path_buf(), source };
    let certs =
        CertificateDer::pem_file_iter(path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty { key: key.to_string(), path: path.to_path_buf() });
    }
    Ok(certs)
}

fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        key: key.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

fn roots(key: &str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots.add(cert).map_err(invalid(key))?;
    }
    Ok(Arc::new(roots))
}

// === impl Acceptor ===

/// Client-facing TLS: the mode and the current certificate.
#[derive(Debug)]
pub struct Acceptor {
    mode: TlsMode,
    cert: PathBuf,
    key: PathBuf,
    /// Replaced whole by [`Acceptor::reload`]; a handshake uses the one that
    /// was current when it started, so sessions never notice a reload.
    current: ArcSwap<Certified>,
}

/// One loaded certificate and key, ready for handshakes.
#[derive(Debug)]
pub struct Certified {
    config: Arc<ServerConfig>,
    /// tls-server-end-point channel binding data for SCRAM-SHA-256-PLUS;
    /// `None` when the certificate's signature names no usable hash.
    end_point: Option<Arc<[u8]>>,
}

impl Acceptor {
    /// `None` when client-facing TLS is disabled.
    pub fn load(tls: &TlsConfig) -> Result<Option<Acceptor>, TlsError> {
        if tls.mode == TlsMode::Disable {
            return Ok(None);
        }
        let missing =
            |key: &str| TlsError::Invalid { key: key.into(), message: "required by tls.mode".into() };
        let cert = tls.cert.clone().ok_or_else(|| missing("tls.cert"))?;
        let key = tls.key.clone().ok_or_else(|| missing("tls.key"))?;
        let current = ArcSwap::from_pointee(Certified::load(&cert, &key)?);
        Ok(Some(Acceptor { mode: tls.mode, cert, key, current }))
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Reads the certificate and key files again. On failure the previous
    /// certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(Arc::new(Certified::load(&self.cert, &self.key)?));
        Ok(())
    }

    fn current(&self) -> Arc<Certified> {
        self.current.load_full()
    }
}

impl Certified {
    fn load(cert: &Path, key: &Path) -> Result<Certified, TlsError> {
        let chain = certificates("tls.cert", cert)?;
        let end_point = end_point(&chain[0]).map(Arc::from);
        let private_key = private_key("tls.key", key)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("tls"))?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(invalid("tls.key"))?;
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Certified { config: Arc::new(config), end_point })
    }
}

// === impl Connector ===

/// Server-facing TLS for one node: its `sslmode` and the rustls config
/// that implements it.
#[derive(Debug, Clone)]
pub struct Connector {
    mode: SslMode,
    /// Built even for `disable`, so that [`Connector::postgres`] always has
    /// one to hand out; never used then.
    config: Arc<ClientConfig>,
    /// What verify-full checks the certificate against: the node's host.
    name: ServerName<'static>,
}

impl Connector {
    /// The connector for one `[[nodes]]` entry; `key` is its config path
    /// (`nodes[2]`), for error messages.
    ///
    /// As in libpq, `require` with an `sslrootcert` checks the chain like
    /// `verify-ca`; `prefer` and `require` without one encrypt but do not
    /// authenticate the server.
    pub fn for_node(node: &NodeConfig, key: &str) -> Result<Connector, TlsError> {
        // A Unix socket never carries TLS (validation allows only disable
        // and prefer there), and its host is a directory, not a name.
        let (mode, host) = match node.is_unix_socket() {
            true => (SslMode::Disable, "localhost"),
            false => (node.sslmode, node.host.as_str()),
        };
        let root_key = format!("{key}.sslrootcert");
        let needs_roots = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
        let roots = match &node.sslrootcert {
            Some(path) if mode != SslMode::Disable => Some(roots(&root_key, path)?),
            None if needs_roots => {
                return Err(TlsError::Invalid {
                    key: root_key,
                    message: "required by verify-ca and verify-full".into(),
                })
            }
            _ => None,
        };
        let name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::Invalid {
            key: format!("{key}.host"),
            message: format!("not a TLS server name: {e}"),
        })?;
        let config = client_config(mode, roots).map_err(invalid(&root_key))?;
        Ok(Connector { mode, config: Arc::new(config), name })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The TLS handshake on a connection whose SSLRequest the server
    /// answered with 'S'.
    pub async fn connect(&self, tcp: tokio::net::TcpStream) -> std::io::Result<Stream> {
        Stream::connect(tcp, self).await
    }

    /// The same policy for a tokio-postgres connection (the monitor and
    /// the catalog loader).
    pub fn postgres(&self) -> (tokio_postgres::config::SslMode, tokio_postgres_rustls::MakeRustlsConnect) {
        let mode = match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        };
        (mode, tokio_postgres_rustls::MakeRustlsConnect::new((*self.config).clone()))
    }
}

/// Connects tokio-postgres (the monitor, the catalog loader) to `node`
/// with its TLS policy, and spawns the connection. With `sslmode = prefer`
/// a TLS attempt that fails is made again in plain text, as libpq and
/// pgnear's own server connections do.
pub async fn connect_postgres(
    pg: &mut tokio_postgres::Config,
    node: &NodeConfig,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    use tokio_postgres::config::SslMode as PgSslMode;
    let (mode, tls) = postgres_connector(node);
    let (client, connection) = match pg.ssl_mode(mode).connect(tls.clone()).await {
        Err(error) if mode == PgSslMode::Prefer && refuses_tls(&error) => {
            pg.ssl_mode(PgSslMode::Disable).connect(tls).await?
        }
        connected => connected?,
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A failed handshake, or a login that pg_hba.conf refuses over TLS
/// (invalid_authorization_specification). tokio-postgres does not expose
/// its error kinds; the handshake's is known by its fixed text.
fn refuses_tls(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
        || error.to_string().starts_with("error performing TLS handshake")
}

/// A tokio-postgres TLS setup for `node`. Never fails: if the node's root
/// file cannot be read any more, TLS is still required and every server
/// certificate is refused with that reason, rather than falling back to
/// weaker checks.
pub fn postgres_connector(
    node: &NodeConfig,
) -> (tokio_postgres::config::SslMode, tokio_postgres_rustls::MakeRustlsConnect) {
    match Connector::for_node(node, &node.name) {
        Ok(connector) => connector.postgres(),
        Err(error) => {
            let verifier = Arc::new(verify::Refuse::new(error.to_string(), provider()));
            let config = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map(|b| b.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth());
            let config = config.unwrap_or_else(|_| unreachable!("ring supports the default versions"));
            (tokio_postgres::config::SslMode::Require, tokio_postgres_rustls::MakeRustlsConnect::new(config))
        }
    }
}

fn client_config(mode: SslMode, roots: Option<Arc<RootCertStore>>) -> Result<ClientConfig, rustls::Error> {
    let provider = provider();
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let mut config = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        (SslMode::VerifyCa | SslMode::Require, Some(roots)) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::ChainOnly::new(roots, provider)))
            .with_no_client_auth(),
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::Unverified::new(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(config)
}
