//! The map writer refuses bad input with an error naming the field and the value, and
//! leaves the datapath as it was. Needs root and BPF (it loads the real program).

use std::time::Duration;

use lb_userspace::{
    datapath::{BackendEntry, Datapath, NodeConfig, Vip},
    loader::{LoadOptions, Programs},
};
use tests::fixture::sa;

fn load() -> Datapath {
    Programs::load(&LoadOptions {
        flow_table_size: 1024,
        half_open_table_size: 1024,
        pin_dir: None,
    })
    .expect("load datapath")
    .1
}

fn err<T: std::fmt::Debug>(r: Result<T, lb_userspace::datapath::DatapathError>) -> String {
    r.expect_err("bad input must be refused").to_string()
}

#[test]
fn out_of_range_ids_ports_and_slots_are_refused_by_name_and_value() {
    let mut dp = load();
    let vip = |id, ring_size| Vip {
        addr: sa("192.0.2.100:6443"),
        id,
        ring_size,
        owned: true,
        local: false,
        snat: (0, 1),
        sync: false,
    };
    assert_eq!(
        err(dp.set_vip(&vip(16, 65_537))),
        "VIP id = 16 is out of range (0..=15)"
    );
    assert_eq!(
        err(dp.set_vip(&Vip {
            snat: (6, 3),
            ..vip(0, 65_537)
        })),
        "VIP SNAT run end = 9 is out of range (0..=8)"
    );
    assert_eq!(
        err(dp.set_vip(&vip(0, 65_539))),
        "Maglev ring size = 65539 is out of range (2..=65537)"
    );
    assert_eq!(
        err(dp.set_vip(&vip(0, 65_535))),
        "Maglev ring size = 65535 is out of range (a prime)"
    );
    assert_eq!(
        err(dp.write_maglev(0, &[(1, 256)])),
        "backend id = 256 is out of range (0..=255)"
    );
    assert_eq!(
        err(dp.set_backend(
            0,
            &BackendEntry {
                addr: sa("198.51.100.11:6443"),
                local: false,
                down: false,
                fallback: lb_common::BACKEND_NONE,
            }
        )),
        "backend id = 0 is out of range (1..=255)"
    );
    assert_eq!(
        err(dp.write_maglev(0, &[(1, 1), (65_537, 1)])),
        "Maglev slot = 65537 is out of range (0..=65536)"
    );
    let nat = |ports: std::ops::RangeInclusive<u16>| NodeConfig {
        snat_v4: Vec::new(),
        snat_v6: Vec::new(),
        claim: ports.clone(),
        ports,
        nexthop_ttl: Duration::from_secs(1),
        tcp_timeouts: lb_userspace::config::TcpTimeouts::default(),
        passive: lb_userspace::passive::PassiveSettings {
            enabled: false,
            threshold: 1,
        },
        netns_cookie: 0,
        sync_listener: None,
        ifaces: Vec::new(),
    };
    assert_eq!(
        err(dp.set_node_config(&nat(0..=100))),
        "NAT port range start = 0 is out of range (1..=100)"
    );
    assert_eq!(
        err(dp.set_node_config(&nat(std::ops::RangeInclusive::new(2000, 1000)))),
        "NAT port range start = 2000 is out of range (1..=1000)"
    );
    // Nothing was written by the refused calls.
    assert!(
        dp.vip_addrs().expect("vips").is_empty(),
        "a refused VIP was written"
    );
}

#[test]
fn unknown_vips_are_named() {
    let mut dp = load();
    assert_eq!(
        err(dp.remove_vip(sa("192.0.2.7:6443"))),
        "VIP 192.0.2.7:6443 is not in the datapath"
    );
    assert_eq!(
        err(dp.remove_vip(sa("[2001:db8::7]:6443"))),
        "VIP [2001:db8::7]:6443 is not in the datapath"
    );
    dp.set_vip(&Vip {
        addr: sa("192.0.2.7:6443"),
        id: 3,
        ring_size: 251,
        owned: false,
        local: false,
        snat: (2, 1),
        sync: false,
    })
    .expect("add vip");
    dp.remove_vip(sa("192.0.2.7:6443"))
        .expect("remove known vip");
}
