//! A stand-in for kube-apiserver, for apilb's end-to-end tests and demo.
//!
//! It serves HTTPS (HTTP/1.1, rustls with the ring provider) and answers just
//! enough of the apiserver's API for load-balancer tests:
//!
//! - `GET /readyz`, `/livez`, `/healthz`: `200 ok`, or `500` while the file
//!   `<control-dir>/<endpoint>-fail` (e.g. `readyz-fail`) exists. The file is
//!   checked on every request, so a test flips an endpoint at runtime by
//!   creating or removing it.
//! - `GET /version`: version JSON that a real kubectl accepts.
//! - `GET /api/v1/namespaces/default/pods?watch=1`: a watch stream that emits
//!   one event line every 100 ms until the client goes away, so that a client
//!   notices a broken connection by a gap; without `watch`, a small `PodList`.
//! - With `--endpointslice FILE`: list and watch of the `default/kubernetes`
//!   `EndpointSlice`, from a file the test rewrites (`tests::sliceapi`), with
//!   resource versions, bookmarks, `410 Gone` and `403 Forbidden`.
//! - Anything else: 404.
//!
//! Every response carries `x-apiserver: <name>`, naming the master that served it.
//! At start it prints one line, `listening on <addr>`, to stderr; with port 0
//! the address is the one actually bound.
//!
//! With `--plain-http` it also answers plain HTTP on the same port, telling the two
//! apart by the first byte a client sends (a TLS record starts with 22, a request
//! with a letter). The soak needs thousands of new connections a second through
//! the VIP, more TLS handshakes than two vCPUs can do, while the load balancer
//! under test, working on TCP, neither sees nor cares which it carries.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Channel, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;

const VERSION_JSON: &str = r#"{"major":"1","minor":"30","gitVersion":"v1.30.0-apilb-stub","gitCommit":"0000000000000000000000000000000000000000","gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go1.22.0","compiler":"gc","platform":"linux/amd64"}"#;
const PODS_PATH: &str = "/api/v1/namespaces/default/pods";
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

type Body = BoxBody<Bytes, Infallible>;

/// A stub kube-apiserver over HTTPS.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound one is logged).
    #[arg(long)]
    listen: SocketAddr,
    /// Master name, sent back in the `x-apiserver` header.
    #[arg(long)]
    name: String,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Server private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Directory where `<readyz|livez|healthz>-fail` files make that endpoint fail.
    #[arg(long)]
    control_dir: PathBuf,
    /// Also serve plain HTTP on the same port (see the module docs).
    #[arg(long)]
    plain_http: bool,
    /// Serve the `EndpointSlice` API from this file (`tests::endpointslice`).
    #[arg(long)]
    endpointslice: Option<PathBuf>,
}

/// The first byte of a TLS record carrying a handshake (a `ClientHello`).
const TLS_HANDSHAKE: u8 = 22;

struct State {
    name: HeaderValue,
    control_dir: PathBuf,
    endpointslice: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = TlsAcceptor::from(Arc::new(server_config(&args)?));
    let state = Arc::new(State {
        name: HeaderValue::from_str(&args.name).context("--name is not a valid header value")?,
        control_dir: args.control_dir,
        endpointslice: args.endpointslice,
    });
    let listener = listen(args.listen).with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "stub-apiserver {}: listening on {}",
        args.name,
        listener.local_addr()?
    );

    loop {
        let (tcp, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let state = Arc::clone(&state);
        let plain_http = args.plain_http;
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move {
                    let mut resp = handle(&req, &state);
                    resp.headers_mut().insert("x-apiserver", state.name.clone());
                    Ok::<_, Infallible>(resp)
                }
            });
            let http = hyper::server::conn::http1::Builder::new();
            if plain_http {
                let mut first = [0u8; 1];
                if !matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == TLS_HANDSHAKE) {
                    let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                    return;
                }
            }
            // Failed handshakes (probes without TLS, untrusting clients) are normal here.
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// A listener on `addr` whose accept queue is as long as the kernel allows
/// (`net.core.somaxconn`), as Go's `net.Listen`, and so kube-apiserver, asks for;
/// tokio's `TcpListener::bind` asks for 1024, which a burst of thousands of new
/// connections a second overflows.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4096);
    socket.listen(backlog)
}

fn server_config(args: &Args) -> anyhow::Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(&args.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading certificates from {}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .with_context(|| format!("reading private key from {}", args.key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("server certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn handle(req: &Request<Incoming>, state: &State) -> Response<Body> {
    if req.method() != Method::GET {
        return not_found();
    }
    match req.uri().path() {
        path @ ("/readyz" | "/livez" | "/healthz") => health(&path[1..], state),
        "/version" => respond(StatusCode::OK, "application/json", VERSION_JSON),
        tests::sliceapi::PATH => match &state.endpointslice {
            Some(file) => tests::sliceapi::serve(file, req.uri().query()),
            None => not_found(),
        },
        PODS_PATH if is_watch(req.uri().query()) => watch(),
        PODS_PATH => respond(
            StatusCode::OK,
            "application/json",
            r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":[{"metadata":{"name":"stub","namespace":"default","resourceVersion":"1"}}]}"#,
        ),
        _ => not_found(),
    }
}

/// `endpoint` is `readyz`, `livez` or `healthz`.
fn health(endpoint: &str, state: &State) -> Response<Body> {
    if state.control_dir.join(format!("{endpoint}-fail")).exists() {
        respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("[-]stub failed: reason withheld\n{endpoint} check failed\n"),
        )
    } else {
        respond(StatusCode::OK, "text/plain; charset=utf-8", "ok")
    }
}

fn is_watch(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=1" | "watch=true"))
    })
}

/// A chunked response with one watch event per [`WATCH_INTERVAL`], until the
/// client disconnects (hyper then drops the body and the send fails).
fn watch() -> Response<Body> {
    let (mut tx, body) = Channel::<Bytes>::new(1);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for rv in 1u64.. {
            tick.tick().await;
            let event = format!(
                r#"{{"type":"MODIFIED","object":{{"kind":"Pod","apiVersion":"v1","metadata":{{"name":"stub","namespace":"default","resourceVersion":"{rv}"}}}}}}"#
            ) + "\n";
            if tx.send_data(Bytes::from(event)).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(body.boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n",
    )
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
