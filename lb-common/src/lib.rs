//! The one definition of everything that crosses the kernel/userspace boundary.
//!
//! The XDP program (`lb-ebpf`) and the controller (`lb-userspace`) both compile this
//! crate, so a struct layout, a map name or a counter index can never drift between
//! the two sides. Rules, checked at compile time below:
//! - every shared type is `#[repr(C)]` with explicit padding and a size assert;
//! - only integers cross: no `bool`, no Rust `enum`, no `Option`;
//! - byte order is part of the field name (`_be` = network order, as on the wire).
//!
//! Addresses are stored as `[u32; 4]` whose *memory* holds the wire bytes: an IPv4
//! address lives in word 0 and words 1..3 are zero.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields are public so that both sides can build the structs"
)]

pub mod counters;
pub mod csum;
pub mod ct;
pub mod hash;
pub mod maps;

pub use counters::*;
pub use ct::{FLOW_F_BACKEND_FIRST, FLOW_F_TS};
pub use hash::flow_hash;

/// `family` values (Linux `AF_*`).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// The only L4 protocol the balancer handles.
pub const IPPROTO_TCP: u8 = 6;

// ---- Map names, for userspace: each is its map's name in the table of maps (`maps`). ----
pub const MAP_VIPS: &str = maps::VIPS.name;
pub const MAP_BACKENDS: &str = maps::BACKENDS.name;
pub const MAP_MAGLEV: &str = maps::MAGLEV.name;
pub const MAP_FLOWS: &str = maps::FLOWS.name;
pub const MAP_REPLIES: &str = maps::REPLIES.name;
pub const MAP_HALF_FLOWS: &str = maps::HALF_FLOWS.name;
pub const MAP_HALF_REPLIES: &str = maps::HALF_REPLIES.name;
pub const MAP_CONFIG: &str = maps::CONFIG.name;
pub const MAP_COUNTERS: &str = maps::COUNTERS.name;
pub const MAP_VIP_STATS: &str = maps::VIP_STATS.name;
pub const MAP_BACKEND_STATS: &str = maps::BACKEND_STATS.name;
pub const MAP_TX_PORTS: &str = maps::TX_PORTS.name;
pub const MAP_PORT_CURSOR: &str = maps::PORT_CURSOR.name;
pub const MAP_PASSIVE_STATS: &str = maps::PASSIVE_STATS.name;
pub const MAP_PASSIVE_EVENTS: &str = maps::PASSIVE_EVENTS.name;
pub const MAP_SYNC_EVENTS: &str = maps::SYNC_EVENTS.name;
pub const MAP_LOCAL_STATS: &str = maps::LOCAL_STATS.name;

/// Version of the map layout: the types below, the map set and their sizes. Bump
/// it with any change to them. Pinned maps live in a directory named after it, so
/// an upgraded apilb with another layout starts with fresh maps instead of reading
/// old ones with new types.
pub const LAYOUT_VERSION: u32 = 13;

// ---- Program names (the function names in lb-ebpf). ----
pub const PROG_XDP: &str = "apilb_xdp";
/// A program that only returns `XDP_DROP`: the floor `cargo xtask bench xdp` compares
/// with. It is alone in an object of its own (lb-ebpf's `floor` binary), which only
/// lb-userspace's `bench` feature embeds; apilb's datapath has no such program.
pub const PROG_XDP_DROP: &str = "apilb_xdp_drop";
/// The node-local balancer's socket programs (cgroup/connect4, connect6,
/// getpeername4, getpeername6), in that order.
pub const PROG_SOCK: [&str; 4] = [
    "apilb_connect4",
    "apilb_connect6",
    "apilb_getpeername4",
    "apilb_getpeername6",
];

