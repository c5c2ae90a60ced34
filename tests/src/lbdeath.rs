//! One "LB node dies" scenario of issue 19, measured: two LB nodes in the
//! [`crate::cluster`] topology balance the VIP over TLS stub apiservers, under 30
//! watch streams, 100 new https connections a second ([`crate::traffic`]) and a
//! kubectl loop ([`kubectl`]); then the VIP's owner, lb1, meets its [`Fate`], and
//! the scenario counts what the clients saw. The test `lb_failover.rs` asserts on
//! the numbers, and `cargo xtask bench failover` prints them as a table.
//!
//! A stream is broken when it ended (an error, a reset, an end of stream), went
//! silent for longer than [`STALL_LIMIT`], or never resumed; one that only
//! paused while the VIP moved is not, but its longest pause is reported. A new
//! connection failed when it got an error or no answer within [`PATIENCE`]
//! (kubectl's TLS handshake timeout); one that succeeded after more than
//! [`crate::traffic::SLOW`] waited for a SYN retransmit.

pub mod kubectl;
pub mod side;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    thread,
    time::{Duration, Instant},
};

/// How long a new connection may take to connect, finish TLS and get its
/// response head: kubectl's (client-go's) TLS handshake timeout. A handshake
/// caught by a cut cable under etcd waits out the lease's expiry (about 2.5 s)
/// on TCP's doubling retransmits, which can pass 5 s.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How near a handover (the failure, the VIP's move, its settling after lb1's
/// return) a new connection's start must be for its failure to be put down to
/// the handover itself: a handshake straddling the instant the VIP changes
/// hands (half-open flows are not synced), or one completed in the
/// millisecond before a SIGKILL whose record never left the node.
pub const HANDOVER: Duration = Duration::from_millis(500);

pub use side::{Election, Side, Stack};

use crate::{
    cluster::{Topology, VIP_ADDR},
    elect::{Etcd, arp_owner, holders, mac, two_lb_nodes},
    live::{Spawned, TempDir, https_via_vip, master_names, metric_sum, metrics, stub_apiservers},
    pki::Pki,
    traffic::{Record, Traffic, WATCH_GAP},
};

/// Watch streams, all opened through lb1.
pub const STREAMS: usize = 30;
/// One new https connection every 10 ms: 100 a second.
pub const EVERY: Duration = Duration::from_millis(10);
/// How long lb1's cable stays cut.
pub const CUT: Duration = Duration::from_secs(5);
/// A stream silent this long at any time is broken, even if it resumed.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Load before the failure, and after the last move.
const BEFORE: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(3);
/// How long a killed node stays down before it is started again.
const DOWN: Duration = Duration::from_secs(2);
/// The generous bound on any move of the VIP.
pub const MOVE_LIMIT: Duration = Duration::from_secs(15);

/// What happens to the owner, lb1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// SIGKILL.
    Kill,
    /// Its cable pulled (its port on the segment down: `eth0` loses its
    /// carrier), plugged in again after [`CUT`].
    CableCut,
    /// SIGTERM.
    Terminate,
    /// SIGKILL, then started again after [`DOWN`]: it preempts the VIP back
    /// where the election preempts.
    KillAndBack,
}

impl Fate {
    pub const ALL: [Self; 4] = [
        Self::Kill,
        Self::CableCut,
        Self::Terminate,
        Self::KillAndBack,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL",
            Self::CableCut => "cable cut 5 s",
            Self::Terminate => "SIGTERM",
            Self::KillAndBack => "SIGKILL, back",
        }
    }
}

/// What the clients saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub broken: usize,
    /// Why streams broke, with how many broke so.
    pub broken_why: BTreeMap<String, usize>,
    /// The longest silence of any stream.
    pub longest_stall: Duration,
    pub attempts: usize,
    /// Failed new connections: start relative to the failure (s), and error.
    pub failed: Vec<(f64, String)>,
    /// Connections that waited for a SYN retransmit: start relative to the
    /// failure, and how long they took (s).
    pub waited: Vec<(f64, f64)>,
    pub kubectl_runs: usize,
    /// Failed kubectl runs: start relative to the failure (s), and error.
    pub kubectl_failed: Vec<(f64, String)>,
    /// From the failure until the router's ARP entry names lb2.
    pub moved: Option<Duration>,
    /// For a returning lb1 (cable back, restarted): from its return until the
    /// VIP is on one node only and traffic goes there; and that node.
    pub settled: Option<(usize, Duration)>,
    /// For a returning lb1: from the failure until its return.
    pub returned: Option<Duration>,
    /// The end of each apilb's log, for a failing test to show.
    pub logs: String,
    /// lb2's `/metrics` at the end (apilb stacks only).
    pub survivor_metrics: String,
}

