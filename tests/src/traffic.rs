//! Client traffic through the VIP, as the scenarios and the demo measure it: a
//! steady stream of new https connections (kubectl, restarting kubelets) and
//! long-lived watch streams (running kubelets), each recording which master served
//! it and whether and when it failed.
//!
//! Everything runs on one thread that lives in the client namespace, so every
//! socket it opens is the client's. The stub apiserver emits a watch event every
//! 100 ms; a stream that errors, ends, or goes [`WATCH_GAP`] without an event is
//! broken. The load loop is bounded in time ([`MAX_RUN`]) and each attempt in time
//! ([`ATTEMPT_TIMEOUT`]).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request,
    body::{Bytes, Incoming},
    header::HOST,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{cluster::VIP, fixture::sa, netns};

/// Connect + TLS + response head of one attempt: long enough for two SYN
/// retransmits (sent 1 s and 3 s after the SYN), the client's own retries that a
/// packet-level balancer relies on when a master refuses or ignores a SYN.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// A watch stream silent this long is broken.
pub const WATCH_GAP: Duration = Duration::from_secs(1);
/// The traffic stops by itself after this long, whatever the test does.
pub const MAX_RUN: Duration = Duration::from_mins(3);

const WATCH_PATH: &str = "/api/v1/namespaces/default/pods?watch=1";

/// An attempt still unanswered this long counts as failed: a healthy one takes
/// milliseconds, and one this slow is what a user sees as a hang.
pub const SLOW: Duration = Duration::from_millis(500);

/// One new connection: when it started and which master answered, or why not
/// (`None` while in flight).
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub result: Option<Result<String, String>>,
    /// How long it took to get its answer or its error.
    pub took: Option<Duration>,
}

impl Attempt {
    /// The master that answered, if one did.
    #[must_use]
    pub fn master(&self) -> Option<&str> {
        match &self.result {
            Some(Ok(m)) => Some(m),
            _ => None,
        }
    }

    /// Failed, or still in flight after [`SLOW`], as of `now`.
    #[must_use]
    pub fn failed(&self, now: Instant) -> bool {
        match &self.result {
            Some(r) => r.is_err(),
            None => now.duration_since(self.at) > SLOW,
        }
    }
}

/// One watch stream.
#[derive(Clone, Debug)]
pub struct Watch {
    /// The master serving it (its `x-apiserver` header), once the response came.
    pub master: Option<String>,
    pub events: u64,
    pub last_event: Instant,
    /// The longest silence between two events so far.
    pub max_gap: Duration,
    /// When and why it ended, for a stream that errored or ended.
    pub ended: Option<(Instant, String)>,
}

impl Watch {
    /// Whether the stream is broken as of `now`: ended, or silent too long at any
    /// time, now included.
    #[must_use]
    pub fn broken(&self, now: Instant) -> bool {
        self.broken_after(now, WATCH_GAP)
    }

    /// [`Watch::broken`] with another silence limit.
    #[must_use]
    pub fn broken_after(&self, now: Instant, gap: Duration) -> bool {
        self.ended.is_some() || self.max_gap > gap || now.duration_since(self.last_event) > gap
    }
}

/// What the traffic saw, up to `taken`.
#[derive(Clone, Debug)]
pub struct Record {
    pub attempts: Vec<Attempt>,
    pub watches: Vec<Watch>,
    pub taken: Instant,
}

impl Record {
    /// A master that `joined` (first served a new connection then) beside three
    /// others: it took 18-32 % of the new connections since, none failed (at
    /// least 400 to judge by), no stream broke, and every stream kept receiving
    /// events after it joined. Returns a line of the numbers, for the test's log.
    ///
    /// # Panics
    /// If any of that does not hold.
    #[must_use]
    pub fn assert_joined(&self, master: &str, joined: Instant) -> String {
        let (by, failed) = self.spread_since(joined);
        let total: usize = by.values().sum();
        let share = by.get(master).copied().unwrap_or(0) as f64 / total as f64;
        let broken = self.broken_watches();
        let line = format!(
            "then {total} new connections: {by:?} ({master} {:.1} %); {failed} failed; broken \
             streams {broken:?}; streams per master {:?}",
            share * 100.0,
            self.watches_per_master()
        );
        assert_eq!(failed, 0, "{line}");
        assert!(total >= 400, "enough connections to judge: {line}");
        assert!(
            (0.18..=0.32).contains(&share),
            "{master} got {share:.3}: {line}"
        );
        assert!(broken.is_empty(), "{line}");
        assert!(
            self.watches.iter().all(|w| w.last_event > joined),
            "every stream kept receiving events after {master} joined: {line}"
        );
        line
    }

