//! `cargo xtask bench hostile`: what clients of the control plane see while an
//! attacker floods the VIP with spoofed SYNs, behind apilb and behind the
//! balancers it replaces.
//!
//! The `tests::cluster` topology with TLS stub apiservers on the three masters
//! (as `bench failover` runs it), and one of: apilb at its defaults
//! (`tests::plane`), kube-proxy-style iptables DNAT on the LB node, whose
//! conntrack holds every SYN's entry (`SYN_SENT`, 120 s by default), or haproxy
//! with kubeadm's HA guide config, whose listening socket on the LB node takes
//! the SYNs (`tests::proxies`). The attacker (`tests::flood`) sits on the
//! masters' segment and sends bare SYNs to VIP:6443 from random addresses in
//! 10.0.0.0/8, which nothing routes, at [`RATE`] a second for [`FLOOD`]: the
//! hostile tests' spoofed SYN flood (`tests/tests/hostile.rs`, scenario a),
//! paced, so that every path is offered the same load, the achieved rate
//! reported.
//!
//! Each run opens [`WATCHES`] watch streams (long-lived established
//! connections), then starts a new https connection every 10 ms: [`QUIET`] of
//! that traffic alone, then the flood, then [`AFTER`] more. Per run: the new
//! connections started during the flood that succeeded, and their p99 time to
//! an answer (connect, TLS, response head; a failure is an error or no answer
//! within 5 s); the connections started after it that failed; the streams
//! broken; the machine's busy CPU (`/proc/stat`: user, nice, system, irq,
//! softirq) a second, during the quiet traffic and during the flood. On veth
//! the LB node's work for a flooded frame runs in the sending CPU's softirq, so
//! the busy CPU includes the attacker's own sending, which is the same for
//! every path. Every path runs [`ROUNDS`] times, interleaved, each time on a
//! fresh cluster; the table shows medians.
//!
//! Unrouted sources favour haproxy: its node cannot route a SYN-ACK to them,
//! so its stack drops each SYN before it holds any state (no SYN cookie is
//! sent), while apilb and iptables forward every SYN to a master, which
//! answers it, and keep a half-open flow or a conntrack entry for it.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{Shape, Topology},
    flood::{Attacker, Rng, Sent, kernel_counter},
    natstate::{NatCounters, flow_tables},
    plane::ControlPlane,
    proxies::{Proxy, ProxyPlane},
    report::median,
    traffic::Traffic,
};

const ROUNDS: usize = 3;
const WATCHES: usize = 30;
const EVERY: Duration = Duration::from_millis(10);
const QUIET: Duration = Duration::from_secs(3);
const FLOOD: Duration = Duration::from_secs(10);
/// Spoofed SYNs a second.
const RATE: f64 = 30_000.0;
const AFTER: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Apilb,
    Iptables,
    Haproxy,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Apilb, Setup::Iptables, Setup::Haproxy];

    fn name(self) -> &'static str {
        match self {
            Setup::Apilb => "apilb XDP (NAT), defaults",
            Setup::Iptables => "iptables DNAT (conntrack)",
            Setup::Haproxy => "haproxy 2.6, kubeadm HA guide config",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Setup::Apilb => "apilb-bhx-lb",
            Setup::Iptables => "apilb-bhx-ipt",
            Setup::Haproxy => "apilb-bhx-hap",
        }
    }
}

enum Plane {
    Apilb(ControlPlane),
    Proxied(ProxyPlane),
}

impl Plane {
    fn start(setup: Setup) -> Self {
        match setup {
            Setup::Apilb => Plane::Apilb(ControlPlane::start(setup.prefix(), Shape::default())),
            Setup::Iptables => {
                Plane::Proxied(ProxyPlane::start(setup.prefix(), Proxy::IptablesDnat))
            }
            Setup::Haproxy => {
                Plane::Proxied(ProxyPlane::start(setup.prefix(), Proxy::HaproxyKubeadm))
            }
        }
    }

    fn parts(&self) -> (&Topology, &Path) {
        match self {
            Self::Apilb(p) => (&p.t, p.ca()),
            Self::Proxied(p) => (&p.t, &p.pki.ca_pem),
        }
    }

    /// What the LB node kept of the flood, in a few words: apilb's new flows,
    /// SYNs it dropped for want of a port and its half-open table; conntrack's
    /// entries; the SYN cookies the node's stack sent.
    fn state(&self, setup: Setup, before: &NatCounters) -> String {
        let lb = self.parts().0.lb();
        match self {
            Self::Apilb(p) => {
                let nat = NatCounters::read(lb).since(before);
                let tables: Vec<String> = flow_tables(&p.pins.0)
                    .iter()
                    .map(|t| format!("{} {}/{}", t.name, t.entries, t.size))
                    .collect();
                format!(
                    "{} new flows, {} SYNs dropped for want of a NAT port; {}",
                    nat.flow_new,
                    nat.dropped,
                    tables.join(", ")
                )
            }
            Self::Proxied(_) => {
                let sysctl = |key: &str| {
                    lb.exec("cat", &[&format!("/proc/sys/net/netfilter/{key}")])
                        .trim()
                        .to_owned()
                };
                let conntrack = if setup == Setup::Iptables {
                    format!(
                        "conntrack {} of {}; ",
                        sysctl("nf_conntrack_count"),
                        sysctl("nf_conntrack_max")
                    )
                } else {
                    String::new()
                };
                format!(
                    "{conntrack}{} SYN cookies sent by the LB node",
                    kernel_counter(lb, "TcpExt", "SyncookiesSent")
                )
            }
        }
    }
}

