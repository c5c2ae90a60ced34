//! `cargo xtask bench e2e`: HTTP requests through every path a user could put in
//! front of the masters, on one topology, at steady state: keep-alive, and a new
//! connection per request with either side closing first.
//!
//! The `tests::cluster` topology: a client one routed hop from the segment, one
//! LB node and three masters, each master running nginx with a small plain-HTTP
//! answer on :6443 (no TLS, so that TLS does not hide what the LB costs). Paths:
//! direct to master-1 (the floor); routed through the LB node to master-1 and
//! back, with nothing balancing (what the extra hop costs); kube-proxy-style
//! iptables DNAT with `statistic --mode random` on the LB node; haproxy `mode
//! tcp` at its defaults, as the master-failure benchmark runs it (`check`: inter
//! 2s, fall 3, rise 2); nginx `stream` as kubespray configures it; apilb's XDP
//! in NAT mode; and, for a client on the LB node itself, apilb's socket-LB, next
//! to a direct connection from that node.
//!
//! Three workloads, each from the client side pinned to CPU 0 (`taskset -c 0`)
//! with 32 connections; everything else (masters, proxies, softirqs) shares the
//! machine's CPUs:
//! - keep-alive: wrk, one thread, [`KEEPALIVE_SECONDS`] per run;
//! - a new connection per request, the server closing first: wrk with
//!   `Connection: close`, [`CLOSE_SECONDS`] per run; the master holds the
//!   `TIME_WAIT`, which is what makes a NAT hold a port longest;
//! - a new connection per request, the client closing first (it reads the whole
//!   answer, then closes; it holds the `TIME_WAIT`): `oneshot-load`
//!   (`tests::oneshot`), one thread and an event loop as wrk, since wrk cannot
//!   close first; [`CLOSE_SECONDS`] per run. Its p99 runs from connect to the
//!   answer's last byte; wrk's starts at the request, after the connect.
//!
//! The connection-per-request runs are long, and apilb runs continuously, started
//! once before the first round and never restarted, after one warm-up of
//! [`WARM_UP`] through it: a NAT port comes back only after its flow's hold
//! (at most the 65 s of a master-first close without timestamps), so the first
//! seconds of a fresh datapath, every port free, say nothing of the rate it
//! sustains. Every run through apilb reports the SYNs it dropped for want of a
//! NAT port (`drop_no_nat_port`) and the ports it reclaimed for new flows
//! (`tests::natstate`), and the headline is its new-connection rate against
//! iptables DNAT's in the same round, for both close workloads: the target is
//! 0.9x or more with no SYN dropped for want of a port, reported, never asserted.
//!
//! Because apilb's program stays attached to the LB node's `eth0`, every path
//! through the LB node crosses it (a packet not for the VIP passes, at a cost
//! `bench xdp` measures): the routed hop includes it, and so do the proxies, as on
//! a node that runs apilb next to them. The iptables rules (and with them
//! conntrack) exist only during their own path's runs, so no other path pays for
//! them.
//!
//! The paths run interleaved, [`ROUNDS`] rounds; the report gives medians and
//! ratios to direct. CPU per 10k requests is the whole machine's busy time
//! (`/proc/stat`) during the run, less the direct path's in the same round: what
//! going through the LB node costs, its hop included. To keep the whole under
//! about 25 minutes (8 keep-alive paths x 10 s, 6 x 2 close workloads x 30 s, 3
//! rounds, and the warm-up), the close workloads leave out the two paths from the
//! LB node: node-local new connections are `bench local`'s subject, and the
//! socket-LB holds no NAT port.
//!
//! The iptables path SNATs to an address of its own. DNAT keeps the client's
//! source port, and the masters close first (`Connection: close`), so they hold
//! `TIME_WAIT` sockets for `<LB address>:<port>`. Sharing the LB node's address
//! with the proxies' and the node's own connections, a reused port met a
//! `TIME_WAIT` socket whose timestamps came from another sender's clock, which
//! the master does not reopen for a SYN that looks older (PAWS, most likely):
//! later rounds measured 300 requests/s instead of 10000, SYNs waiting for
//! their retransmit. With an address of its own, every round measured alike.
//!
//! When the client closes first, haproxy and nginx close their connection to the
//! master first too, so the LB node holds a `TIME_WAIT` for each, at its own
//! address and an ephemeral port: at Debian's defaults (`tcp_tw_reuse = 2`,
//! loopback only; 28,232 ports per master, held 60 s) that caps a proxy near
//! 1,400 new connections a second over three masters, as a NAT's port hold caps
//! it. The bench leaves the node at its defaults, as a user would find it.
//!
//! The client namespace reuses its `TIME_WAIT` ports for new connections
//! (`tcp_tw_reuse = 1`, as `bench local` does on the LB node): closing first
//! 10,000 times a second, one client address would otherwise run out of ports
//! in three seconds.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, SNAT, Topology, VIP, apilb_config},
    live::{Apilb, PinDir, Spawned, TempDir, master_name, sibling_bin},
    natstate::NatCounters,
    netns::Netns,
    proxies,
    report::median,
};

