//! tls-server-end-point channel binding data (RFC 5929 section 4.1): a
//! hash of the server's DER certificate, made with the hash function of the
//! certificate's own signature algorithm, SHA-256 standing in for MD5 and
//! SHA-1. SCRAM-SHA-256-PLUS binds the authentication to it.
//!
//! Only the signature algorithm identifier is read, with a minimal DER
//! walk; a certificate whose algorithm names no hash (Ed25519, RSASSA-PSS)
//! gets no binding, as in PostgreSQL.

use sha2::{Digest, Sha256, Sha384, Sha512};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

const SEQUENCE: u8 = 0x30;
const OBJECT_IDENTIFIER: u8 = 0x06;

/// Signature algorithm OIDs (DER content bytes) and the hash to bind with.
const ALGORITHMS: &[(&[u8], Hash)] = &[
    // md5WithRSAEncryption, sha1WithRSAEncryption: SHA-256 by the RFC.
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], Hash::Sha256),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], Hash::Sha256),
    // sha256/384/512WithRSAEncryption.
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], Hash::Sha256),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], Hash::Sha384),
    (&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], Hash::Sha512),
    // ecdsa-with-SHA1, then ecdsa-with-SHA256/384/512.
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01], Hash::Sha256),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02], Hash::Sha256),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03], Hash::Sha384),
    (&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04], Hash::Sha512),
];

/// The channel binding data for a DER certificate, if its signature
/// algorithm allows one.
pub fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    Some(match signature_hash(cert)? {
        Hash::Sha256 => Sha256::digest(cert).to_vec(),
        Hash::Sha384 => Sha384::digest(cert).to_vec(),
        Hash::Sha512 => Sha512::digest(cert).to_vec(),
    })
}

/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, ... }`
/// and `AlgorithmIdentifier ::= SEQUENCE { algorithm OID, ... }`.
fn signature_hash(cert: &[u8]) -> Option<Hash> {
    let (certificate, _) = element(cert, SEQUENCE)?;
    let (_tbs, rest) = element(certificate, SEQUENCE)?;
    let (algorithm, _) = element(rest, SEQUENCE)?;
    let (oid, _) = element(algorithm, OBJECT_IDENTIFIER)?;
    ALGORITHMS.iter().find(|(known, _)| *known == oid).map(|&(_, hash)| hash)
}

/// Splits one DER element with tag `tag` off the front of `input`: its
/// contents and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    if found != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let width = usize::from(first & 0x7f);
        if width == 0 || width > 4 || rest.len() < width {
            return None;
        }
        let (bytes, rest) = rest.split_at(width);
        (bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)), rest)
    };
    (rest.len() >= length).then(|| rest.split_at(length))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    #[test]
    fn ecdsa_p256_certificates_bind_with_sha256() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()]).unwrap().self_signed(&key).unwrap();
        let der = cert.der();
        assert_eq!(signature_hash(der), Some(Hash::Sha256));
        assert_eq!(end_point(der).unwrap(), Sha256::digest(der).to_vec());
    }

    #[test]
    fn ecdsa_p384_certificates_bind_with_sha384() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(end_point(cert.der()).unwrap().len(), 48);
    }

    #[test]
    fn ed25519_and_garbage_get_no_binding() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".into()]).unwrap().self_signed(&key).unwrap();
        assert_eq!(end_point(cert.der()), None);
        for bad in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01", b"\x02\x01\x00"] {
            assert_eq!(end_point(bad), None, "{bad:?}");
        }
    }
}