    /// How many streams `master` serves.
    #[must_use]
    pub fn watches_on(&self, master: &str) -> usize {
        self.watches_per_master().get(master).copied().unwrap_or(0)
    }

    /// Attempts started at or after `t`.
    pub fn since(&self, t: Instant) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(move |a| a.at >= t)
    }

    /// Per master, the attempts since `t` it answered; and how many failed (in
    /// flight for [`SLOW`] included).
    #[must_use]
    pub fn spread_since(&self, t: Instant) -> (BTreeMap<String, usize>, usize) {
        let mut by = BTreeMap::new();
        let mut failed = 0;
        for a in self.since(t) {
            if let Some(m) = a.master() {
                *by.entry(m.to_owned()).or_insert(0) += 1;
            } else if a.failed(self.taken) {
                failed += 1;
            }
        }
        (by, failed)
    }

    /// Attempts since `t` that ended in an error (a timeout included): what a
    /// client saw fail, however slow the ones that succeeded were.
    #[must_use]
    pub fn errors_since(&self, t: Instant) -> Vec<&Attempt> {
        self.since(t)
            .filter(|a| matches!(a.result, Some(Err(_))))
            .collect()
    }

    /// Attempts since `t` that succeeded but took longer than [`SLOW`] (a SYN
    /// retransmit, typically), with how long each took.
    #[must_use]
    pub fn delayed_since(&self, t: Instant) -> Vec<(Instant, Duration)> {
        self.since(t)
            .filter(|a| a.master().is_some())
            .filter_map(|a| a.took.filter(|d| *d > SLOW).map(|d| (a.at, d)))
            .collect()
    }

    /// The start of the latest failed attempt since `t`.
    #[must_use]
    pub fn last_failure_since(&self, t: Instant) -> Option<Instant> {
        self.since(t)
            .filter(|a| a.failed(self.taken))
            .map(|a| a.at)
            .max()
    }

    /// When, since `t`, `master` first answered a new connection.
    #[must_use]
    pub fn first_served_by(&self, master: &str, t: Instant) -> Option<Instant> {
        self.since(t)
            .filter(|a| a.master() == Some(master))
            .map(|a| a.at)
            .min()
    }

    /// When, since `t`, `master` last answered a new connection.
    #[must_use]
    pub fn last_served_by(&self, master: &str, t: Instant) -> Option<Instant> {
        self.since(t)
            .filter(|a| a.master() == Some(master))
            .map(|a| a.at)
            .max()
    }

    /// Streams broken by the time the record was taken, per master that served
    /// them (`?` for one that never got a response).
    #[must_use]
    pub fn broken_watches(&self) -> BTreeMap<String, usize> {
        self.broken_watches_after(WATCH_GAP)
    }

    /// [`Record::broken_watches`] with another silence limit.
    #[must_use]
    pub fn broken_watches_after(&self, gap: Duration) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for w in self
            .watches
            .iter()
            .filter(|w| w.broken_after(self.taken, gap))
        {
            *by.entry(w.master.clone().unwrap_or_else(|| "?".into()))
                .or_insert(0) += 1;
        }
        by
    }

    /// Streams per master that serves them.
    #[must_use]
    pub fn watches_per_master(&self) -> BTreeMap<String, usize> {
        let mut by = BTreeMap::new();
        for w in &self.watches {
            *by.entry(w.master.clone().unwrap_or_else(|| "?".into()))
                .or_insert(0) += 1;
        }
        by
    }
}

