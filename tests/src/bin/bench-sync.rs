//! `cargo xtask bench sync`: what flow sync (issue 19) costs two LB nodes.
//!
//! The `tests::elect` topology: two LB nodes, each running `apilb run` (VRRP,
//! 100 ms adverts; lb1 at priority 150 owns the VIP), three masters running the
//! stub apiserver, answering plain HTTP on :6443 (`--plain-http`: a TLS handshake
//! per connection would measure the two vCPUs, not the LB, which sees only TCP).
//!
//! - **Steady state.** `oneshot-load --rate` in the client namespace opens new
//!   connections through the VIP at 1,000, 5,000 and then 10,000 a second, open loop
//!   (each a GET, the client closing first), [`WARM_UP`] then [`WINDOW`] per
//!   rate, long enough to pass the half-open (5 s), close (2 s) and last-ACK
//!   (10 s) timeouts, so that NAT ports are being reclaimed as fast as they are
//!   claimed. Measured over the window: new flows (the datapath's `flow_new` on
//!   lb1), sync bytes each way and records (lb1's `/status`: its links with lb2),
//!   flows installed on lb2, each apilb's CPU (utime + stime of its process,
//!   every thread), the links' lag (the oldest message unacknowledged, sampled
//!   every second). The same pair of apilbs runs through every rate, never
//!   restarted; the same runs with sync off, on a pair of its own, are the CPU
//!   baseline.
//! - **Bulk resync.** After the load, [`PRELOAD`] established flows are copied
//!   into lb1's pinned tables (`tests::preload`: clones of flows its datapath
//!   made), then lb2 is stopped (SIGTERM) and started again [`TRIALS`] times: at
//!   each start it asks lb1 for a bulk, which lb1 sends from its tables and lb2
//!   installs; lb2's `/status` says how long that took from its request to the
//!   bulk's end (`apilb_sync_bulk_seconds{dir="received"}`) and how many records
//!   it carried.
//!
//! Everything lives in the bench's own namespaces, pins and processes (prefix
//! `apilb-bsy`), removed when it ends, by a panic too; every load is bounded in
//! count and time.

use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    thread,
    time::{Duration, Instant},
};

use lb_userspace::status::{Snapshot, SyncPeerStatus};
use tests::{
    cluster::{MASTERS, Topology, VIP_ADDR},
    elect::{
        Node, VrrpVip, holders, node_config_with_ports, sync_key, sync_tables, two_lb_nodes,
        vrrp_vip,
    },
    live::{
        Spawned, TempDir, cpu_ticks, master_names, raise_open_files, sibling_bin,
        stub_apiserver_with, ticks_per_second,
    },
    natstate::NatCounters,
    netns::Netns,
    oneshot::wait_serving,
    pki::Pki,
    preload::established_copies,
    report::median,
};

const RATES: [u32; 3] = [1_000, 5_000, 10_000];
const WARM_UP: Duration = Duration::from_secs(10);
const WINDOW: Duration = Duration::from_secs(20);
/// The NAT port range the two nodes split, each claiming half of it: below
/// [`NODE_EPHEMERAL`], which apilb reserves it from (its probes and its sync
/// connections need ports of their own).
const NAT_PORTS: RangeInclusive<u16> = 1024..=63_999;
/// The LB nodes' own ephemeral ports: narrowed, so that lb1's half of the NAT
/// ports gives three masters room for [`PRELOAD`] flows.
const NODE_EPHEMERAL: &str = "64000 65535";
/// Established flows copied into lb1's tables for the bulk: nearly the 94,464
/// leases its half of the NAT ports gives three masters.
const PRELOAD: usize = 90_000;
const TRIALS: usize = 3;
/// At most this many connections in flight in `oneshot-load`.
const MAX_IN_FLIGHT: usize = 20_000;

