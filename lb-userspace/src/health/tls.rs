//! The `https` probe's TLS client: built once per spec from PEM files, so a bad
//! file fails at startup, naming the file, and probes never re-read it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use super::{HealthError, TlsSpec, Trust};

/// A ready TLS connector plus the name to verify.
pub(super) struct Client {
    connector: TlsConnector,
    /// `None`: verify the certificate for the backend's IP.
    server_name: Option<ServerName<'static>>,
}

impl Client {
    pub(super) fn new(spec: &TlsSpec) -> Result<Self, HealthError> {
        let config = client_config(spec)?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: spec.server_name.clone(),
        })
    }

    pub(super) fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    /// The name sent as SNI and verified: the configured one, else the backend's IP.
    pub(super) fn server_name(&self, backend: SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(backend.ip().into()))
    }

    /// The `Host` header: the configured server name, else the backend's address.
    pub(super) fn host(&self, backend: SocketAddr) -> String {
        match &self.server_name {
            Some(name) => name.to_str().into_owned(),
            None => backend.to_string(),
        }
    }
}

fn client_config(spec: &TlsSpec) -> Result<ClientConfig, HealthError> {
    // An explicit provider rather than the process default: nothing to install at
    // startup, and no ambiguity if another crate enables a second provider.
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(HealthError::TlsConfig)?;
    let builder = match &spec.trust {
        Trust::CaFile(ca) => builder.with_root_certificates(load_roots(ca)?),
        Trust::AnyCertificate => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert { provider })),
    };
    let mut config = match &spec.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs(cert, "client certificate")?;
            let key_der = load_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|source| HealthError::BadClientCert {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?
        }
    };
    // hyper speaks HTTP/1.1 here; say so, so that an h2-preferring server agrees.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, HealthError> {
    std::fs::read(path).map_err(|source| HealthError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, HealthError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| HealthError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(HealthError::NoPemItem {
            what,
            path: path.to_path_buf(),
            item: "certificate",
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, HealthError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "CA file")? {
        roots.add(cert).map_err(|source| HealthError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, HealthError> {
    let what = "client key";
    let pem = read(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => HealthError::NoPemItem {
            what,
            path: path.to_path_buf(),
            item: "private key",
        },
        source => HealthError::Pem {
            what,
            path: path.to_path_buf(),
            source,
        },
    })
}

/// `insecure = true`: accepts any certificate, yet still checks the handshake
/// signatures, so the session is at least bound to the key the server presented.
#[derive(Debug)]
struct AnyServerCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
