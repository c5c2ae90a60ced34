//! Node-local mode: processes on the LB node itself connect to the VIP,
//! and `apilb run` balances their `connect()` calls with its socket programs. The
//! VIP is on no interface and has no election: only the socket programs make it
//! reachable. Real processes in the `tests::cluster` topology, echo masters that
//! name themselves; the programs see only the LB node's namespace.

use std::{
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Shape, Topology, VIP},
    fixture::sa,
    live::{Apilb, Client, TempDir},
    nodelocal::Local,
    plane::{ControlPlane, STUB_VERSION},
};

const LOCALHOST: &str = "127.0.0.1:6443";
/// Connects for the spread.
const N: usize = 3000;

#[test]
fn the_nodes_own_connects_to_the_vip_reach_the_masters_and_name_the_vip_as_peer() {
    let local = Local::start("apilb-local");
    for to in [VIP, LOCALHOST] {
        let mut c = Client::connect_to(local.t.lb(), sa(to)).expect("connect");
        let master = c.ask_master().expect("answer");
        assert!(MASTERS.contains(&master.as_str()), "{master}");
        assert_eq!(c.peer(), sa(to), "getpeername names what was asked for");
    }
    // Sockets of other namespaces are left alone: the client's connect goes out as
    // asked, to a VIP no one holds here.
    assert!(
        Client::connect_to(&local.t.client, sa(VIP)).is_err(),
        "only the LB node's own sockets are balanced"
    );

    local.assert_even_spread("local", N);
    thread::sleep(Duration::from_millis(1100)); // the snapshot is republished every second
    let counted = tests::live::metric_sum(
        &tests::live::metrics(local.t.lb()),
        "apilb_backend_local_connects_total{",
    );
    assert!(counted >= N as u64, "local connects counted: {counted}");
}

#[test]
fn a_dead_master_gets_no_new_local_connects_and_the_others_keep_theirs() {
    let mut local = Local::start("apilb-localdie");
    // Open connections to each master first.
    let mut open: Vec<(String, Client)> = Vec::new();
    while open.len() < 12 {
        let mut c = Client::connect_to(local.t.lb(), sa(VIP)).expect("connect");
        let m = c.ask_master().expect("answer");
        open.push((m, c));
    }
    let dead = MASTERS[1];
    drop(local.masters[1].take());
    let died = Instant::now();
    local.wait_spread(Duration::from_secs(5), |by| !by.contains_key(dead));
    eprintln!(
        "local: no new connect reaches {dead} {:.2} s after it died",
        died.elapsed().as_secs_f64()
    );
    let (by, failed) = local.spread(sa(VIP), 300);
    assert_eq!((by.len(), failed), (2, 0), "{by:?}");
    for (m, c) in open.iter_mut().filter(|(m, _)| m != dead) {
        assert_eq!(&c.ask_master().expect("still open"), m);
    }
}

#[test]
fn curl_and_kubectl_on_the_node_reach_the_apiservers_by_the_vip_and_by_localhost() {
    let p = ControlPlane::start_with(
        "apilb-localtls",
        Shape::default(),
        "[local]\nenabled = true\naddresses = [\"127.0.0.1:6443\"]",
    );
    for server in [VIP, LOCALHOST] {
        let seen = p.real_clients(p.t.lb(), server);
        eprintln!(
            "local: on the LB node, kubectl {} got {} and curl got {} from https://{server}",
            seen.kubectl, seen.kubectl_got, seen.curl_got
        );
        assert_eq!(
            (seen.kubectl_got.as_str(), seen.curl_got.as_str()),
            (STUB_VERSION, STUB_VERSION)
        );
    }
}

