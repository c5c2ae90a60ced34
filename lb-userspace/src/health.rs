//! Health probes: decide, per master, whether it may receive traffic.
//!
//! The datapath balances over whatever backends the maps list, so something has to
//! keep dead or not-ready apiservers out of the Maglev table. This module runs one
//! tokio task per backend that probes the master's own address (never the VIP),
//! turns raw probe results into a [`Health`] with rise/fall hysteresis, logs every
//! change with its reason, and reports it to the controller.
//!
//! # Use
//!
//! ```no_run
//! # async fn f() -> Result<(), lb_userspace::health::HealthError> {
//! use std::time::Duration;
//! use lb_userspace::health::{Health, ProbeKind, ProbeSpec, Prober, TlsSpec, Trust};
//!
//! // Specs come validated out of `crate::config`; built by hand here.
//! let spec = ProbeSpec {
//!     kind: ProbeKind::Https {
//!         path: "/readyz".into(),
//!         tls: TlsSpec {
//!             trust: Trust::CaFile("/etc/kubernetes/pki/ca.crt".into()),
//!             server_name: None,
//!             client_cert: None,
//!         },
//!     },
//!     interval: Duration::from_millis(500),
//!     timeout: Duration::from_millis(400),
//!     rise: 2,
//!     fall: 2,
//!     jitter: 0.1,
//! };
//! // Loads the PEM files once; a bad file is an error here.
//! let prober = Prober::new(spec)?;
//! let (tx, mut rx) = tokio::sync::mpsc::channel(64);
//! let handle = prober.spawn("192.168.19.160:6443".parse().unwrap(), Health::Down, tx);
//! while let Some(event) = rx.recv().await {
//!     println!("{} is now {}", event.backend, event.health());
//! }
//! drop(handle); // stops the task
//! # Ok(()) }
//! ```
//!
//! # Semantics
//!
//! - **One connection per probe.** Each probe opens a fresh TCP (and TLS) connection,
//!   like haproxy's checks, so it also exercises the master's accept path.
//! - **Schedule.** Probe starts are `interval` apart, each gap scaled by a random
//!   factor in `1 ± jitter`; with `jitter > 0` the first probe also waits a random
//!   offset in `[0, interval)`, so nodes started together spread out at once.
//!   `jitter = 0` makes the schedule exact (first probe immediately), for tests.
//!   Times come from `tokio::time`, so paused-clock tests can drive it.
//! - **Timeout.** A probe, connect + TLS + request + response head, must finish within
//!   `timeout` (< `interval`), else its result is [`ProbeResult::Timeout`].
//! - **Rise/fall.** The state starts where the caller of [`Prober::spawn`] says the
//!   backend is ([`Probes`] knows). A down backend comes up after `rise` consecutive
//!   successes; an up one goes down after `fall` consecutive failures.
//! - **Reports.** Every state change is logged (`info` for up, `warn` for down) and
//!   sent as a [`HealthEvent`] on the bounded channel given to [`Prober::spawn`]; the
//!   task waits for room rather than drop a change, and stops if the receiver is
//!   gone. The latest probe (result, latency, counters) is also kept in a
//!   [`tokio::sync::watch`] slot readable with [`ProberHandle::latest`], so metrics see
//!   fresh latency without an event per probe.
//! - **Success.** `tcp`: the connect completes. `http`/`https`: the response status
//!   is 2xx.
//! - **Not ready versus down.** A backend that fails its probes but still answers
//!   them is [`Health::NotReady`]: an apiserver shutting down gracefully fails
//!   `/readyz` while it finishes the requests and watches it has, and an expired
//!   certificate, a stale CA or a broken TLS session says nothing about the
//!   connections the master already serves. It becomes [`Health::Down`] only after
//!   `fall` consecutive probes that get no answer at all (refused, timed out, or
//!   unreachable before the connection opened), and each such change is an event
//!   too. A down backend stays down until `rise` probes pass.
//! - **Hints.** The datapath's passive signals are hints, never verdicts: a hint
//!   ([`ProberHandle::confirm`]) makes a ready backend's prober probe at once, and
//!   again each time a probe fails, until one passes (the hint is refuted) or
//!   `fall` have failed in a row (confirmed: the backend leaves rotation). Hinted
//!   probes start no sooner than [`HINT_GAP`] after the last one, so forged signals
//!   cannot turn them into a flood. A hint only hurries the verdict that probes
//!   reach anyway: one probe failed by a lossy link cannot take a master out.
//! - **Lost SYNs.** A probe whose handshake is not done after a third of `timeout`
//!   races a second connection against the first, since a lost SYN or SYN-ACK is
//!   resent only after the kernel's initial RTO (1 s), past the probe's budget.

