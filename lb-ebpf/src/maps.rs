//! The datapath's maps. Each static's identifier is its map name and must equal the
//! `MAP_*` constant in lb-common: the loader opens every map by that constant, so a
//! mismatch fails loudly at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    Backend, COUNTER_COUNT, DatapathConfig, FLOW_TABLE_SIZE, FlowKey, FlowState, MAGLEV_ENTRIES,
    MAX_BACKENDS, MAX_TX_PORTS, MAX_VIPS, PASSIVE_EVENT_GAP_NS, PASSIVE_EVENTS_BYTES,
    PASSIVE_KIND_ICMP, PASSIVE_KIND_RST, PassiveEvent, PassiveState, PassiveStats, ReplyState,
    SockOrig, TrafficStats, VipInfo, VipKey,
};

#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Backend ids, one ring of `MAGLEV_SIZE_MAX` slots per VIP id.
#[map]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_ENTRIES, 0);
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
#[map]
pub static REPLIES: LruHashMap<FlowKey, ReplyState> =
    LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
#[map]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
pub static VIP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
/// Per backend id: failures seen on the wire (passive detection).
#[map]
pub static PASSIVE_STATS: PerCpuArray<PassiveStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
/// Passive failures for the controller, at most one per backend per
/// `PASSIVE_EVENT_GAP_NS`.
#[map]
pub static PASSIVE_EVENTS: RingBuf = RingBuf::with_byte_size(PASSIVE_EVENTS_BYTES, 0);
/// Per backend id: failures in a row, and when its last `PassiveEvent` was sent.
#[map]
pub static PASSIVE_STATE: Array<PassiveState> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Per socket cookie: the address a node-local socket asked for (see `sock`).
#[map]
pub static SOCK_ORIG: LruHashMap<u64, SockOrig> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);
/// Per backend id: node-local connects sent to it.
#[map]
pub static LOCAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
/// Interfaces (by ifindex) that rewritten packets may be redirected to.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
/// Per-CPU cursor into the NAT source-port range; userspace staggers the start points.
#[map]
pub static PORT_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The new-flow path's large temporaries. They live in a per-CPU map because the
/// 512-byte BPF stack is shared by the whole call chain and the hot path needs most
/// of it. XDP runs to completion on one CPU, so one slot per CPU is enough.
pub struct Scratch {
    /// A new flow, filled in by `nat::new_flow` and recorded once forwarded.
    pub flow: FlowState,
    pub reply: ReplyState,
    pub reply_key: FlowKey,
    pub flow_key: FlowKey,
    /// The backend a new flow must not get (it just ignored the flow's SYN), or
    /// `BACKEND_NONE`: an argument of `nat::new_flow`, which has no room for it.
    pub avoid: u32,
    /// The FIB request of `forward::fib_next_hop`.
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

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

/// Count a backend's failure on the wire (`PASSIVE_KIND_*`). Once it has failed
/// `passive_threshold` times in a row, tell the controller, unless it was told
/// about this backend within `PASSIVE_EVENT_GAP_NS`.
#[inline(never)]
pub fn passive_failure(backend_id: u32, kind: u32, now: u64) {
    if let Some(s) = PASSIVE_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, only this CPU writes it (see `count`).
        let s = unsafe { &mut *s };
        if kind == PASSIVE_KIND_RST {
            s.rst += 1;
        } else if kind == PASSIVE_KIND_ICMP {
            s.icmp += 1;
        } else {
            s.silent += 1;
        }
    }
    let (Some(state), Some(cfg)) = (PASSIVE_STATE.get_ptr_mut(backend_id), CONFIG.get(0)) else {
        return;
    };
    // SAFETY: a valid array slot shared by CPUs. Racing updates can lose a count
    // or send one extra event; either only shifts the threshold by one.
    let state = unsafe { &mut *state };
    state.in_a_row = state.in_a_row.saturating_add(1);
    if state.in_a_row < cfg.passive_threshold
        || now.wrapping_sub(state.last_event_ns) < PASSIVE_EVENT_GAP_NS
    {
        return;
    }
    state.last_event_ns = now;
    let event = PassiveEvent {
        backend_id,
        kind,
        at_ns: now,
    };
    // A full ring loses the event; the count above is kept, and the next one
    // after the gap wakes the controller.
    let _ = PASSIVE_EVENTS.output::<PassiveEvent>(&event, 0);
}

/// The backend answered a SYN: its run of passive failures is over. Written only
/// when there is a run, so that answered SYNs do not all write a shared line.
#[inline(always)]
pub fn passive_answered(backend_id: u32) {
    if let Some(state) = PASSIVE_STATE.get_ptr_mut(backend_id) {
        // SAFETY: a valid array slot; a racing failure count may be lost (see
        // `passive_failure`).
        let state = unsafe { &mut *state };
        if state.in_a_row != 0 {
            state.in_a_row = 0;
        }
    }
}
