//! `cargo xtask bench failover` (second part): what clients see when a master dies,
//! behind apilb and behind the balancers it replaces, in the `tests::cluster`
//! topology (one LB node, three TLS stub apiservers, a client one routed hop away).
//!
//! Setups: apilb at its defaults (probes every 500 ms, passive detection on) and
//! with fast probes (every 100 ms); haproxy as kubeadm's HA guide configures it;
//! haproxy at its defaults, and with its checks at apilb's default rate;
//! kube-proxy-style iptables DNAT with no health checks; and the seeds' recipe
//! without a proxy, keepalived on the masters moving the VIP when kubeadm's
//! `check_apiserver.sh` fails on its holder, master-2 (`tests::proxies` has the
//! configs and where they come from).
//! Scenarios: master-2's apiserver process gets SIGKILL (its host then answers SYNs
//! with RST), or master-2's host goes silent (its link is cut at the router: no RST,
//! no ICMP, SYNs vanish).
//!
//! A setup's trials run at once, each on a fresh cluster of its own (the load is
//! light, 100 TLS handshakes a second, and a trial spends most of its time
//! waiting for the failure to be noticed). Each opens 6 watch streams and a new
//! https connection every 10 ms (each bounded by `traffic::ATTEMPT_TIMEOUT`),
//! warms up 2 s, fails master-2 at t0 and keeps the load on for 8 s (killed) or
//! 14 s (silent): longer than haproxy's default checks take to eject the master
//! (for a silent one, fall 3 checks, each a 2 s connect timeout plus the 2 s
//! interval). The keepalived recipe gets 45 s after a kill: its script must fail
//! 10 times, 3 s apart, before the VIP moves. Attempts in flight then finish. Per
//! trial: attempts started since t0 and how many failed (an error or a timeout);
//! the window, from t0 to the start of the last attempt that failed or was
//! delayed; the delayed ones (succeeded, but took over `traffic::SLOW`) and how
//! long they took; watch streams broken on the surviving masters. haproxy's
//! `timeout connect 5s` equals the client's 5 s attempt timeout, so a connection
//! haproxy redispatches once a silent master's connect times out reaches the
//! client too late and counts as failed.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Shape, Topology},
    live::master_name,
    plane::ControlPlane,
    proxies::{Proxy, ProxyPlane},
    report::median,
    traffic::{SLOW, Traffic},
};

const TRIALS: usize = 3;
const WATCHES: usize = 6;
const EVERY: Duration = Duration::from_millis(10);
const WARMUP: Duration = Duration::from_secs(2);
/// The timeline plot's resolution.
const BUCKET: Duration = Duration::from_millis(250);
/// master-2, the one that fails, and the router's port to it.
const VICTIM: usize = 1;
const VICTIM_PORT: &str = "p-m2";

#[derive(Clone, Copy)]
enum Scenario {
    Killed,
    Silent,
}

impl Scenario {
    /// How long the load stays on after the failure: past the longest window
    /// any setup needs (haproxy's defaults eject a killed master within about
    /// 5 s, a silent one within about 11 s), so that each window closes inside it.
    /// The keepalived recipe moves the VIP off a killed apiserver after 10 failed
    /// checks 3 s apart, 27 to 30 s; the rest is margin for the move, and for the
    /// repeat of its gratuitous ARPs 5 s later when the first ones went amiss.
    fn observe(self, setup: Setup) -> Duration {
        match (self, setup) {
            (Self::Killed, Setup::Proxied(Proxy::KeepalivedScript)) => Duration::from_secs(45),
            (Self::Killed, _) => Duration::from_secs(8),
            (Self::Silent, _) => Duration::from_secs(14),
        }
    }

    fn file(self) -> &'static str {
        match self {
            Self::Killed => "failover-killed.svg",
            Self::Silent => "failover-silent.svg",
        }
    }
}

enum Plane {
    Apilb(ControlPlane),
    Proxied(ProxyPlane),
}

impl Plane {
    fn parts(&self) -> (&Topology, &Path) {
        match self {
            Self::Apilb(p) => (&p.t, p.ca()),
            Self::Proxied(p) => (&p.t, &p.pki.ca_pem),
        }
    }

    fn fail(&mut self, scenario: Scenario) {
        match (scenario, self) {
            (Scenario::Killed, Self::Apilb(p)) => p.kill_master(VICTIM),
            (Scenario::Killed, Self::Proxied(p)) => p.kill_master(VICTIM),
            (Scenario::Silent, p) => {
                let router = &p.parts().0.router;
                router.ip(&["link", "set", "dev", VICTIM_PORT, "down"]);
            }
        }
    }
}