mod probe;
mod probes;
mod tls;

pub use probe::is_request_path;
pub use probes::Probes;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::passive::PassiveKind;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// What to probe and how often: `[health]` as `crate::config` validated it, so
/// nothing here checks it again.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    pub kind: ProbeKind,
    /// Time between probe starts (before jitter).
    pub interval: Duration,
    /// Budget for one whole probe; shorter than `interval`.
    pub timeout: Duration,
    /// Consecutive successes for a down backend to come up (at least 1).
    pub rise: u32,
    /// Consecutive failures for an up backend to go down (at least 1).
    pub fall: u32,
    /// Fraction in `[0, 0.5]` by which each gap may deviate from `interval`.
    pub jitter: f64,
}

/// The probe itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// TCP connect only.
    Tcp,
    /// Plain-HTTP `GET path`; success is a 2xx status.
    Http { path: String },
    /// HTTPS `GET path`; success is a 2xx status over a verified TLS session.
    Https { path: String, tls: TlsSpec },
}

impl ProbeKind {
    /// The kind as `health.kind` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::Https { .. } => "https",
        }
    }
}

/// How an `https` probe verifies the master and identifies itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    pub trust: Trust,
    /// Name sent as SNI and verified in the certificate, while the connection still
    /// goes to the backend's IP. `None`: verify the certificate for that IP (no SNI).
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
    /// Client certificate chain and private key, both PEM: `(cert_file, key_file)`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Which server certificates an `https` probe accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Those signed by the CA(s) in this PEM file. Cluster CAs are private, so
    /// system roots would not help.
    CaFile(PathBuf),
    /// Any: only for an explicit `insecure = true`.
    AnyCertificate,
}

/// A backend's health, as the controller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Passes its probes: it takes new connections.
    Ready,
    /// Fails its probes but answers them: no new connections, while the ones it
    /// has keep working.
    NotReady,
    /// Does not answer: its connections are as dead as it is.
    Down,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::NotReady => "not ready",
            Self::Down => "down",
        })
    }
}

/// The outcome of one probe, and the reason carried by a [`HealthEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    /// Connected (tcp) or got a 2xx (http, https).
    Ok,
    /// The probe did not finish within the timeout.
    Timeout,
    /// The connection was refused: nothing listens on the backend's port.
    Refused,
    /// The TLS handshake or session failed: certificate, name, client auth, alert.
    Tls(String),
    /// The server answered with this non-2xx status.
    HttpStatus(u16),
    /// The connection failed before the backend accepted it, other than refused or
    /// timed out: unreachable, no route.
    Io(String),
    /// The backend accepted the connection, then it broke: reset, closed early, an
    /// HTTP protocol error.
    Broken(String),
}

impl ProbeResult {
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }

    /// Whether the backend answered at all, passing or not: anything but no
    /// connection.
    pub fn answered(&self) -> bool {
        !matches!(self, Self::Timeout | Self::Refused | Self::Io(_))
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok => f.write_str("ok"),
            Self::Timeout => f.write_str("timeout"),
            Self::Refused => f.write_str("connection refused"),
            Self::Tls(e) => write!(f, "tls: {e}"),
            Self::HttpStatus(s) => write!(f, "http status {s}"),
            Self::Io(e) => write!(f, "io: {e}"),
            Self::Broken(e) => write!(f, "broken: {e}"),
        }
    }
}

