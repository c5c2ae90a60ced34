//! The map reader and writer: the one typed API through which apilb reads and
//! changes the XDP datapath's maps.
//!
//! [`Datapath`] holds the maps, taken out of the loaded object by `crate::loader`,
//! which keeps the programs. The controller (`crate::controller`) is the only code
//! that writes through it; everything else reads. It speaks in `SocketAddr`s and ids
//! and converts to the `lb_common` layouts here, so byte order is handled in
//! exactly one place.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use crate::{config::TcpTimeouts, passive::PassiveSettings};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        xdp::{DevMapHash, XdpMapError},
    },
};
use lb_common::{
    AF_INET, AF_INET6, BACKEND_F_DOWN, BACKEND_F_LOCAL, Backend, CONFIG_F_PASSIVE, COUNTER_COUNT,
    DatapathConfig, FlowKey, FlowState, IFACES_MAX, IPPROTO_TCP, IfaceMode, MAGLEV_SIZE_MAX,
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_FLOWS, MAP_HALF_FLOWS,
    MAP_HALF_REPLIES, MAP_LOCAL_STATS, MAP_MAGLEV, MAP_PASSIVE_EVENTS, MAP_PASSIVE_STATS,
    MAP_REPLIES, MAP_SYNC_EVENTS, MAP_TX_PORTS, MAP_VIP_STATS, MAP_VIPS, MAX_BACKENDS, MAX_VIPS,
    PassiveStats, ReplyState, SNAT_POOL_MAX, TrafficStats, VIP_F_LOCAL, VIP_F_OWNED, VIP_F_SYNC,
    VipInfo, VipKey,
    ct::{CT_TIME_WAIT, FLOW_F_FROM_PEER},
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("batch update of map {map} ({count} entries)")]
    Batch {
        map: &'static str,
        count: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} = {value} is out of range ({range})")]
    OutOfRange {
        what: &'static str,
        value: String,
        range: String,
    },
    #[error("duplicating the handle of map {map}")]
    Dup {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("adding interface index {ifindex} to the TX ports")]
    TxPort {
        ifindex: u32,
        #[source]
        source: XdpMapError,
    },
    #[error("VIP {0} is not in the datapath")]
    UnknownVip(SocketAddr),
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// A VIP as the datapath knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vip {
    pub addr: SocketAddr,
    /// Index of the VIP's Maglev ring and stats row, below [`MAX_VIPS`].
    pub id: u32,
    /// Maglev ring size M (prime, at most [`MAGLEV_SIZE_MAX`]).
    pub ring_size: u32,
    /// Whether this node owns the VIP and balances it.
    pub owned: bool,
    /// Whether the node's own processes connecting to it are balanced (node-local
    /// mode, `crate::socklb`).
    pub local: bool,
    /// `(first, count)`: the run of its family's SNAT pool (`NodeConfig`) that its
    /// new flows take their source address from.
    pub snat: (u8, u8),
    /// Its flows are exported for flow sync (`SYNC_EVENTS`).
    pub sync: bool,
}

