//! `xdp_mode`: native refuses a device without driver XDP, auto falls back to
//! generic there and says which mode it used. A bridge has no native XDP. Root.

use lb_userspace::{
    datapath::Datapath,
    loader::{AttachMode, AttachedMode, LoadOptions},
};
use tests::netns::Netns;

#[test]
fn auto_falls_back_to_generic_where_native_is_unsupported_and_reports_it() {
    let ns = Netns::new("apilb-attach");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let mut dp = Datapath::load(&LoadOptions {
        flow_table_size: 1024,
        pin_dir: None,
    })
    .expect("load");
    let _inside = ns.enter();
    let native = dp.attach("br0", AttachMode::Native, None);
    assert!(native.is_err(), "a bridge has no native XDP: {native:?}");
    let used = dp
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
    let err = dp
        .attach("nope0", AttachMode::Auto, None)
        .expect_err("no such interface");
    assert_eq!(err.to_string(), "interface \"nope0\" does not exist");
}
