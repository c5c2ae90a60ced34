//! The admin HTTP server: the one window operators and Prometheus have into a
//! running apilb. It exists apart from the run loop so that answering a request
//! never waits on, or touches, the datapath: it reads only the [`Snapshot`] the run
//! loop publishes.
//!
//! It serves three read-only routes:
//!
//! - `GET /healthz`: `200 ok` while the run loop is alive. The run loop replaces
//!   the snapshot after every input it handles and on a one-second tick, so a
//!   snapshot older than [`STALE_AFTER`] means the loop is stuck: that is
//!   `503 stale`. Before the first snapshot (`taken_at == 0`) it is `503 starting`.
//! - `GET /status`: the snapshot as JSON; [`super::client::fetch_status`] reads it
//!   back.
//! - `GET /metrics`: the snapshot in the `OpenMetrics` text format (see
//!   [`super::metrics::render_metrics`] for the metric names).
//!
//! Any other path is `404`; any other method on a known path is `405`.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::pin,
    sync::{Arc, PoisonError, RwLockReadGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};

use super::metrics::{METRICS_CONTENT_TYPE, encode_metrics};
use crate::status::{SharedSnapshot, Snapshot};

/// A snapshot older than this makes `/healthz` answer `503`: the run loop
/// republishes far more often than this, so it has stopped.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// Connections served at once. Scrapers and `apilb status` need a handful; the cap
/// keeps a misbehaving local client from exhausting file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// A client must send its request head within this, so idle sockets don't pile up.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// On shutdown, in-flight requests get this long to finish before being dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Pause after a transient `accept` failure (e.g. out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Errors of the admin server: its listener could not be set up, or broke.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the admin listener to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the admin listener's local address")]
    LocalAddr(#[source] io::Error),
    #[error("the admin listener on {addr} failed")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds the admin listener, naming the address if that fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Serves `/healthz`, `/status` and `/metrics` from `snapshot` on `listener` until
/// `shutdown` completes.
///
/// On shutdown the listener is closed first (new connections are refused), then
/// open connections get a second to finish their request; none outlive
/// this function. Transient `accept` failures are logged and retried; only a
/// broken listener ends it early, with [`ServerError::Serve`].
pub async fn serve(
    listener: TcpListener,
    snapshot: SharedSnapshot,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(ServerError::LocalAddr)?;
    let mut shutdown = pin!(shutdown);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);

    let result = loop {
        // Reap finished connections so the set stays as small as the live ones.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore lives in this function and is never closed.
                Err(_closed) => break Ok(()),
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(%addr, error = %e, "admin: accept failed; retrying");
                    tokio::select! {
                        biased;
                        () = &mut shutdown => break Ok(()),
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
                Err(source) => break Err(ServerError::Serve { addr, source }),
            },
        };
        // Responses are one small write; don't let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let snapshot = Arc::clone(&snapshot);
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(&request, &snapshot, SystemTime::now());
            std::future::ready(Ok::<_, Infallible>(response))
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "admin: connection ended with an error");
            }
            drop(permit);
        });
    };

    // Refuse new connections at once, then let in-flight requests finish.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(%addr, "admin: connections still open after the grace period; dropping them");
    }
    // Abort whatever is left, and wait until it is gone.
    connections.shutdown().await;
    result
}

/// Whether an `accept` error is about one connection or a passing shortage,
/// rather than a broken listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The route a path names.
enum Route {
    Healthz,
    Status,
    Metrics,
}

/// Answers one request from the current snapshot.
fn respond<B>(
    request: &Request<B>,
    snapshot: &SharedSnapshot,
    now: SystemTime,
) -> Response<Full<Bytes>> {
    let route = match request.uri().path() {
        "/healthz" => Route::Healthz,
        "/status" => Route::Status,
        "/metrics" => Route::Metrics,
        _ => return text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    if request.method() != Method::GET {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let snapshot = read(snapshot);
    match route {
        Route::Healthz => {
            let (status, body) = health(&snapshot, now);
            text(status, body)
        }
        Route::Status => match serde_json::to_vec(&*snapshot) {
            Ok(json) => body(StatusCode::OK, "application/json", json.into()),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the snapshot: {e}\n"),
            ),
        },
        Route::Metrics => {
            // Copy, so that the run loop is not kept waiting while this encodes.
            let copy = snapshot.clone();
            drop(snapshot);
            metrics_response(copy)
        }
    }
}

fn metrics_response(snapshot: Snapshot) -> Response<Full<Bytes>> {
    match encode_metrics(snapshot) {
        Ok(metrics) => body(StatusCode::OK, METRICS_CONTENT_TYPE, metrics.into()),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics: {e}\n"),
        ),
    }
}

/// Reads the shared snapshot. A writer that panicked mid-way still left a whole
/// snapshot behind (it is replaced whole), so a poisoned lock is still readable.
fn read(snapshot: &SharedSnapshot) -> RwLockReadGuard<'_, Snapshot> {
    snapshot.read().unwrap_or_else(PoisonError::into_inner)
}

/// `/healthz`: alive while the run loop keeps publishing.
fn health(snapshot: &Snapshot, now: SystemTime) -> (StatusCode, String) {
    if snapshot.taken_at == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: no snapshot yet\n".to_owned(),
        );
    }
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // A snapshot from the future (the clock stepped back) counts as fresh.
    let age = now.saturating_sub(snapshot.taken_at);
    if age > STALE_AFTER.as_secs() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stale: the last snapshot is {age}s old\n"),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    body(status, "text/plain; charset=utf-8", message.into())
}

fn body(status: StatusCode, content_type: &'static str, bytes: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
