//! `cargo xtask bench failover` (second part): what clients see when a master dies,
//! behind apilb and behind the balancers it replaces, in the `tests::cluster`
//! topology (one LB node, three TLS stub apiservers, a client one routed hop away).
//!
//! Setups: apilb at its defaults (passive detection on); haproxy as kubeadm's HA
//! guide configures it; haproxy at its defaults; kube-proxy-style iptables DNAT with
//! no health checks (`tests::proxies` has the configs and where they come from).
//! Scenarios: master-2's apiserver process gets SIGKILL (its host then answers SYNs
//! with RST), or master-2's host goes silent (its link is cut at the router: no RST,
//! no ICMP, SYNs vanish).
//!
//! Each trial starts a fresh cluster, opens 6 watch streams and a new https
//! connection every 10 ms (each bounded by `traffic::ATTEMPT_TIMEOUT`), warms up
//! 2 s, fails master-2 at t0 and keeps the load on for 14 s: longer than haproxy's
//! checks take to eject a silent master (fall 3 checks, each a 2 s connect timeout
//! plus the 2 s interval). Attempts in flight then finish. Per trial: attempts
//! started since t0 and how many failed (an error or a timeout); the window, from
//! t0 to the start of the last attempt that failed or was delayed; the delayed ones
//! (succeeded, but took over `traffic::SLOW`) and how long they took; watch streams
//! broken on the surviving masters. haproxy's `timeout connect 5s` equals the
//! client's 5 s attempt timeout, so a connection haproxy redispatches once a silent
//! master's connect times out reaches the client too late and counts as failed.

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
    traffic::Traffic,
};

const TRIALS: usize = 3;
const WATCHES: usize = 6;
const EVERY: Duration = Duration::from_millis(10);
const WARMUP: Duration = Duration::from_secs(2);
const OBSERVE: Duration = Duration::from_secs(14);
/// master-2, the one that fails, and the router's port to it.
const VICTIM: usize = 1;
const VICTIM_PORT: &str = "p-m2";

#[derive(Clone, Copy)]
enum Scenario {
    Killed,
    Silent,
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
}

fn trial(prefix: &str, proxy: Option<Proxy>, scenario: Scenario) -> Trial {
    let mut plane = match proxy {
        None => Plane::Apilb(ControlPlane::start(prefix, Shape::default())),
        Some(p) => Plane::Proxied(ProxyPlane::start(prefix, p)),
    };
    let (t, ca) = plane.parts();
    let begin = Instant::now();
    let traffic = Traffic::start(&t.client, ca, WATCHES, Some(EVERY));
    thread::sleep(WARMUP);
    let (spread, _) = traffic.record().spread_since(begin);
    assert_eq!(
        spread.len(),
        3,
        "warm-up did not reach every master: {spread:?}"
    );
    let t0 = Instant::now();
    plane.fail(scenario);
    thread::sleep(OBSERVE);
    let r = traffic.stop();
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
    }
}

fn median<T: Copy + Ord>(v: impl Iterator<Item = T>) -> Option<T> {
    let mut s: Vec<T> = v.collect();
    s.sort_unstable();
    s.get(s.len() / 2).copied()
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

fn main() {
    let setups = [
        (
            "apilb, defaults (passive detection on)",
            "apilb-bm-lb",
            None,
        ),
        (
            "haproxy 2.6, kubeadm HA guide config",
            "apilb-bm-hapx",
            Some(Proxy::HaproxyKubeadm),
        ),
        (
            "haproxy 2.6, defaults, layer-4 check",
            "apilb-bm-hapd",
            Some(Proxy::HaproxyDefaults),
        ),
        (
            "iptables DNAT (kube-proxy style)",
            "apilb-bm-ipt",
            Some(Proxy::IptablesDnat),
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
        let mut rows = Vec::new();
        for (name, prefix, proxy) in setups {
            let trials: Vec<Trial> = (1..=TRIALS)
                .map(|n| {
                    let t = trial(prefix, proxy, scenario);
                    eprintln!(
                        "  {title}, {name}: trial {n}: {} attempts, {} failed, window {}, \
                         {} delayed (max {}), {} broken watches on survivors",
                        t.attempts,
                        t.failed,
                        secs(Some(t.window)),
                        t.delays.len(),
                        secs(t.delays.iter().max().copied()),
                        t.broken,
                    );
                    t
                })
                .collect();
            rows.push(row(name, &trials));
        }
        tables.push((title, how, rows));
    }
    println!(
        "\nMaster-2 fails under {WATCHES} watch streams and a new https connection every \
         {} ms; {TRIALS} trials per setup, {} s observed after the failure. Medians of the \
         trials, except the delay columns: median and max over every delayed attempt.",
        EVERY.as_millis(),
        OBSERVE.as_secs(),
    );
    for (title, how, rows) in tables {
        println!("\n### Master-2 {title} ({how})\n");
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
