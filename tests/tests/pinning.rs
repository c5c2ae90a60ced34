//! The datapath outlives its controller: maps and links pinned in bpffs keep
//! traffic flowing while no process holds them, a new process adopts them
//! (reusing the maps, flows included, and swapping its program into the links),
//! and `detach` removes it all; pinned maps of another shape are refused, not
//! reused. Real frames in the `tests::cluster` topology; root.

use std::time::Duration;

use lb_common::{FlowKey, FlowState, LAYOUT_VERSION, MAP_FLOWS, counters::FLOW_NEW};
use lb_userspace::loader::{LoadOptions, Programs};
use tests::{
    cluster::{MASTERS, SNAT, Topology},
    live::{Client, EchoServer, PinDir},
};

#[test]
fn a_pinned_datapath_keeps_an_open_connection_working_across_controller_restarts() {
    let t = Topology::new("apilb-pin");
    let pins = PinDir::new("test-pin");
    let server = EchoServer::start(t.master_ns(MASTERS[0]), MASTERS[0], Duration::from_secs(30));

    let first = t.balancer(Some(&pins.0));
    let mut watch = Client::connect(&t.client).expect("connect through the first controller");
    let before = watch.ask().expect("answer before the restart");
    assert!(first.dp.counters().expect("counters").get(FLOW_NEW) == 1);
    // The controller goes away (as on SIGKILL: its descriptors close).
    drop(first);
    assert!(t.lb_has_xdp(), "the pinned link stays attached");
    assert_eq!(
        watch.ask().expect("answer with no controller running"),
        before,
        "same flow, same NAT port"
    );

    // A new controller adopts the pins: the same maps (the open flow is still there)
    // and its own program swapped into the links.
    let second = t.balancer(Some(&pins.0));
    let flows = second.dp.flows().expect("flows");
    assert_eq!(
        flows.len(),
        1,
        "the new process sees the flow the old one recorded"
    );
    assert_eq!(
        second.dp.counters().expect("counters").get(FLOW_NEW),
        1,
        "and its counters"
    );
    assert_eq!(watch.ask().expect("answer after adoption"), before);
    let mut fresh = Client::connect(&t.client).expect("a new connection after adoption");
    assert!(
        fresh
            .ask()
            .expect("answer on the new connection")
            .contains(&format!(" saw {SNAT}:"))
    );
    assert_eq!(second.dp.counters().expect("counters").get(FLOW_NEW), 2);
    drop((watch, fresh));
    let _ = server.stop();

    drop(second);
    let removed = lb_userspace::loader::detach(&pins.0)
        .expect("detach")
        .removed;
    assert!(
        removed.iter().any(|p| p.ends_with("link-eth0")),
        "{removed:?}"
    );
    assert!(!pins.0.exists(), "the pin directory is gone");
    assert!(!t.lb_has_xdp(), "detach took the program off the interface");
}

#[test]
fn pinned_maps_of_another_shape_are_refused_naming_the_map_and_both_shapes() {
    let pins = PinDir::new("test-layout");
    let load = |flow_table_size| {
        Programs::load(&LoadOptions {
            flow_table_size,
            half_open_table_size: 1024,
            pin_dir: Some(pins.0.clone()),
        })
    };
    drop(load(1024).expect("first load pins the maps"));
    let again = load(1024).map(drop);
    assert!(again.is_ok(), "the same shape is reused: {again:?}");
    let Err(e) = load(2048).map(drop) else {
        panic!("a FLOWS of another size was reused")
    };
    let flows = pins
        .0
        .join(format!("maps-v{LAYOUT_VERSION}"))
        .join(MAP_FLOWS);
    assert_eq!(
        e.to_string(),
        format!(
            "pinned map {} has type/key/value/entries (9, {key}, {value}, 1024) but this apilb \
             expects (9, {key}, {value}, 2048); the layout changed without a LAYOUT_VERSION bump, \
             or flow_table_size changed: run `apilb detach` to start afresh",
            flows.display(),
            key = size_of::<FlowKey>(),
            value = size_of::<FlowState>(),
        )
    );
}