struct Trial {
    attempts: usize,
    failed: usize,
    window: Duration,
    delays: Vec<Duration>,
    broken: usize,
    /// Per [`BUCKET`]: attempts started, and those answered within `SLOW`.
    timeline: Vec<(usize, usize)>,
}

/// What balances the VIP in a trial.
#[derive(Clone, Copy)]
enum Setup {
    /// `apilb run` with these `[health]` lines (empty: its defaults).
    Apilb(&'static str),
    Proxied(Proxy),
}

/// apilb's fast probe settings: every 100 ms, each within 80 ms.
const FAST: &str = "interval = \"100ms\"\ntimeout = \"80ms\"";

fn trial(prefix: &str, setup: Setup, scenario: Scenario) -> Trial {
    let mut plane = match setup {
        Setup::Apilb(health) => {
            Plane::Apilb(ControlPlane::start_with(prefix, Shape::default(), health))
        }
        Setup::Proxied(p) => Plane::Proxied(ProxyPlane::start(prefix, p)),
    };
    let (t, ca) = plane.parts();
    let begin = Instant::now();
    let traffic = Traffic::start(&t.client, ca, WATCHES, Some(EVERY));
    thread::sleep(WARMUP);
    let (spread, _) = traffic.record().spread_since(begin);
    let serving = match setup {
        Setup::Proxied(Proxy::KeepalivedScript) => 1,
        _ => MASTERS.len(),
    };
    assert_eq!(
        spread.len(),
        serving,
        "warm-up did not reach the masters it should: {spread:?}"
    );
    let t0 = Instant::now();
    plane.fail(scenario);
    let observe = scenario.observe(setup);
    thread::sleep(observe);
    let r = traffic.stop();
    // Per `BUCKET` from 1 s before the failure: attempts, and those answered
    // within `SLOW`.
    let mut timeline = vec![(0, 0); bucket_of(t0 + observe, t0) + 1];
    for a in r.since(t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0)) {
        let Some(slot) = timeline.get_mut(bucket_of(a.at, t0)) else {
            continue;
        };
        slot.0 += 1;
        if matches!(a.result, Some(Ok(_))) && a.took.is_some_and(|t| t <= SLOW) {
            slot.1 += 1;
        }
    }
    let errors = r.errors_since(t0);
    let delayed = r.delayed_since(t0);
    let last = errors
        .iter()
        .map(|a| a.at)
        .chain(delayed.iter().map(|d| d.0))
        .max();
    let mut broken = r.broken_watches();
    broken.remove(&master_name(MASTERS[VICTIM]));
    Trial {
        attempts: r.since(t0).count(),
        failed: errors.len(),
        window: last.map_or(Duration::ZERO, |l| l - t0),
        delays: delayed.iter().map(|d| d.1).collect(),
        broken: broken.values().sum(),
        timeline,
    }
}

/// The timeline's bucket of an attempt started at `at`; bucket 0 starts 1 s
/// before the failure at `t0`.
fn bucket_of(at: Instant, t0: Instant) -> usize {
    let from = t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0);
    usize::try_from(at.saturating_duration_since(from).as_millis() / BUCKET.as_millis())
        .unwrap_or(usize::MAX)
}

