//! `cargo xtask bench failover`: how long a VIP takes to move to the other LB node
//! when its owner gets SIGKILL, over 4 trials per setup, in the `tests::cluster`
//! topology with two LB nodes:
//!
//! - apilb VRRP (v3, multicast) with 100 ms and with 1 s adverts;
//! - apilb etcd with the default 3 s lease (etcd in the router namespace);
//! - keepalived on both nodes at its defaults (VRRPv2, `advert_int 1`), and at
//!   100 ms adverts (VRRPv3, `advert_int 0.1`), apilb's fast setting.
//!
//! Failover is timed from the kill until the router's ARP entry for the VIP names
//! the other node's MAC (polled every 10 ms): the moment traffic follows, the same
//! for every setup. Preemption is off, so each trial kills whichever node owns the
//! VIP and restarts it as the backup.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{Topology, VIP_ADDR},
    elect::{
        Etcd, Keepalived, Node, VrrpVip, arp_owner, etcd_election, mac, node_config, two_lb_nodes,
        vrrp_vip,
    },
    report::median,
};

const TRIALS: usize = 4;

/// One LB node's VIP owner: apilb or keepalived.
enum Side {
    Apilb(Node),
    Keepalived(Keepalived, String),
}

impl Side {
    fn kill(&mut self) {
        match self {
            Self::Apilb(n) => n.kill(),
            Self::Keepalived(k, _) => k.kill(),
        }
    }

    fn restart(&mut self, t: &Topology, dir: &Path, node: usize, trial: usize) {
        match self {
            Self::Apilb(n) => n.restart(t, dir),
            Self::Keepalived(k, conf) => {
                *k = Keepalived::start(&t.lbs[node], dir, &format!("k{node}-{trial}"), conf);
            }
        }
    }
}

/// Make the router resolve the VIP (a connection attempt from the client).
fn touch(t: &Topology) {
    let _inside = t.client.enter();
    let addr = format!("{VIP_ADDR}:6443").parse().expect("vip");
    let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200));
}