/// Two apilb nodes and the stub apiservers, running until dropped; field order
/// is drop order: the processes go before their namespaces.
struct Pair {
    nodes: [Node; 2],
    _stubs: Vec<Spawned>,
    t: Topology,
    dir: TempDir,
}

impl Pair {
    fn start(prefix: &str, sync: bool) -> Self {
        let (t, dir) = two_lb_nodes(prefix);
        for key in ["tcp_tw_reuse=1", "ip_local_port_range=1024 65535"] {
            t.client
                .exec("sysctl", &["-qw", &format!("net.ipv4.{key}")]);
        }
        for lb in &t.lbs {
            let range = format!("net.ipv4.ip_local_port_range={NODE_EPHEMERAL}");
            lb.exec("sysctl", &["-qw", &range]);
        }
        let pki = Pki::generate(&dir.0, &master_names(), &[]);
        let control = dir.0.join("control");
        let stubs = MASTERS
            .iter()
            .map(|m| stub_apiserver_with(&t, &pki, &control, m, m, &["--plain-http"]))
            .collect();
        let key = sync_key(&dir.0);
        let config = |node: usize, instance: &str| {
            let mut tables =
                String::from("[election.vrrp]\nadvert_interval = \"100ms\"\npreempt = true\n");
            if sync {
                tables.push_str(&sync_tables(node, &key));
            }
            let vip = vrrp_vip(VrrpVip {
                addr: VIP_ADDR,
                vrid: 51,
                priority: if node == 0 { 150 } else { 100 },
            });
            node_config_with_ports(node, instance, &[vip], &tables, NAT_PORTS)
        };
        let lb1 = Node::start(&t, &dir.0, prefix, 0, |i| config(0, i));
        let deadline = Instant::now() + Duration::from_secs(10);
        while holders(&t, VIP_ADDR) != [0] {
            assert!(Instant::now() < deadline, "lb1 did not take the VIP");
            thread::sleep(Duration::from_millis(50));
        }
        let lb2 = Node::start(&t, &dir.0, prefix, 1, |i| config(1, i));
        wait_serving(&t.client, &[vip()], lb1.apilb());
        let pair = Self {
            nodes: [lb1, lb2],
            _stubs: stubs,
            t,
            dir,
        };
        if sync {
            pair.wait_synced();
        }
        pair
    }

    /// Wait (at most 10 s) until both of lb1's links with lb2 are up.
    fn wait_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = self.peer(0)
                && p.export.state == "up"
                && p.import.state == "up"
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "lb1 and lb2 did not connect:\n{}",
                self.nodes[0].apilb().log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn vip() -> SocketAddr {
    format!("{VIP_ADDR}:6443").parse().expect("vip")
}

impl Pair {
    /// `path` of the admin endpoint of the apilb on LB node `node`; a failure
    /// panics with its log.
    fn admin(&self, node: usize, path: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.t.lbs[node].name(), "curl", "-sfS"])
            .arg(format!("http://127.0.0.1:9464{path}"))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "lb{}'s {path}: {}\n{}",
            node + 1,
            String::from_utf8_lossy(&out.stderr),
            self.nodes[node].apilb().log_text()
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// apilb's `/status` on LB node `node`.
    fn status(&self, node: usize) -> Snapshot {
        let text = self.admin(node, "/status");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("/status: {e}: {text}"))
    }

    /// The one sync peer of the apilb on LB node `node`, if sync is on.
    fn peer(&self, node: usize) -> Option<SyncPeerStatus> {
        self.status(node).sync?.peers.into_iter().next()
    }
}

/// What the counters say at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// CPU ticks of lb1's and lb2's apilb.
    cpu: [u64; 2],
    flow_new: u64,
    /// Sync bytes lb1 sent to lb2 (its flows, its ACKs of lb2's) and received.
    bytes_out: u64,
    bytes_in: u64,
    /// Records lb1 sent; lb2's installs of lb1's flows, and its refusals.
    records: u64,
    installed: u64,
    refused: u64,
    events_lost: u64,
}

