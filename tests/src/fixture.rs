//! Packet fixtures (Katran style) run through `BPF_PROG_TEST_RUN`.
//!
//! A [`Fixture`] is data: a description, the interface it arrives on, the input
//! frame, the expected verdict, the expected output frame and the exact counter
//! movements. A [`Lab`] is the real datapath, loaded into the kernel inside a
//! namespace whose FIB and neighbour tables make forwarding decisions
//! deterministic, and provisioned as `apilb run` provisions it: a [`LabConfig`]
//! becomes config text, which `Config::parse` validates, and the controller
//! (`Reconciler::desired` and `Reconciler::apply`) writes the maps from it, the
//! backends' health and the VIPs this node owns.
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
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::Path,
    time::Duration,
};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions, Xdp};
use lb_common::{
    COUNTER_COUNT, COUNTER_NAMES, FlowKey, FlowState, MAGLEV_SIZE_DEFAULT, OUTCOMES, ReplyState,
    flow_hash,
};
use lb_userspace::{
    config::{Config, TcpTimeouts},
    controller::{Desired, Reconciler},
    datapath::{Counters, Datapath, addr_words},
    health::Health,
    loader::{LoadOptions, Programs},
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
pub const NAT_PORTS: RangeInclusive<u16> = 40_000..=40_999;

/// What a lab's config says, the part the fixtures vary; [`LabConfig::text`] writes
/// it out as an `apilb.toml`.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// VIPs in id order (the controller numbers them from 0 in config order), and
    /// whether each is elected (VRRP: owned only while [`Lab::set_owned`] says so)
    /// rather than static (always owned).
    pub vips: Vec<(SocketAddr, bool)>,
    /// Backends in id order (numbered from 1 in config order): address, weight,
    /// and whether it is this node (`local`).
    pub backends: Vec<(SocketAddr, u32, bool)>,
    /// Whether the IPv6 SNAT address (`2001:db8:2::1`) is configured, beside the
    /// IPv4 one (`198.51.100.1`).
    pub snat_v6: bool,
    pub nat_ports: RangeInclusive<u16>,
    /// `datapath.nat_slice` as `(index, count)`: `(0, 1)` is the whole range.
    pub nat_slice: (u16, u16),
    pub nexthop_ttl: Duration,
    /// `[datapath.tcp_timeouts]`, every key written out; apilb's defaults unless a
    /// fixture changes them.
    pub tcp_timeouts: TcpTimeouts,
    pub passive: bool,
}

impl LabConfig {
    /// Static VIPs over backends of weight 1, with the lab's node settings. The
    /// next-hop TTL is long so that exact counter assertions never see a cache
    /// expiry on a slow machine; the TTL test shortens it. Passive detection is
    /// off (the passive fixtures turn it on), reporting at the first failure.
    #[must_use]
    pub fn new(vips: &[SocketAddr], backends: &[SocketAddr]) -> Self {
        Self {
            vips: vips.iter().map(|&v| (v, false)).collect(),
            backends: backends.iter().map(|&b| (b, 1, false)).collect(),
            snat_v6: true,
            nat_ports: NAT_PORTS,
            nat_slice: (0, 1),
            nexthop_ttl: Duration::from_mins(1),
            tcp_timeouts: TcpTimeouts::default(),
            passive: false,
        }
    }