/// Node-wide datapath settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address pools for NAT, per family, at most [`SNAT_POOL_MAX`] each: the
    /// node's addresses, then those of VIPs that are their own flows' source
    /// (each VIP names its run, [`Vip::snat`]). Replies are recognised at all of
    /// them.
    pub snat_v4: Vec<Ipv4Addr>,
    pub snat_v6: Vec<Ipv6Addr>,
    /// Source ports the datapath allocates at each SNAT address; keep it outside
    /// `ip_local_port_range`.
    pub ports: RangeInclusive<u16>,
    /// The part of `ports` this node claims new flows' ports from (its slice,
    /// `datapath.nat_slice`); replies are recognised on all of `ports`.
    pub claim: RangeInclusive<u16>,
    /// How long a flow reuses its cached next hop before asking the FIB again.
    pub nexthop_ttl: Duration,
    /// How long after its last packet a flow in each TCP state holds its NAT port.
    pub tcp_timeouts: TcpTimeouts,
    /// Passive failure detection (`crate::passive`): a backend's RST or ICMP
    /// unreachable answering a SYN it never accepted is dropped and counted
    /// (`PASSIVE_STATS`), so that the client's SYN retransmit is balanced afresh,
    /// away from that backend; `threshold` failures in a row report it.
    pub passive: PassiveSettings,
    /// The network namespace whose sockets node-local mode balances (its cookie,
    /// `SO_NETNS_COOKIE`); 0: none.
    pub netns_cookie: u64,
    /// This node's flow-sync listener: while the kernel has no socket listening
    /// there (the controller is gone), VIPs that sync get no new flows. `None`
    /// without `[sync]`.
    pub sync_listener: Option<SocketAddr>,
    /// The interfaces whose packets may carry partial checksums (a veth, a tun
    /// device, any interface in generic mode), at most [`IFACES_MAX`]: only there
    /// does the datapath look for them (`lb-ebpf`'s `offload`).
    pub ifaces: Vec<IfaceMode>,
}

/// The sync listener as `DatapathConfig` holds it for `bpf_sk_lookup_tcp`: its
/// family, and a `bpf_sock_tuple` with a zero source (any client).
fn sync_tuple(listener: Option<SocketAddr>) -> (u8, [u32; 9]) {
    let mut tuple = [0; 9];
    let Some(addr) = listener else {
        return (0, tuple);
    };
    let (words, family) = addr_words(addr.ip());
    // The ports share one word: source (0) first, then destination, each in
    // network order, as the C struct lays them out.
    let [hi, lo] = addr.port().to_be_bytes();
    let ports = u32::from_ne_bytes([0, 0, hi, lo]);
    if family == AF_INET {
        tuple[1] = words[0];
        tuple[2] = ports;
    } else {
        tuple[4..8].copy_from_slice(&words);
        tuple[8] = ports;
    }
    (family, tuple)
}

/// A backend as the datapath holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub addr: SocketAddr,
    /// The backend is this node: its flows go to the local stack unmodified, which
    /// must hold the VIP.
    pub local: bool,
    /// Out of rotation: a new flow whose ring slot still names it (the rings are
    /// rewritten after) goes along the fallback order instead.
    pub down: bool,
    /// The next backend id of the fallback order (`BACKEND_NONE`: none).
    pub fallback: u32,
}

/// Counter values summed over CPUs, indexed by `lb_common::counters`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters(pub [u64; COUNTER_COUNT as usize]);

impl Counters {
    #[must_use]
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }
}

/// The datapath's maps, by their `lb_common::MAP_*` names.
pub struct Datapath {
    maps: StdHashMap<&'static str, Map>,
}

/// An address as the datapath stores it: wire bytes in `[u32; 4]`, and its family.
#[must_use]
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

/// The address stored as `addr_words` stores it, back as a `SocketAddr`.
#[must_use]
pub fn socket_addr(addr_be: &[u32; 4], family: u8, port_be: u16) -> SocketAddr {
    let bytes: Vec<u8> = addr_be.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes);
        IpAddr::V6(Ipv6Addr::from(b))
    };
    SocketAddr::new(ip, u16::from_be(port_be))
}

/// The backend a flow goes to.
fn flow_backend(key: &FlowKey, flow: &FlowState) -> SocketAddr {
    socket_addr(&flow.backend_be, key.family, flow.backend_port_be)
}

/// The `VIPS` key of a TCP VIP.
#[must_use]
pub fn vip_key(addr: SocketAddr) -> VipKey {
    let (addr_be, family) = addr_words(addr.ip());
    VipKey {
        addr_be,
        port_be: addr.port().to_be(),
        proto: IPPROTO_TCP,
        family,
    }
}