/// Failed probes since the task started, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureCounts {
    pub timeout: u64,
    pub refused: u64,
    pub tls: u64,
    pub http_status: u64,
    pub io: u64,
    pub broken: u64,
}

impl FailureCounts {
    fn count(&mut self, result: &ProbeResult) {
        match result {
            ProbeResult::Ok => {}
            ProbeResult::Timeout => self.timeout += 1,
            ProbeResult::Refused => self.refused += 1,
            ProbeResult::Tls(_) => self.tls += 1,
            ProbeResult::HttpStatus(_) => self.http_status += 1,
            ProbeResult::Io(_) => self.io += 1,
            ProbeResult::Broken(_) => self.broken += 1,
        }
    }

    /// All failed probes.
    pub fn total(&self) -> u64 {
        self.timeout + self.refused + self.tls + self.http_status + self.io + self.broken
    }
}

/// A backend's health after a probe. Sent on every state change; the latest one,
/// state change or not, is also readable with [`ProberHandle::latest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// The probed backend: the master's own address.
    pub backend: SocketAddr,
    /// The state after this probe: passing.
    pub healthy: bool,
    /// The state after this probe: answering, passing or not (see
    /// [`HealthEvent::health`]).
    pub answering: bool,
    /// This probe's result: for a change, why it happened.
    pub reason: ProbeResult,
    /// How long this probe took (the timeout, for a timeout).
    pub latency: Duration,
    /// Probes run so far.
    pub probes: u64,
    /// State changes so far.
    pub transitions: u64,
    /// Failed probes so far, by reason.
    pub failures: FailureCounts,
    /// Passive hints (see [`ProberHandle::confirm`]) that a probe confirmed, which
    /// took the backend out, and that a passing probe refuted.
    pub hints: HintCounts,
}

/// The outcomes of passive hints, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintCounts {
    pub confirmed: u64,
    pub refuted: u64,
}

impl HealthEvent {
    pub fn health(&self) -> Health {
        match (self.healthy, self.answering) {
            (true, _) => Health::Ready,
            (false, true) => Health::NotReady,
            (false, false) => Health::Down,
        }
    }
}

/// Errors from loading the files a [`ProbeSpec`] names.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot read {what} {}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is not valid PEM", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {} holds no {item}", path.display())]
    NoPemItem {
        what: &'static str,
        path: PathBuf,
        item: &'static str,
    },
    #[error("CA file {}: certificate rejected", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client certificate {} with key {}: rejected", cert.display(), key.display())]
    BadClientCert {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("building the TLS client configuration")]
    TlsConfig(#[source] rustls::Error),
}

/// A [`ProbeSpec`] with its TLS client configuration built once. Cheap to
/// clone; one `Prober` serves any number of backends.
#[derive(Clone)]
pub struct Prober {
    inner: Arc<ProberInner>,
}

struct ProberInner {
    spec: ProbeSpec,
    target: probe::Target,
}

impl fmt::Debug for Prober {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prober")
            .field("spec", &self.inner.spec)
            .finish_non_exhaustive()
    }
}

impl Prober {
    /// For `https`, reads the PEM files and builds the TLS client configuration.
    /// Errors name the offending file.
    pub fn new(spec: ProbeSpec) -> Result<Self, HealthError> {
        let target = probe::Target::new(&spec.kind)?;
        Ok(Self {
            inner: Arc::new(ProberInner { spec, target }),
        })
    }

    /// Starts probing `backend` in a new tokio task, from the state it is known to
    /// be in (`Ready`: it serves until `fall` probes fail; `Down`: it gets nothing
    /// until `rise` probes pass); must be called inside a tokio runtime. State
    /// changes go to `events`. Dropping the handle stops the task.
    pub fn spawn(
        &self,
        backend: SocketAddr,
        health: Health,
        events: mpsc::Sender<HealthEvent>,
    ) -> ProberHandle {
        let (latest_tx, latest) = watch::channel(HealthEvent {
            backend,
            healthy: health == Health::Ready,
            answering: health != Health::Down,
            reason: ProbeResult::Ok,
            latency: Duration::ZERO,
            probes: 0,
            transitions: 0,
            failures: FailureCounts::default(),
            hints: HintCounts::default(),
        });
        let (mark, marks) = mpsc::channel(1);
        let task = tokio::spawn(run(
            Arc::clone(&self.inner),
            backend,
            events,
            latest_tx,
            marks,
        ));
        ProberHandle { task, latest, mark }
    }
}