// ---- Sizes. ----
/// VIP ids run from 0 to `MAX_VIPS - 1`; each owns one Maglev ring.
pub const MAX_VIPS: u32 = 16;
/// Backend ids run from 1 to `MAX_BACKENDS - 1`; 0 is [`BACKEND_NONE`].
pub const MAX_BACKENDS: u32 = 256;
/// The default Maglev ring size M, a prime (Maglev paper, Katran).
pub const MAGLEV_SIZE_DEFAULT: u32 = 65_537;
/// Every VIP's ring has room for this many slots; a VIP uses the first `ring_size`.
pub const MAGLEV_SIZE_MAX: u32 = 65_537;
/// Entries in the `MAGLEV` array: one ring per VIP, VIP `v` at `v * MAGLEV_SIZE_MAX`.
pub const MAGLEV_ENTRIES: u32 = MAX_VIPS * MAGLEV_SIZE_MAX;
/// Default size of both LRU tables of established flows (client side and reply
/// side); the loader sets the real one (`maps::MapSpec::sized_by`).
pub const FLOW_TABLE_SIZE: u32 = 131_072;
/// Default size of both LRU tables of half-open flows, kept apart so that a flood
/// of SYNs evicts only other half-open flows, never an established one.
pub const HALF_OPEN_TABLE_SIZE: u32 = 32_768;
/// SNAT addresses per family (a power of two: indexes are masked): the node's own
/// and those of VIPs that are their own flows' source. A new flow takes its
/// address by its hash from its VIP's run of the pool (`VipInfo::snat_first`),
/// and a port of the range at that address.
pub const SNAT_POOL_MAX: usize = 8;
/// Interfaces the datapath can redirect to.
pub const MAX_TX_PORTS: u32 = 64;

/// A Maglev slot that holds this backend id is empty: new flows on it are dropped.
pub const BACKEND_NONE: u32 = 0;
/// How many steps a new flow follows `Backend::fallback_id` from a backend that is
/// out of rotation before it gives up and takes the ring's choice.
pub const FALLBACK_HOPS: u32 = 16;

// ---- Flag bits. ----
/// `VipInfo::flags`: this node owns the VIP and balances its traffic.
pub const VIP_F_OWNED: u32 = 1;
/// `VipInfo::flags`: the node's own processes connecting to this address are
/// balanced in their `connect()` (node-local mode), owned or not. An extra local
/// address (`127.0.0.1:6443`) is a `VIPS` entry with only this flag, sharing its
/// VIP's id and ring.
pub const VIP_F_LOCAL: u32 = 2;
/// `VipInfo::flags`: the VIP's flows are exported to the flow-sync peers: a new
/// flow takes `ct::FLOW_F_SYNC`, and its establishment and end go to
/// `SYNC_EVENTS`.
pub const VIP_F_SYNC: u32 = 4;
/// `Backend::flags`: the backend is this node; deliver the packet untouched to the
/// local stack, which holds the VIP (topology 2, masters running apilb).
pub const BACKEND_F_LOCAL: u32 = 1;
/// `Backend::flags`: out of rotation (down, not ready, or drained). The controller
/// sets it before it rewrites the rings without the backend, so a new flow whose
/// slot still names it follows `fallback_id` to one in rotation instead.
pub const BACKEND_F_DOWN: u32 = 2;
/// `FlowState::flags`: the backend refused the flow's SYN (a RST or an ICMP unreachable; passive
/// detection): its NAT port is released, and the client's SYN retransmit is
/// balanced as a new flow, away from that backend.
pub const FLOW_F_REFUSED: u32 = 4;

/// `DatapathConfig::flags`: passive failure detection. A backend's RST or ICMP
/// unreachable answering a SYN it never accepted is dropped and counted, and the
/// half-open flow marked refused; the client's SYN retransmit, on a refused flow
/// or one left unanswered, is balanced as a new flow away from that backend.
pub const CONFIG_F_PASSIVE: u32 = 1;

/// Key of the `VIPS` hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of the `VIPS` hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index of this VIP's ring in `MAGLEV` and of its row in `VIP_STATS`.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// M for this VIP: a prime no larger than [`MAGLEV_SIZE_MAX`].
    pub ring_size: u32,
    /// The run of the SNAT pool of the VIP's family its new flows take their
    /// source address from: `snat_count` addresses from index `snat_first`. No
    /// address (`snat_count` 0): new flows are dropped (`DROP_NO_SNAT_ADDR`).
    pub snat_first: u8,
    pub snat_count: u8,
    pub _pad: u16,
}

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// The next backend of this family in a fixed order (by address and port, the
    /// same on every node), wrapping around: where a new flow goes when this one
    /// is marked `BACKEND_F_DOWN`. [`BACKEND_NONE`] if it is the only one.
    pub fallback_id: u32,
    pub _pad2: u32,
}

