//! The client half of the admin endpoint: `apilb status` runs in a process of its
//! own, so it reads a running apilb's state the way an operator's tools would, with
//! one `GET /status` to the endpoint that [`super::server`] serves.

use std::{error::Error as StdError, io, net::SocketAddr, pin::pin, time::Duration};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::{
    Request, StatusCode,
    body::Bytes,
    header::{CONNECTION, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::status::Snapshot;

/// How long [`fetch_status`] waits for the whole exchange.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest `/status` body [`fetch_status`] accepts.
const MAX_STATUS_BYTES: usize = 16 << 20;

/// Errors of [`fetch_status`]: the endpoint could not be reached, or answered
/// something other than a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the admin endpoint at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HTTP exchange with the admin endpoint at {addr} failed")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the admin endpoint at {addr} answered GET /status with {status}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
    #[error("cannot read the /status body from {addr}")]
    Body {
        addr: SocketAddr,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("cannot decode the /status JSON from {addr}")]
    Json {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
    #[error("the admin endpoint at {addr} did not answer within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
}

/// `GET /status` from the apilb whose admin endpoint is at `addr`, within
/// [`FETCH_TIMEOUT`]. This is what `apilb status` shows.
pub async fn fetch_status(addr: SocketAddr) -> Result<Snapshot, ClientError> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch(addr))
        .await
        .unwrap_or(Err(ClientError::Timeout {
            addr,
            after: FETCH_TIMEOUT,
        }))
}

async fn fetch(addr: SocketAddr) -> Result<Snapshot, ClientError> {
    let http = move |source| ClientError::Http { addr, source };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(http)?;
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = hyper::Uri::from_static("/status");
    let host =
        HeaderValue::from_str(&addr.to_string()).expect("a socket address is a valid header");
    request.headers_mut().insert(HOST, host);
    // One request: let the server close the connection once it has answered.
    request
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));

    let mut exchange = pin!(async move {
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status() != StatusCode::OK {
            return Err(ClientError::Status {
                addr,
                status: response.status(),
            });
        }
        let bytes = Limited::new(response.into_body(), MAX_STATUS_BYTES)
            .collect()
            .await
            .map_err(|source| ClientError::Body { addr, source })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Json { addr, source })
    });
    // The connection future does the socket I/O: drive it here, together with the
    // exchange, so that nothing outlives the call.
    tokio::select! {
        biased;
        snapshot = &mut exchange => snapshot,
        ended = connection => match ended {
            // The server closed after answering: the exchange finishes from what
            // is buffered, or fails with hyper's own error.
            Ok(()) => exchange.await,
            Err(source) => Err(ClientError::Http { addr, source }),
        },
    }
}