const PREFIX: &str = "apilb-bench-e2e";
const ROUNDS: usize = 3;
/// Seconds of each keep-alive run.
const KEEPALIVE_SECONDS: u32 = 10;
/// Seconds of each connection-per-request run.
const CLOSE_SECONDS: u32 = 30;
/// Server-first new connections through apilb before the first round: longer
/// than any port hold, the 65 s after a master-first close without timestamps.
const WARM_UP: Duration = Duration::from_secs(70);
const CONNECTIONS: u32 = 32;
const HAPROXY_PORT: u16 = 7001;
const NGINX_PORT: u16 = 7002;
const IPTABLES_PORT: u16 = 7003;
/// The iptables path's SNAT address, a second one of the LB node's (see the
/// module docs).
const IPTABLES_SNAT: &str = "198.51.100.50";
/// A second address of master-1 that the router and master-1 route through the
/// LB node, both ways: the LB node's forwarding alone, with nothing balancing.
const ROUTED: &str = "203.0.113.11";
/// The headline's target: apilb's new connections/s over iptables DNAT's.
const TARGET_RATIO: f64 = 0.9;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    LbNode,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    KeepAlive,
    ServerCloses,
    ClientCloses,
}

impl Workload {
    const ALL: [Workload; 3] = [
        Workload::KeepAlive,
        Workload::ServerCloses,
        Workload::ClientCloses,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::KeepAlive => "keep-alive",
            Workload::ServerCloses => "server closes first",
            Workload::ClientCloses => "client closes first",
        }
    }

    fn seconds(self) -> u32 {
        match self {
            Workload::KeepAlive => KEEPALIVE_SECONDS,
            Workload::ServerCloses | Workload::ClientCloses => CLOSE_SECONDS,
        }
    }
}

struct Route {
    name: &'static str,
    /// address:port.
    to: String,
    from: Side,
    /// Through apilb's NAT: its counters are read around each run.
    nat: bool,
    /// Needs the iptables rules.
    iptables: bool,
    /// Measured in the close workloads too.
    close: bool,
}

impl Route {
    fn url(&self) -> String {
        format!("http://{}/", self.to)
    }

    fn workloads(&self) -> &'static [Workload] {
        if self.close {
            &Workload::ALL
        } else {
            &Workload::ALL[..1]
        }
    }
}

/// One run of wrk or oneshot-load.
#[derive(Clone, Default)]
struct Run {
    rps: f64,
    p99_ms: f64,
    requests: f64,
    errors: u64,
    /// Busy CPU seconds of the whole machine during the run.
    cpu_s: f64,
    /// apilb's NAT counters' movement during the run, on its path.
    nat: Option<NatCounters>,
}

impl Run {
    fn cpu_per_10k(&self) -> f64 {
        self.cpu_s / self.requests * 10_000.0
    }
}

/// Runs by path, then workload (`Workload as usize`), then round.
type Runs = Vec<[Vec<Run>; 3]>;

