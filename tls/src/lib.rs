//! TLS settings shared by the queen (server), drones and the CLI (clients): PEM files in,
//! rustls configs out. Only TLS 1.2 and 1.3 with rustls' safe defaults; the ring provider.
//!
//! A crate of its own so that `shared`, the wire types, depends on no TLS code: a client
//! that only speaks the protocol or the API's JSON never builds rustls for it.
//!
//! Errors name the file and what was wrong with it, since they are read by an operator at
//! startup.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[cfg(feature = "test-pki")]
pub mod test_pki;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    File { path: PathBuf, detail: String },
    #[error("tls: {0}")]
    Config(String),
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| file_err(ca, e))?;
    }
    Ok(roots)
}

/// The server side: this certificate and key; with `client_ca`, every client must present
/// a certificate signed by it (mutual TLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| file_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_err(key, format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(config))
}

/// The client side: trusts only the CA in `ca` (not the system roots: the queen's CA is
/// the operator's own); with `identity` (cert, key), presents it for mutual TLS.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| file_err(key, format!("certificate and key do not match: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    #[test]
    fn a_bad_file_is_named_in_the_error() {
        let dir = dir();
        let missing = dir.path().join("missing.crt");
        let e = load_certs(&missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("missing.crt"), "{e}");

        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "").expect("write");
        let e = load_certs(&empty)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("empty.crt") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = client_config(&empty, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("empty.crt"), "{e}");
    }

    #[cfg(feature = "test-pki")]
    #[test]
    fn certificates_the_test_ca_issues_make_working_configs() {
        let dir = dir();
        let pki = test_pki::Pki::new(dir.path(), "unit");
        let (crt, key) = pki.issue("queen", &["localhost"], test_pki::Usage::ServerAuth);
        assert!(server_config(&crt, &key, Some(&pki.ca())).is_ok());
        assert!(client_config(&pki.ca(), None).is_ok());
        // A key that is not the certificate's is refused, naming the key file.
        let (_, other) = pki.issue("other", &["localhost"], test_pki::Usage::ServerAuth);
        let e = server_config(&crt, &other, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("other.key") && e.contains("do not match"), "{e}");
    }
}