fn check_range(what: &'static str, value: u32, range: RangeInclusive<u32>) -> Result<()> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(DatapathError::OutOfRange {
            what,
            value: value.to_string(),
            range: format!("{}..={}", range.start(), range.end()),
        })
    }
}

impl Datapath {
    /// Take every map of `lb_common::maps::MAPS` out of the loaded object (its
    /// programs keep using them). Map names are shared constants; the object is
    /// checked against every one, so a renamed static in lb-ebpf fails here rather
    /// than at first use.
    pub(crate) fn take_maps(ebpf: &mut Ebpf) -> Result<Self> {
        let maps = lb_common::maps::MAPS
            .iter()
            .map(|spec| {
                let name = spec.name;
                ebpf.take_map(name)
                    .map(|m| (name, m))
                    .ok_or(DatapathError::MissingMap(name))
            })
            .collect::<Result<_>>()?;
        Ok(Self { maps })
    }

    pub(crate) fn map(&self, name: &'static str) -> Result<&Map> {
        self.maps.get(name).ok_or(DatapathError::MissingMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.maps
            .get_mut(name)
            .ok_or(DatapathError::MissingMap(name))
    }

    /// Set the SNAT pools, the source-port range, the next-hop TTL and the TCP
    /// timeouts.
    pub fn set_node_config(&mut self, nat: &NodeConfig) -> Result<()> {
        let (min, max) = (*nat.ports.start(), *nat.ports.end());
        check_range("NAT port range start", u32::from(min), 1..=u32::from(max))?;
        let (claim_min, claim_max) = (*nat.claim.start(), *nat.claim.end());
        check_range(
            "NAT slice start",
            u32::from(claim_min),
            u32::from(min)..=u32::from(claim_max),
        )?;
        check_range(
            "NAT slice end",
            u32::from(claim_max),
            u32::from(claim_min)..=u32::from(max),
        )?;
        let mut snat_v4_be = [0; SNAT_POOL_MAX];
        let snat_v4_count = pool("IPv4 SNAT addresses", &nat.snat_v4, &mut snat_v4_be, |a| {
            u32::from_ne_bytes(a.octets())
        })?;
        let mut snat_v6_be = [[0; 4]; SNAT_POOL_MAX];
        let snat_v6_count = pool("IPv6 SNAT addresses", &nat.snat_v6, &mut snat_v6_be, |a| {
            addr_words(IpAddr::V6(*a)).0
        })?;
        let (sync_family, sync_tuple_be) = sync_tuple(nat.sync_listener);
        let mut ifaces = [IfaceMode::default(); IFACES_MAX];
        if nat.ifaces.len() > IFACES_MAX {
            return Err(DatapathError::OutOfRange {
                what: "veth, tun or generic-mode interfaces",
                value: nat.ifaces.len().to_string(),
                range: format!("at most {IFACES_MAX}"),
            });
        }
        ifaces[..nat.ifaces.len()].copy_from_slice(&nat.ifaces);
        let cfg = DatapathConfig {
            snat_v6_be,
            snat_v4_be,
            snat_v4_count,
            snat_v6_count,
            _pad: 0,
            port_min_host: min,
            port_max_host: max,
            nexthop_ttl_ns: nanos(nat.nexthop_ttl),
            timeouts_ms: nat.tcp_timeouts.by_state_ms(),
            flags: if nat.passive.enabled {
                CONFIG_F_PASSIVE
            } else {
                0
            },
            passive_threshold: nat.passive.threshold,
            netns_cookie: nat.netns_cookie,
            claim_min_host: claim_min,
            claim_max_host: claim_max,
            sync_family,
            _pad2: [0; 3],
            sync_tuple_be,
            _pad3: 0,
            ifaces,
        };
        let mut config: Array<_, DatapathConfig> = self.typed(MAP_CONFIG)?;
        config.set(0, cfg, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Add or replace a VIP.
    pub fn set_vip(&mut self, vip: &Vip) -> Result<()> {
        check_range("VIP id", vip.id, 0..=MAX_VIPS - 1)?;
        check_range("Maglev ring size", vip.ring_size, 2..=MAGLEV_SIZE_MAX)?;
        let (first, count) = (u32::from(vip.snat.0), u32::from(vip.snat.1));
        let pool = u32::try_from(SNAT_POOL_MAX).unwrap_or(u32::MAX);
        check_range("VIP SNAT run end", first + count, 0..=pool)?;
        if !crate::maglev::is_prime(vip.ring_size) {
            return Err(DatapathError::OutOfRange {
                what: "Maglev ring size",
                value: vip.ring_size.to_string(),
                range: "a prime".to_owned(),
            });
        }
        let info = VipInfo {
            vip_id: vip.id,
            flags: if vip.owned { VIP_F_OWNED } else { 0 }
                | if vip.local { VIP_F_LOCAL } else { 0 }
                | if vip.sync { VIP_F_SYNC } else { 0 },
            ring_size: vip.ring_size,
            snat_first: vip.snat.0,
            snat_count: vip.snat.1,
            _pad: 0,
        };
        let mut vips: HashMap<_, VipKey, VipInfo> = self.typed(MAP_VIPS)?;
        vips.insert(vip_key(vip.addr), info, 0)
            .map_err(map_err(MAP_VIPS))
    }

    /// Remove a VIP; its traffic then passes to the stack untouched.
    pub fn remove_vip(&mut self, addr: SocketAddr) -> Result<()> {
        let mut vips: HashMap<_, VipKey, VipInfo> = self.typed(MAP_VIPS)?;
        vips.remove(&vip_key(addr)).map_err(vip_err(addr))
    }

    /// Set backend `id` (`1..MAX_BACKENDS`).
    pub fn set_backend(&mut self, id: u32, entry: &BackendEntry) -> Result<()> {
        check_range("backend id", id, 1..=MAX_BACKENDS - 1)?;
        check_range("fallback backend id", entry.fallback, 0..=MAX_BACKENDS - 1)?;
        let (addr_be, family) = addr_words(entry.addr.ip());
        let b = Backend {
            addr_be,
            port_be: entry.addr.port().to_be(),
            family,
            _pad: 0,
            flags: if entry.local { BACKEND_F_LOCAL } else { 0 }
                | if entry.down { BACKEND_F_DOWN } else { 0 },
            fallback_id: entry.fallback,
            _pad2: 0,
        };
        let mut backends: Array<_, Backend> = self.typed(MAP_BACKENDS)?;
        backends.set(id, b, 0).map_err(map_err(MAP_BACKENDS))
    }

    /// Write the changed slots of VIP `vip_id`'s Maglev ring, in one batch syscall.
    /// `changes` holds `(slot, backend id)` pairs, as `maglev::delta` returns them.
    pub fn write_maglev(&mut self, vip_id: u32, changes: &[(u32, u32)]) -> Result<()> {
        check_range("VIP id", vip_id, 0..=MAX_VIPS - 1)?;
        for &(slot, backend) in changes {
            check_range("Maglev slot", slot, 0..=MAGLEV_SIZE_MAX - 1)?;
            check_range("backend id", backend, 0..=MAX_BACKENDS - 1)?;
        }
        let keys: Vec<u32> = changes
            .iter()
            .map(|(slot, _)| vip_id * MAGLEV_SIZE_MAX + slot)
            .collect();
        let values: Vec<u32> = changes.iter().map(|(_, id)| *id).collect();
        update_batch(map_data(self.map(MAP_MAGLEV)?), &keys, &values).map_err(|source| {
            DatapathError::Batch {
                map: MAP_MAGLEV,
                count: keys.len(),
                source,
            }
        })
    }

    /// Allow redirecting rewritten packets out of interface `ifindex`.
    ///
    /// The kernel resolves `ifindex` in the network namespace of the calling
    /// thread, so call this from the namespace the interface lives in: an index from
    /// another namespace names another device. The controller does it for the
    /// configured interfaces, from the namespace the daemon attached them in.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        let mut ports =
            DevMapHash::try_from(self.map_mut(MAP_TX_PORTS)?).map_err(map_err(MAP_TX_PORTS))?;
        ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DatapathError::TxPort { ifindex, source })
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(MAP_COUNTERS)?).map_err(map_err(MAP_COUNTERS))?;
        let mut out = [0u64; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = map
                .get(&u32::try_from(i).expect("COUNTER_COUNT fits u32"), 0)
                .map_err(map_err(MAP_COUNTERS))?
                .iter()
                .sum();
        }
        Ok(Counters(out))
    }