fn main() {
    let started = Instant::now();
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let t = Topology::new(PREFIX);
    let dir = TempDir::new(PREFIX);
    // Before nginx starts: master-1's nginx listens on the routed address too.
    route_through_lb(&t);
    for key in ["tcp_tw_reuse=1", "ip_local_port_range=1024 65535"] {
        t.client
            .exec("sysctl", &["-qw", &format!("net.ipv4.{key}")]);
    }
    let _masters: Vec<Spawned> = t
        .masters
        .iter()
        .zip(MASTERS)
        .map(|(ns, m)| http_master(ns, &dir.0.join(master_name(m)), m))
        .collect();
    let lb = t.lb();
    lb.ip(&["addr", "add", &format!("{IPTABLES_SNAT}/32"), "dev", "eth0"]);
    let own = SNAT;
    let _haproxy = proxies::Haproxy::start(
        lb,
        &dir.0,
        proxies::Proxy::HaproxyDefaults,
        &format!("{own}:{HAPROXY_PORT}"),
    );
    let _nginx = proxies::nginx_stream(
        lb,
        &dir.0.join("nginx-stream"),
        &format!("{own}:{NGINX_PORT}"),
        cpus,
    );
    let pins = PinDir::new(PREFIX);
    let config = dir.0.join("apilb.toml");
    let mut text = apilb_config(&pins.instance(), "", "kind = \"tcp\"");
    text.push_str("[local]\nenabled = true\n");
    std::fs::write(&config, text).expect("config");
    let mut apilb = Apilb::start_with(lb, &config, &dir.0.join("apilb.log"), &["--detach-on-exit"]);
    assert!(
        apilb.wait_log("datapath updated", Duration::from_secs(15)),
        "apilb did not start:\n{}",
        apilb.log_text()
    );

    let paths = routes();
    let ns = |p: &Route| {
        if p.from == Side::Client {
            &t.client
        } else {
            lb
        }
    };
    for p in paths.iter().filter(|p| !p.iptables) {
        wait_serving(ns(p), &p.url());
    }
    let vip = paths.iter().find(|p| p.nat).expect("apilb's path");
    eprintln!(
        "warm-up: {} s of new connections through apilb",
        WARM_UP.as_secs()
    );
    let warm_up = measure(lb, vip, || {
        wrk(
            &t.client,
            &vip.url(),
            true,
            u32::try_from(WARM_UP.as_secs()).expect("secs"),
        )
    });
    let mut runs: Runs = vec![[Vec::new(), Vec::new(), Vec::new()]; paths.len()];
    for round in 0..ROUNDS {
        eprintln!("round {} of {ROUNDS}", round + 1);
        for (i, p) in paths.iter().enumerate() {
            if p.iptables {
                proxies::iptables_dnat(lb, &format!("{own}:{IPTABLES_PORT}"), IPTABLES_SNAT);
                wait_serving(ns(p), &p.url());
            }
            for &w in p.workloads() {
                let run = measure(lb, p, || match w {
                    Workload::KeepAlive => wrk(ns(p), &p.url(), false, w.seconds()),
                    Workload::ServerCloses => wrk(ns(p), &p.url(), true, w.seconds()),
                    Workload::ClientCloses => oneshot(ns(p), &p.to, w.seconds()),
                });
                runs[i][w as usize].push(run);
            }
            if p.iptables {
                // The whole table, not just its rules: its hooks would keep
                // conntrack tracking every other path's connections through
                // this node.
                lb.exec("nft", &["delete", "table", "ip", "nat"]);
            }
        }
    }
    apilb.signal(libc::SIGTERM);
    assert!(
        apilb.wait(Duration::from_secs(10)).is_some(),
        "apilb did not stop"
    );
    report(&paths, &runs, cpus, started.elapsed());
    report_nat(&paths, &runs, &warm_up);
    report_headline(&paths, &runs);
}

/// Run `f` (a wrk or oneshot-load run on path `p`), with the machine's busy CPU
/// time around it and, on apilb's path, its NAT counters.
fn measure(lb: &Netns, p: &Route, f: impl FnOnce() -> Run) -> Run {
    let before = p.nat.then(|| NatCounters::read(lb));
    let cpu = busy_cpu_s();
    let mut run = f();
    run.cpu_s = busy_cpu_s() - cpu;
    if let Some(before) = before {
        let nat = NatCounters::read(lb).since(&before);
        eprintln!(
            "    apilb: {} new flows, {} SYNs dropped for want of a NAT port, {} ports reclaimed",
            nat.flow_new,
            nat.dropped,
            nat.reclaimed_text()
        );
        run.nat = Some(nat);
    }
    run
}