    /// The config text: attached to both lab interfaces, probes by TCP (the lab
    /// runs no prober: [`Lab::set_health`] stands in for it).
    #[must_use]
    pub fn text(&self) -> String {
        let mut t = format!(
            "[datapath]\ninterfaces = [\"fx0\", \"fx1\"]\nsnat_ipv4 = \"198.51.100.1\"\n\
             nat_ports = [{}, {}]\nnat_slice = [{}, {}]\nnexthop_ttl = \"{}ns\"\n",
            self.nat_ports.start(),
            self.nat_ports.end(),
            self.nat_slice.0,
            self.nat_slice.1,
            self.nexthop_ttl.as_nanos(),
        );
        if self.snat_v6 {
            t.push_str("snat_ipv6 = \"2001:db8:2::1\"\n");
        }
        t.push_str("[datapath.tcp_timeouts]\n");
        for (key, _, timeout) in self.tcp_timeouts.by_key() {
            let _ = writeln!(t, "{key} = \"{}ms\"", timeout.as_millis());
        }
        let _ = write!(
            t,
            "[health]\nkind = \"tcp\"\npassive = {}\npassive_threshold = 1\n",
            self.passive
        );
        for (i, (addr, elected)) in self.vips.iter().enumerate() {
            let _ = write!(
                t,
                "[[vip]]\naddress = \"{}\"\nport = {}\n",
                addr.ip(),
                addr.port()
            );
            if *elected {
                let _ = writeln!(t, "election = \"vrrp\"\nvrid = {}", i + 1);
            }
        }
        for (addr, weight, local) in &self.backends {
            let _ = write!(
                t,
                "[[backend]]\naddress = \"{addr}\"\nweight = {weight}\nlocal = {local}\n"
            );
        }
        t
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

/// What `BPF_PROG_TEST_RUN` returned.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    pub action: u32,
    pub packet: Vec<u8>,
    pub duration: Duration,
}

/// Run `prog` once on `packet` through `BPF_PROG_TEST_RUN`, as if received on
/// `ingress_ifindex` (an interface in the calling thread's network namespace).
pub fn test_run(
    prog: &mut Xdp,
    packet: &[u8],
    ingress_ifindex: u32,
) -> Result<TestRunOutput, ProgramError> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The kernel wants data = 0 and data_end = the packet length.
    let len = u32::try_from(packet.len()).expect("a test packet is shorter than 4 GiB");
    let md: [u32; 6] = [0, len, 0, ingress_ifindex, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let res = prog.test_run(opts)?;
    out.truncate(res.data_size_out as usize);
    Ok(TestRunOutput {
        action: res.return_value,
        packet: out,
        duration: res.duration,
    })
}

/// The datapath loaded into the kernel, inside its own namespace, with the
/// controller that writes its maps.
pub struct Lab {
    pub dp: Datapath,
    pub programs: Programs,
    /// The controller, as `apilb run` has it.
    pub reconciler: Reconciler,
    /// What it was last given: the config, each backend's health, the owned VIPs.
    setup: Option<LabConfig>,
    config: Option<Config>,
    health: HashMap<SocketAddr, Health>,
    owned: HashSet<IpAddr>,
    fx0: u32,
    fx1: u32,
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
    /// Build the namespace and load a fresh datapath, with nothing configured yet
    /// ([`Lab::configure`]). Each master's NAT source ports come from its own
    /// cursor: 40000, 40001, ...
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        Self::with_options(
            prefix,
            &LoadOptions {
                flow_table_size: 4096,
                half_open_table_size: 1024,
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
        // Everything from here on runs in the lab's namespace, as `apilb run` runs
        // in the node's: the config's interfaces are looked up, and the controller
        // writes the redirect targets, there.
        let entered = ns.enter();
        let (programs, dp) = Programs::load(opts).unwrap_or_else(|e| panic!("{}", chain(&e)));
        Self {
            dp,
            programs,
            reconciler: Reconciler::new(),
            setup: None,
            config: None,
            health: HashMap::new(),
            owned: HashSet::new(),
            fx0,
            fx1,
            _entered: entered,
            ns,
        }
    }

    /// [`Lab::new`], configured with `setup`.
    #[must_use]
    pub fn with_config(prefix: &str, setup: &LabConfig) -> Self {
        let mut lab = Self::new(prefix);
        lab.configure(setup);
        lab
    }

    /// The config `setup` describes, parsed and validated as `apilb` does it.
    #[must_use]
    pub fn parse(setup: &LabConfig) -> Config {
        Config::parse(&setup.text(), Path::new("lab.toml"))
            .unwrap_or_else(|e| panic!("{}\n{}", chain(&e), setup.text()))
    }

    /// What flow sync translates records with, for this lab's config.
    #[must_use]
    pub fn sync_view(&self) -> lb_userspace::sync::install::View {
        let config = self.config.as_ref().expect("the lab is configured");
        self.reconciler.sync_view(config)
    }

    /// Give the controller this config (a reload, after the first) and reconcile.
    /// Backends new to it start ready; the others keep their health.
    pub fn configure(&mut self, setup: &LabConfig) {
        self.setup = Some(setup.clone());
        self.apply_config(Self::parse(setup));
    }

    /// Change the last [`LabConfig`] and apply it.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut LabConfig)) {
        let mut setup = self.setup.clone().expect("the lab is configured");
        change(&mut setup);
        self.configure(&setup);
    }

