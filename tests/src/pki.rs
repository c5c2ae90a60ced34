//! A throwaway PKI for the stub apiservers.
//!
//! Real clients (curl, kubectl, apilb's own TLS health probe) verify the
//! apiserver's certificate, so the end-to-end tests need certificates that a
//! real client accepts both when it dials a master directly and when it dials
//! the VIP through the load balancer. [`Pki::generate`] makes a CA and, for
//! every master, a server certificate carrying the master's address, every
//! extra address (the VIP) and the usual in-cluster names as SANs, and writes
//! them as PEM files that the stub apiserver and the clients read.
//!
//! Everything panics with context on failure: this is test-harness code.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// DNS names every master certificate carries, like kube-apiserver's own.
const DNS_SANS: [&str; 3] = ["kubernetes", "kubernetes.default", "localhost"];

/// The files of a generated PKI: `ca.pem`, and `<name>.crt` / `<name>.key` per master.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The directory holding every file.
    pub dir: PathBuf,
    /// The CA certificate (PEM) that clients trust.
    pub ca_pem: PathBuf,
}

impl Pki {
    /// Makes a CA and one server certificate per master in `dir` (created if missing).
    ///
    /// Each master's certificate carries its own address, every address in
    /// `extra_sans` (the VIP) and the DNS names `kubernetes`,
    /// `kubernetes.default` and `localhost`.
    pub fn generate(dir: &Path, masters: &[(String, IpAddr)], extra_sans: &[IpAddr]) -> Pki {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("creating PKI directory {}: {e}", dir.display()));

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "apilb test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA certificate");

        let ca_pem = dir.join("ca.pem");
        write(&ca_pem, &ca.pem());
        let pki = Pki {
            dir: dir.to_owned(),
            ca_pem,
        };

        for (name, addr) in masters {
            let mut params = CertificateParams::new(Vec::<String>::new())
                .unwrap_or_else(|e| panic!("certificate parameters for {name}: {e}"));
            params.distinguished_name.push(DnType::CommonName, name);
            params.subject_alt_names = std::iter::once(*addr)
                .chain(extra_sans.iter().copied())
                .map(SanType::IpAddress)
                .chain(DNS_SANS.iter().map(|dns| {
                    SanType::DnsName(
                        (*dns)
                            .try_into()
                            .unwrap_or_else(|e| panic!("DNS SAN {dns}: {e}")),
                    )
                }))
                .collect();
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let key = KeyPair::generate().unwrap_or_else(|e| panic!("key for {name}: {e}"));
            let cert = params
                .signed_by(&key, &ca)
                .unwrap_or_else(|e| panic!("certificate for {name}: {e}"));
            let (crt_path, key_path) = pki.cert(name);
            write(&crt_path, &cert.pem());
            write(&key_path, &key.serialize_pem());
        }
        pki
    }

    /// The certificate and key paths (`<name>.crt`, `<name>.key`) of master `name`.
    pub fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        )
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