/// The trials' timelines pooled: (seconds since the failure, % answered in time).
fn timeline(trials: &[Trial]) -> Vec<(f64, f64)> {
    let len = trials.iter().map(|t| t.timeline.len()).max().unwrap_or(0);
    (0..len)
        .filter_map(|i| {
            let (n, ok) = trials
                .iter()
                .filter_map(|t| t.timeline.get(i))
                .fold((0, 0), |(n, ok), &(a, b)| (n + a, ok + b));
            let x = (i as f64).mul_add(BUCKET.as_secs_f64(), -1.0);
            (n > 0).then(|| (x, 100.0 * ok as f64 / n as f64))
        })
        .collect()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

/// `n` of `of` in percent, to a tenth.
fn percent(n: usize, of: usize) -> String {
    let tenths = (n * 1000 + of / 2) / of.max(1);
    format!("{}.{} %", tenths / 10, tenths % 10)
}

/// One table row: medians across the trials; the delays pooled over all of them.
fn row(name: &str, trials: &[Trial]) -> String {
    let med = |f: fn(&Trial) -> usize| median(trials.iter().map(f)).unwrap_or(0);
    let (attempts, failed) = (med(|t| t.attempts), med(|t| t.failed));
    let delays = || trials.iter().flat_map(|t| t.delays.iter().copied());
    format!(
        "| {name} | {attempts} | {failed} ({}) | {} | {} | {} | {} | {} |",
        percent(failed, attempts),
        secs(median(trials.iter().map(|t| t.window))),
        med(|t| t.delays.len()),
        secs(median(delays())),
        secs(delays().max()),
        med(|t| t.broken),
    )
}

/// `setup`'s trials of `scenario`, run at once, each logged to stderr.
fn trials(title: &str, name: &str, prefix: &str, setup: Setup, scenario: Scenario) -> Vec<Trial> {
    let trials: Vec<Trial> = thread::scope(|s| {
        let runs: Vec<_> = (1..=TRIALS)
            .map(|n| s.spawn(move || trial(&format!("{prefix}-t{n}"), setup, scenario)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for (n, t) in trials.iter().enumerate() {
        eprintln!(
            "  {title}, {name}: trial {}: {} attempts, {} failed, window {}, \
             {} delayed (max {}), {} broken watches on survivors",
            n + 1,
            t.attempts,
            t.failed,
            secs(Some(t.window)),
            t.delays.len(),
            secs(t.delays.iter().max().copied()),
            t.broken,
        );
    }
    trials
}

fn main() {
    let setups = [
        (
            "apilb, defaults (probes every 500 ms, passive detection on)",
            "apilb-bm-lb",
            Setup::Apilb(""),
        ),
        (
            "apilb, fast probes (every 100 ms)",
            "apilb-bm-lbf",
            Setup::Apilb(FAST),
        ),
        (
            "haproxy 2.6, kubeadm HA guide config",
            "apilb-bm-hapx",
            Setup::Proxied(Proxy::HaproxyKubeadm),
        ),
        (
            "haproxy 2.6, defaults, layer-4 check every 2 s",
            "apilb-bm-hapd",
            Setup::Proxied(Proxy::HaproxyDefaults),
        ),
        (
            "haproxy 2.6, defaults, checks at apilb's rate (500 ms, fall 2)",
            "apilb-bm-hapt",
            Setup::Proxied(Proxy::HaproxyTuned),
        ),
        (
            "iptables DNAT (kube-proxy style)",
            "apilb-bm-ipt",
            Setup::Proxied(Proxy::IptablesDnat),
        ),
        (
            "keepalived 2.2 on the masters, kubeadm guide's check_apiserver.sh, no proxy",
            "apilb-bm-ka",
            Setup::Proxied(Proxy::KeepalivedScript),
        ),
    ];
    let scenarios = [
        (
            Scenario::Killed,
            "process killed",
            "SIGKILL: its host answers SYNs with RST",
        ),
        (
            Scenario::Silent,
            "host silent",
            "link cut at the router: SYNs vanish",
        ),
    ];
    let mut tables = Vec::new();
    for (scenario, title, how) in scenarios {
        let (mut rows, mut lines) = (Vec::new(), Vec::new());
        for (name, prefix, setup) in setups {
            let trials = trials(title, name, prefix, setup, scenario);
            rows.push(row(name, &trials));
            lines.push((name, timeline(&trials)));
        }
        tests::report::lines(
            scenario.file(),
            &format!("Master-2 {title} at t = 0: new connections answered within 0.5 s"),
            ("seconds since the failure", "% answered within 0.5 s"),
            0.0..105.0,
            &lines,
        );
        tables.push((title, how, rows, scenario.file()));
    }
    println!(
        "\nMaster-2 fails under {WATCHES} watch streams and a new https connection every \
         {} ms; {TRIALS} trials per setup, {} s (process killed; {} s for the keepalived \
         recipe) or {} s (host silent) observed after the failure. Medians of the \
         trials, except the delay columns: median and max over every delayed attempt. The plots pool the trials: per \
         {} ms from 1 s before the failure, the share of new connections answered \
         within 0.5 s.",
        EVERY.as_millis(),
        Scenario::Killed.observe(Setup::Apilb("")).as_secs(),
        Scenario::Killed
            .observe(Setup::Proxied(Proxy::KeepalivedScript))
            .as_secs(),
        Scenario::Silent.observe(Setup::Apilb("")).as_secs(),
        BUCKET.as_millis(),
    );
    for (title, how, rows, file) in tables {
        println!("\n### Master-2 {title} ({how})\n");
        println!("![timeline: master-2 {title}](tests/plots/{file})\n");
        println!(
            "| setup | attempts | failed | window | delayed (> 0.5 s) | delayed took, median \
             | delayed took, max | broken watches on survivors |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for row in rows {
            println!("{row}");
        }
    }
}