    /// Traffic to VIP `id`, summed over CPUs.
    pub fn vip_stats(&self, id: u32) -> Result<TrafficStats> {
        self.stats(MAP_VIP_STATS, id)
    }

    /// Traffic through backend `id` (both directions), summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats> {
        self.stats(MAP_BACKEND_STATS, id)
    }

    /// The ring buffer of passive failure events, taken out of the datapath (once:
    /// its reader owns it; see `crate::passive`).
    pub fn take_passive_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self
            .maps
            .remove(MAP_PASSIVE_EVENTS)
            .ok_or(DatapathError::MissingMap(MAP_PASSIVE_EVENTS))?;
        aya::maps::RingBuf::try_from(map).map_err(map_err(MAP_PASSIVE_EVENTS))
    }

    /// The synced flows' event ring (`SYNC_EVENTS`), taken out for its reader.
    pub fn take_sync_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self
            .maps
            .remove(MAP_SYNC_EVENTS)
            .ok_or(DatapathError::MissingMap(MAP_SYNC_EVENTS))?;
        aya::maps::RingBuf::try_from(map).map_err(map_err(MAP_SYNC_EVENTS))
    }

    /// Node-local connects sent to backend `id`, summed over CPUs.
    pub fn local_connects(&self, id: u32) -> Result<u64> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(MAP_LOCAL_STATS)?).map_err(map_err(MAP_LOCAL_STATS))?;
        let per_cpu = map.get(&id, 0).map_err(map_err(MAP_LOCAL_STATS))?;
        Ok(per_cpu.iter().sum())
    }

    /// Backend `id`'s failures seen on the wire, summed over CPUs.
    pub fn passive_stats(&self, id: u32) -> Result<PassiveStats> {
        let map: PerCpuArray<_, PassiveStats> = PerCpuArray::try_from(self.map(MAP_PASSIVE_STATS)?)
            .map_err(map_err(MAP_PASSIVE_STATS))?;
        let per_cpu = map.get(&id, 0).map_err(map_err(MAP_PASSIVE_STATS))?;
        Ok(PassiveStats {
            rst: per_cpu.iter().map(|s| s.rst).sum(),
            silent: per_cpu.iter().map(|s| s.silent).sum(),
            icmp: per_cpu.iter().map(|s| s.icmp).sum(),
        })
    }

    fn stats(&self, name: &'static str, id: u32) -> Result<TrafficStats> {
        let map: PerCpuArray<_, TrafficStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let per_cpu = map.get(&id, 0).map_err(map_err(name))?;
        Ok(per_cpu
            .iter()
            .fold(TrafficStats::default(), |acc, s| TrafficStats {
                packets: acc.packets + s.packets,
                bytes: acc.bytes + s.bytes,
                new_flows: acc.new_flows + s.new_flows,
            }))
    }

    /// Every established client flow (client -> VIP) and its state.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        self.entries(MAP_FLOWS)
    }

    /// Every established flow's reply entry (backend -> SNAT address:port) and the
    /// flow it restores.
    pub fn replies(&self) -> Result<Vec<(FlowKey, ReplyState)>> {
        self.entries(MAP_REPLIES)
    }

    /// Every half-open client flow (its handshake not complete) and its state.
    pub fn half_open_flows(&self) -> Result<Vec<(FlowKey, FlowState)>> {
        self.entries(MAP_HALF_FLOWS)
    }

    /// The half-open client flow `key`, if it is still half-open.
    pub fn half_open_flow(&self, key: &FlowKey) -> Result<Option<FlowState>> {
        let map: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.map(MAP_HALF_FLOWS)?).map_err(map_err(MAP_HALF_FLOWS))?;
        match map.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_HALF_FLOWS)(e)),
        }
    }

    /// Every half-open flow's reply entry.
    pub fn half_open_replies(&self) -> Result<Vec<(FlowKey, ReplyState)>> {
        self.entries(MAP_HALF_REPLIES)
    }

    /// Every entry of the flow table `name`.
    fn entries<V: aya::Pod>(&self, name: &'static str) -> Result<Vec<(FlowKey, V)>> {
        let map: HashMap<_, FlowKey, V> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        map.iter().collect::<Result<_, _>>().map_err(map_err(name))
    }

    /// Handles of their own on the flow tables, and on nothing else: for a thread
    /// that removes flows (`crate::reaper`) while this one goes on.
    pub fn flow_tables(&self) -> Result<Self> {
        let mut maps = StdHashMap::new();
        for name in [MAP_FLOWS, MAP_REPLIES, MAP_HALF_FLOWS, MAP_HALF_REPLIES] {
            let Map::LruHashMap(data) = self.map(name)? else {
                return Err(DatapathError::MissingMap(name));
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DatapathError::Dup { map: name, source })?;
            let data = MapData::from_fd(fd).map_err(map_err(name))?;
            maps.insert(name, Map::LruHashMap(data));
        }
        Ok(Self { maps })
    }

    /// Remove every flow (both directions, established and half-open) to a
    /// backend for which `doomed` holds when its entry is removed, so that its
    /// clients' next segments find no flow: the stack answers them with a RST and
    /// they reconnect through the ring, instead of waiting out a dead master's TCP
    /// timeout. Matched by address, which flows record, not by id, which can move
    /// between configurations. Returns how many client flows it removed, by
    /// backend.
    pub fn remove_flows(
        &mut self,
        doomed: impl Fn(SocketAddr) -> bool,
    ) -> Result<BTreeMap<SocketAddr, usize>> {
        let mut removed = BTreeMap::new();
        for (flows_map, replies_map) in
            [(MAP_FLOWS, MAP_REPLIES), (MAP_HALF_FLOWS, MAP_HALF_REPLIES)]
        {
            let listed: Vec<(FlowKey, SocketAddr)> = self
                .entries::<FlowState>(flows_map)?
                .iter()
                .map(|(k, f)| (*k, flow_backend(k, f)))
                .filter(|(_, b)| doomed(*b))
                .collect();
            let mut flows: HashMap<_, FlowKey, FlowState> = self.typed(flows_map)?;
            for (k, backend) in listed {
                // A flow the LRU evicted meanwhile is already gone: not an error.
                if doomed(backend) && flows.remove(&k).is_ok() {
                    *removed.entry(backend).or_insert(0) += 1;
                }
            }
            let listed: Vec<(FlowKey, SocketAddr)> = self
                .entries::<ReplyState>(replies_map)?
                .iter()
                .map(|(k, _)| (*k, socket_addr(&k.src_be, k.family, k.sport_be)))
                .filter(|(_, b)| doomed(*b))
                .collect();
            let mut replies: HashMap<_, FlowKey, ReplyState> = self.typed(replies_map)?;
            for (k, backend) in listed {
                if doomed(backend) {
                    let _ = replies.remove(&k);
                }
            }
        }
        Ok(removed)
    }

    /// Remove the flows peers synced here (`FLOW_F_FROM_PEER`, never used here)
    /// that `stale` picks, with their NAT port leases; how many went.
    pub fn sweep_parked(&mut self, stale: impl Fn(&FlowKey, &FlowState) -> bool) -> Result<usize> {
        let listed: Vec<FlowKey> = self
            .flows()?
            .into_iter()
            .filter(|(k, f)| f.flags & FLOW_F_FROM_PEER != 0 && stale(k, f))
            .map(|(k, _)| k)
            .collect();
        if listed.is_empty() {
            return Ok(0);
        }
        let mut flows: HashMap<_, FlowKey, FlowState> = self.typed(MAP_FLOWS)?;
        // One the LRU evicted, or the datapath re-anchored, meanwhile stays.
        let removed: HashSet<FlowKey> = listed
            .into_iter()
            .filter(|k| {
                flows
                    .get(k, 0)
                    .is_ok_and(|f| f.flags & FLOW_F_FROM_PEER != 0)
                    && flows.remove(k).is_ok()
            })
            .collect();
        // A lease goes with its flow: it names the client the flow's key has.
        let leases: Vec<FlowKey> = self
            .replies()?
            .into_iter()
            .filter(|(k, r)| {
                removed.contains(&FlowKey {
                    src_be: r.client_be,
                    dst_be: r.vip_be,
                    sport_be: r.client_port_be,
                    dport_be: r.vip_port_be,
                    proto: k.proto,
                    family: k.family,
                    _pad: 0,
                })
            })
            .map(|(k, _)| k)
            .collect();
        let mut replies: HashMap<_, FlowKey, ReplyState> = self.typed(MAP_REPLIES)?;
        for k in &leases {
            let _ = replies.remove(k);
        }
        Ok(removed.len())
    }

    /// Write a flow a peer synced (`crate::sync::install::entries_of`): the reply
    /// entry first, as the datapath promotes, then the client's. `false`, writing
    /// nothing, if a live flow of this node's own holds the client's tuple or its
    /// NAT port's lease.
    pub fn install_peer_flow(
        &mut self,
        key: &FlowKey,
        flow: &FlowState,
        rkey: &FlowKey,
        reply: &ReplyState,
    ) -> Result<bool> {
        let flows: HashMap<_, FlowKey, FlowState> = self.typed(MAP_FLOWS)?;
        if let Ok(old) = flows.get(key, 0)
            && old.flags & FLOW_F_FROM_PEER == 0
            && old.state < CT_TIME_WAIT
        {
            return Ok(false);
        }
        // The port's lease may name an earlier client: a flow a peer synced
        // before (its port since reused there), which goes, or a live flow of
        // this node's own, which stays.
        let replies: HashMap<_, FlowKey, ReplyState> = self.typed(MAP_REPLIES)?;
        if let Ok(lease) = replies.get(rkey, 0)
            && (lease.client_be != reply.client_be || lease.client_port_be != reply.client_port_be)
        {
            let earlier = FlowKey {
                src_be: lease.client_be,
                dst_be: lease.vip_be,
                sport_be: lease.client_port_be,
                dport_be: lease.vip_port_be,
                ..*key
            };
            let mut flows: HashMap<_, FlowKey, FlowState> = self.typed(MAP_FLOWS)?;
            match flows.get(&earlier, 0) {
                Ok(f) if f.flags & FLOW_F_FROM_PEER == 0 && f.state < CT_TIME_WAIT => {
                    return Ok(false);
                }
                Ok(_) => {
                    let _ = flows.remove(&earlier);
                }
                Err(_) => {}
            }
        }
        let mut replies: HashMap<_, FlowKey, ReplyState> = self.typed(MAP_REPLIES)?;
        replies
            .insert(rkey, reply, 0)
            .map_err(map_err(MAP_REPLIES))?;
        let mut flows: HashMap<_, FlowKey, FlowState> = self.typed(MAP_FLOWS)?;
        flows.insert(key, flow, 0).map_err(map_err(MAP_FLOWS))?;
        Ok(true)
    }

    /// The VIPs in the datapath.
    pub fn vip_addrs(&self) -> Result<Vec<SocketAddr>> {
        let vips: HashMap<_, VipKey, VipInfo> =
            HashMap::try_from(self.map(MAP_VIPS)?).map_err(map_err(MAP_VIPS))?;
        vips.keys()
            .map(|k| {
                k.map(|k| socket_addr(&k.addr_be, k.family, k.port_be))
                    .map_err(map_err(MAP_VIPS))
            })
            .collect()
    }

    fn typed<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        T::try_from(self.map_mut(name)?).map_err(map_err(name))
    }
}

