//! The health prober against real servers on loopback: TLS with certificates made
//! here by rcgen, a /readyz whose status the test flips, a listener that is stopped
//! (refused), one that never answers (timeout), and a plain TCP port.
//!
//! Every test probes every 100 ms (the lowest interval the prober must support)
//! with `jitter = 0`, so probe counts are exact, and counts the requests its server
//! saw to check them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lb_userspace::health::{
    Health, HealthError, HealthEvent, ProbeKind, ProbeResult, ProbeSpec, Prober, ProberHandle,
    TlsSpec, Trust,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(80);
/// Generous bound for any single state change: a handful of intervals.
const EVENT_DEADLINE: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------- files and PKI

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "apilb-health-{}-{test}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self(path)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `sans` (IP addresses or DNS names).
    fn issue(&self, sans: &[&str]) -> Leaf {
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "apilb test leaf");
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf { cert, key }
    }
}

struct Leaf {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Leaf {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.der().clone()]
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key.serialize_der()).into()
    }

    /// Writes `NAME.crt` and `NAME.key`; returns their paths.
    fn write(&self, dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
        (
            dir.write(&format!("{name}.crt"), &self.cert.pem()),
            dir.write(&format!("{name}.key"), &self.key.serialize_pem()),
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_tls(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).expect("client CA");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    Arc::new(
        builder
            .with_single_cert(leaf.chain(), leaf.key_der())
            .expect("server certificate"),
    )
}

// ---------------------------------------------------------------- test servers

enum Mode {
    Https(Arc<ServerConfig>),
    Http,
    /// Accepts and holds connections, never reads or writes.
    Silent,
}

/// A loopback server on an ephemeral port. Its /readyz answers 200 while `ready`,
/// 500 otherwise. Dropping or stopping it aborts every task it started.
struct Server {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    /// HTTP requests served (any path).
    requests: Arc<AtomicU64>,
    /// The SNI of the last TLS handshake that completed.
    sni: Arc<Mutex<Option<String>>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let ready = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(AtomicU64::new(0));
        let sni = Arc::new(Mutex::new(None));
        let (r, q, s) = (Arc::clone(&ready), Arc::clone(&requests), Arc::clone(&sni));
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it drops (aborts) every connection task.
            let mut conns = JoinSet::new();
            let mut held = Vec::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                match &mode {
                    Mode::Silent => held.push(tcp),
                    Mode::Http => {
                        conns.spawn(serve(TokioIo::new(tcp), Arc::clone(&r), Arc::clone(&q)));
                    }
                    Mode::Https(config) => {
                        let acceptor = TlsAcceptor::from(Arc::clone(config));
                        let (r, q, s) = (Arc::clone(&r), Arc::clone(&q), Arc::clone(&s));
                        conns.spawn(async move {
                            // A failed handshake (e.g. no client cert) just ends here.
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            *s.lock().unwrap() = tls.get_ref().1.server_name().map(str::to_owned);
                            serve(TokioIo::new(tls), r, q).await;
                        });
                    }
                }
                while conns.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            ready,
            requests,
            sni,
            task: Some(task),
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn sni(&self) -> Option<String> {
        self.sni.lock().unwrap().clone()
    }

    /// Closes the listener and every connection; the port then refuses.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn serve<I>(io: I, ready: Arc<AtomicBool>, requests: Arc<AtomicU64>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        requests.fetch_add(1, Ordering::SeqCst);
        let status = match (req.uri().path(), ready.load(Ordering::SeqCst)) {
            ("/readyz", true) => StatusCode::OK,
            ("/readyz", false) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::NOT_FOUND,
        };
        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
        *response.status_mut() = status;
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

// ---------------------------------------------------------------- prober helpers

/// A spec, and the state its prober starts from.
fn spec(kind: ProbeKind, initial: Health) -> (ProbeSpec, Health) {
    let spec = ProbeSpec {
        kind,
        interval: INTERVAL,
        timeout: TIMEOUT,
        rise: 2,
        fall: 2,
        jitter: 0.0,
    };
    (spec, initial)
}

fn https(tls: TlsSpec) -> ProbeKind {
    ProbeKind::Https {
        path: "/readyz".into(),
        tls,
    }
}

fn trusting(ca_file: &Path) -> TlsSpec {
    TlsSpec {
        trust: Trust::CaFile(ca_file.to_path_buf()),
        server_name: None,
        client_cert: None,
    }
}

fn start(
    (spec, initial): (ProbeSpec, Health),
    backend: SocketAddr,
) -> (ProberHandle, mpsc::Receiver<HealthEvent>) {
    let prober = Prober::new(spec).unwrap_or_else(|e| panic!("Prober::new: {e}"));
    let (tx, rx) = mpsc::channel(16);
    (prober.spawn(backend, initial, tx), rx)
}

async fn next_event(rx: &mut mpsc::Receiver<HealthEvent>, waiting_for: &str) -> HealthEvent {
    tokio::time::timeout(EVENT_DEADLINE, rx.recv())
        .await
        .unwrap_or_else(|_| {
            panic!("no event within {EVENT_DEADLINE:?} while waiting for {waiting_for}")
        })
        .unwrap_or_else(|| panic!("prober stopped while waiting for {waiting_for}"))
}

fn assert_tls_failure(event: &HealthEvent, needle: &str) {
    match &event.reason {
        ProbeResult::Tls(message) => {
            assert!(
                message.contains(needle),
                "TLS reason {message:?} lacks {needle:?}"
            );
        }
        other => panic!("expected a TLS failure containing {needle:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn https_up_after_rise_probes_down_after_fall_500s_and_back() {
    let dir = TempDir::new("risefall");
    let ca = Ca::new("apilb test CA");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let server = Server::start(Mode::Https(server_tls(
        &ca.issue(&["127.0.0.1", "kubernetes.default"]),
        None,
    )))
    .await;
    let (handle, mut rx) = start(spec(https(trusting(&ca_file)), Health::Down), server.addr);

    let up = next_event(&mut rx, "up").await;
    assert_eq!(
        (up.backend, up.healthy, &up.reason),
        (server.addr, true, &ProbeResult::Ok)
    );
    assert_eq!((up.probes, up.transitions, up.failures.total()), (2, 1, 0));
    assert_eq!(server.requests(), 2, "up after exactly rise = 2 probes");
    assert!(
        up.latency > Duration::ZERO && up.latency < TIMEOUT,
        "latency {:?}",
        up.latency
    );

    server.set_ready(false);
    let flipped = Instant::now();
    let down = next_event(&mut rx, "not ready").await;
    assert_eq!(
        (down.health(), &down.reason),
        (Health::NotReady, &ProbeResult::HttpStatus(500))
    );
    assert_eq!(
        (down.probes, down.transitions, down.failures.http_status),
        (4, 2, 2)
    );
    assert_eq!(
        server.requests(),
        4,
        "down after exactly fall = 2 failed probes"
    );
    // Two probes 100 ms apart; the first at most one interval after the flip.
    assert!(
        flipped.elapsed() < Duration::from_millis(400),
        "took {:?}",
        flipped.elapsed()
    );

    server.set_ready(true);
    let back = next_event(&mut rx, "up again").await;
    assert_eq!((back.healthy, back.probes, back.transitions), (true, 6, 3));
    assert_eq!(server.requests(), 6);
    assert_eq!(handle.latest(), back);

    // Dropping the handle stops the probes.
    drop(handle);
    tokio::time::sleep(INTERVAL * 3).await;
    assert_eq!(server.requests(), 6, "probes after the handle was dropped");
}

#[tokio::test]
async fn stopped_server_goes_down_with_refused() {
    let dir = TempDir::new("refused");
    let ca = Ca::new("apilb test CA");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let mut server = Server::start(Mode::Https(server_tls(&ca.issue(&["127.0.0.1"]), None))).await;
    let (_handle, mut rx) = start(spec(https(trusting(&ca_file)), Health::Down), server.addr);
    assert!(next_event(&mut rx, "up").await.healthy);

    server.stop().await;
    let down = next_event(&mut rx, "down").await;
    assert_eq!(
        (down.health(), &down.reason),
        (Health::Down, &ProbeResult::Refused)
    );
    assert_eq!(
        (down.probes, down.failures.refused, down.failures.total()),
        (4, 2, 2)
    );
}

#[tokio::test]
async fn a_not_ready_server_goes_down_when_it_stops_answering() {
    let dir = TempDir::new("notready");
    let ca = Ca::new("apilb test CA");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let mut server = Server::start(Mode::Https(server_tls(&ca.issue(&["127.0.0.1"]), None))).await;
    let (_handle, mut rx) = start(spec(https(trusting(&ca_file)), Health::Ready), server.addr);
    server.set_ready(false);
    let not_ready = next_event(&mut rx, "not ready").await;
    assert_eq!(
        (not_ready.health(), not_ready.probes),
        (Health::NotReady, 2)
    );

    server.stop().await;
    let down = next_event(&mut rx, "down").await;
    assert_eq!(
        (down.health(), &down.reason, down.failures.refused),
        (Health::Down, &ProbeResult::Refused, 2),
        "down after fall = 2 unanswered probes"
    );
    assert_eq!((down.probes, down.transitions), (4, 2));
}

#[tokio::test]
async fn silent_server_goes_down_with_timeout() {
    let server = Server::start(Mode::Silent).await;
    let mut spec = spec(
        ProbeKind::Http {
            path: "/readyz".into(),
        },
        Health::Ready,
    );
    spec.0.timeout = Duration::from_millis(50);
    let (handle, mut rx) = start(spec, server.addr);

    let down = next_event(&mut rx, "down").await;
    assert_eq!(
        (down.health(), &down.reason),
        (Health::Down, &ProbeResult::Timeout)
    );
    assert_eq!(
        (down.probes, down.transitions, down.failures.timeout),
        (2, 1, 2)
    );
    assert!(
        // The upper bound leaves room for a loaded machine waking the task late.
        down.latency >= Duration::from_millis(50) && down.latency < Duration::from_millis(250),
        "a timed-out probe takes the timeout: {:?}",
        down.latency
    );
    assert_eq!(handle.latest(), down);
}

#[tokio::test]
async fn certificate_from_another_ca_is_a_tls_failure() {
    let dir = TempDir::new("wrongca");
    let ca = Ca::new("apilb test CA");
    let other = Ca::new("some other CA");
    let other_file = dir.write("other.crt", &other.pem());
    let server = Server::start(Mode::Https(server_tls(&ca.issue(&["127.0.0.1"]), None))).await;
    let (_handle, mut rx) = start(
        spec(https(trusting(&other_file)), Health::Ready),
        server.addr,
    );

    let down = next_event(&mut rx, "out of rotation").await;
    // A TLS failure is an answer: not ready, its connections kept; never down.
    assert_eq!(down.health(), Health::NotReady);
    assert_tls_failure(&down, "invalid peer certificate");
    assert_eq!((down.probes, down.failures.tls), (2, 2));
    assert_eq!(
        server.requests(),
        0,
        "no request over an unverified session"
    );
}

#[tokio::test]
async fn server_name_verifies_a_certificate_without_the_ip() {
    let dir = TempDir::new("sni");
    let ca = Ca::new("apilb test CA");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let server = Server::start(Mode::Https(server_tls(
        &ca.issue(&["kubernetes.default"]),
        None,
    )))
    .await;

    let named = TlsSpec {
        server_name: Some(ServerName::try_from("kubernetes.default").unwrap()),
        ..trusting(&ca_file)
    };
    let (_named, mut named_rx) = start(spec(https(named), Health::Down), server.addr);
    let up = next_event(&mut named_rx, "up with server_name").await;
    assert_eq!((up.healthy, up.probes), (true, 2));
    assert_eq!(
        server.sni().as_deref(),
        Some("kubernetes.default"),
        "SNI sent"
    );

    // Same server, no server_name: the certificate is checked for 127.0.0.1.
    let (_by_ip, mut by_ip_rx) = start(spec(https(trusting(&ca_file)), Health::Ready), server.addr);
    let down = next_event(&mut by_ip_rx, "down without server_name").await;
    assert!(!down.healthy);
    assert_tls_failure(&down, "not valid for name");
}

#[tokio::test]
async fn insecure_accepts_an_untrusted_certificate() {
    let stranger = Ca::new("nobody trusts me");
    let server = Server::start(Mode::Https(server_tls(
        &stranger.issue(&["elsewhere.example"]),
        None,
    )))
    .await;
    let insecure = TlsSpec {
        trust: Trust::AnyCertificate,
        server_name: None,
        client_cert: None,
    };
    let (_handle, mut rx) = start(spec(https(insecure), Health::Down), server.addr);

    let up = next_event(&mut rx, "up").await;
    assert_eq!((up.healthy, up.probes, up.failures.total()), (true, 2, 0));
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn client_certificate_is_required_and_presented() {
    let dir = TempDir::new("mtls");
    let ca = Ca::new("apilb test CA");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let client = ca.issue(&["apilb-health"]);
    let (cert, key) = client.write(&dir, "client");
    let server = Server::start(Mode::Https(server_tls(
        &ca.issue(&["127.0.0.1"]),
        Some(&ca),
    )))
    .await;

    let with_cert = TlsSpec {
        client_cert: Some((cert, key)),
        ..trusting(&ca_file)
    };
    let (_with, mut with_rx) = start(spec(https(with_cert), Health::Down), server.addr);
    let up = next_event(&mut with_rx, "up with a client certificate").await;
    assert_eq!((up.healthy, up.probes), (true, 2));
    assert_eq!(server.requests(), 2);

    let (_without, mut without_rx) =
        start(spec(https(trusting(&ca_file)), Health::Ready), server.addr);
    let down = next_event(&mut without_rx, "down without a client certificate").await;
    assert!(!down.healthy);
    // TLS 1.3: the client finishes its handshake first and reads the server's alert.
    assert_tls_failure(&down, "CertificateRequired");
}

#[tokio::test]
async fn http_probe_goes_down_on_non_2xx() {
    let server = Server::start(Mode::Http).await;
    let (_handle, mut rx) = start(
        spec(
            ProbeKind::Http {
                path: "/readyz".into(),
            },
            Health::Down,
        ),
        server.addr,
    );
    let up = next_event(&mut rx, "up").await;
    assert_eq!((up.healthy, up.probes), (true, 2));
    assert_eq!(server.requests(), 2);

    server.set_ready(false);
    let down = next_event(&mut rx, "down").await;
    assert_eq!(
        (down.healthy, &down.reason, down.probes),
        (false, &ProbeResult::HttpStatus(500), 4)
    );

    // A path the server does not serve is a failure too (404).
    let (_wrong, mut wrong_rx) = start(
        spec(
            ProbeKind::Http {
                path: "/nope".into(),
            },
            Health::Ready,
        ),
        server.addr,
    );
    assert_eq!(
        next_event(&mut wrong_rx, "down").await.reason,
        ProbeResult::HttpStatus(404)
    );
}

#[tokio::test]
async fn tcp_probe_follows_the_listener() {
    let mut server = Server::start(Mode::Silent).await;
    let (_handle, mut rx) = start(spec(ProbeKind::Tcp, Health::Down), server.addr);
    let up = next_event(&mut rx, "up").await;
    assert_eq!(
        (up.healthy, up.probes, &up.reason),
        (true, 2, &ProbeResult::Ok)
    );

    server.stop().await;
    let down = next_event(&mut rx, "down").await;
    assert_eq!(
        (down.healthy, &down.reason, down.probes),
        (false, &ProbeResult::Refused, 4)
    );
}

#[test]
fn bad_files_are_errors_naming_the_path() {
    let dir = TempDir::new("badfiles");
    let missing = dir.0.join("missing-ca.crt");
    let err = Prober::new(spec(https(trusting(&missing)), Health::Down).0).unwrap_err();
    assert!(
        matches!(&err, HealthError::ReadFile { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let garbage = dir.write("garbage.crt", "not a certificate\n");
    let err = Prober::new(spec(https(trusting(&garbage)), Health::Down).0).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("CA file {} holds no certificate", garbage.display())
    );

    let ca = Ca::new("apilb test CA");
    let ca_file = dir.write("ca.crt", &ca.pem());
    let (cert, _) = ca.issue(&["apilb-health"]).write(&dir, "client");
    let no_key = dir.0.join("client-missing.key");
    let tls = TlsSpec {
        client_cert: Some((cert, no_key.clone())),
        ..trusting(&ca_file)
    };
    let err = Prober::new(spec(https(tls), Health::Down).0).unwrap_err();
    assert!(
        err.to_string().contains(&no_key.display().to_string()),
        "{err}"
    );
}
