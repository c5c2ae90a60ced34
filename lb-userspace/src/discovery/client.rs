//! The Kubernetes client of discovery: the credentials `[discovery]` names, aimed
//! at one master's own address rather than at the server the kubeconfig names.

use std::{net::SocketAddr, time::Duration};

use crate::config::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading the kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("reading the in-cluster credentials")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("the server {0:?} has no host to verify its certificate for")]
    NoHost(String),
    #[error("building the client for {master}")]
    Build {
        master: SocketAddr,
        #[source]
        source: kube::Error,
    },
}

/// How long to wait for a master to accept the connection: a dead master must
/// not hold discovery up for long, since another is tried next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest silence on an open watch before the client gives up on it; the
/// watcher asks the server to end each watch sooner (`WATCH_TIMEOUT_SECONDS`).
const READ_TIMEOUT: Duration = Duration::from_secs(75);
/// The server ends each watch after this long, and the watcher resumes it.
pub const WATCH_TIMEOUT_SECONDS: u32 = 55;

/// The credentials, with the server the kubeconfig or the pod's environment
/// names (whose host the certificate is verified for).
pub async fn base(credentials: &Credentials) -> Result<kube::Config, ClientError> {
    match credentials {
        Credentials::Kubeconfig(path) => {
            let err = |source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)
        }
        Credentials::InCluster => kube::Config::incluster().map_err(ClientError::InCluster),
    }
}

/// A client of `master` itself: TCP to its address, TLS verified for the host the
/// credentials name (the VIP, `kubernetes.default`, the service IP: every
/// apiserver's certificate carries them), unless they name a `tls-server-name`.
pub fn to_master(base: &kube::Config, master: SocketAddr) -> Result<kube::Client, ClientError> {
    let mut config = base.clone();
    let name = match &base.tls_server_name {
        Some(name) => name.clone(),
        None => base
            .cluster_url
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| ClientError::NoHost(base.cluster_url.to_string()))?,
    };
    config.cluster_url = format!("https://{master}")
        .parse()
        .expect("an address:port makes a URL");
    config.tls_server_name = Some(name);
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    kube::Client::try_from(config).map_err(|source| ClientError::Build { master, source })
}
