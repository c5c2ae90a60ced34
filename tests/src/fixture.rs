//! Packet fixtures (Katran style) run through `BPF_PROG_TEST_RUN`.
//!
//! A [`Fixture`] is data: a description, the interface it arrives on, the input
//! frame, the expected verdict, the expected output frame and the exact counter
//! movements. A [`Lab`] is the real datapath, loaded into the kernel and provisioned
//! only through `lb_userspace::datapath` (the production map writer), inside a
//! namespace whose FIB and neighbour tables make forwarding decisions deterministic.
//!
//! Lab addresses (documentation ranges, all inside the lab's own namespace):
//!
//! | what | IPv4 | IPv6 | MAC |
//! | --- | --- | --- | --- |
//! | `fx0`, client side | 192.0.2.1/24 | 2001:db8:1::1/64 | 02:00:00:00:00:01 |
//! | `fx1`, master side, SNAT source | 198.51.100.1/24 | 2001:db8:2::1/64 | 02:00:00:00:00:02 |
//! | client (on fx0) | 192.0.2.10 | 2001:db8:1::10 | 02:00:00:00:0c:0a |
//! | masters 1-3 (on fx1) | 198.51.100.11-13 | 2001:db8:2::11-13 | 02:00:00:00:0b:01-03 |
//! | master on the client link | 192.0.2.21 | | 02:00:00:00:0b:21 |
//! | master with no neighbour entry | 198.51.100.14 | | |
//! | VIPs | `192.0.2.100:6443`, `192.0.2.101:6443` | `[2001:db8:1::100]:6443` | |

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use lb_common::{COUNTER_COUNT, COUNTER_NAMES, FlowKey, MAGLEV_SIZE_DEFAULT, OUTCOMES, flow_hash};
use lb_userspace::{
    datapath::{BackendEntry, Counters, Datapath, NodeConfig, Vip, addr_words},
    loader::LoadOptions,
    maglev::{self, WeightedBackend},
};

use crate::{
    netns::{Entered, Netns},
    packets::{Mac, describe},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const FX0_MAC: Mac = [2, 0, 0, 0, 0, 1];
pub const FX1_MAC: Mac = [2, 0, 0, 0, 0, 2];
pub const CLIENT_MAC: Mac = [2, 0, 0, 0, 0x0c, 0x0a];
pub const ONE_ARMED_MAC: Mac = [2, 0, 0, 0, 0x0b, 0x21];
/// MAC of master `n` (1-based) on fx1.
#[must_use]
pub const fn master_mac(n: u8) -> Mac {
    [2, 0, 0, 0, 0x0b, n]
}
/// The NAT source-port range the lab configures.
pub const NAT_PORTS: std::ops::RangeInclusive<u16> = 40_000..=40_999;

/// The lab's node settings. The next-hop TTL is long so that exact counter
/// assertions never see a cache expiry on a slow machine; the TTL test shortens it.
#[must_use]
pub fn lab_config() -> NodeConfig {
    NodeConfig {
        snat_v4: Some("198.51.100.1".parse().expect("v4")),
        snat_v6: Some("2001:db8:2::1".parse().expect("v6")),
        ports: NAT_PORTS,
        nexthop_ttl: std::time::Duration::from_mins(1),
        ..NodeConfig::new(None, None, NAT_PORTS)
    }
}

/// Parse a socket address literal.
#[must_use]
pub fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Which lab interface a frame arrives on.
#[derive(Clone, Copy, Debug)]
pub enum Ingress {
    ClientSide,
    MasterSide,
}

/// One packet through the program, and everything it must do.
pub struct Fixture {
    pub desc: &'static str,
    pub ingress: Ingress,
    pub input: Vec<u8>,
    pub verdict: u32,
    pub output: Vec<u8>,
    /// Counters that must move, by exactly these amounts; all others must not.
    pub counters: Vec<(u32, u64)>,
}

/// The datapath loaded into the kernel, inside its own namespace.
pub struct Lab {
    pub dp: Datapath,
    fx0: u32,
    fx1: u32,
    rings: HashMap<u32, Vec<u32>>,
    // Field order is drop order: leave the namespace before deleting it.
    _entered: Entered,
    pub ns: Netns,
}

fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity
    // only read it. Pid 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pin to CPU 0"
        );
    }
}

