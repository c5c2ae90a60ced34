//! VIP ownership by VRRP between two apilb LB nodes in the `tests::cluster`
//! topology (the VIP is not on any node until an election puts it there), with TCP
//! echo masters, so a connection to the VIP says which node's datapath served it.
//! VRRPv3 multicast, 100 ms adverts: the target failover is 1 s, asserted within
//! 5x. Root.

use std::time::{Duration, Instant};

use lb_userspace::election::vrrp::packet::Reject;

use tests::{
    cluster::{VIP_ADDR, VIP2_ADDR, VIP6_ADDR},
    elect::{
        Node, VrrpVip, echo_masters, holders, node_config, served_by, two_lb_nodes, vrrp_vip,
        wait_served_by,
    },
};

const TARGET: Duration = Duration::from_secs(1);

/// The tests run one at a time: each runs two apilb nodes with 100 ms adverts and
/// probes, and four pairs at once on two CPUs could fail over spuriously.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let _serial = serial();
    let _ = tests::elect::vrrp_kill_and_preempt("apilb-vrrp", TARGET * 5);
}

#[test]
fn link_down_sigstop_and_sigterm_each_move_the_vip_and_nopreempt_keeps_it_where_it_is() {
    let _serial = serial();
    let (t, dir) = two_lb_nodes("apilb-vrrp2");
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let mut lb1 = Node::start(&t, &dir.0, "apilb-vrrp2", 0, |i| {
        node_config(0, i, &vip(150), &election(true))
    });
    let lb2 = Node::start(&t, &dir.0, "apilb-vrrp2", 1, |i| {
        node_config(1, i, &vip(100), &election(true))
    });
    let serve = |node, since, what: &str| {
        let took = wait_served_by(&t.client, VIP_ADDR, node, since, TARGET * 5);
        eprintln!(
            "vrrp 100ms: {what}: served by lb{} after {took:?}",
            node + 1
        );
        assert!(took.is_some(), "{what}: lb{} never served", node + 1);
    };
    serve(0, Instant::now(), "start");

    // Link down (the cable, not the node's own admin state, which would also drop
    // its routes): lb1 stops hearing and being heard.
    let down = Instant::now();
    t.router.ip(&["link", "set", "p-lb1", "down"]);
    serve(1, down, "lb1's link down");
    // Link up: lb1 still thinks it is master, with the higher priority; lb2 hears
    // it and steps back, lb1 hears lb2 and announces again.
    let up = Instant::now();
    t.router.ip(&["link", "set", "p-lb1", "up"]);
    serve(0, up, "lb1's link up");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(holders(&t, VIP_ADDR), [0]);

    // SIGSTOP: lb1 falls silent but keeps its address; lb2 takes over and
    // announces. SIGCONT: lb1 advertises again and wins back.
    let stopped = Instant::now();
    lb1.apilb().signal(libc::SIGSTOP);
    serve(1, stopped, "lb1 SIGSTOPped");
    let resumed = Instant::now();
    lb1.apilb().signal(libc::SIGCONT);
    serve(0, resumed, "lb1 SIGCONTed");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(holders(&t, VIP_ADDR), [0]);

    // SIGTERM: lb1 sends priority 0, so lb2 takes over after Skew_Time (~60 ms),
    // not the whole Master_Down_Interval.
    let term = Instant::now();
    lb1.apilb().signal(libc::SIGTERM);
    serve(1, term, "lb1 SIGTERMed");
    assert!(
        lb1.apilb
            .as_mut()
            .expect("running")
            .wait(Duration::from_secs(5))
            .is_some()
    );
    assert!(
        lb1.apilb().log_text().contains("no longer master"),
        "{}",
        lb1.apilb().log_text()
    );
    assert_eq!(
        holders(&t, VIP_ADDR),
        [1],
        "lb1 removed its address on exit"
    );
    assert!(
        lb2.apilb()
            .log_text()
            .contains("master resigned (priority 0)"),
        "lb2 took over on lb1's priority-0 advert, not its timeout:\n{}",
        lb2.apilb().log_text()
    );

    // Back with preempt off: lb2 keeps the VIP although lb1's priority is higher.
    std::fs::write(
        &lb1.config,
        node_config(0, &lb1.pins.instance(), &vip(150), &election(false)),
    )
    .expect("config");
    lb1.restart(&t, &dir.0);
    nopreempt_keeps_it_on_lb2(&t);
}

/// lb1, back with the higher priority but preempt off, leaves the VIP on lb2.
fn nopreempt_keeps_it_on_lb2(t: &tests::cluster::Topology) {
    std::thread::sleep(TARGET * 2);
    assert_eq!(
        served_by(&t.client, VIP_ADDR),
        Some(1),
        "nopreempt: lb2 keeps it"
    );
    assert_eq!(holders(t, VIP_ADDR), [1]);
}