/// Value of the single-entry `CONFIG` array: node-wide NAT settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Source addresses for IPv6 flows under NAT; the first `snat_v6_count` count.
    pub snat_v6_be: [[u32; 4]; SNAT_POOL_MAX],
    /// Source addresses for IPv4 flows under NAT; the first `snat_v4_count` count.
    pub snat_v4_be: [u32; SNAT_POOL_MAX],
    /// How many of `snat_v4_be` are set (0: no IPv4 VIP can be served).
    pub snat_v4_count: u8,
    /// How many of `snat_v6_be` are set (0: no IPv6 VIP can be served).
    pub snat_v6_count: u8,
    pub _pad: u16,
    /// Inclusive range of source ports the datapath allocates at each SNAT address,
    /// in host order.
    pub port_min_host: u16,
    pub port_max_host: u16,
    /// How long a flow trusts its cached next hop before asking the FIB again; it
    /// bounds how long a flow keeps using a neighbour's old MAC or an old route.
    /// 0 asks the FIB for every packet.
    pub nexthop_ttl_ns: u64,
    /// By TCP state (`ct::CT_*`): how long after its last packet a flow holds its
    /// NAT port (see `ct::reusable`).
    pub timeouts_ms: [u32; ct::CT_STATES],
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// Passive failures in a row (no SYN-ACK from the backend in between) that make
    /// the datapath tell the controller; at least 1.
    pub passive_threshold: u32,
    /// Node-local mode balances only sockets of this network namespace (the node's,
    /// where apilb runs); 0 balances none.
    pub netns_cookie: u64,
    /// Inclusive range of ports, within `port_min_host..=port_max_host`, from which
    /// this node claims ports for new flows (its slice, `datapath.nat_slice`), in
    /// host order. Replies are recognised on the whole range: a node that takes a
    /// VIP over must translate the flows another node opened on its slice.
    pub claim_min_host: u16,
    pub claim_max_host: u16,
    /// The family of this node's flow-sync listener (`AF_INET`, `AF_INET6`), or 0
    /// without `[sync]`. While the kernel has no listener there (the controller is
    /// gone), new flows of VIPs that sync are refused (`DROP_SYNC_DOWN`).
    pub sync_family: u8,
    pub _pad2: [u8; 3],
    /// The listener as a `bpf_sock_tuple` for `bpf_sk_lookup_tcp`, words in network
    /// order: source address (0), destination address (the listener's), then the
    /// source port (0) and the listener's port in the last word. IPv4 uses the
    /// first three words.
    pub sync_tuple_be: [u32; 9],
    pub _pad3: u32,
    /// The interfaces whose packets may carry partial checksums (`lb-ebpf`'s
    /// `offload`), with how the program runs there; unused slots are all zero.
    /// Any other interface (a NIC in native mode) skips the check entirely.
    pub ifaces: [IfaceMode; IFACES_MAX],
}

/// How many interfaces [`DatapathConfig::ifaces`] describes at most.
pub const IFACES_MAX: usize = 8;

/// One interface the XDP program runs on, as the loader found it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceMode {
    pub ifindex: u32,
    /// `IFACE_F_*` bits.
    pub flags: u32,
}

/// Its packets may carry partial checksums: a veth or a tun device, whose peer
/// or writer may leave the checksum to an offload, or any interface in generic
/// mode, whose socket buffers may come from one.
pub const IFACE_F_PARTIAL: u32 = 1;
/// The program runs there in generic (skb) mode: the kernel keeps each packet's
/// socket buffer, and its checksum state, whatever the verdict.
pub const IFACE_F_SKB: u32 = 2;

/// Key of both LRU flow tables.
///
/// In `FLOWS` it is the client's packet as received: client -> VIP.
/// In `REPLIES` it is the backend's reply as received: backend -> SNAT address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_be: [u32; 4],
    pub dst_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u16,
}

/// Default of `DatapathConfig::nexthop_ttl_ns`.
pub const NEXTHOP_TTL_DEFAULT_NS: u64 = 1_000_000_000;
/// A half-open NAT lease claimed this recently is not taken as orphaned when its
/// flow entry is missing: it covers the gap between claiming a port and recording
/// its flow.
pub const PORT_CLAIM_GRACE_NS: u64 = 1_000_000_000;

/// Ports a new flow tries, from its master's port cursor, before it is dropped
/// for want of one (`DROP_NO_NAT_PORT`).
pub const PORT_TRIES: u32 = 8;

/// How far past the cursor try `i` (below [`PORT_TRIES`]) looks: the next four
/// ports, then 16, 64, 256 and 1,024 on. Long-lived flows hold runs of
/// consecutive ports (watches opened together, when the LB or its clients
/// start), which the cursor meets again on every lap; eight tries in a row
/// would fail on a run of eight and drop a SYN each lap, a run of thousands
/// hundreds. The far tries jump such a run, and the cursor follows the port
/// taken, so the run costs one claim a lap, not a SYN.
#[inline(always)]
#[must_use]
pub const fn port_try_offset(i: u32) -> u32 {
    if i < 4 { i } else { 1 << (2 * i - 4) }
}
/// A flow's `last_seen_ns` is rewritten at most this often, to keep per-packet
/// writes to shared flow entries rare.
pub const FLOW_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// A FIB answer cached in a flow entry, so that established packets skip the
/// ~200 ns `bpf_fib_lookup`. `ifindex == 0` means nothing is cached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The largest IP datagram the FIB accepted on this path (its MTU check); a
    /// larger packet asks the FIB again.
    pub max_len_host: u16,
    pub _pad: [u8; 6],
    /// `bpf_ktime_get_coarse_ns` when the FIB gave this answer.
    pub checked_ns: u64,
}

