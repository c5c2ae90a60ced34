//! `cargo xtask bench e2e`: HTTP requests through every path a user could put in
//! front of the masters, on one topology, measured by wrk.
//!
//! The `tests::cluster` topology: a client one routed hop from the segment, one
//! LB node and three masters, each master running nginx with a small plain-HTTP
//! answer on :6443 (no TLS, so that TLS does not hide what the LB costs). Paths:
//! direct to master-1 (the floor); routed through the LB node to master-1 and
//! back, with nothing balancing (what the extra hop alone costs), and the same
//! with apilb's XDP program attached, passing those packets to the stack (what
//! native XDP on a veth costs a packet it does not rewrite); kube-proxy-style
//! iptables DNAT with `statistic --mode random` on the LB node; haproxy `mode
//! tcp` at its defaults, as the master-failure benchmark runs it (`check`: inter
//! 2s, fall 3, rise 2); nginx `stream` as kubespray configures it; apilb's XDP
//! in NAT mode; and, for a client on the LB node itself, apilb's socket-LB, next
//! to a direct connection from that node.
//!
//! wrk runs pinned to CPU 0 (`taskset -c 0`), one thread and 32 connections, in
//! two workloads: keep-alive, and a new connection per request (`Connection:
//! close`). Everything else (masters, proxies, softirqs) shares the machine's CPUs.
//! The paths run interleaved, `ROUNDS` rounds; the report gives medians and ratios
//! to direct. CPU per 10k requests is the whole machine's busy time (`/proc/stat`)
//! during the run, less the direct path's in the same round: what going through
//! the LB node costs, its hop included. apilb runs only during its own paths, and
//! the iptables rules (and with them conntrack) exist only during theirs, so no
//! path pays for another.
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
use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, SNAT, Topology, VIP, apilb_config},
    live::{Apilb, PinDir, Spawned, TempDir, master_name},
    netns::Netns,
    proxies,
    report::median,
};

const PREFIX: &str = "apilb-bench-e2e";
const ROUNDS: usize = 3;
const SECONDS: u32 = 2;
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    LbNode,
}

struct Route {
    name: &'static str,
    url: String,
    from: Side,
    /// Needs `apilb run`.
    apilb: bool,
    /// Needs the iptables rules.
    iptables: bool,
}

/// One wrk run.
#[derive(Clone, Copy, Default)]
struct Run {
    rps: f64,
    p99_ms: f64,
    requests: f64,
    errors: u64,
    /// Busy CPU seconds of the whole machine during the run.
    cpu_s: f64,
}

impl Run {
    fn cpu_per_10k(&self) -> f64 {
        self.cpu_s / self.requests * 10_000.0
    }
}

fn main() {
    let started = Instant::now();
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let t = Topology::new(PREFIX);
    let dir = TempDir::new(PREFIX);
    // Before nginx starts: master-1's nginx listens on the routed address too.
    route_through_lb(&t);
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

    let paths = routes();
    let ns = |p: &Route| {
        if p.from == Side::Client {
            &t.client
        } else {
            lb
        }
    };
    for p in &paths {
        if !p.apilb && !p.iptables {
            wait_serving(ns(p), &p.url);
        }
    }
    // runs[path][workload] over rounds; workload 0 keep-alive, 1 close.
    let mut runs = vec![[Vec::new(), Vec::new()]; paths.len()];
    let mut no_port_total = 0;
    for round in 0..ROUNDS {
        eprintln!("round {} of {ROUNDS}", round + 1);
        for (i, p) in paths.iter().enumerate().filter(|(_, p)| !p.apilb) {
            if p.iptables {
                proxies::iptables_dnat(lb, &format!("{own}:{IPTABLES_PORT}"), IPTABLES_SNAT);
                wait_serving(ns(p), &p.url);
            }
            for close in [false, true] {
                runs[i][usize::from(close)].push(wrk(ns(p), &p.url, close));
            }
            if p.iptables {
                // The whole table, not just its rules: its hooks would keep
                // conntrack tracking every other path's connections through
                // this node.
                lb.exec("nft", &["delete", "table", "ip", "nat"]);
            }
        }
        let mut apilb = Apilb::start_with(
            lb,
            &config,
            &dir.0.join(format!("apilb-{round}.log")),
            &["--detach-on-exit"],
        );
        assert!(
            apilb.wait_log("datapath updated", Duration::from_secs(15)),
            "apilb did not start:\n{}",
            apilb.log_text()
        );
        for (i, p) in paths.iter().enumerate().filter(|(_, p)| p.apilb) {
            wait_serving(ns(p), &p.url);
            for close in [false, true] {
                runs[i][usize::from(close)].push(wrk(ns(p), &p.url, close));
            }
        }
        let no_port = nat_port_drops(lb);
        eprintln!("  apilb dropped {no_port} SYNs for want of a NAT port");
        no_port_total += no_port;
        apilb.signal(libc::SIGTERM);
        assert!(
            apilb.wait(Duration::from_secs(10)).is_some(),
            "apilb did not stop"
        );
    }
    report(&paths, &runs, cpus, started.elapsed());
    print_nat_budget(no_port_total);
}

