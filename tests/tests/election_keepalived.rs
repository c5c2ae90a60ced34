//! apilb and a real keepalived (Debian's 2.2) share one VRRP virtual router,
//! configured as the keepalived recipes for kubeadm HA configure it: unicast peers,
//! `advert_int 1`, and for VRRPv2 `auth_type PASS`.
//! apilb runs on lb1, keepalived on lb2 with a TCP responder standing in for the
//! proxy keepalived usually fronts, so a connection to the VIP says which side
//! served it. Whichever side has the higher priority owns the VIP; killing it
//! moves the VIP to the other. Target failover with 1 s adverts: 3.7 s, asserted
//! within 5x. Root.

use std::time::{Duration, Instant};

use tests::{
    cluster::{Topology, VIP_ADDR, lb_addr},
    elect::{
        Keepalived, Node, VrrpVip, echo_masters, holders, node_config, two_lb_nodes, vrrp_vip,
        wait_served_by,
    },
    live::{EchoServer, TempDir},
};

const TARGET: Duration = Duration::from_millis(3700);
const KEEPALIVED: usize = usize::MAX;

fn keepalived_conf(version: u8, priority: u8) -> String {
    let auth = if version == 2 {
        "    authentication {\n        auth_type PASS\n        auth_pass 123456\n    }\n"
    } else {
        ""
    };
    format!(
        "global_defs {{\n    router_id lb2\n    vrrp_version {version}\n}}\n\
         vrrp_instance VI_1 {{\n    state BACKUP\n    interface eth0\n    virtual_router_id 51\n    \
         priority {priority}\n    advert_int 1\n    unicast_src_ip {}\n    unicast_peer {{\n        {}\n    }}\n\
         {auth}    virtual_ipaddress {{\n        {VIP_ADDR}/32 dev eth0\n    }}\n}}\n",
        lb_addr(1),
        lb_addr(0),
    )
}

fn apilb_election(version: u8) -> String {
    let auth = if version == 2 {
        "auth_pass = \"123456\"\n"
    } else {
        ""
    };
    format!(
        "[election.vrrp]\nversion = {version}\nadvert_interval = \"1s\"\nunicast_peers = [\"{}\"]\n{auth}",
        lb_addr(1)
    )
}

fn interop(version: u8) {
    let prefix = format!("apilb-kad{version}");
    let (t, dir) = two_lb_nodes(&prefix);
    let _masters = echo_masters(&t, Duration::from_mins(5));
    let _responder = EchoServer::start(&t.lbs[1], "0.0.0.0:6443", Duration::from_mins(5));
    let vip = vrrp_vip(VrrpVip {
        addr: VIP_ADDR,
        vrid: 51,
        priority: 150,
    });
    let mut apilb = Node::start(&t, &dir.0, &prefix, 0, |i| {
        node_config(0, i, std::slice::from_ref(&vip), &apilb_election(version))
    });
    let mut keepalived = Keepalived::start(&t.lbs[1], &dir.0, "k1", &keepalived_conf(version, 100));
    let step = |apilb: &Node, who: usize, since: Instant, what: &str| {
        let took = wait_served_by(&t.client, VIP_ADDR, who, since, TARGET * 5);
        eprintln!("keepalived interop v{version}: {what}: after {took:?}");
        assert!(
            took.is_some(),
            "v{version} {what}: not served by {}\napilb:\n{}",
            if who == KEEPALIVED {
                "keepalived's node"
            } else {
                "apilb"
            },
            apilb
                .apilb
                .as_ref()
                .map(tests::live::Apilb::log_text)
                .unwrap_or_default()
        );
    };

    // apilb 150 > keepalived 100: apilb owns the VIP.
    step(&apilb, 0, Instant::now(), "apilb (150) wins");
    assert_eq!(
        holders(&t, VIP_ADDR),
        [0],
        "keepalived did not take the address"
    );
    // apilb killed: keepalived takes over.
    let killed = Instant::now();
    apilb.kill();
    step(
        &apilb,
        KEEPALIVED,
        killed,
        "apilb SIGKILLed, keepalived takes over",
    );
    // apilb back: it drops its stale address and preempts keepalived.
    let back = Instant::now();
    apilb.restart(&t, &dir.0);
    step(&apilb, 0, back, "apilb restarted, preempts");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holders(&t, VIP_ADDR), [0], "keepalived gave the address up");

    // keepalived with 200 > 150 preempts apilb; killing it moves the VIP back.
    keepalived.kill();
    let higher = Instant::now();
    keepalived = Keepalived::start(&t.lbs[1], &dir.0, "k2", &keepalived_conf(version, 200));
    step(&apilb, KEEPALIVED, higher, "keepalived (200) preempts");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(holders(&t, VIP_ADDR), [1], "apilb gave the address up");
    let killed = Instant::now();
    keepalived.kill();
    step(&apilb, 0, killed, "keepalived SIGKILLed, apilb takes over");
    let log = apilb.apilb().log_text();
    assert!(
        !log.contains("adverts refused"),
        "no advert was refused:\n{log}"
    );

    keepalived.kill();
    misconfigured_peer_is_refused(&t, &dir, &apilb, version);
}

/// A misconfigured keepalived (v2: another password; v3: another VRID) is refused
/// and counted by reason, not obeyed.
fn misconfigured_peer_is_refused(t: &Topology, dir: &TempDir, apilb: &Node, version: u8) {
    let (conf, reason) = if version == 2 {
        (
            keepalived_conf(version, 200).replace("auth_pass 123456", "auth_pass wrong"),
            "auth",
        )
    } else {
        (
            keepalived_conf(version, 200).replace("virtual_router_id 51", "virtual_router_id 52"),
            "vrid",
        )
    };
    let _wrong = Keepalived::start(&t.lbs[1], &dir.0, "k3", &conf);
    assert!(
        apilb
            .apilb()
            .wait_log("VRRP adverts refused", Duration::from_secs(10)),
        "{reason} rejections logged:\n{}",
        apilb.apilb().log_text()
    );
    // The line names the sender, its VRID and the reason.
    let log = apilb.apilb().log_text();
    let line = log
        .lines()
        .find(|l| l.contains("VRRP adverts refused"))
        .unwrap_or_default();
    eprintln!("keepalived interop v{version}: {line}");
    let vrid = if version == 2 { 51 } else { 52 };
    for field in [
        format!("src={}", lb_addr(1)),
        format!("vrid={vrid}"),
        format!("reason=\"{reason}\""),
    ] {
        assert!(line.contains(&field), "{field} not in {line:?}");
    }
    let metrics = tests::live::metrics(&t.lbs[0]);
    assert!(
        metrics.contains(&format!(
            "apilb_vrrp_adverts_rejected_total{{reason=\"{reason}\"}}"
        )),
        "{metrics}"
    );
    // apilb does not obey it (that keepalived, master of its own VRID, claims the
    // address too: the split brain a misconfiguration makes, now visible).
    assert!(
        metrics.contains("state=\"master\""),
        "apilb stays master:\n{metrics}"
    );
}

#[test]
fn apilb_and_keepalived_share_a_vrid_with_vrrpv2_and_pass_auth() {
    interop(2);
}

#[test]
fn apilb_and_keepalived_share_a_vrid_with_vrrpv3() {
    interop(3);
}