/// Busy CPU time of the whole machine so far, in seconds.
fn busy_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .expect("the cpu line")
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user, nice, system, (idle, iowait,) irq, softirq
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6];
    // SAFETY: sysconf with a valid name has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

struct Run {
    sent: Sent,
    during: usize,
    ok: usize,
    p99: Option<Duration>,
    after: usize,
    after_failed: usize,
    broken: usize,
    /// Busy CPU seconds a second: traffic alone, and with the flood.
    cpu_quiet: f64,
    cpu_flood: f64,
    state: String,
}

fn run(setup: Setup) -> Run {
    let plane = Plane::start(setup);
    let (t, ca) = plane.parts();
    let x = Attacker::on_segment(t, setup.prefix());
    let mut rng = Rng::new();
    let nat = match &plane {
        Plane::Apilb(_) => NatCounters::read(t.lb()),
        Plane::Proxied(_) => NatCounters::default(),
    };
    let traffic = Traffic::start(&t.client, ca, WATCHES, Some(EVERY));
    let cpu = busy_cpu_s();
    thread::sleep(QUIET);
    let cpu_quiet = (busy_cpu_s() - cpu) / QUIET.as_secs_f64();
    let start = Instant::now();
    let cpu = busy_cpu_s();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count of frames"
    )]
    let count = (RATE * FLOOD.as_secs_f64()) as u64;
    let sent = x.send_paced(
        (0..count).map(|_| x.spoofed_syn(&mut rng)),
        Some(RATE),
        FLOOD + Duration::from_secs(1),
    );
    let end = Instant::now();
    let cpu_flood = (busy_cpu_s() - cpu) / (end - start).as_secs_f64();
    thread::sleep(AFTER);
    let r = traffic.stop();
    let state = plane.state(setup, &nat);
    let during: Vec<_> = r.since(start).filter(|a| a.at < end).collect();
    let mut took: Vec<Duration> = during
        .iter()
        .filter(|a| a.master().is_some())
        .filter_map(|a| a.took)
        .collect();
    took.sort_unstable();
    let p99 = (!took.is_empty()).then(|| took[(took.len() * 99).div_ceil(100) - 1]);
    let after: Vec<_> = r.since(end).collect();
    let run = Run {
        sent,
        during: during.len(),
        ok: took.len(),
        p99,
        after: after.len(),
        after_failed: after.iter().filter(|a| a.master().is_none()).count(),
        broken: r.broken_watches().values().sum(),
        cpu_quiet,
        cpu_flood,
        state,
    };
    eprintln!(
        "  {}: {}; during the flood {}/{} new connections succeeded, p99 {}; after it \
         {} of {} failed; {} of {WATCHES} streams broken; busy CPU {:.2} s/s quiet, \
         {:.2} s/s flooded; {}",
        setup.name(),
        run.sent,
        run.ok,
        run.during,
        ms(run.p99),
        run.after_failed,
        run.after,
        run.broken,
        run.cpu_quiet,
        run.cpu_flood,
        run.state
    );
    run
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1e3),
    )
}

fn main() {
    let started = Instant::now();
    let mut runs: Vec<Vec<Run>> = Setup::ALL.iter().map(|_| Vec::new()).collect();
    for round in 1..=ROUNDS {
        eprintln!("round {round} of {ROUNDS}");
        for (i, setup) in Setup::ALL.into_iter().enumerate() {
            runs[i].push(run(setup));
        }
    }
    println!(
        "A spoofed SYN flood at the VIP: {RATE:.0} SYNs/s offered for {} s from random \
         unrouted sources, by an attacker on the masters' segment; meanwhile {WATCHES} \
         watch streams opened before it and a new https connection every {} ms. {ROUNDS} \
         rounds, each on a fresh cluster, medians; the last column is the last round's. \
         Answer time: connect, TLS and response head, of the connections that succeeded. \
         Busy CPU is the whole machine's, the attacker's sending included. Run took {:.0} s.\n",
        FLOOD.as_secs(),
        EVERY.as_millis(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "| path | SYNs sent /s | new connections during the flood: succeeded | p99 answer \
         | failed after it | streams lost (of {WATCHES}) | busy CPU s/s: traffic alone | \
         with the flood | the LB node's state after the flood |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for (setup, runs) in Setup::ALL.iter().zip(&runs) {
        let med = |f: fn(&Run) -> f64| median(runs.iter().map(f)).unwrap_or(f64::NAN);
        println!(
            "| {} | {:.0} | {:.1} % (of {}) | {} | {} | {} | {:.2} | {:.2} | {} |",
            setup.name(),
            med(|r| r.sent.rate()),
            med(|r| 100.0 * r.ok as f64 / r.during.max(1) as f64),
            median(runs.iter().map(|r| r.during)).unwrap_or(0),
            ms(median(runs.iter().filter_map(|r| r.p99))),
            median(runs.iter().map(|r| r.after_failed)).unwrap_or(0),
            median(runs.iter().map(|r| r.broken)).unwrap_or(0),
            med(|r| r.cpu_quiet),
            med(|r| r.cpu_flood),
            runs.last().map_or("", |r| r.state.as_str()),
        );
    }
}
