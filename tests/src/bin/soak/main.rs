//! `cargo xtask soak [--minutes N]`: apilb run as a user runs it, for N minutes
//! (10 by default), under the load that issue 17 is about, and then asserted.
//!
//! The `tests::cluster` topology, given IPv6 too (the segment's
//! `fd00:198:51:100::/64`, the client's `fd00:192:0:2::/64` behind the router):
//! one LB node running `apilb run` at its defaults with an IPv4 and an IPv6 VIP,
//! each over the three masters of its family (the same three hosts), and a stub
//! apiserver on each master. While it runs:
//! - **New connections**, [`RATE`] a second (`--rate`) for N minutes, then stop: paced from
//!   the start (open loop: a slow connection does not slow the next), alternately
//!   to each VIP, and in equal thirds by who closes first (`tests::oneshot`): the
//!   client (FIN after the whole answer), the server (`Connection: close`), or
//!   the client aborting with a RST (`SO_LINGER` 0). Each must get the whole
//!   answer within [`EXCHANGE_LIMIT`].
//! - **[`WATCHES`] watch streams** over TLS, half to each VIP, open from before
//!   the load until after it; data must keep flowing (an event every 100 ms; one
//!   silent for [`STREAM_SILENCE`], ended or errored is broken).
//! - **A flapping master**: every [`FLAP_PERIOD`], master-2's `/readyz` fails
//!   for half of it, so the controller's probes take it out of rotation and bring
//!   it back (apilb's `backend_transitions_total` must count each move); the
//!   streams and connections it holds must survive. Its share of new connections
//!   while out is reported: a client reusing the 4-tuple of a flow still in the
//!   table can follow that flow to it.
//! - **Samples** every [`SAMPLE_EVERY`]: apilb's RSS (`/proc`), and the entries
//!   of its pinned flow tables (`FLOWS`, `REPLIES`, and `HALF_FLOWS`,
//!   `HALF_REPLIES` where the datapath has them).
//!
//! The asserts, each with its numbers: no failed connection (connect errors,
//! resets not asked for, short or wrong answers, timeouts), no broken stream, no
//! SYN dropped for want of a NAT port, every flow table below its size (a full LRU
//! table evicts live flows), apilb's RSS after the first minute (or half the run,
//! if shorter) never more than [`RSS_GROWTH`] above its value then, master-2
//! out of rotation and back in every flap, and no other master ever out. A
//! summary table, fit for `BENCHMARKS.md`, comes
//! first, so a failed run still shows its figures.
//!
//! The load is plain HTTP while probes and streams are TLS: the stub apiserver
//! answers both on :6443 (`--plain-http`, told apart by the first byte). One TLS
//! handshake costs the stub about 0.27 ms of CPU and the client more (measured
//! here with `openssl s_time`: 1,900 handshakes per client CPU second), so 5,000 a
//! second would need more than the machine's two vCPUs, while the LB, working on
//! TCP, neither sees nor cares what the connections carry. A second VIP on another
//! port would not do: apilb balances every VIP of a family over all its backends,
//! and probes each backend at its own address and port.
//!
//! The client namespace reuses `TIME_WAIT` ports for new connections
//! (`tcp_tw_reuse = 1`) from the widest range, as `bench local` does on the LB
//! node: a third of 2,500 connections a second per VIP closing first would
//! otherwise run out of ports within a minute. The soak raises its open-files limit,
//! which the stubs and apilb inherit.
//!
//! Everything runs on the soak's own namespaces (prefix `apilb-soak`), pins and
//! processes, removed when it ends, by a failed assert too (the `Drop` guards of
//! `tests::netns`, `tests::live`); the load is bounded in count and time.
//!
//! `cluster` sets the cluster up, `load` paces the connections, `streams` keeps
//! the watch streams, `outcome` reports and asserts; this file runs them.

mod cluster;
mod load;
mod outcome;
mod streams;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::Parser;
use tests::{
    cluster::{MASTERS, Topology, VIP_ADDR, VIP6_ADDR},
    fixture::sa,
    live::{
        Apilb, PinDir, Spawned, TempDir, master_name, master_names, metric_sum, metrics,
        raise_open_files,
    },
    natstate::{NatCounters, TableCount, flow_tables},
    netns::Netns,
    oneshot::wait_serving,
    pki::Pki,
};

use crate::{
    cluster::{add_ipv6, config_text, master6, stub},
    load::{Load, paced},
    outcome::{Outcome, warnings},
    streams::{Watch, connector, watch},
};

const PREFIX: &str = "apilb-soak";
/// New connections per second through the VIPs, by default (`--rate`).
const RATE: u32 = 5000;
const WATCHES: usize = 30;
/// master-2 is out of rotation for the first half of each period, in for the
/// second.
const FLAP_PERIOD: Duration = Duration::from_secs(20);
/// The flapping master (0-based): master-2.
const FLAPPING: usize = 1;
/// After a flap, the probes' time to notice (fall or rise 2 x 500 ms, plus a
/// timeout) and a margin, before a window counts.
const FLAP_SETTLE: Duration = Duration::from_secs(3);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// apilb's RSS may grow by at most this fraction after the first minute.
const RSS_GROWTH: f64 = 0.10;

