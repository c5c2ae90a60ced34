//! The watch streams: TLS, through either VIP, each recording its master, its
//! events and how it ended.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request as HttpRequest, body::Bytes, header::HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tests::oneshot::EXCHANGE_LIMIT;
use tokio_rustls::TlsConnector;

/// A watch stream silent this long is broken (the stub sends an event every
/// 100 ms; this leaves room for a loaded machine, not for a stalled flow).
const STREAM_SILENCE: Duration = Duration::from_secs(5);

/// One watch stream.
#[derive(Clone, Debug)]
pub struct Watch {
    pub to: Option<SocketAddr>,
    pub master: Option<String>,
    pub events: u64,
    pub last_event: Instant,
    pub max_gap: Duration,
    pub ended: Option<String>,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            to: None,
            master: None,
            events: 0,
            last_event: Instant::now(),
            max_gap: Duration::ZERO,
            ended: None,
        }
    }
}

impl Watch {
    pub fn broken(&self) -> bool {
        self.master.is_none() || self.ended.is_some() || self.max_gap > STREAM_SILENCE
    }
}

/// Watch stream `i` to `to`: its master, then every event, then how it ended.
pub async fn watch(
    connector: TlsConnector,
    to: SocketAddr,
    record: Arc<Mutex<Vec<Watch>>>,
    i: usize,
    opened: tokio::sync::oneshot::Sender<()>,
) {
    let update = |f: &dyn Fn(&mut Watch)| f(&mut record.lock().expect("lock")[i]);
    update(&|w| w.to = Some(to));
    let head = tokio::time::timeout(EXCHANGE_LIMIT, open_watch(&connector, to))
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let _ = opened.send(());
    let mut body = match head {
        Ok((master, body)) => {
            update(&|w| {
                w.master = Some(master.clone());
                w.last_event = Instant::now();
            });
            body
        }
        Err(e) => {
            update(&|w| w.ended = Some(e.clone()));
            return;
        }
    };
    let why = loop {
        match body.frame().await {
            Some(Ok(_)) => update(&|w| {
                let now = Instant::now();
                w.events += 1;
                w.max_gap = w.max_gap.max(now.duration_since(w.last_event));
                w.last_event = now;
            }),
            Some(Err(e)) => break format!("stream: {e}"),
            None => break "stream ended".to_owned(),
        }
    };
    update(&|w| w.ended = Some(why.clone()));
}

/// `GET` a watch over TLS to `to`: the master that answered, and the body.
async fn open_watch(
    connector: &TlsConnector,
    to: SocketAddr,
) -> Result<(String, hyper::body::Incoming), String> {
    let tcp = tokio::net::TcpStream::connect(to)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = connector
        .connect(ServerName::IpAddress(to.ip().into()), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    let req = HttpRequest::get("/api/v1/namespaces/default/pods?watch=1")
        .header(HOST, to.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("http status {}", resp.status()));
    }
    let master = resp
        .headers()
        .get("x-apiserver")
        .and_then(|v| v.to_str().ok())
        .ok_or("no x-apiserver header")?
        .to_owned();
    Ok((master, resp.into_body()))
}

pub fn connector(ca: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}