    /// Give the controller `config` as it is, validated or not, and reconcile.
    pub fn apply_config(&mut self, config: Config) {
        self.health
            .retain(|a, _| config.backends.iter().any(|b| b.addr == *a));
        for b in &config.backends {
            self.health.entry(b.addr).or_insert(Health::Ready);
        }
        self.config = Some(config);
        self.reconcile();
    }

    /// What the prober of `backend` would report, and the reconcile it causes.
    pub fn set_health(&mut self, backend: SocketAddr, health: Health) {
        self.health.insert(backend, health);
        self.reconcile();
    }

    /// Whether this node won the election of the elected VIP at `vip`, and the
    /// reconcile that follows.
    pub fn set_owned(&mut self, vip: IpAddr, owned: bool) {
        if owned {
            self.owned.insert(vip);
        } else {
            self.owned.remove(&vip);
        }
        self.reconcile();
    }

    /// Tell the datapath which interfaces may deliver partial checksums, as the
    /// loader would after attaching (`IFACE_F_*` by ingress): the lab's veths
    /// stand for NICs until a test says otherwise.
    pub fn set_ifaces(&mut self, ifaces: &[(Ingress, u32)]) {
        let modes = ifaces
            .iter()
            .map(|&(ingress, flags)| lb_common::IfaceMode {
                ifindex: self.ifindex(ingress),
                flags,
            })
            .collect();
        self.reconciler.set_ifaces(modes);
        self.reconcile();
    }

    fn reconcile(&mut self) {
        let config = self.config.as_ref().expect("the lab is configured");
        let desired = self.reconciler.desired(config, &self.health, &self.owned);
        self.reconciler
            .apply(&mut self.dp, desired)
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
    }

    /// What the controller last wrote.
    #[must_use]
    pub fn desired(&self) -> &Desired {
        self.reconciler.current().expect("the lab is configured")
    }

    /// The id the controller gave the backend at `addr`.
    #[must_use]
    pub fn backend_id(&self, addr: SocketAddr) -> u32 {
        *self
            .desired()
            .backends
            .iter()
            .find(|(_, b)| b.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not a configured backend"))
            .0
    }

    /// The backend a new flow goes to when its slot names backend `id` and `id` is
    /// out of rotation: the next in the controller's fallback order.
    #[must_use]
    pub fn fallback(&self, id: u32) -> (u32, SocketAddr) {
        let next = self.desired().entry(id).expect("configured").fallback;
        (next, self.desired().backends[&next].addr)
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
        let (_, ring) = self
            .desired()
            .vips
            .iter()
            .find(|(v, _)| v.id == id)
            .unwrap_or_else(|| panic!("no VIP has id {id}"));
        ring[(flow_hash(&key) % MAGLEV_SIZE_DEFAULT) as usize]
    }

    /// The lab interface index for an ingress side.
    #[must_use]
    pub fn ifindex(&self, ingress: Ingress) -> u32 {
        match ingress {
            Ingress::ClientSide => self.fx0,
            Ingress::MasterSide => self.fx1,
        }
    }

    /// Run the datapath's XDP program `prog` once on `packet`, arriving on `ingress`.
    pub fn test_run(
        &mut self,
        prog: &'static str,
        packet: &[u8],
        ingress: Ingress,
    ) -> TestRunOutput {
        let ifindex = self.ifindex(ingress);
        let xdp = self
            .programs
            .xdp(prog)
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        test_run(xdp, packet, ifindex).unwrap_or_else(|e| panic!("{prog}: {}", chain(&e)))
    }

    /// Every flow, established or half-open.
    pub fn all_flows(&self) -> Vec<(FlowKey, FlowState)> {
        let mut all = self.dp.flows().unwrap_or_else(|e| panic!("{}", chain(&e)));
        all.extend(
            self.dp
                .half_open_flows()
                .unwrap_or_else(|e| panic!("{}", chain(&e))),
        );
        all
    }

    /// Every reply entry (NAT port lease), established or half-open.
    pub fn all_replies(&self) -> Vec<(FlowKey, ReplyState)> {
        let mut all = self
            .dp
            .replies()
            .unwrap_or_else(|e| panic!("{}", chain(&e)));
        all.extend(
            self.dp
                .half_open_replies()
                .unwrap_or_else(|e| panic!("{}", chain(&e))),
        );
        all
    }

    /// Run a fixture and assert verdict, output bytes and counter movements; return
    /// the frame the program produced.
    pub fn run(&mut self, f: &Fixture) -> Vec<u8> {
        let before = self.counters();
        let out = self.test_run(lb_common::PROG_XDP, &f.input, f.ingress);
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