impl Sample {
    fn take(pair: &Pair) -> Self {
        for node in &pair.nodes {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", node.apilb().pid()))
                .unwrap_or_default();
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            assert!(
                state.is_some_and(|r| !r.starts_with('Z')),
                "apilb on lb{} is gone:\n{}",
                node.index + 1,
                node.apilb().log_text()
            );
        }
        let mut s = Sample {
            at: Instant::now(),
            cpu: [0, 1].map(|i| cpu_ticks(pair.nodes[i].apilb().pid())),
            flow_new: NatCounters::parse(&pair.admin(0, "/metrics")).flow_new,
            bytes_out: 0,
            bytes_in: 0,
            records: 0,
            installed: 0,
            refused: 0,
            events_lost: 0,
        };
        if let Some(sync) = pair.status(0).sync {
            let p = &sync.peers[0];
            s.bytes_out = p.export.sent.bytes + p.import.sent.bytes;
            s.bytes_in = p.export.received.bytes + p.import.received.bytes;
            s.records = p.export.sent.records;
            s.events_lost = sync.events_lost;
            if let Some(q) = pair.peer(1) {
                s.installed = q.flows_installed;
                s.refused = q.rejected.iter().map(|(_, n)| n).sum();
            }
        }
        s
    }

    /// Each count's movement since `before`, per second.
    fn rates_since(&self, before: &Sample) -> Rates {
        let secs = self.at.duration_since(before.at).as_secs_f64();
        let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let cpu = |i: usize| per_s(self.cpu[i], before.cpu[i]) / ticks_per_second();
        Rates {
            cpu: [cpu(0), cpu(1)],
            flows: per_s(self.flow_new, before.flow_new),
            bytes_out: per_s(self.bytes_out, before.bytes_out),
            bytes_in: per_s(self.bytes_in, before.bytes_in),
            records: per_s(self.records, before.records),
            installed: per_s(self.installed, before.installed),
            refused: self.refused.saturating_sub(before.refused),
            events_lost: self.events_lost.saturating_sub(before.events_lost),
        }
    }
}

/// A window's movements, per second but for the two counts of failures.
#[derive(Clone, Copy, Debug)]
struct Rates {
    /// CPU seconds a second of lb1's and lb2's apilb.
    cpu: [f64; 2],
    flows: f64,
    bytes_out: f64,
    bytes_in: f64,
    records: f64,
    installed: f64,
    refused: u64,
    events_lost: u64,
}

/// One rate's figures, over the window.
struct RateRow {
    sync: bool,
    rate: u32,
    rates: Rates,
    /// The load's answered and failed connections, over its whole run, and the
    /// failures by kind.
    answered: u64,
    failed: u64,
    kinds: String,
    /// The links' lag, sampled every second: the median and the most.
    lag: (f64, f64),
}

/// `oneshot-load --rate` from the client to the VIP for `seconds`: connections
/// answered, failed, and the failures by kind (`kind n, ...`).
fn load(client: &Netns, rate: u32, seconds: u64) -> (u64, u64, String) {
    let bin = sibling_bin("oneshot-load");
    let args = [
        "--to".to_owned(),
        vip().to_string(),
        "--path".into(),
        "/version".into(),
        "--rate".into(),
        rate.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--connections".into(),
        MAX_IN_FLIGHT.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client.exec(bin.to_str().expect("utf-8 path"), &args);
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("oneshot-load printed no {key}:\n{out}"))
    };
    let kinds: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("error_"))
        .collect();
    (value("requests"), value("errors"), kinds.join(", "))
}