impl Outcome {
    /// When the VIP changed hands, in seconds from the failure: the failure
    /// itself, the move to lb2, and the settling after lb1's return.
    #[must_use]
    pub fn handovers(&self) -> Vec<f64> {
        let mut at = vec![0.0];
        at.extend(self.moved.map(|d| d.as_secs_f64()));
        if let (Some(r), Some((_, s))) = (self.returned, self.settled) {
            at.push((r + s).as_secs_f64());
        }
        at
    }

    /// Failed new connections and kubectl runs that started more than
    /// [`HANDOVER`] away from every handover: those no moment of the move
    /// explains.
    #[must_use]
    pub fn failed_away_from_handovers(&self) -> Vec<&(f64, String)> {
        let at = self.handovers();
        (self.failed.iter())
            .chain(&self.kubectl_failed)
            .filter(|(t, _)| at.iter().all(|h| (t - h).abs() > HANDOVER.as_secs_f64()))
            .collect()
    }

    /// The longest wait of a connection that waited for a SYN retransmit.
    #[must_use]
    pub fn waited_max(&self) -> Option<f64> {
        self.waited.iter().map(|w| w.1).reduce(f64::max)
    }

    /// One line with every number.
    #[must_use]
    pub fn summary(&self) -> String {
        let mut s = format!(
            "broken streams {}/{STREAMS} {:?} (longest stall {:.2} s); failed new connections \
             {}/{}",
            self.broken,
            self.broken_why,
            self.longest_stall.as_secs_f64(),
            self.failed.len(),
            self.attempts,
        );
        if let Some((at, why)) = self.failed.first() {
            let _ = write!(s, " (first at {at:+.2} s: {why})");
        }
        let starts = match (self.waited.first(), self.waited.last()) {
            (Some(a), Some(b)) => format!(", started {:+.2} s to {:+.2} s", a.0, b.0),
            _ => String::new(),
        };
        let _ = write!(
            s,
            "; waited for a SYN retransmit {} (max {}{starts}); kubectl failed {}/{}{}; \
             VIP moved {}",
            self.waited.len(),
            secs(self.waited_max()),
            self.kubectl_failed.len(),
            self.kubectl_runs,
            self.kubectl_failed
                .first()
                .map(|(at, e)| format!(" (first at {at:+.2} s: {e})"))
                .unwrap_or_default(),
            secs(self.moved.map(|d| d.as_secs_f64())),
        );
        if let Some((node, d)) = self.settled {
            let _ = write!(
                s,
                "; settled on lb{} {:.2} s after lb1 returned",
                node + 1,
                d.as_secs_f64()
            );
        }
        s
    }

    /// A Markdown table row: `setup`, `fate` and the numbers.
    #[must_use]
    pub fn row(&self, setup: &str, fate: Fate) -> String {
        format!(
            "| {setup} | {} | {} | {:.2} s | {} | {} ({}) | {} | {} |",
            fate.name(),
            self.broken,
            self.longest_stall.as_secs_f64(),
            self.failed.len(),
            self.waited.len(),
            secs(self.waited_max()),
            self.kubectl_failed.len(),
            secs(self.moved.map(|d| d.as_secs_f64())),
        )
    }
}

/// The header of [`Outcome::row`]'s table.
pub const TABLE_HEAD: &str = "| setup | lb1's fate | broken streams of 30 | longest stream stall | \
     failed new connections | waited for a SYN retransmit (max) | kubectl failures | VIP moved \
     after |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |";

fn secs(d: Option<f64>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{d:.2} s"))
}

/// Seconds from `origin` to `at`, negative before it.
fn offset(at: Instant, origin: Instant) -> f64 {
    at.checked_duration_since(origin).map_or_else(
        || -origin.duration_since(at).as_secs_f64(),
        |d| d.as_secs_f64(),
    )
}