fn wait_owner(t: &Topology, macs: &[String; 2], limit: Duration) -> Option<usize> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        touch(t);
        if let Some(o) = arp_owner(t, VIP_ADDR, macs) {
            return Some(o);
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Run the trials; failover times in seconds. `cycle`: the advert interval (or
/// keepalive period) the kill's phase is spread over.
fn trials(
    name: &str,
    t: &Topology,
    dir: &Path,
    sides: &mut [Side; 2],
    limit: Duration,
    cycle: Duration,
) -> Vec<f64> {
    let macs = [mac(&t.lbs[0]), mac(&t.lbs[1])];
    let mut owner =
        wait_owner(t, &macs, limit).unwrap_or_else(|| panic!("{name}: nobody owns the VIP"));
    let mut times = Vec::new();
    for trial in 0..TRIALS {
        let other = 1 - owner;
        let killed = Instant::now();
        sides[owner].kill();
        let mut moved = None;
        while killed.elapsed() < limit {
            if arp_owner(t, VIP_ADDR, &macs) == Some(other) {
                moved = Some(killed.elapsed());
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let moved = moved.unwrap_or_else(|| panic!("{name}: trial {trial}: the VIP did not move"));
        eprintln!(
            "  {name}: trial {}: {:.3} s",
            trial + 1,
            moved.as_secs_f64()
        );
        times.push(moved.as_secs_f64());
        sides[owner].restart(t, dir, owner, trial);
        // The restarted node settles as backup before the next kill, which lands at
        // a different point of the advert (or keepalive) cycle each trial: the
        // time since the last advert spreads evenly over one cycle.
        thread::sleep(Duration::from_secs(1) + cycle.mul_f64(trial as f64 / TRIALS as f64));
        owner = other;
    }
    times
}

fn apilb_pair(
    t: &Topology,
    dir: &Path,
    prefix: &str,
    election: &dyn Fn(usize) -> String,
    vip: &dyn Fn(usize) -> String,
) -> [Side; 2] {
    let node = |i: usize| {
        Side::Apilb(Node::start(t, dir, prefix, i, |inst| {
            node_config(i, inst, &[vip(i)], &election(i))
        }))
    };
    let first = node(0);
    thread::sleep(Duration::from_millis(500));
    [first, node(1)]
}

fn vrrp(advert: &str) -> Vec<f64> {
    let prefix = format!("apilb-bfo-v{}", advert.trim_end_matches('s'));
    let (t, dir) = two_lb_nodes(&prefix);
    let election =
        |_| format!("[election.vrrp]\nadvert_interval = \"{advert}\"\npreempt = false\n");
    let vip = |_| {
        vrrp_vip(VrrpVip {
            addr: VIP_ADDR,
            vrid: 51,
            priority: 100,
        })
    };
    let mut sides = apilb_pair(&t, &dir.0, &prefix, &election, &vip);
    let (limit, cycle) = if advert == "100ms" {
        (5, Duration::from_millis(100))
    } else {
        (20, Duration::from_secs(1))
    };
    trials(
        &format!("apilb vrrp {advert}"),
        &t,
        &dir.0,
        &mut sides,
        Duration::from_secs(limit),
        cycle,
    )
}

fn etcd() -> Vec<f64> {
    let prefix = "apilb-bfo-etcd";
    let (t, dir) = two_lb_nodes(prefix);
    let _etcd = Etcd::start(&t, &dir.0);
    let election = |i| etcd_election(i, "3s", 1);
    let vip = |_| format!("address = \"{VIP_ADDR}\"\nelection = \"etcd\"");
    let mut sides = apilb_pair(&t, &dir.0, prefix, &election, &vip);
    // Keepalives go every third of the lease.
    trials(
        "apilb etcd 3s lease",
        &t,
        &dir.0,
        &mut sides,
        Duration::from_secs(15),
        Duration::from_secs(1),
    )
}

/// keepalived on both nodes, adverts every `advert` seconds: `"1"` is its
/// default (VRRPv2); a fraction needs VRRPv3, whose adverts count centiseconds.
fn keepalived(advert: &str) -> Vec<f64> {
    let prefix = format!("apilb-bfo-ka{}", advert.replace('.', ""));
    let (t, dir) = two_lb_nodes(&prefix);
    let version = if advert.contains('.') {
        "    vrrp_version 3\n"
    } else {
        ""
    };
    let conf = |i: usize| {
        format!(
            "global_defs {{\n    router_id lb{}\n{version}}}\nvrrp_instance VI_1 {{\n    state BACKUP\n    \
             nopreempt\n    interface eth0\n    virtual_router_id 51\n    priority 100\n    \
             advert_int {advert}\n    virtual_ipaddress {{\n        {VIP_ADDR}/32 dev eth0\n    }}\n}}\n",
            i + 1
        )
    };
    let first = Keepalived::start(&t.lbs[0], &dir.0, "k0-start", &conf(0));
    thread::sleep(Duration::from_secs(4));
    let second = Keepalived::start(&t.lbs[1], &dir.0, "k1-start", &conf(1));
    let mut sides = [
        Side::Keepalived(first, conf(0)),
        Side::Keepalived(second, conf(1)),
    ];
    let cycle = Duration::from_secs_f64(advert.parse().expect("advert_int"));
    trials(
        &format!("keepalived advert_int {advert}"),
        &t,
        &dir.0,
        &mut sides,
        Duration::from_secs(20),
        cycle,
    )
}

fn main() {
    let rows = [
        ("apilb VRRP, 100 ms adverts", vrrp("100ms")),
        (
            "keepalived 2.2, VRRPv3, 100 ms adverts (advert_int 0.1)",
            keepalived("0.1"),
        ),
        ("apilb VRRP, 1 s adverts", vrrp("1s")),
        (
            "keepalived 2.2, defaults (VRRPv2, advert_int 1)",
            keepalived("1"),
        ),
        ("apilb etcd, 3 s lease", etcd()),
    ];
    println!(
        "\nVIP failover after SIGKILL of the owner, {TRIALS} trials each (router's ARP entry moves)\n"
    );
    println!("| setup | median | max |");
    println!("| --- | ---: | ---: |");
    for (name, times) in rows {
        let median = median(times.iter().copied()).expect("trials");
        let max = times.iter().copied().fold(f64::MIN, f64::max);
        println!("| {name} | {median:.2} s | {max:.2} s |");
    }
}