/// A running per-backend probe task. Dropping it aborts the task.
#[derive(Debug)]
pub struct ProberHandle {
    task: JoinHandle<()>,
    latest: watch::Receiver<HealthEvent>,
    mark: mpsc::Sender<PassiveKind>,
}

impl ProberHandle {
    /// A passive hint (`why`): if the backend is ready, probe it now, or
    /// [`HINT_GAP`] after its last probe started, whichever is later. A failed
    /// probe takes it out at once (not ready, or down if it got no answer); a
    /// passing one changes nothing. Hints that come while one waits are one hint.
    pub fn confirm(&self, why: PassiveKind) {
        let _ = self.mark.try_send(why);
    }

    /// The state after the latest probe, with its result, latency and counters.
    /// Before the first probe: the initial state, zero counters, reason `Ok`.
    pub fn latest(&self) -> HealthEvent {
        self.latest.borrow().clone()
    }
}

impl Drop for ProberHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Rise/fall hysteresis: pure, so that it is tested without sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RiseFall {
    rise: u32,
    fall: u32,
    healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
}

impl RiseFall {
    fn new(rise: u32, fall: u32, healthy: bool) -> Self {
        Self {
            rise,
            fall,
            healthy,
            streak: 0,
        }
    }

    /// Feeds one probe result; returns the new state if it changed.
    fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { self.rise } else { self.fall };
        if self.streak < needed {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(ok)
    }
}

/// The least time between a probe's start and a probe that a passive hint brings
/// forward (or the interval, if shorter): at most ten hint-driven probes a second
/// per backend, however many signals, forged or not, the datapath reports.
pub const HINT_GAP: Duration = Duration::from_millis(100);

/// `interval` scaled by a factor uniform in `[1 - jitter, 1 + jitter]`.
fn jittered(interval: Duration, jitter: f64) -> Duration {
    if jitter == 0.0 {
        return interval;
    }
    interval.mul_f64(1.0 + jitter * (2.0 * fastrand::f64() - 1.0))
}

