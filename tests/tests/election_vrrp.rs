//! VIP ownership by VRRP between two apilb LB nodes in the `tests::cluster`
//! topology (the VIP is not on any node until an election puts it there), with TCP
//! echo masters, so a connection to the VIP says which node's datapath served it.
//! VRRPv3 multicast, 100 ms adverts: the target failover is 1 s, asserted within
//! 5x. Root.

use std::time::{Duration, Instant};

use tests::{
    cluster::{Shape, Topology, VIP_ADDR},
    elect::{Node, VrrpVip, echo_masters, holders, node_config, served_by, vrrp_vip, wait_served_by},
    live::TempDir,
};

const TARGET: Duration = Duration::from_secs(1);

fn pair(prefix: &str) -> (Topology, TempDir) {
    let t = Topology::with_shape(
        prefix,
        Shape {
            lb_nodes: 2,
            vip_on_first_lb: false,
            ..Shape::default()
        },
    );
    (t, TempDir::new(prefix))
}

fn election(preempt: bool) -> String {
    format!("[election.vrrp]\nadvert_interval = \"100ms\"\npreempt = {preempt}\n")
}

fn vip(priority: u8) -> Vec<String> {
    vec![vrrp_vip(VrrpVip {
        addr: VIP_ADDR,
        vrid: 51,
        priority,
    })]
}

#[test]
fn the_higher_priority_node_owns_the_vip_and_the_other_takes_over_when_it_is_killed() {
    let (t, dir) = pair("apilb-vrrp");
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let mut lb1 = Node::start(&t, &dir.0, "apilb-vrrp", 0, |i| {
        node_config(0, i, &vip(150), &election(true))
    });
    let _lb2 = Node::start(&t, &dir.0, "apilb-vrrp", 1, |i| {
        node_config(1, i, &vip(100), &election(true))
    });
    let won = wait_served_by(&t.client, VIP_ADDR, 0, Instant::now(), Duration::from_secs(5));
    assert!(won.is_some(), "lb1 never served the VIP:\n{}", lb1.apilb().log_text());
    assert_eq!(holders(&t, VIP_ADDR), [0], "only lb1 holds the address");

    let killed = Instant::now();
    lb1.kill();
    let took = wait_served_by(&t.client, VIP_ADDR, 1, killed, TARGET * 5);
    eprintln!("vrrp 100ms: SIGKILL -> served by lb2 after {took:?}");
    assert!(took.is_some(), "lb2 did not take over");
    assert!(holders(&t, VIP_ADDR).contains(&1));

    // lb1 comes back: it drops the address it left, then preempts (150 > 100).
    let back = Instant::now();
    lb1.restart(&t, &dir.0);
    let took = wait_served_by(&t.client, VIP_ADDR, 0, back, TARGET * 5);
    eprintln!("vrrp 100ms: lb1 restarted -> preempted after {took:?}");
    assert!(took.is_some(), "lb1 did not preempt");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(holders(&t, VIP_ADDR), [0], "lb2 gave the address up");
    assert_eq!(served_by(&t.client, VIP_ADDR), Some(0));
}