/// Run `rate` new connections a second through the pair for the warm-up and the
/// window, and measure the window.
fn at_rate(pair: &Pair, sync: bool, rate: u32) -> RateRow {
    let seconds = (WARM_UP + WINDOW).as_secs() + 1;
    thread::scope(|s| {
        let client = &pair.t.client;
        let running = s.spawn(move || load(client, rate, seconds));
        thread::sleep(WARM_UP);
        let before = Sample::take(pair);
        let mut lags = Vec::new();
        while before.at.elapsed() < WINDOW {
            thread::sleep(Duration::from_secs(1));
            if let Some(p) = pair.peer(0) {
                lags.push(p.export.lag_seconds.max(p.import.lag_seconds));
            }
        }
        let rates = Sample::take(pair).rates_since(&before);
        let (answered, failed, kinds) = running.join().expect("the load");
        eprintln!(
            "sync {}: {rate}/s offered, {:.0} new flows/s, {answered} answered, {failed} \
             failed ({kinds})",
            if sync { "on" } else { "off" },
            rates.flows
        );
        RateRow {
            sync,
            rate,
            rates,
            answered,
            failed,
            kinds,
            lag: (
                median(lags.iter().copied()).unwrap_or(0.0),
                lags.iter().copied().fold(0.0, f64::max),
            ),
        }
    })
}

/// One bulk: lb2 restarted, and what it took in from lb1.
struct Bulk {
    records: u64,
    /// lb2's request to the bulk's end, as lb2 measured it.
    seconds: f64,
    /// lb2's start to the bulk seen ended in its `/status` (polled every 50 ms):
    /// its startup and lb1's redial included.
    from_start: f64,
    /// lb1's apilb CPU over that time.
    lb1_cpu: f64,
}

