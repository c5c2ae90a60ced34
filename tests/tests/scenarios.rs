//! Issue 4's scenarios, measured through the real `apilb run` in the live topology.
//! Root.

use std::{collections::HashMap, time::Duration};

use tests::{
    cluster::{MASTERS, Topology, apilb_config},
    live::{Apilb, Client, EchoServer, PinDir},
};

const CONNECTIONS: usize = 3000;

#[test]
fn three_thousand_new_connections_land_on_the_three_masters_within_ten_percent_of_equal() {
    let t = Topology::new("apilb-spread");
    let pins = PinDir::new("test-spread");
    let _servers: Vec<EchoServer> = MASTERS
        .iter()
        .map(|m| EchoServer::start(t.master_ns(m), m, Duration::from_mins(2)))
        .collect();
    let dir = std::env::temp_dir().join(format!("apilb-spread-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let text = apilb_config(
        &pins.instance(),
        "nat_ports = [40000, 49999]",
        "kind = \"tcp\"",
    );
    let config = dir.join("apilb.toml");
    std::fs::write(&config, text).expect("config");
    let apilb = Apilb::start(t.lb(), &config, &dir.join("apilb.log"));
    assert!(
        apilb.wait_log("datapath updated", Duration::from_secs(15)),
        "log:\n{}",
        apilb.log_text()
    );

    let mut by: HashMap<String, usize> = HashMap::new();
    let mut failed = 0;
    for _ in 0..CONNECTIONS {
        match Client::connect(&t.client).and_then(|mut c| c.ask_master()) {
            Ok(m) => *by.entry(m).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("{CONNECTIONS} connections: {by:?}, {failed} failed");
    assert_eq!(failed, 0, "{by:?}");
    assert_eq!(by.len(), 3, "{by:?}");
    let equal = CONNECTIONS / 3;
    for (m, n) in &by {
        assert!(
            n.abs_diff(equal) * 10 <= equal,
            "{m} got {n} of {CONNECTIONS}, more than 10% off {equal}: {by:?}"
        );
    }
}
