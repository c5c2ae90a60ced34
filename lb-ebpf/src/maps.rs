//! The datapath's maps, and the helpers that bump its counters.
//!
//! Each static is built from its spec in `lb_common::maps` (kind, sizes, entries),
//! and its identifier is the spec's name: the loader opens every map by that name,
//! so a mismatch fails loudly at load time.
#![cfg(target_arch = "bpf")]

use aya_ebpf::{
    bindings::bpf_devmap_val,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, DatapathConfig, FlowKey, FlowState, PassiveState, PassiveStats, ReplyState, SockOrig,
    TrafficStats, VipInfo, VipKey,
    maps::{self as specs, MapSpec, MapType},
};

#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = hash(&specs::VIPS);
#[map]
pub static BACKENDS: Array<Backend> = array(&specs::BACKENDS);
/// Backend ids, one ring of `MAGLEV_SIZE_MAX` slots per VIP id.
#[map]
pub static MAGLEV: Array<u32> = array(&specs::MAGLEV);
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = lru_hash(&specs::FLOWS);
#[map]
pub static REPLIES: LruHashMap<FlowKey, ReplyState> = lru_hash(&specs::REPLIES);
/// `FLOWS` and `REPLIES` for flows whose handshake is not complete (see `flow`).
#[map]
pub static HALF_FLOWS: LruHashMap<FlowKey, FlowState> = lru_hash(&specs::HALF_FLOWS);
#[map]
pub static HALF_REPLIES: LruHashMap<FlowKey, ReplyState> = lru_hash(&specs::HALF_REPLIES);
#[map]
pub static CONFIG: Array<DatapathConfig> = array(&specs::CONFIG);
#[map]
pub static COUNTERS: PerCpuArray<u64> = per_cpu_array(&specs::COUNTERS);
#[map]
pub static VIP_STATS: PerCpuArray<TrafficStats> = per_cpu_array(&specs::VIP_STATS);
#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = per_cpu_array(&specs::BACKEND_STATS);
/// Per backend id: failures seen on the wire (passive detection).
#[map]
pub static PASSIVE_STATS: PerCpuArray<PassiveStats> = per_cpu_array(&specs::PASSIVE_STATS);
/// Passive failures for the controller, at most one per backend per
/// `PASSIVE_EVENT_GAP_NS`.
#[map]
pub static PASSIVE_EVENTS: RingBuf = ring_buf(&specs::PASSIVE_EVENTS);
/// Synced flows' establishment and end, for the controller's peers (see `sync`).
#[map]
pub static SYNC_EVENTS: RingBuf = ring_buf(&specs::SYNC_EVENTS);
/// Per backend id: failures in a row, and when its last `PassiveEvent` was sent.
#[map]
pub static PASSIVE_STATE: Array<PassiveState> = array(&specs::PASSIVE_STATE);
/// Per socket cookie: the address a node-local socket asked for (see `sock`).
#[map]
pub static SOCK_ORIG: LruHashMap<u64, SockOrig> = lru_hash(&specs::SOCK_ORIG);
/// Per backend id: node-local connects sent to it.
#[map]
pub static LOCAL_STATS: PerCpuArray<u64> = per_cpu_array(&specs::LOCAL_STATS);
/// Interfaces (by ifindex) that rewritten packets may be redirected to.
#[map]
pub static TX_PORTS: DevMapHash = dev_map_hash(&specs::TX_PORTS);
/// Per backend id: the cursor into the NAT source-port range (`ports::claim_port`).
#[map]
pub static PORT_CURSOR: Array<u32> = array(&specs::PORT_CURSOR);

/// The new-flow path's large temporaries. They live in a per-CPU map because the
/// 512-byte BPF stack is shared by the whole call chain and the hot path needs most
/// of it. XDP runs to completion on one CPU, so one slot per CPU is enough.
pub struct Scratch {
    /// A new flow, filled in by `flow::new_flow` and recorded once forwarded.
    pub flow: FlowState,
    pub reply: ReplyState,
    pub reply_key: FlowKey,
    pub flow_key: FlowKey,
    /// The backend a new flow must not get (it just ignored the flow's SYN), or
    /// `BACKEND_NONE`: an argument of `flow::new_flow`, which has no room for it.
    pub avoid: u32,
    /// A new flow's SYN carried timestamps (1) or not (0), and its TSval (host
    /// order): for `ports::claim_port`, which reuses ports by them.
    pub syn_ts: u32,
    pub syn_tsval: u32,
    /// A new flow's SYN's sequence number (host order), its `FlowState::seq`.
    pub syn_seq: u32,
    /// The TSval floor a reclaimed port's previous flow leaves (`ct::ts_offset`).
    pub ts_floor: u32,
    /// The FIB request of `forward::fib_next_hop`.
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
    /// This packet's partial checksum was finished (1) or not (0), and its
    /// interface's `IFACE_F_*`, for `offload::restore` after the verdict. Kept
    /// here rather than in registers, where the verifier would walk every path
    /// of the program once for each value.
    pub partial: u32,
    pub iface: u32,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = per_cpu_array(&specs::SCRATCH);

// Each map is built from its spec in `lb_common::maps`, by the constructor of its
// kind, which checks at compile time that the spec's type and sizes are those of the
// static's key and value types: a static and its spec cannot disagree.

/// Whether a map of `map_type` with key `K` and value `V` is what `spec` says.
/// A spec without a value size (`SCRATCH`) leaves the value unchecked.
const fn fits<K, V>(spec: &MapSpec, map_type: MapType) -> bool {
    spec.map_type as u32 == map_type as u32
        && spec.key_size as usize == size_of::<K>()
        && match spec.value_size {
            Some(v) => v as usize == size_of::<V>(),
            None => true,
        }
}

const fn hash<K, V>(spec: &MapSpec) -> HashMap<K, V> {
    assert!(fits::<K, V>(spec, MapType::Hash));
    HashMap::with_max_entries(spec.max_entries, 0)
}

const fn lru_hash<K, V>(spec: &MapSpec) -> LruHashMap<K, V> {
    assert!(fits::<K, V>(spec, MapType::LruHash));
    LruHashMap::with_max_entries(spec.max_entries, 0)
}

const fn array<V>(spec: &MapSpec) -> Array<V> {
    assert!(fits::<u32, V>(spec, MapType::Array));
    Array::with_max_entries(spec.max_entries, 0)
}

const fn per_cpu_array<V>(spec: &MapSpec) -> PerCpuArray<V> {
    assert!(fits::<u32, V>(spec, MapType::PerCpuArray));
    PerCpuArray::with_max_entries(spec.max_entries, 0)
}

const fn dev_map_hash(spec: &MapSpec) -> DevMapHash {
    assert!(fits::<u32, bpf_devmap_val>(spec, MapType::DevMapHash));
    DevMapHash::with_max_entries(spec.max_entries, 0)
}

/// A ring buffer's key and value are empty; its entry count is its size in bytes.
const fn ring_buf(spec: &MapSpec) -> RingBuf {
    assert!(fits::<(), ()>(spec, MapType::RingBuf));
    RingBuf::with_byte_size(spec.max_entries, 0)
}

/// Add one to a counter from `lb_common::counters`.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot is only touched by this CPU, and XDP programs
        // are not preempted, so nothing else writes it while we do.
        unsafe { *c += 1 };
    }
}

/// Account a packet (and optionally a new flow) to a VIP or backend stats row.
#[inline(always)]
pub fn account(map: &PerCpuArray<TrafficStats>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(s) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it (see `count`).
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += bytes;
        s.new_flows += u64::from(new_flow);
    }
}