/// Traffic running in the background until stopped or dropped.
pub struct Traffic {
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Traffic {
    /// From the client namespace, open `watches` watch streams through the VIP and
    /// then start a new connection (`GET /version`) every `every` (none if `None`).
    /// Returns once every stream has its response head or failed.
    #[must_use]
    pub fn start(
        client: &netns::Netns,
        ca: &Path,
        watches: usize,
        every: Option<Duration>,
    ) -> Self {
        Self::start_patient(client, ca, watches, every, ATTEMPT_TIMEOUT)
    }

    /// [`Traffic::start`], each new connection given `patience` (rather than
    /// [`ATTEMPT_TIMEOUT`]) for its connect, TLS and response head.
    #[must_use]
    pub fn start_patient(
        client: &netns::Netns,
        ca: &Path,
        watches: usize,
        every: Option<Duration>,
        patience: Duration,
    ) -> Self {
        let connector = connector(ca);
        let record = Arc::new(Mutex::new(Record {
            attempts: Vec::new(),
            watches: Vec::new(),
            taken: Instant::now(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = client.name().to_owned();
        let (rec, halt) = (Arc::clone(&record), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let _inside = netns::enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(run(
                connector,
                rec,
                halt,
                watches,
                (every, patience),
                ready_tx,
            ));
        });
        if ready_rx.recv_timeout(ATTEMPT_TIMEOUT * 3).is_err() {
            stop.store(true, Ordering::Relaxed);
            panic!("the watch streams did not open");
        }
        Self {
            record,
            stop,
            thread: Some(thread),
        }
    }

    /// A copy of what was seen so far.
    #[must_use]
    pub fn record(&self) -> Record {
        let mut r = self.record.lock().expect("lock").clone();
        r.taken = Instant::now();
        r
    }

    /// Stop starting attempts, let those in flight finish, then close the streams;
    /// return the record as of just before the streams closed.
    pub fn stop(mut self) -> Record {
        self.halt();
        self.record.lock().expect("lock").clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A TLS client that trusts the test CA in `ca`.
#[must_use]
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

async fn run(
    connector: TlsConnector,
    record: Arc<Mutex<Record>>,
    stop: Arc<AtomicBool>,
    watches: usize,
    (every, patience): (Option<Duration>, Duration),
    ready: std::sync::mpsc::Sender<()>,
) {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut attempts = tokio::task::JoinSet::new();
    let mut opened = tokio::task::JoinSet::new();
    for i in 0..watches {
        record.lock().expect("lock").watches.push(Watch {
            master: None,
            events: 0,
            last_event: Instant::now(),
            max_gap: Duration::ZERO,
            ended: None,
        });
        let (c, r) = (connector.clone(), Arc::clone(&record));
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tasks.spawn(watch(c, r, i, head_tx));
        opened.spawn(head_rx);
    }
    opened.join_all().await;
    let _ = ready.send(());
    let mut tick = every.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
        if let Some(tick) = &mut tick {
            tick.tick().await;
            let (c, r) = (connector.clone(), Arc::clone(&record));
            let i = {
                let mut rec = r.lock().expect("lock");
                rec.attempts.push(Attempt {
                    at: Instant::now(),
                    result: None,
                    took: None,
                });
                rec.attempts.len() - 1
            };
            attempts.spawn(async move {
                let result = tokio::time::timeout(patience, request(&c, "/version"))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                    .map(|(master, _)| master);
                let a = &mut r.lock().expect("lock").attempts[i];
                a.took = Some(a.at.elapsed());
                a.result = Some(result);
            });
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while attempts.try_join_next().is_some() {}
    }
    // Attempts in flight finish (each is bounded by its patience), so that the
    // record says how every one of them ended; then the streams close.
    let _ = tokio::time::timeout(patience * 2, attempts.join_all()).await;
    record.lock().expect("lock").taken = Instant::now();
    tasks.shutdown().await;
}

/// `GET path` to the VIP on a new connection: the master that answered, and the
/// response (whose body may still be streaming).
async fn request(
    connector: &TlsConnector,
    path: &str,
) -> Result<(String, hyper::Response<Incoming>), String> {
    request_to(connector, sa(VIP), path).await
}

/// `GET path` to `vip` over TLS on a new connection: the master that answered
/// (its `x-apiserver` header), and the response (whose body may still be
/// streaming).
pub async fn request_to(
    connector: &TlsConnector,
    vip: SocketAddr,
    path: &str,
) -> Result<(String, hyper::Response<Incoming>), String> {
    let tcp = TcpStream::connect(vip)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls = connector
        .connect(ServerName::IpAddress(vip.ip().into()), tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(HOST, vip.to_string())
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
    Ok((master, resp))
}

/// Watch stream `i`: record its master, then every event, then how it ended.
async fn watch(
    connector: TlsConnector,
    record: Arc<Mutex<Record>>,
    i: usize,
    head: tokio::sync::oneshot::Sender<()>,
) {
    let update = |f: &dyn Fn(&mut Watch)| f(&mut record.lock().expect("lock").watches[i]);
    let opened = tokio::time::timeout(ATTEMPT_TIMEOUT, request(&connector, WATCH_PATH))
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let _ = head.send(());
    let mut body = match opened {
        Ok((master, resp)) => {
            update(&|w| {
                w.master = Some(master.clone());
                w.last_event = Instant::now();
            });
            resp.into_body()
        }
        Err(e) => {
            update(&|w| w.ended = Some((Instant::now(), e.clone())));
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
    update(&|w| w.ended = Some((Instant::now(), why.clone())));
}
