//! Test support (feature `test-pki`): a throwaway CA and the certificates it signs, as PEM
//! files in a directory, generated at run time with rcgen. Never used by the binaries.

use std::path::{Path, PathBuf};

pub use rcgen::ExtendedKeyUsagePurpose as Usage;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA (`<dir>/ca.crt`) and what it signs.
pub struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    /// A new CA named `name`, its files under `<parent>/<name>/`.
    ///
    /// # Panics
    /// If key generation or writing the files fails: this is test support.
    pub fn new(parent: &Path, name: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = params.self_signed(&ca_key).expect("self-sign the CA");
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).expect("create the PKI dir");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write the CA");
        Pki { dir, ca, ca_key }
    }

    /// The CA certificate's file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A file in this PKI's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Issues a certificate for `sans` (host names or IP addresses) for `usage`, written as
    /// `<name>.crt` and `<name>.key`; returns their paths.
    ///
    /// # Panics
    /// If signing or writing fails: this is test support.
    pub fn issue(&self, name: &str, sans: &[&str], usage: Usage) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("generate a key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign the certificate");
        let (crt, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).expect("write the certificate");
        std::fs::write(&k, key.serialize_pem()).expect("write the key");
        (crt, k)
    }
}
