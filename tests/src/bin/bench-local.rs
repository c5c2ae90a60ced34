//! `cargo xtask bench local`: what a new connection from the LB node itself costs
//! through node-local mode, against direct connections to the masters and against
//! kubespray's per-node nginx stream proxy on localhost.
//!
//! One `tests::cluster` topology, with `apilb run` in node-local mode on the LB node
//! throughout (its cgroup and XDP programs see every setup's connects and packets).
//! The masters answer each connection with one byte at once, then read until EOF.
//! On the LB node, `WORKERS` threads each loop: connect (non-blocking, 1 s timeout,
//! as Go's dialer does) -> read the first byte -> close. The client closes first,
//! normally (no RST), so the LB node holds the `TIME_WAIT`s; it gets `tcp_tw_reuse = 1`
//! and the widest port range (apilb reserves 20000-29999 of it). Setups run
//! interleaved, `ROUNDS` rounds of `PER_ROUND` after a discarded warm-up round each,
//! so that drift of the machine weighs on all alike.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Shape, Topology, VIP, apilb_config},
    fixture::sa,
    live::{Apilb, PinDir, TempDir},
    netns::Netns,
};

const PREFIX: &str = "apilb-bench-local";
/// Concurrent client threads, each with one connection at a time.
const WORKERS: usize = 4;
const ROUNDS: usize = 3;
const PER_ROUND: Duration = Duration::from_secs(3);
/// Not 6443: with `[local] addresses`, apilb would balance 127.0.0.1:6443 itself.
const NGINX: &str = "127.0.0.1:6444";

/// One setup's results over all rounds.
#[derive(Default)]
struct Setup {
    name: &'static str,
    /// Where each worker connects, in turn.
    to: Vec<SocketAddr>,
    /// Connect + first byte of each successful connection, ns.
    ns: Vec<u64>,
    /// Connections per second of each round.
    rates: Vec<f64>,
    secs: f64,
    failed: usize,
}

impl Setup {
    fn new(name: &'static str, to: Vec<SocketAddr>) -> Self {
        let mut setup = Self::default();
        (setup.name, setup.to) = (name, to);
        setup
    }

    fn rate(&self) -> f64 {
        self.ns.len() as f64 / self.secs
    }

    /// The `p`-th permille of the (sorted) latencies, in µs.
    fn permille(&self, p: usize) -> f64 {
        self.ns[(self.ns.len() - 1) * p / 1000] as f64 / 1000.0
    }

    /// Rate and p99 as ratios to `base`'s.
    fn vs(&self, base: &Self) -> (f64, f64) {
        let p99 = self.permille(990) / base.permille(990);
        (self.rate() / base.rate(), p99)
    }

    /// Run `WORKERS` clients in `lb` for `PER_ROUND` and add their figures.
    fn round(&mut self, lb: &Netns) {
        let (to, start) = (&self.to, Instant::now());
        let results: Vec<(Vec<u64>, usize)> = thread::scope(|s| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|_| s.spawn(move || client(lb, to, start + PER_ROUND)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("client"))
                .collect()
        });
        let (secs, before) = (start.elapsed().as_secs_f64(), self.ns.len());
        for (ns, failed) in results {
            self.ns.extend(ns);
            self.failed += failed;
        }
        self.rates.push((self.ns.len() - before) as f64 / secs);
        self.secs += secs;
        self.ns.sort_unstable();
    }
}

/// One client loop until `end`: each connection's connect + first-byte time, and
/// how many failed.
fn client(lb: &Netns, to: &[SocketAddr], end: Instant) -> (Vec<u64>, usize) {
    let _inside = lb.enter();
    let (mut ns, mut failed) = (Vec::with_capacity(100_000), 0);
    for addr in to.iter().cycle() {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        match first_byte(*addr) {
            Ok(()) => ns.push(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(_) => failed += 1,
        }
    }
    (ns, failed)
}

/// Connect (non-blocking, 1 s timeout), read the first byte, close.
fn first_byte(to: SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    c.read_exact(&mut [0u8; 1])
}

/// The masters' servers, in one tokio runtime: one byte on accept, then read until
/// EOF. Each listener is made inside its master's namespace.
fn serve_masters(t: &Topology) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for (ns, m) in t.masters.iter().zip(MASTERS) {
        let listener = {
            let (_rt, _inside) = (rt.enter(), ns.enter());
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.set_reuseaddr(true).expect("reuseaddr");
            sock.bind(sa(m)).expect("bind the master's port");
            sock.listen(4096).expect("listen")
        };
        rt.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => drop(tokio::spawn(answer(conn))),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
    }
    rt
}

async fn answer(conn: tokio::net::TcpStream) {
    // A new socket's send buffer is empty: the byte goes out in one write.
    if conn.writable().await.is_err() || conn.try_write(b"!").is_err() {
        return;
    }
    let mut buf = [0u8; 64];
    while conn.readable().await.is_ok() {
        match conn.try_read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
            _ => {}
        }
    }
}