/// Every path measured, in the report's order.
fn routes() -> [Route; 8] {
    let own = SNAT;
    let path = |name, to: &str, from, nat, iptables, close| Route {
        name,
        to: to.to_owned(),
        from,
        nat,
        iptables,
        close,
    };
    [
        path(
            "direct to master-1",
            MASTERS[0],
            Side::Client,
            false,
            false,
            true,
        ),
        path(
            "routed via the LB node, no balancing",
            &format!("{ROUTED}:6443"),
            Side::Client,
            false,
            false,
            true,
        ),
        path(
            "iptables DNAT (statistic random)",
            &format!("{own}:{IPTABLES_PORT}"),
            Side::Client,
            false,
            true,
            true,
        ),
        path(
            "haproxy mode tcp",
            &format!("{own}:{HAPROXY_PORT}"),
            Side::Client,
            false,
            false,
            true,
        ),
        path(
            "nginx stream",
            &format!("{own}:{NGINX_PORT}"),
            Side::Client,
            false,
            false,
            true,
        ),
        path("apilb XDP (NAT)", VIP, Side::Client, true, false, true),
        path(
            "direct to master-1, from the LB node",
            MASTERS[0],
            Side::LbNode,
            false,
            false,
            false,
        ),
        path(
            "apilb socket-LB, from the LB node",
            VIP,
            Side::LbNode,
            false,
            false,
            false,
        ),
    ]
}

/// nginx answering every request on `addr` with a line naming the master; on
/// master-1 also on [`ROUTED`].
fn http_master(ns: &Netns, dir: &Path, addr: &str) -> Spawned {
    let name = master_name(addr);
    let also = if addr == MASTERS[0] {
        format!("listen {ROUTED}:6443 reuseport;")
    } else {
        String::new()
    };
    proxies::nginx(
        ns,
        dir,
        &format!(
            "worker_processes 1;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  server {{ listen {addr} reuseport; {also} default_type text/plain;
           location / {{ return 200 \"{name}\\n\"; }} }}
}}
"
        ),
    )
}

/// [`ROUTED`]: on master-1, with replies from it sent back through the LB node;
/// the client, the router and the LB node route it.
fn route_through_lb(t: &Topology) {
    let m1 = &t.masters[0];
    let via_lb = ["via", SNAT];
    m1.ip(&["addr", "add", &format!("{ROUTED}/32"), "dev", "eth0"]);
    m1.ip(&["rule", "add", "from", ROUTED, "table", "99"]);
    m1.ip(&[
        &["route", "add", "192.0.2.0/24"][..],
        &via_lb,
        &["table", "99"],
    ]
    .concat());
    t.router
        .ip(&[&["route", "add", &format!("{ROUTED}/32")][..], &via_lb].concat());
    t.client
        .ip(&["route", "add", &format!("{ROUTED}/32"), "via", "192.0.2.1"]);
    let to_m1 = MASTERS[0].split(':').next().expect("address");
    t.lb()
        .ip(&["route", "add", &format!("{ROUTED}/32"), "via", to_m1]);
}

/// Wait (at most 15 s) until `url` answers from `ns`.
fn wait_serving(ns: &Netns, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "curl", "-sf", "-m", "1", url])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{url} does not answer");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Busy CPU time of the whole machine so far, in seconds (user, nice, system,
/// irq, softirq from `/proc/stat`).
fn busy_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().expect("number"))
        .collect();
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    [0, 1, 2, 5, 6].iter().map(|&i| fields[i]).sum::<f64>() / hz
}

fn parse_wrk(out: &str) -> Run {
    let mut run = Run::default();
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_ms = millis(v.trim());
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            run.requests = n.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            run.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    assert!(run.requests > 0.0, "wrk measured nothing:\n{out}");
    run
}