#[test]
fn active_active_each_vip_on_its_preferred_node_both_on_the_survivor() {
    let _serial = serial();
    let (t, dir) = two_lb_nodes("apilb-vrrp-aa");
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let vips = |p1: u8, p2: u8| {
        vec![
            vrrp_vip(VrrpVip {
                addr: VIP_ADDR,
                vrid: 51,
                priority: p1,
            }),
            vrrp_vip(VrrpVip {
                addr: VIP2_ADDR,
                vrid: 52,
                priority: p2,
            }),
        ]
    };
    let mut lb1 = Node::start(&t, &dir.0, "apilb-vrrp-aa", 0, |i| {
        node_config(0, i, &vips(150, 100), &election(true))
    });
    let _lb2 = Node::start(&t, &dir.0, "apilb-vrrp-aa", 1, |i| {
        node_config(1, i, &vips(100, 150), &election(true))
    });
    let start = Instant::now();
    assert!(wait_served_by(&t.client, VIP_ADDR, 0, start, TARGET * 5).is_some());
    assert!(wait_served_by(&t.client, VIP2_ADDR, 1, start, TARGET * 5).is_some());
    assert_eq!(
        (holders(&t, VIP_ADDR), holders(&t, VIP2_ADDR)),
        (vec![0], vec![1])
    );

    let killed = Instant::now();
    lb1.kill();
    let took = wait_served_by(&t.client, VIP_ADDR, 1, killed, TARGET * 5);
    eprintln!("active-active: lb1 killed -> its VIP on lb2 after {took:?}");
    assert!(took.is_some());
    assert_eq!(
        served_by(&t.client, VIP2_ADDR),
        Some(1),
        "lb2's own VIP stays"
    );
}

#[test]
fn a_node_whose_masters_are_unreachable_lowers_its_priority_and_hands_the_vip_over() {
    let _serial = serial();
    let (t, dir) = two_lb_nodes("apilb-vrrp-trk");
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let election = "[election.vrrp]\nadvert_interval = \"100ms\"\ntrack_weight = -60\n";
    let lb1 = Node::start(&t, &dir.0, "apilb-vrrp-trk", 0, |i| {
        node_config(0, i, &vip(150), election)
    });
    let _lb2 = Node::start(&t, &dir.0, "apilb-vrrp-trk", 1, |i| {
        node_config(1, i, &vip(100), election)
    });
    assert!(wait_served_by(&t.client, VIP_ADDR, 0, Instant::now(), TARGET * 5).is_some());

    // `add` or `del` a prohibit route on lb1 to every master.
    let masters_route = |verb: &str| {
        for m in tests::cluster::MASTERS {
            let ip = m.split(':').next().expect("ip");
            t.lbs[0].ip(&["route", verb, "prohibit", ip]);
        }
    };
    // lb1 loses every master (its probes fail; lb2's do not): 150 - 60 = 90 < 100.
    let cut = Instant::now();
    masters_route("add");
    let took = wait_served_by(&t.client, VIP_ADDR, 1, cut, TARGET * 5);
    eprintln!("vrrp tracking: lb1's masters unreachable -> served by lb2 after {took:?}");
    assert!(
        took.is_some(),
        "lb2 did not take over:\n{}",
        lb1.apilb().log_text()
    );
    assert!(
        lb1.apilb()
            .log_text()
            .contains("priority changed by health tracking")
    );

    // Reachable again: back to 150, and lb1 preempts.
    let healed = Instant::now();
    masters_route("del");
    let took = wait_served_by(&t.client, VIP_ADDR, 0, healed, TARGET * 5);
    eprintln!("vrrp tracking: lb1's masters reachable -> served by lb1 after {took:?}");
    assert!(took.is_some());
}

/// [`node_config`] for VIPs among which an IPv6 one: it needs an IPv6 SNAT address
/// and backend; none answers here, so tracking is off (both nodes would drop alike
/// anyway).
fn config_with_v6(node: usize, instance: &str, vips: &[String]) -> String {
    node_config(
        node,
        instance,
        vips,
        "[election.vrrp]\nadvert_interval = \"100ms\"\ntrack_weight = 0\n\
         [[backend]]\naddress = \"[fd00:198:51:100::11]:6443\"\n",
    )
    .replace(
        "snat_ipv4 = ",
        &format!(
            "snat_ipv6 = \"fd00:198:51:100::{}\"\nsnat_ipv4 = ",
            node + 2
        ),
    )
}