/// Everything one scenario runs, dropped in field order: the balancers first,
/// the namespaces and files last.
struct Lab {
    sides: Vec<Side>,
    _stubs: Vec<Spawned>,
    _etcd: Option<Etcd>,
    pki: Pki,
    t: Topology,
    dir: TempDir,
    macs: [String; 2],
    stack: Stack,
}

/// Run one scenario: `stack` on both LB nodes (namespaces and files named
/// `prefix`), the load, and lb1's `fate`.
///
/// # Panics
/// If the lab does not come up, or a sync-on lb2 does not hold the streams'
/// flows before the failure.
#[must_use]
pub fn run(prefix: &str, stack: Stack, fate: Fate) -> Outcome {
    let mut lab = Lab::start(prefix, stack);
    let begin = Instant::now();
    let traffic = Traffic::start_patient(
        &lab.t.client,
        &lab.pki.ca_pem,
        STREAMS,
        Some(EVERY),
        PATIENCE,
    );
    let kubectl = kubectl::KubectlLoop::start(&lab.t.client, &lab.dir.0, &lab.pki.ca_pem);
    if matches!(stack, Stack::Apilb { sync: true, .. }) {
        lab.wait_synced();
    }
    thread::sleep(BEFORE.saturating_sub(begin.elapsed()));
    let failed_at = Instant::now();
    let (moved, settled, returned) = lab.befall(fate, failed_at);
    thread::sleep(AFTER);
    let record = traffic.stop();
    let runs = kubectl.stop();
    let mut out = tally(&record, begin, failed_at);
    out.kubectl_runs = runs.len();
    out.kubectl_failed = (runs.into_iter())
        .filter_map(|r| Some((offset(r.at, failed_at), r.error?)))
        .collect();
    out.moved = moved;
    out.settled = settled;
    out.returned = returned;
    if matches!(stack, Stack::Apilb { .. }) {
        out.survivor_metrics = metrics(&lab.t.lbs[1]);
    }
    for (i, s) in lab.sides.iter().enumerate() {
        let _ = writeln!(
            out.logs,
            "--- lb{} log (tail):\n{}",
            i + 1,
            tail(&s.log(), 30)
        );
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The streams' and new connections' numbers from `record` (the load began at
/// `begin`, the failure at `failed_at`).
fn tally(record: &Record, begin: Instant, failed_at: Instant) -> Outcome {
    let mut out = Outcome::default();
    for w in &record.watches {
        let silent = record.taken.saturating_duration_since(w.last_event);
        out.longest_stall = out.longest_stall.max(w.max_gap).max(silent);
        let why = if let Some((at, why)) = &w.ended {
            Some(format!("{why} at {:+.2} s", offset(*at, failed_at)))
        } else if w.max_gap > STALL_LIMIT {
            Some(format!("silent {:.1} s", w.max_gap.as_secs_f64()))
        } else {
            (silent > WATCH_GAP).then(|| "never resumed".to_owned())
        };
        if let Some(why) = why {
            out.broken += 1;
            // The time of a reset varies by stream; the reason is what counts.
            let key = why.split(" at ").next().unwrap_or_default().to_owned();
            *out.broken_why.entry(key).or_insert(0) += 1;
        }
    }
    out.attempts = record.since(begin).count();
    out.failed = record
        .errors_since(begin)
        .into_iter()
        .map(|a| {
            let why = match &a.result {
                Some(Err(e)) => e.clone(),
                _ => String::new(),
            };
            (offset(a.at, failed_at), why)
        })
        .collect();
    out.waited = record
        .delayed_since(begin)
        .into_iter()
        .map(|(at, took)| (offset(at, failed_at), took.as_secs_f64()))
        .collect();
    out
}

impl Lab {
    /// Topology, CA, stubs (and etcd), lb1 serving the VIP, then lb2.
    fn start(prefix: &str, stack: Stack) -> Self {
        let (t, dir) = two_lb_nodes(prefix);
        let pki = Pki::generate(&dir.0, &master_names(), &[VIP_ADDR.parse().expect("vip")]);
        let stubs = stub_apiservers(&t, &pki, &dir.0);
        let etcd = matches!(
            stack,
            Stack::Apilb {
                election: Election::Etcd,
                ..
            }
        )
        .then(|| Etcd::start(&t, &dir.0));
        let macs = [mac(&t.lbs[0]), mac(&t.lbs[1])];
        let mut lab = Self {
            sides: Vec::new(),
            _stubs: stubs,
            _etcd: etcd,
            pki,
            t,
            dir,
            macs,
            stack,
        };
        lab.sides
            .push(Side::start(&lab.t, &lab.dir.0, prefix, 0, stack));
        lab.wait_serving(0);
        lab.sides
            .push(Side::start(&lab.t, &lab.dir.0, prefix, 1, stack));
        // lb2 hears lb1 and stays backup.
        thread::sleep(Duration::from_secs(1));
        lab.wait_serving(0);
        lab
    }

    /// Wait until only LB node `node` holds the VIP and a request through it
    /// succeeds.
    fn wait_serving(&self, node: usize) {
        let deadline = Instant::now() + MOVE_LIMIT;
        while holders(&self.t, VIP_ADDR) != [node]
            || https_via_vip(&self.t.client, &self.pki.ca_pem, "/version").is_none()
        {
            assert!(
                Instant::now() < deadline,
                "lb{} does not serve the VIP alone (holders {:?}):\n{}",
                node + 1,
                holders(&self.t, VIP_ADDR),
                self.sides
                    .iter()
                    .map(Side::log)
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until lb2 has installed at least one flow per stream from lb1.
    fn wait_synced(&self) {
        let installed = || metric_sum(&metrics(&self.t.lbs[1]), "apilb_sync_flows_installed_total");
        let deadline = Instant::now() + Duration::from_secs(10);
        while installed() < STREAMS as u64 {
            assert!(
                Instant::now() < deadline,
                "lb2 installed {} flows:\n{}",
                installed(),
                self.sides[1].log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Apply `fate` to lb1 at `failed_at`; how long until traffic went to lb2,
    /// and, when lb1 returns, where and how soon the VIP settled, and when it
    /// returned.
    fn befall(
        &mut self,
        fate: Fate,
        failed_at: Instant,
    ) -> (
        Option<Duration>,
        Option<(usize, Duration)>,
        Option<Duration>,
    ) {
        match fate {
            Fate::Kill | Fate::KillAndBack => self.sides[0].kill(),
            Fate::Terminate => self.sides[0].terminate(),
            Fate::CableCut => self.cable(false),
        }
        let moved = self.wait_arp(1, failed_at);
        let returned = match fate {
            Fate::Kill | Fate::Terminate => return (moved, None, None),
            Fate::CableCut => {
                thread::sleep((failed_at + CUT).saturating_duration_since(Instant::now()));
                let back = Instant::now();
                self.cable(true);
                back
            }
            Fate::KillAndBack => {
                thread::sleep(DOWN);
                let back = Instant::now();
                self.sides[0].restart(&self.t, &self.dir.0);
                back
            }
        };
        let home = usize::from(!self.stack.preempts());
        let settled = self.wait_alone(home, returned).map(|d| (home, d));
        (
            moved,
            settled,
            Some(returned.saturating_duration_since(failed_at)),
        )
    }

    /// Plug lb1's cable in or pull it out: its port on the router's bridge goes
    /// up or down, so that lb1's `eth0` loses its carrier as a NIC does, and
    /// keeps its addresses and routes (`ip link set eth0 down` on the node
    /// itself would delete its routes, which no pulled cable does).
    fn cable(&self, plugged: bool) {
        let state = if plugged { "up" } else { "down" };
        self.t.router.ip(&["link", "set", "p-lb1", state]);
    }

    /// Poll the router's ARP entry for the VIP until it names LB node `node`;
    /// how long that took from `since`.
    fn wait_arp(&self, node: usize, since: Instant) -> Option<Duration> {
        while since.elapsed() < MOVE_LIMIT {
            if arp_owner(&self.t, VIP_ADDR, &self.macs) == Some(node) {
                return Some(since.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Poll until LB node `node` alone holds the VIP and the router's ARP entry
    /// names it; how long that took from `since`.
    fn wait_alone(&self, node: usize, since: Instant) -> Option<Duration> {
        while since.elapsed() < MOVE_LIMIT {
            if holders(&self.t, VIP_ADDR) == [node]
                && arp_owner(&self.t, VIP_ADDR, &self.macs) == Some(node)
            {
                return Some(since.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}