/// What kube-proxy would write for the `kubernetes` service (cluster IP
/// 10.96.0.1:443 to the three masters) in iptables mode: its chain layout,
/// comments, probabilities and masquerade marking.
const KUBE_PROXY_IPTABLES: &str = "*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
:KUBE-SEP-A4ZJ2AMMSYSXX2EU - [0:0]
:KUBE-SEP-B7Z3PQR2N2WXFQLK - [0:0]
:KUBE-SEP-C5QW6HZXY4GJ3T2M - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment \"default/kubernetes:https cluster IP\" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment \"default/kubernetes:https -> 198.51.100.11:6443\" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-A4ZJ2AMMSYSXX2EU
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment \"default/kubernetes:https -> 198.51.100.12:6443\" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-B7Z3PQR2N2WXFQLK
-A KUBE-SVC-NPX46M4PTMTKRN6Y -m comment --comment \"default/kubernetes:https -> 198.51.100.13:6443\" -j KUBE-SEP-C5QW6HZXY4GJ3T2M
-A KUBE-SEP-A4ZJ2AMMSYSXX2EU -s 198.51.100.11/32 -m comment --comment default/kubernetes:https -j KUBE-MARK-MASQ
-A KUBE-SEP-A4ZJ2AMMSYSXX2EU -p tcp -m comment --comment default/kubernetes:https -m tcp -j DNAT --to-destination 198.51.100.11:6443
-A KUBE-SEP-B7Z3PQR2N2WXFQLK -s 198.51.100.12/32 -m comment --comment default/kubernetes:https -j KUBE-MARK-MASQ
-A KUBE-SEP-B7Z3PQR2N2WXFQLK -p tcp -m comment --comment default/kubernetes:https -m tcp -j DNAT --to-destination 198.51.100.12:6443
-A KUBE-SEP-C5QW6HZXY4GJ3T2M -s 198.51.100.13/32 -m comment --comment default/kubernetes:https -j KUBE-MARK-MASQ
-A KUBE-SEP-C5QW6HZXY4GJ3T2M -p tcp -m comment --comment default/kubernetes:https -m tcp -j DNAT --to-destination 198.51.100.13:6443
COMMIT
";

/// The same service in kube-proxy's nftables mode, at cluster IP 10.96.0.2: a
/// `kube-proxy` table whose service chain picks an endpoint with `numgen`.
const KUBE_PROXY_NFT: &str = "table ip kube-proxy {
  chain nat-prerouting { type nat hook prerouting priority dstnat; policy accept; jump services; }
  chain nat-output { type nat hook output priority -100; policy accept; jump services; }
  chain services { ip daddr 10.96.0.2 tcp dport 443 goto service-kubernetes; }
  chain service-kubernetes {
    numgen random mod 3 vmap { 0 : goto endpoint-1, 1 : goto endpoint-2, 2 : goto endpoint-3 }
  }
  chain endpoint-1 { meta l4proto tcp dnat to 198.51.100.11:6443; }
  chain endpoint-2 { meta l4proto tcp dnat to 198.51.100.12:6443; }
  chain endpoint-3 { meta l4proto tcp dnat to 198.51.100.13:6443; }
}
";

/// Both rulesets as the LB node's tools print them: the rules, without the
/// packet counters that traffic moves (`nft --stateless`) or iptables-save's
/// comment lines, which carry a timestamp.
fn rulesets(t: &Topology) -> (String, String) {
    let saved = t
        .lb()
        .exec("iptables-save", &[])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    (
        saved,
        t.lb().exec("nft", &["--stateless", "list", "ruleset"]),
    )
}