/// The router's neighbour entry for `vip` names LB node `node`'s MAC.
fn router_resolves_to(t: &tests::cluster::Topology, vip: &str, node: usize) -> bool {
    let mac = t.lbs[node].ip(&["-br", "link", "show", "dev", "eth0"]);
    let mac = mac.split_whitespace().nth(2).expect("MAC");
    t.router.ip(&["-6", "neigh", "show", vip]).contains(mac)
}

#[test]
fn an_ipv6_vip_moves_by_vrrpv3_from_link_local_with_unsolicited_neighbour_adverts() {
    let _serial = serial();
    let (t, dir) = two_lb_nodes("apilb-vrrp6");
    let config = |node: usize, instance: &str, priority: u8| {
        let vip = vec![vrrp_vip(VrrpVip {
            addr: VIP6_ADDR,
            vrid: 61,
            priority,
        })];
        config_with_v6(node, instance, &vip)
    };
    let mut lb1 = Node::start(&t, &dir.0, "apilb-vrrp6", 0, |i| config(0, i, 150));
    let _lb2 = Node::start(&t, &dir.0, "apilb-vrrp6", 1, |i| config(1, i, 100));
    let owner = |node: usize, since: Instant| {
        while since.elapsed() < TARGET * 5 {
            // Any packet to the VIP makes the router resolve it (or keep it fresh).
            {
                let _inside = t.router.enter();
                let addr = std::net::SocketAddr::new(VIP6_ADDR.parse().expect("v6"), 6443);
                let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200));
            }
            if holders(&t, VIP6_ADDR) == [node] && router_resolves_to(&t, VIP6_ADDR, node) {
                return Some(since.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    };
    let won = owner(0, Instant::now());
    assert!(
        won.is_some(),
        "lb1 never owned the IPv6 VIP:\n{}",
        lb1.apilb().log_text()
    );
    let killed = Instant::now();
    lb1.kill();
    // lb1's stale address stays (SIGKILL); the router follows lb2's advert.
    let mut took = None;
    while killed.elapsed() < TARGET * 5 {
        if holders(&t, VIP6_ADDR).contains(&1) && router_resolves_to(&t, VIP6_ADDR, 1) {
            took = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("vrrp IPv6 100ms: SIGKILL -> router resolves the VIP to lb2 after {took:?}");
    assert!(
        took.is_some(),
        "the router still resolves the IPv6 VIP to lb1"
    );
}

/// Wait (at most 5 s) until `line` is a line of the node's `/metrics`.
fn wait_metric(t: &tests::cluster::Topology, node: usize, line: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = tests::live::metrics(&t.lbs[node]);
        if m.lines().any(|l| l == line) {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("{line:?} not in:\n{m}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node's log, written to a file: no colour codes; a VIP moving says it
/// rewrote its VIP entry only; failing open (if at all, before the first
/// probes) said once, not at every VRRP transition.
fn assert_logs_plain(node: &Node) {
    let log = node.apilb().log_text();
    assert!(
        !log.contains("\x1b["),
        "no colour codes in a log file:\n{log}"
    );
    assert!(log.contains("wrote=1 VIP entry"), "{log}");
    assert!(!log.contains("backends=0"), "{log}");
    assert!(log.matches("failing open").count() <= 1, "{log}");
}

/// keepalived's reload applies a new priority, and so does apilb's SIGHUP: no
/// restart that would move the VIP twice. Also: a fresh instance has every
/// refusal reason's series at 0, and logs carry no colour codes in a file.
#[test]
fn a_sighup_priority_change_moves_the_vip_in_place_and_nopreempt_holds_it_back() {
    let _serial = serial();
    let prefix = "apilb-fr-reload";
    let (t, dir) = two_lb_nodes(prefix);
    let _masters = echo_masters(&t, Duration::from_mins(3));
    let lb1 = Node::start(&t, &dir.0, prefix, 0, |i| {
        node_config(0, i, &vip(150), &election(true))
    });
    let lb2 = Node::start(&t, &dir.0, prefix, 1, |i| {
        node_config(1, i, &vip(100), &election(true))
    });
    for reason in Reject::ALL.map(|r| r.reason()) {
        let series = format!("apilb_vrrp_adverts_rejected_total{{reason=\"{reason}\"}} 0");
        assert!(wait_metric(&t, 1, &series), "{series} from the start");
    }
    assert!(
        wait_served_by(&t.client, VIP_ADDR, 0, Instant::now(), TARGET * 5).is_some(),
        "lb1 (150) owns the VIP:\n{}",
        lb1.apilb().log_text()
    );
    let reload = |node: &Node, priority: u8, election: &str| {
        let text = node_config(node.index, &node.pins.instance(), &vip(priority), election);
        std::fs::write(&node.config, text).expect("config");
        node.apilb().signal(libc::SIGHUP);
    };
    let reloads = |node: usize, applied: u64, refused: u64| {
        wait_metric(
            &t,
            node,
            &format!("apilb_config_reloads_total{{result=\"applied\"}} {applied}"),
        ) && wait_metric(
            &t,
            node,
            &format!("apilb_config_reloads_total{{result=\"refused\"}} {refused}"),
        )
    };

    // lb2 reloaded at 200 > 150: it preempts, lb1 yields.
    let raised = Instant::now();
    reload(&lb2, 200, &election(true));
    let took = wait_served_by(&t.client, VIP_ADDR, 1, raised, TARGET * 5);
    eprintln!("vrrp reload: lb2 raised to 200 by SIGHUP -> served by lb2 after {took:?}");
    assert!(
        took.is_some(),
        "lb2 did not preempt:\n{}",
        lb2.apilb().log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(holders(&t, VIP_ADDR), [1], "lb1 gave the address up");
    assert!(reloads(1, 1, 0), "the reload was applied, not refused");
    assert!(
        lb1.apilb().log_text().contains("higher-priority master"),
        "{}",
        lb1.apilb().log_text()
    );
    assert!(lb2.apilb().log_text().contains("reload applied in place"));

    // lb1 reloaded at 250 with preempt off: it stays backup; preempt back on: it
    // takes over.
    reload(&lb1, 250, &election(false));
    assert!(reloads(0, 1, 0));
    nopreempt_keeps_it_on_lb2(&t);
    let on = Instant::now();
    reload(&lb1, 250, &election(true));
    let took = wait_served_by(&t.client, VIP_ADDR, 0, on, TARGET * 5);
    eprintln!("vrrp reload: lb1 at 250 turns preempt on -> served by lb1 after {took:?}");
    assert!(took.is_some(), "lb1 did not preempt");
    assert!(reloads(0, 2, 0));

    // Any other election key still takes a restart, and says which.
    reload(
        &lb1,
        250,
        "[election.vrrp]\nadvert_interval = \"200ms\"\npreempt = true\n",
    );
    assert!(
        lb1.apilb().wait_log(
            "election.vrrp.advert_interval changed; that takes a restart",
            Duration::from_secs(5)
        ),
        "{}",
        lb1.apilb().log_text()
    );
    assert!(reloads(0, 2, 1));
    assert_eq!(served_by(&t.client, VIP_ADDR), Some(0));

    for node in [&lb1, &lb2] {
        assert_logs_plain(node);
    }
}

/// VRRP adverts are marked network control, TOS / traffic class 0xc0, as
/// keepalived marks them: seen on the wire as one node sends them for an IPv4
/// and an IPv6 VIP.
#[test]
fn adverts_leave_as_network_control_tos_0xc0_over_ipv4_and_ipv6() {
    let _serial = serial();
    let prefix = "apilb-fr-tos";
    let (t, dir) = two_lb_nodes(prefix);
    let lb1 = Node::start(&t, &dir.0, prefix, 0, |i| {
        let vips = [
            vrrp_vip(VrrpVip {
                addr: VIP_ADDR,
                vrid: 51,
                priority: 150,
            }),
            vrrp_vip(VrrpVip {
                addr: VIP6_ADDR,
                vrid: 61,
                priority: 150,
            }),
        ];
        config_with_v6(0, i, &vips)
    });
    let capture = {
        let _inside = t.lbs[0].enter();
        tests::capture::Capture::open(t.lbs[0].ifindex(tests::cluster::LB_DEV))
    };
    let (mut v4, mut v6) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (v4.is_none() || v6.is_none()) && Instant::now() < deadline {
        let Some((frame, true)) = capture.next_frame() else {
            continue;
        };
        match (frame.get(12..14), frame.len()) {
            // IPv4, protocol 112: the TOS byte.
            (Some([0x08, 0x00]), 34..) if frame[23] == 112 => v4 = Some(frame[15]),
            // IPv6, next header 112: the traffic class straddles bytes 0 and 1.
            (Some([0x86, 0xdd]), 54..) if frame[20] == 112 => {
                v6 = Some((frame[14] << 4) | (frame[15] >> 4));
            }
            _ => {}
        }
    }
    eprintln!("vrrp adverts sent: IPv4 TOS {v4:x?}, IPv6 traffic class {v6:x?}");
    assert_eq!(
        (v4, v6),
        (Some(0xc0), Some(0xc0)),
        "{}",
        lb1.apilb().log_text()
    );
    assert!(!lb1.apilb().log_text().contains("\x1b["));
}