impl Lab {
    /// Build the namespace and load a fresh datapath. The calling thread is pinned to
    /// CPU 0, so NAT source ports come from CPU 0's cursor: 40000, 40001, ...
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self::with_options(
            prefix,
            &LoadOptions {
                flow_table_size: 4096,
                pin_dir: None,
            },
        )
    }

    /// [`Lab::new`] with other datapath sizes.
    #[must_use]
    pub fn with_options(prefix: &str, opts: &LoadOptions) -> Self {
        pin_to_cpu0();
        let ns = Netns::new(prefix);
        ns.ip(&[
            "link",
            "add",
            "fx0",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "fx1",
            "address",
            "02:00:00:00:00:02",
        ]);
        for (dev, v4, v6) in [
            ("fx0", "192.0.2.1/24", "2001:db8:1::1/64"),
            ("fx1", "198.51.100.1/24", "2001:db8:2::1/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", dev]);
            ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        );
        let neigh = |ip: &str, mac: &str, dev: &str| {
            ns.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        };
        neigh("192.0.2.10", "02:00:00:00:0c:0a", "fx0");
        neigh("2001:db8:1::10", "02:00:00:00:0c:0a", "fx0");
        neigh("192.0.2.21", "02:00:00:00:0b:21", "fx0");
        for n in 1..=3 {
            neigh(
                &format!("198.51.100.1{n}"),
                &format!("02:00:00:00:0b:0{n}"),
                "fx1",
            );
            neigh(
                &format!("2001:db8:2::1{n}"),
                &format!("02:00:00:00:0b:0{n}"),
                "fx1",
            );
        }
        let (fx0, fx1) = (ns.ifindex("fx0"), ns.ifindex("fx1"));
        let entered = ns.enter();
        let mut dp = Datapath::load(opts).unwrap_or_else(|e| panic!("{}", chain(&e)));
        dp.set_node_config(&lab_config())
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        for ifindex in [fx0, fx1] {
            dp.add_tx_port(ifindex)
                .unwrap_or_else(|e| panic!("{}", chain(&e)));
        }
        Self {
            dp,
            fx0,
            fx1,
            rings: HashMap::new(),
            _entered: entered,
            ns,
        }
    }

    /// Add VIP `id` at `addr` and give it these backends (id, address).
    pub fn vip(&mut self, id: u32, addr: SocketAddr, owned: bool, backends: &[(u32, SocketAddr)]) {
        self.dp
            .set_vip(&Vip {
                addr,
                id,
                ring_size: MAGLEV_SIZE_DEFAULT,
                owned,
                local: false,
            })
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        self.ring(id, backends);
    }

    /// Point VIP `id`'s Maglev ring at these backends, writing only the changed slots.
    pub fn ring(&mut self, id: u32, backends: &[(u32, SocketAddr)]) {
        let weighted: Vec<WeightedBackend> = backends
            .iter()
            .map(|&(bid, addr)| {
                self.dp
                    .set_backend(bid, &BackendEntry::remote(addr))
                    .unwrap_or_else(|e| panic!("{}", chain(&e)));
                WeightedBackend {
                    key: addr.to_string(),
                    id: bid,
                    weight: 1,
                }
            })
            .collect();
        let table = maglev::build_table(&weighted, MAGLEV_SIZE_DEFAULT);
        let old = self.rings.remove(&id).unwrap_or_default();
        self.dp
            .write_maglev(id, &maglev::delta(&old, &table))
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        self.rings.insert(id, table);
    }

    /// The backend id VIP `id`'s ring gives a new flow from `client` to `vip`.
    #[must_use]
    pub fn maglev_pick(&self, id: u32, client: SocketAddr, vip: SocketAddr) -> u32 {
        let (src_be, family) = addr_words(client.ip());
        let key = FlowKey {
            src_be,
            dst_be: addr_words(vip.ip()).0,
            sport_be: client.port().to_be(),
            dport_be: vip.port().to_be(),
            proto: lb_common::IPPROTO_TCP,
            family,
            _pad: 0,
        };
        self.rings[&id][(flow_hash(&key) % MAGLEV_SIZE_DEFAULT) as usize]
    }

    /// The lab interface index for an ingress side.
    #[must_use]
    pub fn ifindex(&self, ingress: Ingress) -> u32 {
        match ingress {
            Ingress::ClientSide => self.fx0,
            Ingress::MasterSide => self.fx1,
        }
    }

    /// Run a fixture and assert verdict, output bytes and counter movements; return
    /// the frame the program produced.
    pub fn run(&mut self, f: &Fixture) -> Vec<u8> {
        let ifindex = self.ifindex(f.ingress);
        let before = self.counters();
        let out = self
            .dp
            .test_run(lb_common::PROG_XDP, &f.input, ifindex)
            .unwrap_or_else(|e| panic!("{}: {}", f.desc, chain(&e)));
        let after = self.counters();
        let moved: Vec<(u32, u64)> = (0..COUNTER_COUNT)
            .filter(|&i| after.get(i) != before.get(i))
            .map(|i| (i, after.get(i) - before.get(i)))
            .collect();
        let outcomes: u64 = moved
            .iter()
            .filter(|(i, _)| *i < OUTCOMES)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(
            outcomes, 1,
            "{}: a packet bumps exactly one outcome counter",
            f.desc
        );
        let mut want = f.counters.clone();
        want.sort_unstable();
        let named = |v: &[(u32, u64)]| {
            v.iter()
                .map(|&(i, n)| format!("{}+{n}", COUNTER_NAMES[i as usize]))
                .collect::<Vec<_>>()
        };
        assert!(
            out.action == f.verdict && out.packet == f.output && moved == want,
            "fixture failed: {}\n verdict: got {} want {}\n counters: got {:?} want {:?}\n input:\n{}\n output (got):\n{}\n output (want):\n{}",
            f.desc,
            out.action,
            f.verdict,
            named(&moved),
            named(&want),
            describe(&f.input),
            describe(&out.packet),
            describe(&f.output),
        );
        out.packet
    }

    fn counters(&self) -> Counters {
        self.dp
            .counters()
            .unwrap_or_else(|e| panic!("{}", chain(&e)))
    }
}

/// Check the IPv4 header and TCP checksums of a frame by recomputing them with
/// etherparse, independently of the datapath. Returns `(ip_ok, tcp_ok)`; `ip_ok` is
/// true for IPv6, which has no header checksum.
#[must_use]
pub fn checksums_valid(frame: &[u8]) -> (bool, bool) {
    let p = etherparse::SlicedPacket::from_ethernet(frame).expect("frame parses");
    let Some(etherparse::TransportSlice::Tcp(t)) = &p.transport else {
        panic!("not tcp")
    };
    let h = t.to_header();
    match &p.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            let ih = ip.header().to_header();
            (
                ih.calc_header_checksum() == ih.header_checksum,
                h.calc_checksum_ipv4(&ih, t.payload()).ok() == Some(h.checksum),
            )
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => (
            true,
            h.calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                .ok()
                == Some(h.checksum),
        ),
        _ => panic!("not ip"),
    }
}

/// An error with its whole source chain, for panic messages.
#[must_use]
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// The NAT source address the lab uses for `ip`'s family.
#[must_use]
pub fn snat_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => "198.51.100.1".parse().expect("v4"),
        IpAddr::V6(_) => "2001:db8:2::1".parse().expect("v6"),
    }
}