#[test]
fn kube_proxys_iptables_and_nftables_rules_keep_working_and_stay_byte_identical() {
    let mut before = (String::new(), String::new());
    let mut local = Local::start_after("apilb-localkp", |t| {
        let dir = TempDir::new("apilb-localkp");
        let (ipt, nft) = (dir.0.join("rules.iptables"), dir.0.join("rules.nft"));
        std::fs::write(&ipt, KUBE_PROXY_IPTABLES).expect("rules");
        std::fs::write(&nft, KUBE_PROXY_NFT).expect("rules");
        let lb = t.lb();
        lb.exec(
            "iptables-restore",
            &["--noflush", ipt.to_str().expect("path")],
        );
        lb.exec("nft", &["-f", nft.to_str().expect("path")]);
        // The service CIDR is routed (a node has a default route; these do not).
        lb.ip(&["route", "add", "10.96.0.0/12", "via", "198.51.100.1"]);
        before = rulesets(t);
    });
    assert!(before.0.contains("KUBE-SVC-NPX46M4PTMTKRN6Y") && before.1.contains("kube-proxy"));
    let reach = |local: &Local, to: &str| {
        let (by, failed) = local.spread(sa(to), 60);
        assert_eq!((by.len(), failed), (3, 0), "{to}: {by:?}");
    };
    for to in ["10.96.0.1:443", "10.96.0.2:443", VIP] {
        reach(&local, to);
    }
    let during = rulesets(&local.t);
    local.apilb.signal(libc::SIGTERM);
    assert_eq!(
        local.apilb.wait(Duration::from_secs(10)),
        Some(0),
        "apilb exits on SIGTERM"
    );
    let after = rulesets(&local.t);
    for to in ["10.96.0.1:443", "10.96.0.2:443"] {
        reach(&local, to);
    }
    eprintln!(
        "local: kube-proxy rules, {} bytes of iptables-save and {} of nft list ruleset, \
         identical before, during and after apilb",
        before.0.len(),
        before.1.len()
    );
    assert_eq!(before, during, "apilb changed a rule while running");
    assert_eq!(before, after, "apilb changed a rule by exiting");
}

/// How many connects in a row from the LB node to the VIP succeed, from a thread,
/// until `stop`; and how many fail.
fn connect_loop(
    ns: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<(usize, usize)> {
    thread::spawn(move || {
        let _inside = tests::netns::enter(&ns);
        let (mut ok, mut failed) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            let answered = std::net::TcpStream::connect_timeout(&sa(VIP), Duration::from_secs(2))
                .and_then(|c| {
                    let mut c = Client::from_stream(c)?;
                    c.ask_master()
                });
            if answered.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        (ok, failed)
    })
}

#[test]
fn the_socket_programs_keep_balancing_through_a_restart_until_apilb_detach() {
    let mut local = Local::start("apilb-localre");
    let pinned = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&local.pins.0)
            .expect("pins")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sock-"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(pinned().len(), 4, "{:?}", pinned());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = connect_loop(local.t.lb().name().to_owned(), std::sync::Arc::clone(&stop));
    thread::sleep(Duration::from_millis(300));
    // SIGKILL, then a new apilb, which attaches its own links and releases these.
    local.apilb.signal(libc::SIGKILL);
    assert!(
        local.apilb.wait(Duration::from_secs(5)).is_some(),
        "apilb died"
    );
    thread::sleep(Duration::from_millis(300));
    let config = local.dir.0.join("apilb.toml");
    local.apilb = Apilb::start(local.t.lb(), &config, &local.dir.0.join("apilb-2.log"));
    assert!(
        local
            .apilb
            .wait_log("datapath updated", Duration::from_secs(15)),
        "{}",
        local.apilb.log_text()
    );
    thread::sleep(Duration::from_millis(300));
    // SIGTERM leaves them attached too.
    local.apilb.signal(libc::SIGTERM);
    assert_eq!(local.apilb.wait(Duration::from_secs(10)), Some(0));
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().expect("load thread");
    eprintln!("local: {ok} connects through a SIGKILL, a restart and a SIGTERM: {failed} failed");
    assert_eq!(failed, 0, "{ok} succeeded");
    assert!(ok > 100, "{ok} connects");
    assert_eq!(
        pinned().len(),
        4,
        "the restart replaced the links, one each"
    );
    // apilb detach releases them: the VIP, on no interface, is unreachable again.
    let instance = local.pins.instance();
    tests::netns::run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{}", local.t.lb().name()),
            tests::live::apilb_bin().to_str().expect("path"),
            "detach",
            "--instance",
            &instance,
        ],
    );
    local.wait_unbalanced();
}
