//! The watch streams: TLS, through either VIP, each recording its master, its
//! events and how it ended.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::BodyExt as _;
pub use tests::traffic::connector;
use tests::{oneshot::EXCHANGE_LIMIT, traffic::request_to};
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
    let (master, resp) =
        request_to(connector, to, "/api/v1/namespaces/default/pods?watch=1").await?;
    Ok((master, resp.into_body()))
}