/// Fill `slots` with `addrs`, as the datapath stores them, and return their count.
fn pool<A, W: Copy>(
    what: &'static str,
    addrs: &[A],
    slots: &mut [W; SNAT_POOL_MAX],
    word: impl Fn(&A) -> W,
) -> Result<u8> {
    if addrs.len() > SNAT_POOL_MAX {
        return Err(DatapathError::OutOfRange {
            what,
            value: addrs.len().to_string(),
            range: format!("0..={SNAT_POOL_MAX}"),
        });
    }
    for (slot, a) in slots.iter_mut().zip(addrs) {
        *slot = word(a);
    }
    Ok(u8::try_from(addrs.len()).expect("SNAT_POOL_MAX fits u8"))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A missing VIP key is the caller's mistake; any other failure is the map's.
fn vip_err(addr: SocketAddr) -> impl Fn(MapError) -> DatapathError {
    move |source| match source {
        MapError::KeyNotFound => DatapathError::UnknownVip(addr),
        // `remove` reports a missing key as the raw syscall's ENOENT.
        MapError::SyscallError(ref e) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            DatapathError::UnknownVip(addr)
        }
        source => DatapathError::Map {
            map: MAP_VIPS,
            source,
        },
    }
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

pub(crate) fn map_data(map: &Map) -> &MapData {
    match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::DevMapHash(d)
        | Map::RingBuf(d) => d,
        other => panic!("lb-ebpf defines no map of type {other:?}"),
    }
}