/// wrk's latency figure (`812.00us`, `1.23ms`, `2.00s`) in ms.
fn millis(v: &str) -> f64 {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "s" => n * 1000.0,
        _ => n,
    }
}

/// One wrk run from `ns`, pinned to CPU 0, for `seconds`.
fn wrk(ns: &Netns, url: &str, close: bool, seconds: u32) -> Run {
    let (duration, connections) = (format!("{seconds}s"), CONNECTIONS.to_string());
    let mut args = vec![
        "-c",
        "0",
        "wrk",
        "-t1",
        "-c",
        &connections,
        "-d",
        &duration,
        "--latency",
    ];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let run = parse_wrk(&ns.exec("taskset", &args));
    eprintln!(
        "  {url} {}: {:.0} req/s, p99 {:.2} ms, {} errors",
        if close {
            Workload::ServerCloses.name()
        } else {
            Workload::KeepAlive.name()
        },
        run.rps,
        run.p99_ms,
        run.errors
    );
    run
}

/// One oneshot-load run from `ns` to `to` (the client closing first), pinned to
/// CPU 0, for `seconds`.
fn oneshot(ns: &Netns, to: &str, seconds: u32) -> Run {
    let bin = sibling_bin("oneshot-load");
    let (seconds, connections) = (seconds.to_string(), CONNECTIONS.to_string());
    let out = ns.exec(
        "taskset",
        &[
            "-c",
            "0",
            bin.to_str().expect("utf-8 path"),
            "--to",
            to,
            "--connections",
            &connections,
            "--seconds",
            &seconds,
        ],
    );
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("oneshot-load printed no {key}:\n{out}"))
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a count, printed as an integer"
    )]
    let errors = value("errors") as u64;
    let run = Run {
        rps: value("rps"),
        p99_ms: value("p99_ms"),
        requests: value("requests"),
        errors,
        ..Run::default()
    };
    assert!(run.requests > 0.0, "oneshot-load measured nothing:\n{out}");
    eprintln!(
        "  {to} {}: {:.0} req/s, p99 {:.2} ms, {} errors",
        Workload::ClientCloses.name(),
        run.rps,
        run.p99_ms,
        run.errors
    );
    run
}

