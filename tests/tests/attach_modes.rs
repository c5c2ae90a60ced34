//! `xdp_mode`: native refuses a device without driver XDP, auto falls back to
//! generic there and says which mode it used, and a process that adopts a pinned
//! link says the mode that link runs in. A bridge has no native XDP. Root.

use lb_userspace::loader::{AttachMode, AttachedMode, LoadOptions, Programs};
use tests::{live::PinDir, netns::Netns};

#[test]
fn auto_falls_back_to_generic_where_native_is_unsupported_and_reports_it() {
    let ns = Netns::new("apilb-attach");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let (mut programs, _maps) = Programs::load(&LoadOptions {
        flow_table_size: 1024,
        half_open_table_size: 1024,
        pin_dir: None,
    })
    .expect("load");
    let _inside = ns.enter();
    let native = programs.attach("br0", AttachMode::Native, None);
    assert!(native.is_err(), "a bridge has no native XDP: {native:?}");
    let used = programs
        .attach("br0", AttachMode::Auto, None)
        .expect("auto attaches");
    assert_eq!(
        used,
        AttachedMode::Skb,
        "auto fell back to generic and says so"
    );
    assert!(
        ns.ip(&["link", "show", "dev", "br0"])
            .contains("xdpgeneric"),
        "attached in generic mode"
    );
    let err = programs
        .attach("nope0", AttachMode::Auto, None)
        .expect_err("no such interface");
    assert_eq!(err.to_string(), "interface \"nope0\" does not exist");
}

#[test]
fn a_process_adopting_a_pinned_link_reports_the_mode_the_link_runs_in() {
    let ns = Netns::new("apilb-adopt");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let pins = PinDir::new("test-adopt");
    let load = || {
        Programs::load(&LoadOptions {
            flow_table_size: 1024,
            half_open_table_size: 1024,
            pin_dir: Some(pins.0.clone()),
        })
        .expect("load")
    };
    let _inside = ns.enter();
    let (mut first, _maps) = load();
    let used = first
        .attach("br0", AttachMode::Generic, Some(&pins.0))
        .expect("attach");
    assert_eq!(used, AttachedMode::Skb);
    drop(first);
    // The next process asks for native, but adopts the generic link in place.
    let (mut second, _maps) = load();
    let adopted = second
        .attach("br0", AttachMode::Native, Some(&pins.0))
        .expect("adopt");
    assert_eq!(adopted, AttachedMode::Skb, "the adopted link's own mode");
    assert!(
        ns.ip(&["link", "show", "dev", "br0"])
            .contains("xdpgeneric"),
        "still attached in generic mode"
    );
}