/// Copy [`PRELOAD`] established flows into lb1's tables, then restart lb2
/// [`TRIALS`] times and time the bulk it takes in each time: the flows written.
fn bulks(pair: &mut Pair) -> (usize, Vec<Bulk>) {
    let half = (NAT_PORTS.end() - NAT_PORTS.start()) / 2;
    let lb1_ports = *NAT_PORTS.start()..=NAT_PORTS.start() + half;
    let written = established_copies(&pair.nodes[0].pins.0, lb1_ports, PRELOAD);
    eprintln!(
        "preloaded {} flows on lb1 ({} ports skipped, still leased)",
        written.flows, written.ports_taken
    );
    let trials = (0..TRIALS)
        .map(|_| {
            let lb1 = pair.nodes[0].apilb().pid();
            pair.nodes[1].terminate();
            let (t0, c0) = (Instant::now(), cpu_ticks(lb1));
            pair.nodes[1].restart(&pair.t, &pair.dir.0);
            let deadline = Instant::now() + Duration::from_mins(1);
            loop {
                if let Some(p) = pair.peer(1)
                    && p.bulks_received.count > 0
                {
                    return Bulk {
                        records: p.bulks_received.last_records,
                        seconds: p.bulks_received.last_seconds,
                        from_start: t0.elapsed().as_secs_f64(),
                        lb1_cpu: (cpu_ticks(lb1) - c0) as f64 / ticks_per_second(),
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "lb2 took in no bulk:\n{}",
                    pair.nodes[1].apilb().log_text()
                );
                thread::sleep(Duration::from_millis(50));
            }
        })
        .collect();
    (written.flows, trials)
}

fn main() {
    let started = Instant::now();
    raise_open_files();
    let mut rows = Vec::new();
    let mut bulk = None;
    for sync in [false, true] {
        let prefix = if sync { "apilb-bsy1" } else { "apilb-bsy0" };
        let mut pair = Pair::start(prefix, sync);
        for rate in RATES {
            rows.push(at_rate(&pair, sync, rate));
        }
        if sync {
            bulk = Some(bulks(&mut pair));
        }
    }
    report_rates(&rows);
    if let Some((preloaded, trials)) = bulk {
        report_bulks(preloaded, &trials);
    }
    println!();
    println!("Run took {:.0} s.", started.elapsed().as_secs_f64());
}

fn report_rates(rows: &[RateRow]) {
    println!(
        "Two LB nodes (VRRP, 100 ms adverts; lb1 owns the VIP, lb2 its sync peer), \
         new connections through the VIP: one plain-HTTP GET each, the client closing \
         first, started at a fixed rate (`oneshot-load --rate`, open loop). Per rate \
         {} s of warm-up, then a {} s window; the same two apilbs run through every \
         rate; sync off is the same on a pair of its own. Bytes as on the wire \
         (`apilb_sync_bytes_total`), records sent by lb1, flows installed by lb2; CPU \
         is utime + stime of each apilb process; lag is the oldest unacknowledged \
         message, sampled every second.",
        WARM_UP.as_secs(),
        WINDOW.as_secs()
    );
    println!();
    println!(
        "| sync | offered /s | new flows /s | answered (failed) | bytes/s lb1 → lb2 | \
         lb2 → lb1 | bytes per flow | records/s sent | installed/s on lb2 | refused, \
         events lost | lb1 CPU s/s | lb2 CPU s/s | lag median / max |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        let x = &r.rates;
        let sync = |v: String| if r.sync { v } else { "-".to_owned() };
        println!(
            "| {} | {} | {:.0} | {} ({}{}) | {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {} |",
            if r.sync { "on" } else { "off" },
            r.rate,
            x.flows,
            r.answered,
            r.failed,
            if r.kinds.is_empty() {
                String::new()
            } else {
                format!(": {}", r.kinds)
            },
            sync(format!("{:.0}", x.bytes_out)),
            sync(format!("{:.0}", x.bytes_in)),
            sync(format!("{:.0}", x.bytes_out / x.flows)),
            sync(format!("{:.0}", x.records)),
            sync(format!("{:.0}", x.installed)),
            sync(format!("{}, {}", x.refused, x.events_lost)),
            x.cpu[0],
            x.cpu[1],
            sync(format!("{:.3} s / {:.3} s", r.lag.0, r.lag.1)),
        );
    }
    println!();
    println!("What sync adds, per new flow (CPU on less CPU off, over the flows of the window):");
    println!();
    println!("| offered /s | lb1 (the owner) µs per flow | lb2 (the peer) µs per flow |");
    println!("| ---: | ---: | ---: |");
    for rate in RATES {
        let of = |sync: bool| rows.iter().find(|r| r.rate == rate && r.sync == sync);
        if let (Some(off), Some(on)) = (of(false), of(true)) {
            let extra = |i: usize| (on.rates.cpu[i] - off.rates.cpu[i]) / on.rates.flows * 1e6;
            println!("| {rate} | {:.1} | {:.1} |", extra(0), extra(1));
        }
    }
}

fn report_bulks(preloaded: usize, trials: &[Bulk]) {
    println!();
    println!(
        "Bulk resync: {preloaded} established flows copied into lb1's tables \
         (`tests::preload`), then lb2 stopped (SIGTERM) and started {TRIALS} times; at \
         each start it asks lb1 for every synced flow, which lb1 lists from its tables \
         and sends in chunks and lb2 installs. Request to end as lb2 measures it \
         (`apilb_sync_bulk_seconds{{dir=\"received\"}}`). A bulk sends every synced \
         flow lb1's table holds: the records include the load's flows, closed but \
         still there (their NAT ports, still leased, are why fewer were copied)."
    );
    println!();
    println!("| trial | records | request → end | records/s | lb2 start → bulk end | lb1 CPU |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, b) in trials.iter().enumerate() {
        println!(
            "| {} | {} | {:.2} s | {:.0} | {:.2} s | {:.2} s |",
            i + 1,
            b.records,
            b.seconds,
            b.records as f64 / b.seconds,
            b.from_start,
            b.lb1_cpu
        );
    }
    if let Some(rate) = median(trials.iter().map(|b| b.records as f64 / b.seconds)) {
        println!();
        println!("Median: {rate:.0} flows/s taken in one bulk.");
    }
}