#[derive(Parser)]
#[command(about = "apilb under a bounded connection load, watch streams and a flapping master")]
struct Args {
    /// How long the connection load runs.
    #[arg(long, default_value_t = 10)]
    minutes: u32,
    /// New connections per second (the figure by default; lower, e.g. to
    /// see a datapath within its port budget).
    #[arg(long, default_value_t = RATE)]
    rate: u32,
}

fn main() {
    let args = Args::parse();
    let run_for = Duration::from_secs(u64::from(args.minutes) * 60);
    raise_open_files();
    let t = Topology::new(PREFIX);
    add_ipv6(&t);
    for key in ["tcp_tw_reuse=1", "ip_local_port_range=1024 65535"] {
        t.client
            .exec("sysctl", &["-qw", &format!("net.ipv4.{key}")]);
    }
    let dir = TempDir::new(PREFIX);
    let ip6: IpAddr = VIP6_ADDR.parse().expect("v6");
    let sans: Vec<IpAddr> = [VIP_ADDR.parse().expect("vip"), ip6]
        .into_iter()
        .chain((0..MASTERS.len()).map(|i| master6(i).ip()))
        .collect();
    let pki = Pki::generate(&dir.0, &master_names(), &sans);
    let control: Vec<PathBuf> = MASTERS.iter().map(|m| dir.0.join(master_name(m))).collect();
    let _stubs: Vec<Spawned> = MASTERS
        .iter()
        .zip(&control)
        .map(|(m, c)| stub(&t, &pki, m, c))
        .collect();
    let pins = PinDir::new(PREFIX);
    let config = dir.0.join("apilb.toml");
    std::fs::write(&config, config_text(&pins.instance(), &pki.ca_pem)).expect("config");
    let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
    assert!(
        apilb.wait_log("datapath updated", Duration::from_secs(15)),
        "apilb did not start:\n{}",
        apilb.log_text()
    );
    let vips = [sa(&format!("{VIP_ADDR}:6443")), SocketAddr::new(ip6, 6443)];
    wait_serving(&t.client, &vips, &apilb);
    let rss_pid = apilb.pid();

    let soak = Soak {
        t: &t,
        vips,
        ca: &pki.ca_pem,
        readyz_fail: control[FLAPPING].join("readyz-fail"),
        pins: &pins.0,
        pid: rss_pid,
        run_for,
        rate: args.rate,
    };
    let outcome = soak.run();
    println!("{}", outcome.summary());
    eprintln!(
        "apilb's warnings, by message:\n{}",
        warnings(&apilb.log_text())
    );
    outcome.assert_all();
}

/// The soak's parts, borrowed from `main`'s guards.
struct Soak<'a> {
    t: &'a Topology,
    vips: [SocketAddr; 2],
    ca: &'a Path,
    readyz_fail: PathBuf,
    pins: &'a Path,
    pid: i32,
    run_for: Duration,
    rate: u32,
}

