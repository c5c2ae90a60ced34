//! A Kubernetes control plane in network namespaces, wired the way a real one is:
//! LB nodes and masters on one L2 segment, clients one routed hop away.
//!
//! ```text
//!  client  eth0 192.0.2.10/24 ── cl 192.0.2.1/24  router
//!                                   seg 198.51.100.1/24, fd00:198:51:100::1/64
//!                                   (a bridge: the segment)
//!       ┌─────────────┬─────────────┬───────┴─────┬─────────────┬─────────────┐
//!     p-lb1         p-lb2          p-m1          p-m2          p-m3        (p-m4)
//!   lb1 eth0 .2   lb2 eth0 .3   master-1 .11  master-2 .12  master-3 .13 (master-4 .14)
//! ```
//!
//! The VIP, 198.51.100.100, is a /32 on the first LB node's `eth0`, so the router
//! resolves it there. The LB is one-armed: it rewrites a packet and sends it back
//! out of `eth0` (`XDP_TX`), and SNATs to its own address. Addresses are from the
//! documentation ranges and live only in these namespaces; no namespace has a
//! default route, only routes to the other subnet via the router. Every namespace
//! name starts with the caller's prefix and is deleted when the topology drops,
//! which removes every link with it.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use lb_userspace::{
    config::Config,
    controller::Reconciler,
    datapath::Datapath,
    health::Health,
    loader::{AttachMode, LoadOptions, Programs},
};

use crate::{
    fixture::{chain, sa},
    netns::Netns,
};

/// The VIP the clients use.
pub const VIP: &str = "198.51.100.100:6443";
/// The VIP's address alone, as the config and certificates take it.
pub const VIP_ADDR: &str = "198.51.100.100";
/// The three masters' apiserver addresses.
pub const MASTERS: [&str; 3] = [
    "198.51.100.11:6443",
    "198.51.100.12:6443",
    "198.51.100.13:6443",
];
/// A fourth master, wired only when asked for, for scale-out.
pub const FOURTH_MASTER: &str = "198.51.100.14:6443";
/// The first LB node's own address, which it SNATs to.
pub const SNAT: &str = "198.51.100.2";
/// A second VIP, for active-active.
pub const VIP2_ADDR: &str = "198.51.100.101";
/// An IPv6 VIP on the segment (`fd00:198:51:100::/64`, the router is `::1`), for the
/// IPv6 election tests.
pub const VIP6_ADDR: &str = "fd00:198:51:100::100";

/// LB node `i`'s own address (0-based): 198.51.100.2, .3.
#[must_use]
pub fn lb_addr(i: usize) -> String {
    format!("198.51.100.{}", 2 + i)
}
/// The LB nodes' only interface.
pub const LB_DEV: &str = "eth0";

/// How many LB nodes and masters to wire.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// 1 or 2.
    pub lb_nodes: usize,
    /// 3 or 4.
    pub masters: usize,
    /// Put the VIP on the first LB node (a static VIP). Off for elected VIPs,
    /// whose address apilb adds on the node that wins.
    pub vip_on_first_lb: bool,
    /// The client and the masters send with checksum offload on, as containers
    /// do: their segments reach the LB node's `eth0` with partial checksums,
    /// through a peer (`p-lb<i>`) that keeps them partial. The router's ports
    /// towards the client and the masters have it off, so that the router
    /// finishes in software, as a NIC would in hardware, any segment that leaves
    /// the LB node still partial: a wrong partial field becomes a wrong checksum
    /// that the receiver counts.
    pub tx_offload: bool,
    /// The router's ports to the LB nodes run an XDP program (which passes
    /// everything), so that their veths deliver what the LB nodes' native XDP
    /// sends back. Off, the peers are as a kind node's host side is: no XDP.
    pub peer_xdp: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            lb_nodes: 1,
            masters: 3,
            vip_on_first_lb: true,
            tx_offload: false,
            peer_xdp: true,
        }
    }
}

pub struct Topology {
    pub client: Netns,
    pub router: Netns,
    /// LB nodes; `lbs[0]` holds the VIP.
    pub lbs: Vec<Netns>,
    /// One namespace per master, in address order (`master-1` first).
    pub masters: Vec<Netns>,
    /// A datapath with no VIPs on the router's LB-facing ports, which passes every
    /// packet. A veth delivers `XDP_TX` frames only to a peer with NAPI on, which
    /// here means an XDP program of its own (switching GRO on, the other documented
    /// way, did not take on kernel 6.18).
    _peers: (Programs, Datapath),
}