/// Wait (at most 15 s) until `ok`; panic with `what` and `log()` if it does not come.
fn wait_until(what: &str, ok: impl Fn() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}:\n{}", log());
        thread::sleep(Duration::from_millis(100));
    }
}

/// Whether 30 connections in a row from `lb` to `to` each get their first byte.
fn serves(lb: &Netns, to: &str) -> bool {
    let _inside = lb.enter();
    (0..30).all(|_| first_byte(sa(to)).is_ok())
}

fn main() {
    let started = Instant::now();
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let shape = Shape {
        vip_on_first_lb: false,
        ..Shape::default()
    };
    let t = Topology::with_shape(PREFIX, shape);
    let lb = t.lb();
    let wide = "net.ipv4.ip_local_port_range=1024 65535";
    lb.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1", wide]);
    let rt = serve_masters(&t);
    let (pins, dir) = (PinDir::new(PREFIX), TempDir::new(PREFIX));
    let config = dir.0.join("apilb.toml");
    // The default NAT ports lie below the ephemeral range, which `wide` leaves no
    // room below: name them, as before that default.
    let text = apilb_config(
        &pins.instance(),
        "nat_ports = [20000, 29999]",
        "kind = \"tcp\"",
    ) + "[local]\nenabled = true\n";
    std::fs::write(&config, text).expect("apilb config");
    let apilb = Apilb::start(lb, &config, &dir.0.join("apilb.log"));
    let status = || lb.exec("curl", &["-s", "http://127.0.0.1:9464/status"]);
    let ready = || status().matches("\"health\":\"ready\"").count() == MASTERS.len();
    let log = || apilb.log_text();
    let up = || log().contains("datapath updated") && ready();
    wait_until("apilb did not start", up, log);
    let nginx = tests::proxies::nginx_stream(lb, &dir.0, NGINX, cpus);
    wait_until("the VIP does not answer", || serves(lb, VIP), log);
    let nginx_log = || std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
    wait_until("nginx does not answer", || serves(lb, NGINX), nginx_log);

    let addrs = |a: &[&str]| a.iter().map(|a| sa(a)).collect();
    let mut setups = [
        Setup::new("direct to master-1", addrs(&MASTERS[..1])),
        Setup::new("direct, round-robin over the 3 masters", addrs(&MASTERS)),
        Setup::new("apilb socket-LB, VIP", addrs(&[VIP])),
        Setup::new("nginx stream on 127.0.0.1", addrs(&[NGINX])),
    ];
    for s in &mut setups {
        s.round(lb); // warm-up, discarded
        *s = Setup::new(s.name, std::mem::take(&mut s.to));
    }
    for _ in 0..ROUNDS {
        for s in &mut setups {
            s.round(lb);
        }
    }
    let spread = local_connects(lb);
    drop((nginx, apilb, rt));
    report(&setups, cpus, &spread, started.elapsed());
}

/// apilb's local connects per master, once its snapshot (taken every second) has
/// caught up.
fn local_connects(lb: &Netns) -> Vec<String> {
    thread::sleep(Duration::from_millis(1100));
    let metrics = tests::live::metrics(lb);
    let key = "apilb_backend_local_connects_total{backend=";
    let lines = metrics.lines().filter_map(|l| l.strip_prefix(key));
    lines.map(|l| l.replace(['"', '}'], "")).collect()
}

fn report(setups: &[Setup], cpus: usize, spread: &[String], took: Duration) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "New connections from the LB node (connect -> first byte -> close), {WORKERS} workers, \
         {ROUNDS} interleaved rounds of {} s per setup\nkernel {}, {cpus} CPUs shared by the \
         clients, the masters and nginx; run took {:.0} s\n\n\
         | setup | conn/s | rounds | p50 µs | p99 µs | failed | rate / direct | p99 / direct |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        PER_ROUND.as_secs(),
        kernel.trim(),
        took.as_secs_f64()
    );
    for s in setups {
        let lo = s.rates.iter().copied().fold(f64::MAX, f64::min);
        let hi = s.rates.iter().copied().fold(0.0, f64::max);
        let (rate, p99) = s.vs(&setups[0]);
        let (conns, p50, p99_us) = (s.rate(), s.permille(500), s.permille(990));
        println!(
            "| {} | {conns:.0} | {lo:.0}-{hi:.0} | {p50:.0} | {p99_us:.0} | {} | {rate:.2}x | \
             {p99:.2}x |",
            s.name, s.failed,
        );
    }
    println!("\napilb's local connects per master: {}", spread.join(", "));
    let ((rate, p99), (rr_rate, rr_p99)) = (setups[2].vs(&setups[0]), setups[2].vs(&setups[1]));
    println!(
        "target: apilb >= 0.95x direct's rate, p99 <= 1.05x direct's; measured {rate:.2}x, \
         {p99:.2}x (against round-robin direct: {rr_rate:.2}x, {rr_p99:.2}x)"
    );
}
