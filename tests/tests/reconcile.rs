//! The reconciler against the real datapath (in the fixture lab's namespace): it
//! writes only what changed, takes a dead backend out of the ring and removes its
//! flows and no others, and fails open when no backend is healthy. Needs root.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use lb_common::{PROG_XDP, counters::*};
use lb_userspace::{
    config::Config,
    controller::{Applied, Reconciler},
    health::Health,
};
use tests::{
    fixture::{CLIENT_MAC, FX0_MAC, Ingress, Lab, XDP_PASS, XDP_REDIRECT, sa},
    packets::Tcp,
};

const MASTERS: [&str; 3] = [
    "198.51.100.11:6443",
    "198.51.100.12:6443",
    "198.51.100.13:6443",
];

fn config() -> Config {
    let mut text = String::from(
        "[datapath]\ninterfaces = [\"fx0\", \"fx1\"]\nsnat_ipv4 = \"198.51.100.1\"\nnat_ports = [40000, 40999]\n\
         nexthop_ttl = \"1m\"\n[[vip]]\naddress = \"192.0.2.100\"\n[health]\nkind = \"tcp\"\n",
    );
    for m in MASTERS {
        text.push_str("[[backend]]\naddress = \"");
        text.push_str(m);
        text.push_str("\"\n");
    }
    Config::parse(&text, Path::new("reconcile-test.toml")).expect("valid")
}

/// `addrs` ready, every other master down.
fn healthy(addrs: &[&str]) -> HashMap<SocketAddr, Health> {
    addrs.iter().map(|a| (sa(a), Health::Ready)).collect()
}

/// Run one frame through the program from the client side; return the verdict.
fn send(lab: &mut Lab, pkt: &Tcp) -> u32 {
    lab.test_run(PROG_XDP, &pkt.build(), Ingress::ClientSide)
        .action
}

/// Open flows until two different masters hold one each: (backend id, its SYN).
fn flows_on_two_masters(lab: &mut Lab) -> Vec<(u32, Tcp)> {
    let mut by_backend: Vec<(u32, Tcp)> = Vec::new();
    for port in 51_000..51_050 {
        let syn = Tcp::syn(
            CLIENT_MAC,
            FX0_MAC,
            sa(&format!("192.0.2.10:{port}")),
            sa("192.0.2.100:6443"),
        );
        assert_eq!(send(lab, &syn), XDP_REDIRECT);
        let flows = lab.all_flows();
        let id = flows
            .iter()
            .find(|(k, _)| u16::from_be(k.sport_be) == port)
            .expect("flow")
            .1
            .backend_id;
        if !by_backend.iter().any(|(b, _)| *b == id) {
            by_backend.push((id, syn));
        }
        if by_backend.len() == 2 {
            break;
        }
    }
    by_backend
}

#[test]
fn a_dead_backend_leaves_the_ring_with_its_flows_and_no_other_flow_is_touched() {
    let mut lab = Lab::new("apilb-fx-reconcile");
    let cfg = config();
    let mut r = Reconciler::new();

    let all = r.desired(&cfg, &healthy(&MASTERS), &HashSet::new());
    let first = r.apply(&mut lab.dp, all.clone()).expect("apply");
    assert_eq!(
        (
            first.backends_written,
            first.vips_written,
            first.ring_slots_written
        ),
        (3, 1, 65_537)
    );
    let again = r.apply(&mut lab.dp, all.clone()).expect("apply again");
    assert_eq!(
        again,
        Applied::default(),
        "re-applying the same state writes nothing"
    );

    let by_backend = flows_on_two_masters(&mut lab);
    let [(dead_id, dead_flow), (live_id, live_flow)] = &by_backend[..] else {
        panic!("two masters got flows")
    };
    let dead_addr = all.backends[dead_id].addr;
    let flows_on_dead = lab
        .all_flows()
        .iter()
        .filter(|(_, f)| f.backend_id == *dead_id)
        .count();
    let slots_of_dead = all.vips[0].1.iter().filter(|&&b| b == *dead_id).count();

    let survivors: Vec<&str> = MASTERS
        .iter()
        .copied()
        .filter(|m| sa(m) != dead_addr)
        .collect();
    let after = r.desired(&cfg, &healthy(&survivors), &HashSet::new());
    let applied = r.apply(&mut lab.dp, after.clone()).expect("apply");
    assert_eq!(
        applied.keep_flows, None,
        "down only just: its flows wait until it has been down a while with others ready"
    );
    // Maglev moves the dead master's slots and a sliver of the others' (0.1% here).
    let others_moved = applied.ring_slots_written - slots_of_dead;
    assert!(
        applied.ring_slots_written >= slots_of_dead && others_moved * 100 < 65_537 - slots_of_dead,
        "{others_moved} other slots moved"
    );
    // Only the dead master's entry changes: it is marked out of rotation.
    assert_eq!((applied.backends_written, applied.vips_written), (1, 0));
    assert!(after.vips[0].1.iter().all(|b| b != dead_id));
    // Down for `fall + 1` probe intervals (1.5 s here) while the others are ready:
    // its flows go.
    let settled = r.desired_at(
        &cfg,
        &healthy(&survivors),
        &HashSet::new(),
        Instant::now() + Duration::from_secs(2),
    );
    let removed = r.apply(&mut lab.dp, settled).expect("apply");
    let keep = removed
        .keep_flows
        .clone()
        .expect("the dead master's flows go");
    assert!(!keep.contains(&dead_addr) && keep.len() == 2, "{keep:?}");
    // What the reaper thread does with it, on its own handles.
    let mut tables = lab.dp.flow_tables().expect("flow tables");
    let gone = tables.remove_flows(|b| !keep.contains(&b)).expect("remove");
    assert_eq!(gone, [(dead_addr, flows_on_dead)].into());
    assert_eq!(
        removed.ring_slots_written, 0,
        "the ring was already rewritten"
    );

    let before = lab.dp.counters().expect("counters");
    assert_eq!(
        send(&mut lab, &dead_flow.clone().data(b"x")),
        XDP_PASS,
        "the dead master's flow is gone"
    );
    assert_eq!(
        send(&mut lab, &live_flow.clone().data(b"x")),
        XDP_REDIRECT,
        "the live master's flow stays"
    );
    let c = lab.dp.counters().expect("counters");
    assert_eq!(
        (
            c.get(PASS_NO_FLOW) - before.get(PASS_NO_FLOW),
            c.get(FLOW_NEW) - before.get(FLOW_NEW)
        ),
        (1, 0)
    );
    let survivor = lab
        .all_flows()
        .into_iter()
        .find(|(k, _)| k.sport_be == live_flow.src.port().to_be());
    assert_eq!(survivor.expect("live flow").1.backend_id, *live_id);

    let none = r.desired(&cfg, &healthy(&[]), &HashSet::new());
    assert!(
        none.fail_open && none.in_rotation.len() == 3,
        "no healthy master: all three serve"
    );
    let applied = r.apply(&mut lab.dp, none).expect("apply");
    let keep = applied.keep_flows.expect("every master kept again");
    assert_eq!(keep.len(), 3, "failing open removes no flow");
}