/// Value of `FLOWS` and `HALF_FLOWS`: everything the established path needs to
/// rewrite and forward a packet, so that it costs one lookup and a flow keeps its
/// backend whatever Maglev says later; and the flow's TCP state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub backend_be: [u32; 4],
    pub backend_port_be: u16,
    /// The source port the datapath allocated for this flow; 0 for a flow to a local
    /// backend, which is delivered without NAT.
    pub nat_port_be: u16,
    pub backend_id: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// TCP state, a `ct::CT_*`.
    pub state: u8,
    /// Index of the flow's SNAT address in its family's pool.
    pub snat_index: u8,
    /// 1 once the client's FIN was seen (`ct::fin_proven`); written by the client
    /// direction only, so that no race with the backend's loses it (`ct::settled`).
    pub client_fin: u8,
    /// 1 once the backend's FIN was seen; written by the backend direction only.
    pub backend_fin: u8,
    /// Added to the client's TSvals, taken from the backend's TSecrs (`FLOW_F_TS`).
    pub ts_off: u32,
    /// The last TSval the client's FIN carried, as the backend saw it: the floor
    /// for the next flow on this port (`ct::ts_offset`).
    pub fin_tsval: u32,
    /// Coarse time of the flow's last packet, to `FLOW_SEEN_GRANULARITY_NS`.
    pub last_seen_ns: u64,
    /// The client's sequence number, host order, as last recorded: its SYN's
    /// (the ISN) while the backend has not answered, then refreshed with
    /// `last_seen_ns`. A RST from the client must be near it (`ct::near`), and a
    /// refusal of the SYN must match it.
    pub seq: u32,
    /// The client's acknowledgement number, host order, recorded with `seq`: where
    /// the backend's own RST must be (`ct::near`).
    pub ack: u32,
    pub next_hop: NextHop,
}

/// Value of `REPLIES` and `HALF_REPLIES`: how to turn a backend's reply back into
/// the VIP's. The entry is also the lease on its NAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyState {
    pub client_be: [u32; 4],
    pub vip_be: [u32; 4],
    pub client_port_be: u16,
    pub vip_port_be: u16,
    pub backend_id: u32,
    /// Coarse time the NAT port was claimed (see `PORT_CLAIM_GRACE_NS`).
    pub claimed_ns: u64,
    /// The flow's `FlowState::ts_off`, taken from the backend's TSecrs.
    pub ts_off: u32,
    /// `REPLY_F_*` bits.
    pub flags: u32,
    pub next_hop: NextHop,
}

/// `ReplyState::flags`: the client's SYN carried timestamps; the backend's TSecrs
/// are shifted back by `ts_off`.
pub const REPLY_F_TS: u32 = 1;
/// `ReplyState::flags`: the backend sent a FIN, so its plain ACKs can move the
/// flow's state too (the last ACK of a master-first close) and are tracked.
pub const REPLY_F_TRACK: u32 = 2;
/// `ReplyState::flags`: the flow's VIP syncs (`VIP_F_SYNC`); the backend's SYN-ACK
/// passes only while this node's controller is alive (`DROP_SYNC_DOWN`).
pub const REPLY_F_SYNC: u32 = 4;

/// One row of `PASSIVE_STATS` (per backend id), per CPU: the backend's failures the
/// datapath saw on the wire, by kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveStats {
    /// RSTs answering a SYN the backend never accepted.
    pub rst: u64,
    /// Flows whose SYN the backend never answered before the client sent it again.
    pub silent: u64,
    /// ICMP destination unreachable (not "fragmentation needed") for a SYN.
    pub icmp: u64,
}

/// One row of `PASSIVE_STATE` (per backend id), shared by all CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveState {
    /// When the last `PassiveEvent` for this backend was sent.
    pub last_event_ns: u64,
    /// Passive failures since the backend last answered a SYN.
    pub in_a_row: u32,
    pub _pad: u32,
}