/// `BPF_MAP_UPDATE_BATCH` on a map with `u32` keys and values; aya 0.14 has no
/// batch API. Array maps support it since Linux 5.6.
fn update_batch(map: &MapData, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    assert_eq!(keys.len(), values.len());
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(std::io::Error::other)?,
        map_fd: u32::try_from(map.fd().as_fd().as_raw_fd()).map_err(std::io::Error::other)?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr.batch` whose key and value pointers cover
    // `count` u32s each and stay alive for the call; the kernel writes back only
    // `attr.count`, the number of elements it processed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.count as usize != keys.len() {
        return Err(std::io::Error::other(format!(
            "kernel applied {} of {} entries",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bpf_sock_tuple`'s bytes: zero source, then the listener, ports last.
    fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn the_sync_listener_is_laid_out_as_bpf_sock_tuple() {
        let (family, t) = sync_tuple(Some("192.0.2.2:9465".parse().unwrap()));
        assert_eq!(family, AF_INET);
        // saddr 0.0.0.0, daddr 192.0.2.2, sport 0, dport 9465 (0x24f9), in
        // network order; the rest unused.
        assert_eq!(bytes(&t[..3]), [0, 0, 0, 0, 192, 0, 2, 2, 0, 0, 0x24, 0xf9]);
        assert!(t[3..].iter().all(|w| *w == 0));
        let (family, t) = sync_tuple(Some("[2001:db8::2]:9465".parse().unwrap()));
        assert_eq!(family, AF_INET6);
        let b = bytes(&t);
        assert!(b[..16].iter().all(|x| *x == 0));
        assert_eq!(b[16..20], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(b[31], 2);
        assert_eq!(b[32..], [0, 0, 0x24, 0xf9]);
        assert_eq!(sync_tuple(None), (0, [0; 9]));
    }
}