/// SYNs apilb's datapath on `lb` dropped for want of a NAT port, from its metrics.
fn nat_port_drops(lb: &Netns) -> u64 {
    tests::live::metric_sum(
        &tests::live::metrics(lb),
        "apilb_datapath_packets_total{counter=\"drop_no_nat_port\"}",
    )
}

/// What apilb's default NAT port budget allows, next to the SYNs it dropped.
fn print_nat_budget(dropped: u64) {
    use lb_userspace::{capacity, config};
    // The LB node's namespace keeps Linux's default ephemeral ports, 32768-60999.
    let range = config::default_nat_ports(32_768).expect("room below 32768");
    let t = config::TcpTimeouts::default();
    let c = capacity::nat_capacity(
        config::range_len(&range),
        1,
        lb_common::HALF_OPEN_TABLE_SIZE,
        &t,
    );
    println!(
        "\napilb runs at its defaults: each master has {} NAT ports ({}-{}), so it takes \
         {} new connections at once and, held up, about {:.0} a second when a port comes \
         back {:?} after its flow closes (client first, RST, or master first with TCP \
         timestamps), {:.0} when it is held {:?} (master first, no timestamps). apilb \
         starts afresh each round, and a round's {SECONDS} s of new connections stays \
         within that. SYNs dropped for want of a NAT port, all rounds: {dropped}.",
        c.ports,
        range.start(),
        range.end(),
        c.ports,
        c.rate_after_close.floor(),
        t.close,
        c.rate_after_time_wait.floor(),
        t.time_wait,
    );
}

/// Every path measured, in the report's order.
fn routes() -> [Route; 9] {
    let own = SNAT;
    [
        path("direct to master-1", MASTERS[0], Side::Client, false, false),
        path(
            "routed via the LB node, no balancing",
            &format!("{ROUTED}:6443"),
            Side::Client,
            false,
            false,
        ),
        path(
            "iptables DNAT (statistic random)",
            &format!("{own}:{IPTABLES_PORT}"),
            Side::Client,
            false,
            true,
        ),
        path(
            "haproxy mode tcp",
            &format!("{own}:{HAPROXY_PORT}"),
            Side::Client,
            false,
            false,
        ),
        path(
            "nginx stream",
            &format!("{own}:{NGINX_PORT}"),
            Side::Client,
            false,
            false,
        ),
        path("apilb XDP (NAT)", VIP, Side::Client, true, false),
        path(
            "routed via the LB node, apilb's XDP attached (passes it)",
            &format!("{ROUTED}:6443"),
            Side::Client,
            true,
            false,
        ),
        path(
            "direct to master-1, from the LB node",
            MASTERS[0],
            Side::LbNode,
            false,
            false,
        ),
        path(
            "apilb socket-LB, from the LB node",
            VIP,
            Side::LbNode,
            true,
            false,
        ),
    ]
}

