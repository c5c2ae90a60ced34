//! The smallest whole run, made to prove a kernel: `cargo xtask vm-test` runs it
//! inside a VM for each kernel it boots, and the host suite runs it too.
//!
//! `apilb run` in the LB namespace of the `tests::cluster` topology, with TCP
//! health probes and node-local mode on: connections from the client namespace
//! cross the XDP program to echo masters, and the LB node's own connects are
//! balanced by the socket programs, whose `getpeername` hook names the VIP.

use std::time::{Duration, Instant};

use tests::{
    cluster::{MASTERS, Topology, VIP, apilb_config},
    fixture::sa,
    live::{Apilb, Client, EchoServer, PinDir, TempDir},
};

const LIFETIME: Duration = Duration::from_mins(2);
/// Enough connections that each of three masters gets one unless the hash is
/// broken: a fair spread misses one with a chance of 3 x (2/3)^60, about 1e-10.
const N: usize = 60;

#[test]
fn apilb_run_balances_the_clients_and_the_nodes_own_connects() {
    let t = Topology::new("apilb-smoke");
    let _masters: Vec<EchoServer> = MASTERS
        .iter()
        .enumerate()
        .map(|(i, m)| EchoServer::start(&t.masters[i], m, LIFETIME))
        .collect();
    let pins = PinDir::new("apilb-smoke");
    let dir = TempDir::new("apilb-smoke");
    let config = dir.0.join("apilb.toml");
    let mut text = apilb_config(
        &pins.instance(),
        "maglev_size = 1009",
        "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\njitter = 0.0",
    );
    text.push_str("[local]\nenabled = true\n");
    std::fs::write(&config, text).expect("config");
    let apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
    assert!(
        apilb.wait_log("datapath updated", Duration::from_secs(30)),
        "apilb did not start:\n{}",
        apilb.log_text()
    );

    // Probes bring the masters in one by one: wait (bounded) for all three.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (by, failed) = loop {
        let (by, failed) = tests::live::spread(&t.client, sa(VIP), N);
        if (by.len(), failed) == (3, 0) || Instant::now() > deadline {
            break (by, failed);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("smoke: {N} connects through XDP: {by:?}, {failed} failed");
    assert_eq!(
        (by.len(), failed),
        (3, 0),
        "{by:?}; apilb's log:\n{}",
        apilb.log_text()
    );

    let mut own = Client::connect_to(t.lb(), sa(VIP)).expect("the node's own connect");
    let master = own.ask_master().expect("answer");
    assert!(MASTERS.contains(&master.as_str()), "{master}");
    assert_eq!(
        own.peer(),
        sa(VIP),
        "getpeername names the VIP: this needs the cgroup getpeername hooks \
         (Linux 5.8, commit 1b66d253610c)"
    );
}
