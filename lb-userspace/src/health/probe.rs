//! One probe: connect to the backend, optionally TLS, optionally `GET path`, and
//! classify the outcome into a [`ProbeResult`].

use std::error::Error;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{HealthError, ProbeKind, ProbeResult, tls};

const USER_AGENT_VALUE: &str = concat!("apilb-health/", env!("CARGO_PKG_VERSION"));

/// A [`ProbeKind`] with everything a probe needs prepared.
pub(super) enum Target {
    Tcp,
    Http { path: String },
    Https { path: String, tls: tls::Client },
}

impl Target {
    pub(super) fn new(kind: &ProbeKind) -> Result<Self, HealthError> {
        Ok(match kind {
            ProbeKind::Tcp => Self::Tcp,
            ProbeKind::Http { path } => Self::Http { path: path.clone() },
            ProbeKind::Https { path, tls } => Self::Https {
                path: path.clone(),
                tls: tls::Client::new(tls)?,
            },
        })
    }
}

/// Whether `path` can be a probe's request target: an origin-form path, since the
/// probe always goes to the backend's own address and a full URL naming another
/// host makes no sense. (`crate::config` asks, so a bad path fails `apilb check`.)
pub fn is_request_path(path: &str) -> bool {
    path.starts_with('/')
        && path
            .parse::<hyper::http::uri::PathAndQuery>()
            .is_ok_and(|p| p.as_str() == path)
}

/// Runs one probe against `backend`, without a deadline: the caller applies the
/// timeout around the whole of it. A handshake not done after `resend` gets a
/// second connection racing it (see [`connect`]).
pub(super) async fn run(target: &Target, backend: SocketAddr, resend: Duration) -> ProbeResult {
    let tcp = match connect(backend, resend).await {
        Ok(tcp) => tcp,
        Err(e) => return classify(&e),
    };
    // Requests are one small write; don't let Nagle delay them.
    if let Err(e) = tcp.set_nodelay(true) {
        return accepted(classify(&e));
    }
    accepted(match target {
        Target::Tcp => ProbeResult::Ok,
        Target::Http { path } => get(tcp, path, &backend.to_string()).await,
        Target::Https { path, tls } => {
            match tls.connector().connect(tls.server_name(backend), tcp).await {
                Ok(stream) => get(stream, path, &tls.host(backend)).await,
                Err(e) => classify(&e),
            }
        }
    })
}

/// Connects to `backend`; if the handshake is not done after `resend`, a second
/// connection races the first and whichever finishes first (connected or
/// refused) decides. The kernel resends a lost SYN, or a SYN whose SYN-ACK was
/// lost, only after its initial RTO of 1 s, past a probe's budget: without the
/// race one lost packet on a lossy link would fail the probe. The loser is
/// dropped, so its socket closes.
async fn connect(backend: SocketAddr, resend: Duration) -> io::Result<TcpStream> {
    let mut first = pin!(TcpStream::connect(backend));
    tokio::select! {
        done = &mut first => return done,
        () = tokio::time::sleep(resend) => {}
    }
    let second = pin!(TcpStream::connect(backend));
    tokio::select! {
        done = first => done,
        done = second => done,
    }
}

/// The result of a probe whose connection the backend accepted: an I/O failure
/// after that is an answer of sorts (see [`ProbeResult::Broken`]), not silence.
fn accepted(result: ProbeResult) -> ProbeResult {
    match result {
        ProbeResult::Io(e) => ProbeResult::Broken(e),
        r => r,
    }
}

/// `GET path` over a fresh HTTP/1.1 connection; success is a 2xx status.
async fn get<S>(io: S, path: &str, host: &str) -> ProbeResult
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(parts) => parts,
        Err(e) => return classify(&e),
    };
    let request = Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, USER_AGENT_VALUE)
        // One request per connection: let the server close cleanly after answering.
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new());
    let request = match request {
        Ok(request) => request,
        Err(e) => return ProbeResult::Io(format!("building the request: {e}")),
    };
    let mut exchange = pin!(async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        // Read the (small) body so the server sees a complete exchange; the status
        // alone decides, so a broken body does not turn a 2xx into a failure.
        let mut body = response.into_body();
        while let Some(Ok(_)) = body.frame().await {}
        Ok::<StatusCode, hyper::Error>(status)
    });
    // The connection future does the socket I/O; drive it in this task, together
    // with the exchange, so that nothing outlives the probe.
    let first = tokio::select! {
        biased;
        status = &mut exchange => Some(status),
        conn = conn => match conn {
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        },
    };
    let status = match first {
        Some(status) => status,
        // The connection ended cleanly first: the response is already buffered, or
        // the exchange fails with hyper's own "closed before message completed".
        None => exchange.await,
    };
    match status {
        Ok(status) if status.is_success() => ProbeResult::Ok,
        Ok(status) => ProbeResult::HttpStatus(status.as_u16()),
        Err(e) => classify(&e),
    }
}

/// Maps an error chain to a reason. A TLS failure anywhere in the chain wins:
/// tokio-rustls reports it as an `io::Error` wrapping a `rustls::Error`, and a TLS
/// alert received after the handshake (a rejected client certificate under TLS 1.3)
/// surfaces inside hyper's error.
fn classify(err: &(dyn Error + 'static)) -> ProbeResult {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return ProbeResult::Tls(tls.to_string());
        }
        let io = e.downcast_ref::<io::Error>();
        match io.map(io::Error::kind) {
            Some(io::ErrorKind::ConnectionRefused) => return ProbeResult::Refused,
            Some(io::ErrorKind::TimedOut) => return ProbeResult::Timeout,
            _ => {}
        }
        // `io::Error::source` skips the error it wraps; look at that one too.
        current = match io.and_then(io::Error::get_ref) {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    ProbeResult::Io(chain(err))
}

/// "outer: cause: root cause", for an `Io` reason.
fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        current = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_finds_tls_inside_io() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(matches!(classify(&e), ProbeResult::Tls(m) if m.contains("UnknownIssuer")));
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(classify(&e), ProbeResult::Refused);
        let e = io::Error::other("boom");
        assert_eq!(classify(&e), ProbeResult::Io("boom".into()));
    }

    #[test]
    fn paths_must_be_origin_form() {
        assert!(is_request_path("/readyz"));
        assert!(is_request_path("/readyz?verbose"));
        for bad in ["readyz", "", "http://x/readyz", "/a b"] {
            assert!(!is_request_path(bad), "{bad:?} accepted");
        }
    }
}
