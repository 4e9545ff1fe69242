//! A certificate authority made at test time with rcgen, the server
//! certificates it signs, and TLS clients that trust it. Files are PEM in a
//! temporary directory that the `postgres` OS user can read, because the
//! lab runs PostgreSQL as that user when the tests run as root.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;

/// A test CA and the directory its files live in.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: TempDir,
    name: String,
}

/// A server certificate and key, as files.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    /// A new CA named `name`; its certificate is written to `<name>.crt`.
    pub fn new(name: &str) -> Ca {
        let dir = tempfile::Builder::new().prefix("pgnear-certs-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("pgnear test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca = Ca { issuer, dir, name: name.to_string() };
        ca.write(&format!("{name}.crt"), &ca.issuer.pem(), 0o644);
        ca
    }

    /// The CA certificate file: what `sslrootcert` names.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join(format!("{}.crt", self.name))
    }

    /// The CA certificate, parsed.
    pub fn root_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(self.root()).unwrap()
    }

    /// Signs a server certificate for `names` (DNS names or IP addresses)
    /// and writes `<file>.crt` and `<file>.key`.
    pub fn server(&self, file: &str, names: &[&str]) -> ServerCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ServerCert {
            cert: self.write(&format!("{file}.crt"), &cert.pem(), 0o644),
            key: self.write(&format!("{file}.key"), &key.serialize_pem(), 0o600),
        }
    }

    /// A TLS client config that trusts this CA only.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root_der()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// tokio-postgres TLS that trusts this CA.
    pub fn postgres_tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        tokio_postgres_rustls::MakeRustlsConnect::new(self.client_config())
    }

    /// Writes a file readable by PostgreSQL: owned by `postgres` when we
    /// are root, since it refuses a key that others could read.
    fn write(&self, file: &str, contents: &str, mode: u32) -> PathBuf {
        let path = self.dir.path().join(file);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        if is_root() {
            let status =
                std::process::Command::new("chown").arg("postgres:postgres").arg(&path).status().unwrap();
            assert!(status.success(), "chown of {} failed", path.display());
        }
        path
    }
}

fn is_root() -> bool {
    let output = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// TOML for a `[tls]` section serving `cert`.
pub fn tls_section(mode: &str, cert: &ServerCert) -> String {
    format!(
        "[tls]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    )
}

/// PostgreSQL settings that turn on TLS with `cert`.
pub fn server_ssl(
    builder: pgnear::lab::cluster::ClusterBuilder,
    cert: &ServerCert,
) -> pgnear::lab::cluster::ClusterBuilder {
    builder
        .setting("ssl", "on")
        .setting("ssl_cert_file", &cert.cert.display().to_string())
        .setting("ssl_key_file", &cert.key.display().to_string())
}