impl Topology {
    /// One LB node and three masters, every namespace named `<prefix>-<pid>-<n><role>`.
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self::with_shape(prefix, Shape::default())
    }

    #[must_use]
    pub fn with_shape(prefix: &str, shape: Shape) -> Self {
        assert!((1..=2).contains(&shape.lb_nodes) && (3..=4).contains(&shape.masters));
        let client = Netns::with_role(prefix, "c");
        let router = Netns::with_role(prefix, "r");
        router.ip(&["link", "add", "seg", "type", "bridge"]);
        router.ip(&["addr", "add", "198.51.100.1/24", "dev", "seg"]);
        router.ip(&[
            "addr",
            "add",
            "fd00:198:51:100::1/64",
            "dev",
            "seg",
            "nodad",
        ]);
        router.ip(&["link", "set", "seg", "up"]);
        router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let offload = shape.tx_offload;
        wire(&router, "cl", None, &client, "192.0.2.10/24", offload);
        router.ip(&["addr", "add", "192.0.2.1/24", "dev", "cl"]);
        client.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.1"]);

        let lbs: Vec<Netns> = (1..=shape.lb_nodes)
            .map(|i| {
                let ns = Netns::with_role(prefix, &format!("lb{i}"));
                wire(
                    &router,
                    &format!("p-lb{i}"),
                    Some("seg"),
                    &ns,
                    &format!("198.51.100.{}/24", 1 + i),
                    offload,
                );
                ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
                // The FIB-miss path forwards a rewritten packet out of the interface
                // it came in by; that is the design here, not a route to correct.
                for key in ["all", LB_DEV] {
                    ns.exec(
                        "sysctl",
                        &["-qw", &format!("net.ipv4.conf.{key}.send_redirects=0")],
                    );
                }
                ns.ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.1"]);
                ns
            })
            .collect();
        if shape.vip_on_first_lb {
            lbs[0].ip(&["addr", "add", &format!("{VIP_ADDR}/32"), "dev", LB_DEV]);
        }

        let masters: Vec<Netns> = (1..=shape.masters)
            .map(|i| {
                let ns = Netns::with_role(prefix, &format!("m{i}"));
                wire(
                    &router,
                    &format!("p-m{i}"),
                    Some("seg"),
                    &ns,
                    &format!("198.51.100.{}/24", 10 + i),
                    offload,
                );
                ns.ip(&["route", "add", "192.0.2.0/24", "via", "198.51.100.1"]);
                ns
            })
            .collect();

        let (mut peers, peer_maps) = Programs::load(&LoadOptions {
            flow_table_size: 1024,
            half_open_table_size: 1024,
            pin_dir: None,
        })
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
        {
            let _inside = router.enter();
            for i in (1..=shape.lb_nodes).filter(|_| shape.peer_xdp) {
                peers
                    .attach(&format!("p-lb{i}"), AttachMode::Native, None)
                    .unwrap_or_else(|e| panic!("{}", chain(&e)));
            }
        }
        Self {
            client,
            router,
            lbs,
            masters,
            _peers: (peers, peer_maps),
        }
    }

    /// The first LB node, which holds the VIP.
    #[must_use]
    pub fn lb(&self) -> &Netns {
        &self.lbs[0]
    }

    /// Load the balancer (pinned under `pin_dir` if given), attach it to the first
    /// LB node's `eth0`, and provision VIP:6443 -> master-1 (up) as `apilb run`
    /// does, through the controller, in the LB node's namespace.
    #[must_use]
    pub fn balancer(&self, pin_dir: Option<&Path>) -> Balancer {
        let (mut programs, mut dp) = Programs::load(&LoadOptions {
            flow_table_size: 4096,
            half_open_table_size: 1024,
            pin_dir: pin_dir.map(Path::to_owned),
        })
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
        let _inside = self.lb().enter();
        programs
            .attach(LB_DEV, AttachMode::Native, pin_dir)
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        let text = format!(
            "[datapath]\ninterfaces = [\"{LB_DEV}\"]\nsnat_ipv4 = \"{SNAT}\"\n\
             nat_ports = [40000, 40999]\nmaglev_size = 251\n\
             [health]\nkind = \"tcp\"\npassive = false\npassive_threshold = 1\n\
             [[vip]]\naddress = \"{VIP_ADDR}\"\n[[backend]]\naddress = \"{}\"\n",
            MASTERS[0]
        );
        let config = Config::parse(&text, Path::new("balancer.toml"))
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        let mut reconciler = Reconciler::new();
        let up = HashMap::from([(sa(MASTERS[0]), Health::Ready)]);
        let desired = reconciler.desired(&config, &up, &HashSet::new());
        reconciler
            .apply(&mut dp, desired)
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        Balancer {
            dp,
            _programs: programs,
        }
    }

    /// Whether an XDP program is attached to the first LB node's `eth0`.
    #[must_use]
    pub fn lb_has_xdp(&self) -> bool {
        self.lb()
            .ip(&["link", "show", "dev", LB_DEV])
            .contains(" xdp")
    }

    /// The namespace of the master serving `addr` (one of [`MASTERS`] or
    /// [`FOURTH_MASTER`]).
    #[must_use]
    pub fn master_ns(&self, addr: &str) -> &Netns {
        let i = master_index(addr);
        self.masters
            .get(i)
            .unwrap_or_else(|| panic!("{addr} is not wired in this topology"))
    }
}

