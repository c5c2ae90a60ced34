//! From [`EtcdSettings`] to what the VIP tasks use, derived once: the client's connect
//! options with the TLS files loaded (so a missing or non-PEM file fails at start, not
//! in a task), the lease timing, and requests bounded in time whose errors name the
//! endpoints.

use std::{future::Future, path::Path, time::Duration};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use tokio::time::{Instant, timeout_at};

use super::{EtcdError, EtcdSettings, EtcdTls};

/// The least time an owner releases a VIP before its lease could expire.
const MIN_GUARD: Duration = Duration::from_millis(500);

/// What the VIP tasks share, derived once from the validated settings: client
/// options (with the TLS files loaded) and the lease's timing.
pub(super) struct Config {
    pub(super) settings: EtcdSettings,
    pub(super) options: ConnectOptions,
    /// The endpoints, comma-separated, for errors and logs.
    pub(super) endpoints: String,
    /// `lease_ttl` rounded up to whole seconds: what is asked of etcd.
    pub(super) ttl: Duration,
    pub(super) keepalive_every: Duration,
    pub(super) guard: Duration,
    pub(super) request_timeout: Duration,
}

impl Config {
    pub(super) fn new(settings: EtcdSettings) -> Result<Self, EtcdError> {
        let mut options = ConnectOptions::new().with_connect_timeout(settings.dial_timeout);
        if let Some(tls) = &settings.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let ttl = Duration::from_secs(
            settings.lease_ttl.as_secs() + u64::from(settings.lease_ttl.subsec_nanos() > 0),
        );
        Ok(Self {
            endpoints: settings.endpoints.join(","),
            options,
            ttl,
            keepalive_every: ttl / 3,
            guard: (ttl / 4).max(MIN_GUARD),
            request_timeout: settings.dial_timeout + ttl / 2,
            settings,
        })
    }

    pub(super) fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX)
    }

    /// The session is unusable for `what` reason.
    pub(super) fn session_error(&self, what: String) -> EtcdError {
        EtcdError::Session {
            endpoints: self.endpoints.clone(),
            what,
        }
    }

    /// `fut`, an etcd request, given the request timeout; its error names the
    /// endpoints and `op`.
    pub(super) async fn request<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        self.request_until(op, Instant::now() + self.request_timeout, fut)
            .await
    }

    /// `fut`, an etcd request, given until `until`.
    pub(super) async fn request_until<T>(
        &self,
        op: &'static str,
        until: Instant,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        let started = Instant::now();
        match timeout_at(until, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(EtcdError::Request {
                endpoints: self.endpoints.clone(),
                op,
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
                op,
                after: started.elapsed(),
            }),
        }
    }
}

/// Whether `endpoint` is one the client can dial (`crate::config` asks, so that a
/// bad one fails `apilb check`); the error is why not.
pub fn check_endpoint(endpoint: &str, tls: bool) -> Result<(), &'static str> {
    let bad = Err;
    let rest = if let Some(rest) = endpoint.strip_prefix("http://") {
        if tls {
            return bad("http:// with TLS settings; use https:// or no scheme");
        }
        rest
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        rest
    } else if endpoint.contains("://") {
        return bad("only http:// and https:// are supported");
    } else {
        endpoint
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.chars().any(char::is_whitespace) {
        return bad("expected host:port");
    }
    Ok(())
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    let bytes = std::fs::read(path).map_err(|source| EtcdError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(EtcdError::NotPem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    let ca = read_pem("ca_file", &tls.ca_file)?;
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = &tls.client_cert {
        let identity = Identity::from_pem(read_pem("cert_file", cert)?, read_pem("key_file", key)?);
        options = options.identity(identity);
    }
    Ok(options)
}