/// Sets the stop flag when dropped, so that the soak's threads end when the
/// scope unwinds from a panic too.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Soak<'_> {
    fn run(&self) -> Outcome {
        let stop = AtomicBool::new(false);
        let load = Arc::new(Mutex::new(Load::default()));
        let nat_before = NatCounters::read(self.t.lb());
        let transitions_before = transitions(self.t.lb());
        let overflows_before = listen_overflows(self.t);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, load) = (&stop, &load);
        let (watches, flaps, samples, load_done) = thread::scope(|s| {
            let _stop = StopOnDrop(stop);
            let watches = s.spawn(|| self.watch_streams(stop, &ready_tx));
            assert!(
                ready_rx.recv_timeout(Duration::from_secs(20)).is_ok(),
                "the watch streams did not open"
            );
            // The load, the flaps and the samples share one clock, from here.
            let started = Instant::now();
            let sampler = s.spawn(move || self.sample(stop, load, started));
            let flapper = s.spawn(move || self.flap(stop, started));
            let load_thread = s.spawn(move || self.connections(load, started));
            let load_done = load_thread.join().expect("the load");
            stop.store(true, Ordering::Relaxed);
            (
                watches.join().expect("the watch streams"),
                flapper.join().expect("the flapper"),
                sampler.join().expect("the sampler"),
                load_done,
            )
        });
        let nat = NatCounters::read(self.t.lb()).since(&nat_before);
        let overflows = listen_overflows(self.t)
            .iter()
            .zip(overflows_before)
            .map(|(n, was)| n.saturating_sub(was))
            .collect();
        let transitions = transitions(self.t.lb())
            .into_iter()
            .zip(transitions_before)
            .map(|((m, a, n), (_, _, was))| (m, a, n.saturating_sub(was)))
            .collect();
        let mut load = load.lock().expect("lock").clone();
        load.took = load_done;
        Outcome {
            run_for: self.run_for,
            rate: self.rate,
            load,
            watches,
            flaps,
            samples,
            nat,
            transitions,
            overflows,
        }
    }

    /// The connection load, from the client namespace, for `run_for`: returns
    /// when every connection started has ended (each within its limit).
    fn connections(&self, load: &Arc<Mutex<Load>>, started: Instant) -> Duration {
        let _inside = self.t.client.enter();
        // Workers are created now, inside the client namespace, and stay there.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(paced(
            self.vips,
            self.rate,
            self.run_for,
            Arc::clone(load),
            started,
        ))
    }

    /// Open [`WATCHES`] streams (half to each VIP), signal `ready` once every one
    /// has its answer or failed, keep them until `stop`; how each went.
    fn watch_streams(&self, stop: &AtomicBool, ready: &std::sync::mpsc::Sender<()>) -> Vec<Watch> {
        let _inside = self.t.client.enter();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let connector = connector(self.ca);
        let record = Arc::new(Mutex::new(vec![Watch::default(); WATCHES]));
        rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            let mut opened = Vec::new();
            for i in 0..WATCHES {
                let (c, r) = (connector.clone(), Arc::clone(&record));
                let (tx, rx) = tokio::sync::oneshot::channel();
                tasks.spawn(watch(c, self.vips[i % 2], r, i, tx));
                opened.push(rx);
            }
            for rx in opened {
                let _ = rx.await;
            }
            let _ = ready.send(());
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // As of now: the silence since each stream's last event counts too.
            let seen = {
                let now = Instant::now();
                let mut r = record.lock().expect("lock");
                for w in r.iter_mut() {
                    w.max_gap = w.max_gap.max(now.duration_since(w.last_event));
                }
                r.clone()
            };
            tasks.shutdown().await;
            seen
        })
    }

    /// Fail master-2's `/readyz` for the first half of every [`FLAP_PERIOD`] until
    /// `stop`; the flaps, as (time since start, now in rotation).
    fn flap(&self, stop: &AtomicBool, started: Instant) -> Vec<(Duration, bool)> {
        let mut flaps = Vec::new();
        let mut next = FLAP_PERIOD / 2;
        let mut ready = true;
        while !stop.load(Ordering::Relaxed) {
            if started.elapsed() >= next {
                ready = !ready;
                if ready {
                    std::fs::remove_file(&self.readyz_fail).expect("readyz back on");
                } else {
                    std::fs::write(&self.readyz_fail, b"").expect("readyz off");
                }
                flaps.push((started.elapsed(), ready));
                next += FLAP_PERIOD / 2;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.readyz_fail);
        flaps
    }

    /// Every [`SAMPLE_EVERY`] until `stop`, and once more then: apilb's RSS and
    /// flow tables; with a line of progress.
    fn sample(&self, stop: &AtomicBool, load: &Mutex<Load>, started: Instant) -> Vec<Sample> {
        let mut samples = Vec::new();
        let mut next = Duration::ZERO;
        loop {
            let done = stop.load(Ordering::Relaxed);
            if done || started.elapsed() >= next {
                let s = Sample {
                    at: started.elapsed(),
                    rss_kib: rss_kib(self.pid),
                    tables: flow_tables(self.pins),
                };
                let l = load.lock().expect("lock");
                let (ok, failed) = l.totals();
                eprintln!(
                    "{:>4.0} s: {} started, {ok} answered, {failed} failed, {} in flight; \
                     apilb RSS {} KiB; {}",
                    s.at.as_secs_f64(),
                    l.started,
                    l.in_flight.load(Ordering::Relaxed),
                    s.rss_kib,
                    s.tables
                        .iter()
                        .map(|t| format!("{} {}", t.name, t.entries))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                drop(l);
                samples.push(s);
                next += SAMPLE_EVERY;
            }
            if done {
                return samples;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Each master's SYNs or handshakes its kernel dropped because the stub's
/// accept queue was full (`TcpExtListenOverflows` + `TcpExtListenDrops`): a
/// master too busy to take connections, whatever the LB does.
fn listen_overflows(t: &Topology) -> Vec<u64> {
    t.masters
        .iter()
        .map(|ns| {
            let text = ns.exec("cat", &["/proc/net/netstat"]);
            let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
            let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
                return 0;
            };
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .filter(|(n, _)| matches!(*n, "ListenOverflows" | "ListenDrops"))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .collect()
}

/// Every backend's health transitions so far, from apilb's metrics in `lb`:
/// (master index, address, count), IPv4 then IPv6 per master.
fn transitions(lb: &Netns) -> Vec<(usize, SocketAddr, u64)> {
    let text = metrics(lb);
    (0..MASTERS.len())
        .flat_map(|i| [(i, sa(MASTERS[i])), (i, master6(i))])
        .map(|(i, addr)| {
            let series = format!("apilb_backend_transitions_total{{backend=\"{addr}\"");
            (i, addr, metric_sum(&text, &series))
        })
        .collect()
}

/// One sample of apilb's footprint.
pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub tables: Vec<TableCount>,
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("apilb (pid {pid}) is gone: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}