/// The balancer [`Topology::balancer`] brought up: its maps, and its programs,
/// attached while this lives (and after, if pinned).
pub struct Balancer {
    pub dp: Datapath,
    _programs: Programs,
}

/// The addresses of the first `n` masters (at most four), in order.
pub fn master_addrs(n: usize) -> impl Iterator<Item = &'static str> {
    MASTERS.into_iter().chain([FOURTH_MASTER]).take(n)
}

/// 0 for master-1's address, 1 for master-2's, and so on.
#[must_use]
pub fn master_index(addr: &str) -> usize {
    match sa(addr).ip() {
        std::net::IpAddr::V4(v4) if (11..=14).contains(&v4.octets()[3]) => {
            usize::from(v4.octets()[3] - 11)
        }
        _ => panic!("{addr} is not a master address"),
    }
}

/// A veth from the router (`port`, enslaved to `bridge` if given) to `eth0` in
/// `ns`, which gets `addr`. Frames the endpoint sends carry full checksums, as
/// frames off a wire do, rather than veth's offloaded partial ones, unless
/// `offload` (`Shape::tx_offload`).
fn wire(router: &Netns, port: &str, bridge: Option<&str>, ns: &Netns, addr: &str, offload: bool) {
    router.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]);
    if let Some(br) = bridge {
        router.ip(&["link", "set", port, "master", br]);
    }
    router.ip(&["link", "set", port, "up"]);
    ns.ip(&["addr", "add", addr, "dev", "eth0"]);
    // The link-local address is usable at once (IPv6 VRRP sends from it).
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.eth0.accept_dad=0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    if !offload {
        ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
    } else if !port.starts_with("p-lb") {
        router.exec("ethtool", &["-K", port, "tx", "off"]);
    }
}

/// `apilb run`'s config for the first LB node: instance `instance`, its `eth0`,
/// its own address as SNAT, the VIP and the three masters, with `datapath` lines
/// added to `[datapath]` and `health` as the `[health]` section's body.
///
/// The XDP mode is native, as on a node's NIC, unless `datapath` says otherwise:
/// the router's peer programs give the LB nodes' veths what native mode needs
/// there, which `auto` cannot see (it takes generic mode on a veth).
#[must_use]
pub fn apilb_config(instance: &str, datapath: &str, health: &str) -> String {
    let mode = native_unless(datapath);
    let mut text = format!(
        "instance = \"{instance}\"\n[datapath]\ninterfaces = [\"{LB_DEV}\"]\nsnat_ipv4 = \"{SNAT}\"\n{mode}{datapath}\n\
         [[vip]]\naddress = \"{VIP_ADDR}\"\n[health]\n{health}\n"
    );
    for m in MASTERS {
        text.push_str("[[backend]]\naddress = \"");
        text.push_str(m);
        text.push_str("\"\n");
    }
    text
}

/// `xdp_mode = "native"` as a `[datapath]` line, unless `datapath` (more lines of
/// that section) sets the mode itself. For configs of the LB nodes wired here.
#[must_use]
pub fn native_unless(datapath: &str) -> &'static str {
    if datapath.contains("xdp_mode") {
        ""
    } else {
        "xdp_mode = \"native\"\n"
    }
}