fn path(name: &'static str, to: &str, from: Side, apilb: bool, iptables: bool) -> Route {
    Route {
        name,
        url: format!("http://{to}/"),
        from,
        apilb,
        iptables,
    }
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

/// One wrk run from `ns`, pinned to CPU 0.
fn wrk(ns: &Netns, url: &str, close: bool) -> Run {
    let (duration, connections) = (format!("{SECONDS}s"), CONNECTIONS.to_string());
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
    let before = busy_cpu_s();
    let out = ns.exec("taskset", &args);
    let cpu_s = busy_cpu_s() - before;
    let run = parse_wrk(&out, cpu_s);
    eprintln!(
        "  {url} {}: {:.0} req/s, p99 {:.2} ms, {} errors",
        if close { "close" } else { "keep-alive" },
        run.rps,
        run.p99_ms,
        run.errors
    );
    run
}

fn parse_wrk(out: &str, cpu_s: f64) -> Run {
    let mut run = Run {
        cpu_s,
        ..Run::default()
    };
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

fn report(paths: &[Route], runs: &[[Vec<Run>; 2]], cpus: usize, took: Duration) {
    // Each path's floor: the direct path from the same side.
    let base = |p: &Route| {
        paths
            .iter()
            .position(|q| q.from == p.from && q.name.starts_with("direct"))
            .expect("a direct path per side")
    };
    let med =
        |i: usize, w: usize, f: fn(&Run) -> f64| median(runs[i][w].iter().map(f)).expect("runs");
    // The LB's extra CPU per 10k requests, round by round against its direct path.
    let extra = |i: usize, w: usize, b: usize| {
        median(
            runs[i][w]
                .iter()
                .zip(&runs[b][w])
                .map(|(r, d)| r.cpu_per_10k() - d.cpu_per_10k()),
        )
        .expect("runs")
    };
    println!(
        "wrk 4.1 pinned to CPU 0 (`taskset -c 0 wrk -t1 -c{CONNECTIONS} -d{SECONDS}s`), \
         {cpus} vCPUs, {ROUNDS} interleaved rounds, medians; ratios are to direct from the \
         same side (the client namespace, or the LB node for the socket-LB); run took \
         {:.0} s.\n",
        took.as_secs_f64()
    );
    println!(
        "| path | keep-alive req/s | / direct | p99 | new conn. per request req/s | / direct | p99 | \
         LB CPU s per 10k req, keep-alive / new conn. | errors |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut rps = [Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new()];
    for (i, p) in paths.iter().enumerate() {
        let b = base(p);
        let mut cells = Vec::new();
        for w in 0..2 {
            let (r, d) = (med(i, w, |r| r.rps), med(b, w, |r| r.rps));
            let l = med(i, w, |r| r.p99_ms);
            rps[w].push(r);
            p99[w].push(l);
            cells.push(format!("{r:.0} | {:.2}x | {l:.2} ms", r / d));
        }
        let cpu = if i == b {
            "(floor)".to_owned()
        } else {
            format!("{:.3} / {:.3}", extra(i, 0, b), extra(i, 1, b))
        };
        let errors: u64 = runs[i].iter().flatten().map(|r| r.errors).sum();
        println!(
            "| {} | {} | {} | {cpu} | {errors} |",
            p.name, cells[0], cells[1]
        );
    }
    let names: Vec<&str> = paths.iter().map(|p| p.name).collect();
    for (file, title, unit, [ka, close]) in [
        ("e2e-requests.svg", "Requests/s per path", "requests/s", rps),
        ("e2e-p99.svg", "p99 latency per path", "ms", p99),
    ] {
        tests::report::bars(
            file,
            &format!("{title} (median of rounds)"),
            unit,
            &names,
            &[("keep-alive", ka), ("new connection per request", close)],
        );
    }
    println!("\n![requests/s per path](tests/plots/e2e-requests.svg)");
    println!("![p99 per path](tests/plots/e2e-p99.svg)");
}