/// Size of the `PASSIVE_EVENTS` ring buffer (a power of two of pages).
pub const PASSIVE_EVENTS_BYTES: u32 = 64 * 1024;
/// Bytes of the `SYNC_EVENTS` ring buffer: at 10,000 new flows a second, two
/// events of 104 bytes (with the ring's header) each, half a second of slack for
/// a reader that stalls.
pub const SYNC_EVENTS_BYTES: u32 = 1 << 20;

/// `SyncEvent::kind`: the flow was promoted to the established table.
pub const SYNC_EV_ESTABLISHED: u8 = 1;
/// `SyncEvent::kind`: the flow reached `TIME_WAIT` or `CLOSE`.
pub const SYNC_EV_CLOSED: u8 = 2;

/// A record of `SYNC_EVENTS`: a synced flow's life moved on (`SYNC_EV_*`); the
/// controller sends it to its flow-sync peers. Written in place in the ring, never
/// built on the BPF stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncEvent {
    pub kind: u8,
    /// The flow's `ct::CT_*` state.
    pub state: u8,
    /// Index of its source address in this node's SNAT pool of its family.
    pub snat_index: u8,
    pub _pad0: u8,
    /// `FlowState::flags`.
    pub flags: u32,
    /// Client to VIP, as the client's packets arrive.
    pub key: FlowKey,
    pub backend_be: [u32; 4],
    pub backend_port_be: u16,
    pub nat_port_be: u16,
    pub ts_off: u32,
    pub fin_tsval: u32,
    pub seq: u32,
    pub ack: u32,
    pub _pad1: u32,
    /// Coarse monotonic time of the event.
    pub at_ns: u64,
}
/// At most one `PassiveEvent` per backend this often: the controller reads the
/// exact counts from `PASSIVE_STATS`, so a storm wakes it, not floods it.
pub const PASSIVE_EVENT_GAP_NS: u64 = 10_000_000;
/// `PassiveEvent::kind`: a RST to a SYN the backend never answered.
pub const PASSIVE_KIND_RST: u32 = 0;
/// `PassiveEvent::kind`: no answer to a SYN before the client sent it again.
pub const PASSIVE_KIND_SILENT: u32 = 1;
/// `PassiveEvent::kind`: an ICMP destination unreachable about a SYN.
pub const PASSIVE_KIND_ICMP: u32 = 2;
/// A SYN on a flow its backend has not answered for this long is the client's
/// retransmit (Linux waits 1 s): the backend is silent, and the flow is balanced
/// afresh.
pub const PASSIVE_SILENT_NS: u64 = 500_000_000;

/// A record of `PASSIVE_EVENTS`: a backend just failed on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveEvent {
    pub backend_id: u32,
    /// `PASSIVE_KIND_*`.
    pub kind: u32,
    /// Coarse monotonic time of the failure.
    pub at_ns: u64,
}

/// Value of `SOCK_ORIG`, keyed by socket cookie: the address a node-local socket
/// asked to connect to, which `getpeername()` reports instead of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
}

/// One row of `VIP_STATS` (per VIP id) and `BACKEND_STATS` (per backend id), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

const _: () = {
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<VipInfo>() == 16);
    assert!(size_of::<Backend>() == 32);
    assert!(size_of::<DatapathConfig>() == 336);
    assert!(size_of::<IfaceMode>() == 8);
    assert!(size_of::<SyncEvent>() == 96);
    assert!(size_of::<SockOrig>() == 20);
    assert!(size_of::<PassiveStats>() == 24);
    assert!(size_of::<PassiveState>() == 16);
    assert!(size_of::<PassiveEvent>() == 16);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<NextHop>() == 32);
    assert!(size_of::<FlowState>() == 88);
    assert!(size_of::<ReplyState>() == 88);
    assert!(size_of::<TrafficStats>() == 24);
    assert!(MAGLEV_SIZE_DEFAULT <= MAGLEV_SIZE_MAX);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `repr(C)`, made only of integers, with every padding byte
    // an explicit field (the size asserts above prove there is no hidden padding), so
    // every bit pattern is valid and the kernel may read or write any of them.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DatapathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReplyState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PassiveStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PassiveEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PassiveState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockOrig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SyncEvent {}

    impl super::SyncEvent {
        /// The event a `SYNC_EVENTS` record holds, if the record is whole.
        #[must_use]
        pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
            (bytes.len() >= size_of::<Self>()).then(|| {
                // SAFETY: at least `size_of::<Self>()` bytes, read unaligned, and
                // every bit pattern is a valid `SyncEvent` (see above).
                unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) }
            })
        }
    }
}