fn report(paths: &[Route], runs: &Runs, cpus: usize, took: Duration) {
    // Each path's floor: the direct path from the same side.
    let base = |p: &Route| {
        paths
            .iter()
            .position(|q| q.from == p.from && q.name.starts_with("direct"))
            .expect("a direct path per side")
    };
    let med = |i: usize, w: Workload, f: fn(&Run) -> f64| median(runs[i][w as usize].iter().map(f));
    // The LB's extra CPU per 10k requests, round by round against its direct path.
    let extra = |i: usize, w: Workload, b: usize| {
        median(
            runs[i][w as usize]
                .iter()
                .zip(&runs[b][w as usize])
                .map(|(r, d)| r.cpu_per_10k() - d.cpu_per_10k()),
        )
    };
    println!(
        "Each run from the client's side pinned to CPU 0 with {CONNECTIONS} connections: \
         keep-alive and server-first close by wrk (`taskset -c 0 wrk -t1 -c{CONNECTIONS}`, \
         the latter with `Connection: close`), client-first close by `oneshot-load` (one \
         thread, an event loop, as wrk). Keep-alive runs {KEEPALIVE_SECONDS} s, the others \
         {CLOSE_SECONDS} s, after a {} s warm-up through apilb, which runs throughout. \
         {cpus} vCPUs, {ROUNDS} interleaved rounds, medians; ratios are to direct from the \
         same side (the client namespace, or the LB node for the socket-LB); run took \
         {:.0} s.\n",
        WARM_UP.as_secs(),
        took.as_secs_f64()
    );
    println!(
        "| path | keep-alive req/s | / direct | p99 | server closes first: req/s | / direct | \
         p99 | client closes first: req/s | / direct | p99 | LB CPU s per 10k req \
         (keep-alive / server / client closes) | errors |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut rps = [Vec::new(), Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new(), Vec::new()];
    for (i, p) in paths.iter().enumerate() {
        let b = base(p);
        let mut cells = Vec::new();
        let mut cpu = Vec::new();
        for w in Workload::ALL {
            let (Some(r), Some(d), Some(l)) = (
                med(i, w, |r| r.rps),
                med(b, w, |r| r.rps),
                med(i, w, |r| r.p99_ms),
            ) else {
                cells.push("- | - | -".to_owned());
                cpu.push("-".to_owned());
                rps[w as usize].push(0.0);
                p99[w as usize].push(0.0);
                continue;
            };
            rps[w as usize].push(r);
            p99[w as usize].push(l);
            cells.push(format!("{r:.0} | {:.2}x | {l:.2} ms", r / d));
            cpu.push(extra(i, w, b).map_or_else(|| "-".to_owned(), |c| format!("{c:.3}")));
        }
        let cpu = if i == b {
            "(floor)".to_owned()
        } else {
            cpu.join(" / ")
        };
        let errors: u64 = runs[i].iter().flatten().map(|r| r.errors).sum();
        println!("| {} | {} | {cpu} | {errors} |", p.name, cells.join(" | "));
    }
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    for (file, title, unit, [ka, server, client]) in [
        ("e2e-requests.svg", "Requests/s per path", "requests/s", rps),
        ("e2e-p99.svg", "p99 latency per path", "ms", p99),
    ] {
        tests::report::bars(
            file,
            &format!("{title} (median of rounds; no bar: not measured)"),
            unit,
            &names,
            &[
                ("keep-alive", ka),
                ("new connection per request, server closes first", server),
                ("new connection per request, client closes first", client),
            ],
        );
    }
    println!("\n![requests/s per path](tests/plots/e2e-requests.svg)");
    println!("![p99 per path](tests/plots/e2e-p99.svg)");
}

/// apilb's NAT counters during each of its runs, the warm-up first.
fn report_nat(paths: &[Route], runs: &Runs, warm_up: &Run) {
    let i = paths.iter().position(|p| p.nat).expect("apilb's path");
    println!("\napilb's NAT ports during each of its runs (it ran throughout, at its defaults):\n");
    println!(
        "| run | req/s | new flows | SYNs dropped for want of a NAT port | NAT ports reclaimed |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    let row = |name: String, r: &Run| {
        let nat = r.nat.clone().unwrap_or_default();
        println!(
            "| {name} | {:.0} | {} | {} | {} |",
            r.rps,
            nat.flow_new,
            nat.dropped,
            nat.reclaimed_text()
        );
    };
    row(
        format!(
            "warm-up, {}, {} s",
            Workload::ServerCloses.name(),
            WARM_UP.as_secs()
        ),
        warm_up,
    );
    for round in 0..ROUNDS {
        for w in Workload::ALL {
            if let Some(r) = runs[i][w as usize].get(round) {
                row(format!("round {}, {}", round + 1, w.name()), r);
            }
        }
    }
}

/// apilb's new connections/s over iptables DNAT's, round by round, for both
/// close workloads, against [`TARGET_RATIO`].
fn report_headline(paths: &[Route], runs: &Runs) {
    let apilb = paths.iter().position(|p| p.nat).expect("apilb's path");
    let iptables = paths
        .iter()
        .position(|p| p.iptables)
        .expect("iptables' path");
    println!(
        "\nNew connections through apilb against iptables DNAT in the same round (target: \
         {TARGET_RATIO}x or more, with no SYN dropped for want of a NAT port; reported, \
         not asserted):\n"
    );
    for w in [Workload::ServerCloses, Workload::ClientCloses] {
        let (a, d) = (&runs[apilb][w as usize], &runs[iptables][w as usize]);
        let ratios: Vec<f64> = a.iter().zip(d).map(|(a, d)| a.rps / d.rps).collect();
        let dropped: u64 = a
            .iter()
            .filter_map(|r| r.nat.as_ref())
            .map(|n| n.dropped)
            .sum();
        let Some(m) = median(ratios.iter().copied()) else {
            continue;
        };
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        let met = if m >= TARGET_RATIO && dropped == 0 {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "- **{}: {m:.2}x** (rounds: {}), {dropped} SYNs dropped for want of a NAT port: \
             target {met}",
            w.name(),
            each.join(", ")
        );
    }
}