/// The probe task of one backend.
async fn run(
    inner: Arc<ProberInner>,
    backend: SocketAddr,
    events: mpsc::Sender<HealthEvent>,
    latest: watch::Sender<HealthEvent>,
    mut marks: mpsc::Receiver<PassiveKind>,
) {
    let spec = &inner.spec;
    let mut report = latest.borrow().clone();
    let mut state = RiseFall::new(spec.rise, spec.fall, report.healthy);
    // While it fails, one answer proves the backend alive and `fall` silent probes
    // prove it dead.
    let mut answering = RiseFall::new(1, spec.fall, report.answering);
    let mut next = Instant::now();
    if spec.jitter > 0.0 {
        next += spec.interval.mul_f64(fastrand::f64());
    }
    let mut last_started: Option<Instant> = None;
    let mut hint: Option<PassiveKind> = None;
    loop {
        // A hint brings the next probe forward, to no sooner than `HINT_GAP` after
        // the last one started.
        let due = match (hint, last_started) {
            (Some(_), Some(last)) => next.min(last + HINT_GAP.min(spec.interval)),
            (Some(_), None) => Instant::now(),
            (None, _) => next,
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            Some(kind) = marks.recv() => {
                // Only a backend in rotation has anything to confirm.
                if report.healthy {
                    hint = Some(kind);
                }
                continue;
            }
        }
        let started = Instant::now();
        last_started = Some(started);
        next = started + jittered(spec.interval, spec.jitter);
        let result = match tokio::time::timeout(
            spec.timeout,
            probe::run(&inner.target, backend, spec.timeout / 3),
        )
        .await
        {
            Ok(result) => result,
            Err(_elapsed) => ProbeResult::Timeout,
        };
        report.latency = started.elapsed();
        report.probes += 1;
        report.failures.count(&result);
        let was = report.health();
        state.observe(result.is_ok());
        answering.observe(result.answered());
        report.healthy = state.healthy;
        if let Some(why) = hint.take() {
            if result.is_ok() {
                report.hints.refuted += 1;
                debug!(%backend, "passive hint refuted by a passing probe: {why}");
            } else if !state.healthy {
                report.hints.confirmed += 1;
                info!(%backend, reason = %result, "passive hint confirmed by {} failed probes in a row: {why}", spec.fall);
            } else {
                // Failed, but not yet `fall` times: probe again soon.
                hint = Some(why);
            }
        }
        if report.healthy && !answering.healthy {
            // Ready again after being down: answering, with no silent streak.
            answering = RiseFall::new(1, spec.fall, true);
        }
        // Once down, a backend stays down until it is ready again: answering without
        // passing says nothing about connections it no longer has.
        report.answering = report.healthy || (was != Health::Down && answering.healthy);
        report.reason = result;
        let now = report.health();
        if now == was {
            debug!(%backend, health = ?now, result = %report.reason, latency = ?report.latency, "probe");
            latest.send_replace(report.clone());
            continue;
        }
        report.transitions += 1;
        if now == Health::Ready {
            info!(%backend, state = %now, reason = %report.reason, latency = ?report.latency,
                transitions = report.transitions, "backend health changed");
        } else {
            warn!(%backend, state = %now, reason = %report.reason, latency = ?report.latency,
                transitions = report.transitions, "backend health changed");
        }
        latest.send_replace(report.clone());
        if events.send(report.clone()).await.is_err() {
            debug!(%backend, "health event receiver gone; stopping the prober");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_fall_changes_state_only_after_consecutive_results() {
        let mut s = RiseFall::new(2, 3, false);
        assert_eq!(s.observe(true), None);
        assert_eq!(
            s.observe(false),
            None,
            "a failure resets the success streak"
        );
        assert_eq!(s.observe(true), None);
        assert_eq!(
            s.observe(true),
            Some(true),
            "second consecutive success: up"
        );
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None, "a success resets the failure streak");
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(
            s.observe(false),
            Some(false),
            "third consecutive failure: down"
        );
    }

    #[test]
    fn only_no_connection_at_all_is_no_answer() {
        for silent in [
            ProbeResult::Timeout,
            ProbeResult::Refused,
            ProbeResult::Io("no route to host".into()),
        ] {
            assert!(!silent.answered(), "{silent}");
        }
        for answered in [
            ProbeResult::Ok,
            ProbeResult::HttpStatus(500),
            ProbeResult::Tls("certificate expired".into()),
            ProbeResult::Broken("connection reset by peer".into()),
        ] {
            assert!(answered.answered(), "{answered}");
        }
    }

    #[test]
    fn rise_one_and_fall_one_follow_every_result() {
        let mut s = RiseFall::new(1, 1, true);
        assert_eq!(s.observe(false), Some(false));
        assert_eq!(s.observe(true), Some(true));
        assert_eq!(s.observe(true), None);
    }

    #[test]
    fn jittered_gaps_stay_within_the_fraction() {
        let interval = Duration::from_millis(100);
        let gaps: Vec<Duration> = (0..10_000).map(|_| jittered(interval, 0.2)).collect();
        let min = gaps.iter().min().unwrap();
        let max = gaps.iter().max().unwrap();
        assert!(*min >= Duration::from_millis(80), "min {min:?}");
        assert!(*max <= Duration::from_millis(120), "max {max:?}");
        // The spread is actually used: 10k uniform draws cover most of +-20 ms.
        assert!(*min < Duration::from_millis(82) && *max > Duration::from_millis(118));
        assert_eq!(jittered(interval, 0.0), interval);
    }
}
