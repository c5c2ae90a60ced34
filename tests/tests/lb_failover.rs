//! An LB node dies and no connection notices (issue 19): two apilb nodes share the
//! VIP by VRRP (100 ms adverts) in the `tests::cluster` topology, with flow sync
//! between them, and TCP echo masters. Long-lived connections opened through the
//! owner keep working on the other node after the owner is killed (SIGKILL) or
//! stopped (SIGTERM), and again when it comes back and preempts, because each node
//! already holds the other's flows. The same kill with sync off shows what sync
//! buys: every such connection breaks. Root.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use tests::{
    cluster::VIP_ADDR,
    elect::{
        Etcd, Node, VrrpVip, assert_served_by, echo_masters, etcd_election, node_config, sync_key,
        sync_tables, two_lb_nodes, vrrp_vip, wait_served_by,
    },
    live::{metric_sum, metrics},
};

const STREAMS: usize = 10;

/// The tests run one at a time: each runs two apilb nodes with 100 ms adverts.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Node `node`'s `[election]` (VRRP, or etcd with a 3 s lease) and, with `sync`,
/// `[sync]` tables.
fn tables(node: usize, dir: &std::path::Path, sync: bool, etcd: bool) -> String {
    let mut t = if etcd {
        etcd_election(node, "3s", 1)
    } else {
        String::from("[election.vrrp]\nadvert_interval = \"100ms\"\npreempt = true\n")
    };
    if sync {
        t.push_str(&sync_tables(node, &dir.join("sync.key")));
    }
    t
}

/// One exchange on `conn`: a line out, the master's line back.
fn exchange(conn: &mut BufReader<TcpStream>) -> Result<String, String> {
    conn.get_mut()
        .write_all(b"ping\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    match conn.read_line(&mut line) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(line),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// What happens to the owner, lb1.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Killed,
    /// Killed, with the VIP elected through etcd (a 3 s lease) instead of VRRP.
    KilledUnderEtcd,
    Terminated,
    /// Killed, then started again: it preempts the VIP back (150 > 100).
    KilledAndBack,
}

/// Open `STREAMS` connections through lb1, end it as `fate` says, and try each
/// again on lb2 (and, if lb1 comes back, again on lb1): the exchanges that
/// failed, and how long lb2 took to serve the VIP.
fn streams_through(prefix: &str, sync: bool, fate: Fate) -> (Vec<String>, Option<Duration>) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (t, dir) = two_lb_nodes(prefix);
    let _key = sync_key(&dir.0);
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let etcd = fate == Fate::KilledUnderEtcd;
    let _etcd = etcd.then(|| Etcd::start(&t, &dir.0));
    let vip = |priority| {
        if etcd {
            return vec![format!("address = \"{VIP_ADDR}\"\nelection = \"etcd\"")];
        }
        vec![vrrp_vip(VrrpVip {
            addr: VIP_ADDR,
            vrid: 51,
            priority,
        })]
    };
    let mut lb1 = Node::start(&t, &dir.0, prefix, 0, |i| {
        node_config(0, i, &vip(150), &tables(0, &dir.0, sync, etcd))
    });
    assert_served_by(&t, VIP_ADDR, &lb1, Duration::from_secs(10));
    let lb2 = Node::start(&t, &dir.0, prefix, 1, |i| {
        node_config(1, i, &vip(100), &tables(1, &dir.0, sync, etcd))
    });
    let addr: SocketAddr = format!("{VIP_ADDR}:6443").parse().expect("vip");
    let mut streams: Vec<BufReader<TcpStream>> = (0..STREAMS)
        .map(|_| {
            let _inside = t.client.enter();
            let c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            BufReader::new(c)
        })
        .collect();
    for s in &mut streams {
        exchange(s).expect("an exchange through lb1");
    }
    if sync {
        // lb2 holds every stream's flow before lb1 dies.
        let until = Instant::now() + Duration::from_secs(10);
        let installed = || metric_sum(&metrics(&t.lbs[1]), "apilb_sync_flows_installed_total");
        while installed() < STREAMS as u64 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            installed() >= STREAMS as u64,
            "lb2 installed {} flows:\n{}",
            installed(),
            lb2.apilb().log_text()
        );
    }
    let ended = Instant::now();
    if fate == Fate::Terminated {
        lb1.terminate();
    } else {
        lb1.kill();
    }
    let took = wait_served_by(&t.client, VIP_ADDR, 1, ended, Duration::from_secs(10));
    let mut broken: Vec<String> = streams
        .iter_mut()
        .filter_map(|s| exchange(s).err())
        .collect();
    if fate == Fate::KilledAndBack {
        let back = Instant::now();
        lb1.restart(&t, &dir.0);
        let preempted = wait_served_by(&t.client, VIP_ADDR, 0, back, Duration::from_secs(5));
        eprintln!("lb1 restarted: it serves the VIP again after {preempted:?}");
        assert!(
            preempted.is_some(),
            "lb1 did not preempt:\n{}",
            lb1.apilb().log_text()
        );
        broken.extend(streams.iter_mut().filter_map(|s| exchange(s).err()));
    }
    (broken, took)
}

/// With sync on, the owner ends as `fate` says (`what`, for the report) and no
/// stream notices.
fn no_stream_breaks(prefix: &str, fate: Fate, what: &str) {
    let (broken, took) = streams_through(prefix, true, fate);
    eprintln!(
        "sync on, {what}: lb2 serves after {took:?}; {} exchanges of {STREAMS} streams \
         failed {broken:?}",
        broken.len()
    );
    assert!(took.is_some(), "lb2 did not take over");
    assert_eq!(broken, Vec::<String>::new());
}

#[test]
fn with_sync_no_stream_notices_the_owner_sigkilled() {
    no_stream_breaks("apilb-lbfs", Fate::Killed, "owner SIGKILLed");
}

#[test]
fn without_sync_every_stream_breaks_when_the_owner_is_sigkilled() {
    let (broken, took) = streams_through("apilb-lbfn", false, Fate::Killed);
    eprintln!(
        "sync off, owner SIGKILLed: lb2 serves after {took:?}; {} of {STREAMS} streams broken",
        broken.len()
    );
    assert!(took.is_some(), "lb2 did not take over");
    assert_eq!(broken.len(), STREAMS, "{broken:?}");
}

#[test]
fn with_sync_no_stream_notices_the_owner_sigtermed() {
    no_stream_breaks("apilb-lbft", Fate::Terminated, "owner SIGTERMed");
}

#[test]
fn with_sync_no_stream_notices_the_owner_killed_and_preempting_back() {
    no_stream_breaks(
        "apilb-lbfb",
        Fate::KilledAndBack,
        "owner SIGKILLed then back (both moves)",
    );
}

#[test]
fn with_sync_no_stream_notices_the_etcd_owner_sigkilled() {
    no_stream_breaks(
        "apilb-lbfe",
        Fate::KilledUnderEtcd,
        "etcd (3 s lease), owner SIGKILLed",
    );
}
