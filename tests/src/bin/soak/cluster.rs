//! The soak's cluster: `tests::cluster`'s topology with IPv6 added, the stub
//! apiservers on both families (plain HTTP too), and apilb's config for both
//! VIPs.

use std::{fmt::Write as _, net::SocketAddr, path::Path};

use tests::{
    cluster::{MASTERS, SNAT, Topology, VIP_ADDR, VIP6_ADDR},
    live::{Spawned, master_name, sibling_bin},
    pki::Pki,
};

/// IPv6 on the segment: the router is `::1`, the LB node `::2`, masters `::11`..
const SEG6: &str = "fd00:198:51:100";
/// IPv6 between client (`::10`) and router (`::1`).
const CLIENT6: &str = "fd00:192:0:2";

/// Master `i`'s IPv6 apiserver address.
pub fn master6(i: usize) -> SocketAddr {
    SocketAddr::new(format!("{SEG6}::{}", 11 + i).parse().expect("v6"), 6443)
}

/// IPv6 on the topology: the segment's addresses on the LB node (and the VIP)
/// and masters, the client's link, routes both ways, forwarding on the router
/// and the LB node (whose FIB-miss path hands a rewritten packet to the stack).
pub fn add_ipv6(t: &Topology) {
    t.router
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    t.router.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{CLIENT6}::1/64"),
        "dev",
        "cl",
        "nodad",
    ]);
    t.client.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{CLIENT6}::10/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    t.client.ip(&[
        "-6",
        "route",
        "add",
        &format!("{SEG6}::/64"),
        "via",
        &format!("{CLIENT6}::1"),
    ]);
    let lb = t.lb();
    lb.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    lb.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{SEG6}::2/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    lb.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{VIP6_ADDR}/128"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let on_segment = std::iter::once((lb, 2)).chain(t.masters.iter().zip(11..));
    for (ns, host) in on_segment {
        if host != 2 {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{SEG6}::{host}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        ns.ip(&[
            "-6",
            "route",
            "add",
            &format!("{CLIENT6}::/64"),
            "via",
            &format!("{SEG6}::1"),
        ]);
    }
}

/// apilb's config: defaults, but for the topology's facts.
pub fn config_text(instance: &str, ca: &Path) -> String {
    let mut text = format!(
        "instance = \"{instance}\"\n[datapath]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\n\
         snat_ipv4 = \"{SNAT}\"\nsnat_ipv6 = \"{SEG6}::2\"\n\
         [[vip]]\naddress = \"{VIP_ADDR}\"\n[[vip]]\naddress = \"{VIP6_ADDR}\"\n\
         [health]\nca_file = \"{}\"\n",
        ca.display()
    );
    for (i, m) in MASTERS.iter().enumerate() {
        let _ = write!(
            text,
            "[[backend]]\naddress = \"{m}\"\n[[backend]]\naddress = \"{}\"\n",
            master6(i)
        );
    }
    text
}

/// The stub apiserver of the master at `addr`, on both its addresses (`[::]`),
/// plain HTTP too; `control` holds its `readyz-fail` switch.
pub fn stub(t: &Topology, pki: &Pki, addr: &str, control: &Path) -> Spawned {
    let name = master_name(addr);
    let (crt, key) = pki.cert(&name);
    std::fs::create_dir_all(control).expect("control dir");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let args = [
        "--listen".to_owned(),
        "[::]:6443".to_owned(),
        "--name".to_owned(),
        name,
        "--cert".to_owned(),
        path(&crt),
        "--key".to_owned(),
        path(&key),
        "--control-dir".to_owned(),
        path(control),
        "--plain-http".to_owned(),
    ];
    Spawned::start(
        t.master_ns(addr),
        &sibling_bin("stub-apiserver"),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}
