//! VIP ownership through a real etcd (Debian's etcd-server) started by the test in
//! the router namespace, between two apilb LB nodes of the `tests::cluster`
//! topology, with a 2 s lease. Killing the owner moves the VIP within the lease TTL
//! plus a bounded delay; cutting the owner off from etcd makes it give the VIP up
//! before the other takes it, so no sample ever finds the address on both. A
//! rolling restart of a three-member etcd (as a kubeadm upgrade does, one master
//! at a time) moves no VIP: the owner's keepalive reopens on the same lease. Root.

use std::time::{Duration, Instant};

use tests::{
    cluster::VIP_ADDR,
    elect::{
        ETCD_ADDR, Etcd, Node, assert_served_by, echo_masters, etcd_election, holders, node_config,
        two_lb_nodes, wait_served_by,
    },
};

const TTL: Duration = Duration::from_secs(2);
/// etcd looks for expired leases every 500 ms, and a candidate's campaign takes a
/// round trip or two.
const SLACK: Duration = Duration::from_secs(2);

#[test]
fn the_vip_follows_the_etcd_lease_and_never_has_two_owners() {
    let prefix = "apilb-etcd";
    let (t, dir) = two_lb_nodes(prefix);
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let _etcd = Etcd::start(&t, &dir.0);
    let vip = vec![format!("address = \"{VIP_ADDR}\"\nelection = \"etcd\"")];
    let mut lb1 = Node::start(&t, &dir.0, prefix, 0, |i| {
        node_config(0, i, &vip, &etcd_election(0, "2s", 1))
    });
    let first = wait_served_by(
        &t.client,
        VIP_ADDR,
        0,
        Instant::now(),
        Duration::from_secs(5),
    );
    assert!(
        first.is_some(),
        "lb1 never owned:\n{}",
        lb1.apilb().log_text()
    );
    let _lb2 = Node::start(&t, &dir.0, prefix, 1, |i| {
        node_config(1, i, &vip, &etcd_election(1, "2s", 1))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(holders(&t, VIP_ADDR), [0], "lb2 is a candidate");

    // The owner is killed: its lease runs out, lb2 takes the key.
    let killed = Instant::now();
    lb1.kill();
    let took = wait_served_by(&t.client, VIP_ADDR, 1, killed, TTL + SLACK);
    eprintln!("etcd, 2 s lease: owner SIGKILLed -> served by lb2 after {took:?}");
    assert!(
        took.is_some(),
        "lb2 did not take over within TTL + {SLACK:?}"
    );
    lb1.restart(&t, &dir.0);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(holders(&t, VIP_ADDR), [1], "lb1 came back as a candidate");

    // lb2 is cut off from etcd: it gives the VIP up before its lease can expire,
    // and only then does lb1 get it. Sampled every 20 ms: never both.
    let cut = Instant::now();
    t.lbs[1].ip(&["route", "replace", "prohibit", ETCD_ADDR]);
    let (mut released, mut taken, mut both) = (None, None, 0);
    while cut.elapsed() < TTL + SLACK + Duration::from_secs(1) {
        let h = holders(&t, VIP_ADDR);
        if h.len() == 2 {
            both += 1;
        }
        if released.is_none() && !h.contains(&1) {
            released = Some(cut.elapsed());
        }
        if taken.is_none() && h.contains(&0) {
            taken = Some(cut.elapsed());
        }
        if released.is_some() && taken.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "etcd, 2 s lease: lb2 cut off -> released after {released:?}, lb1 owns after {taken:?}, \
         {both} samples with two owners"
    );
    assert_eq!(both, 0, "two nodes held the VIP at once");
    let (released, taken) = (
        released.expect("lb2 released"),
        taken.expect("lb1 took over"),
    );
    assert!(
        released < taken,
        "released {released:?} before taken {taken:?}"
    );
    assert!(released <= TTL, "lb2 let go before its lease could expire");
    assert!(wait_served_by(&t.client, VIP_ADDR, 0, Instant::now(), SLACK).is_some());
}

/// Every member of a three-member etcd is stopped (SIGTERM, as kubelet stops a
/// static pod) and started again in turn, the leader among them, while lb1 owns the VIP with the default 3 s lease: the
/// lease outlives each break, lb1's keepalive reopens on a surviving member, and
/// the VIP never moves. Sampled every 20 ms.
#[test]
fn a_rolling_etcd_restart_moves_no_vip() {
    let prefix = "apilb-etcdr";
    let (t, dir) = two_lb_nodes(prefix);
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let mut etcd = Etcd::cluster(&t, &dir.0, 3);
    let vip = vec![format!("address = \"{VIP_ADDR}\"\nelection = \"etcd\"")];
    let lb1 = Node::start(&t, &dir.0, prefix, 0, |i| {
        node_config(0, i, &vip, &etcd_election(0, "3s", 3))
    });
    assert_served_by(&t, VIP_ADDR, &lb1, Duration::from_secs(10));
    let lb2 = Node::start(&t, &dir.0, prefix, 1, |i| {
        node_config(1, i, &vip, &etcd_election(1, "3s", 3))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(holders(&t, VIP_ADDR), [0], "lb2 is a candidate");

    let mut moved = Vec::new();
    for member in 0..3 {
        let started = Instant::now();
        etcd.restart(&t, member);
        let back = started.elapsed();
        // The other members run on; give the restarted one time to rejoin, and lb1
        // a few keepalives, before the next goes.
        while started.elapsed() < back + Duration::from_secs(4) {
            let h = holders(&t, VIP_ADDR);
            if h != [0] {
                moved.push((member, started.elapsed(), h));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "etcd member m{member} stopped and back in {back:?}; VIP holders sampled for 4 s after"
        );
    }
    let log = lb1.apilb().log_text();
    let reopened = log.matches("keepalive reopened").count();
    let released = log.matches("VIP released").count();
    eprintln!(
        "rolling etcd restart: {} samples off lb1, lb1's keepalive reopened {reopened} times, \
         VIP released {released} times",
        moved.len()
    );
    assert!(
        moved.is_empty(),
        "the VIP moved: {moved:?}\nlb1:\n{log}\nlb2:\n{}",
        lb2.apilb().log_text()
    );
    assert_eq!(released, 0, "lb1 released the VIP:\n{log}");
}
