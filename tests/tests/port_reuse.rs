//! A NAT port reused right after its master closed the last connection on it,
//! while the master still holds `TIME_WAIT` for that 4-tuple, must cost the next
//! client nothing: no refused connection and no SYN retransmit. The datapath keeps
//! each port's timestamps monotonic (`ct::ts_offset`) so that the master's
//! `TIME_WAIT` accepts the new SYN (RFC 6191).
//!
//! The real kernels of the `tests::cluster` topology are the judges: masters that
//! answer and close first, a client that connects again and again through 64 NAT
//! ports per master, the masters' `TIME_WAIT` sockets counted with `ss`, and the
//! client's own count of SYN retransmits (`TcpExtTCPSynRetrans`). Root.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Topology, VIP, apilb_config},
    live::{Apilb, PinDir, TempDir, metric_sum, metrics},
    netns::{self, Netns},
};

/// Connections made, one after another.
const CONNECTIONS: usize = 1_500;
/// Started at most this often, so that 64 ports per master, each free again
/// `CLOSE` after its last use, are never all taken at once: about 33 a second
/// per master reuse each port every two seconds, inside the masters' 60 s
/// `TIME_WAIT`.
const EVERY: Duration = Duration::from_millis(10);
const PORTS: &str = "nat_ports = [40000, 40063]";
const CLOSE: &str = "100ms";

/// A master that answers every connection with one line and closes it first.
struct ClosingServer {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<usize>>,
}

impl ClosingServer {
    fn start(ns: &Netns, addr: &str) -> Self {
        let (name, addr): (String, SocketAddr) =
            (ns.name().to_owned(), addr.parse().expect("addr"));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            let _inside = netns::enter(&name);
            let listener = TcpListener::bind(addr).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let mut served = 0;
            let deadline = Instant::now() + Duration::from_mins(3);
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        // The master writes and closes first: it holds TIME_WAIT.
                        let _ = conn.write_all(b"bye\n");
                        served += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            served
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listening");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().map_or(0, |h| h.join().expect("server"))
    }
}

impl Drop for ClosingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The client namespace's count of retransmitted SYNs.
fn syn_retransmits(ns: &Netns) -> u64 {
    let text = ns.exec("cat", &["/proc/net/netstat"]);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().expect("names"), lines.next().expect("values"));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .map_or(0, |(_, v)| v.parse().expect("a count"))
}

/// One connection: read the master's line to its close. `Err` names what failed.
fn once(vip: SocketAddr) -> Result<(), String> {
    let mut conn = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if answer == "bye\n" {
        Ok(())
    } else {
        Err(format!("answer {answer:?}"))
    }
}

#[test]
fn ports_reused_under_the_masters_time_wait_cost_no_connection_and_no_syn_retransmit() {
    let t = Topology::new("apilb-reuse");
    let pins = PinDir::new("apilb-reuse");
    let servers: Vec<ClosingServer> = MASTERS
        .iter()
        .map(|m| ClosingServer::start(t.master_ns(m), m))
        .collect();
    let dir = TempDir::new("apilb-reuse");
    let datapath = format!("{PORTS}\n[datapath.tcp_timeouts]\nclose = \"{CLOSE}\"");
    let config = dir.0.join("apilb.toml");
    std::fs::write(
        &config,
        apilb_config(&pins.instance(), &datapath, "kind = \"tcp\""),
    )
    .expect("config");
    let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
    assert!(
        apilb.wait_log("datapath updated", Duration::from_secs(15)),
        "log:\n{}",
        apilb.log_text()
    );

    let vip: SocketAddr = VIP.parse().expect("vip");
    let retransmits_before = syn_retransmits(&t.client);
    let started = Instant::now();
    let mut failures = Vec::new();
    {
        let _inside = t.client.enter();
        let mut due = started;
        for i in 0..CONNECTIONS {
            // Paced from the last start, never catching up in a burst.
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            due = Instant::now() + EVERY;
            if let Err(e) = once(vip) {
                failures.push(format!("connection {i}: {e}"));
            }
        }
    }
    let took = started.elapsed();
    let retransmits = syn_retransmits(&t.client) - retransmits_before;
    let time_wait: usize = MASTERS
        .iter()
        .map(|m| {
            t.master_ns(m)
                .exec("ss", &["-Htan", "state", "time-wait"])
                .lines()
                .count()
        })
        .sum();
    let m = metrics(t.lb());
    let counter = |name: &str| {
        metric_sum(
            &m,
            &format!("apilb_datapath_packets_total{{counter=\"{name}\"}}"),
        )
    };
    let kinds = [
        "reclaim_closed",
        "reclaim_orphan",
        "reclaim_half_open",
        "reclaim_idle",
    ];
    let by_kind: Vec<(&str, u64)> = kinds.iter().map(|k| (*k, counter(k))).collect();
    let reclaimed: u64 = by_kind.iter().map(|(_, n)| n).sum();
    let no_port = counter("drop_no_nat_port");
    let served: usize = servers.into_iter().map(ClosingServer::stop).sum();
    eprintln!(
        "scenario reuse: {CONNECTIONS} connections in {:.1} s over 192 ports, {} failed, \
         {retransmits} SYN retransmits, {time_wait} TIME_WAIT sockets on the masters, \
         {reclaimed} ports reused ({by_kind:?}), {no_port} SYNs dropped for want of a port, \
         {served} served",
        took.as_secs_f64(),
        failures.len(),
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // No SYN met the masters' TIME_WAIT, and none was dropped for want of a
    // port: each master's ports are taken in turn from its own cursor, so the
    // next port is the one its oldest flow left.
    assert_eq!(
        (retransmits, no_port),
        (0, 0),
        "SYN retransmits, and SYNs dropped for want of a port"
    );
    // (The masters also served apilb's TCP probes.)
    assert!(served >= CONNECTIONS, "the masters served {served}");
    // The hard case really happened: the masters closed first and hold TIME_WAIT
    // on the ports, and eight connections in ten or more took a port another flow
    // had left.
    assert!(
        time_wait >= 150,
        "only {time_wait} TIME_WAIT sockets on the masters"
    );
    assert!(
        reclaimed * 10 >= u64::try_from(CONNECTIONS * 8).expect("count"),
        "only {reclaimed} ports reused"
    );
}
