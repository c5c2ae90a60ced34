//! Flow state for NAT mode: picking a backend for a new flow and claiming a source
//! port for it.
//!
//! A new flow gets two entries: `FLOWS` (client -> VIP, so later packets keep their
//! backend whatever Maglev says) and `REPLIES` (backend -> SNAT address:port, to undo
//! the NAT on the way back). The reply entry is inserted with `BPF_NOEXIST`, which is
//! what makes a source port ours atomically, even against other CPUs.

use aya_ebpf::bindings::{BPF_ANY, BPF_EXIST, BPF_NOEXIST};
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_NONE, DatapathConfig, FlowKey, FlowState, MAGLEV_SIZE_MAX, NextHop,
    ReplyState, VipInfo, counters::*, flow_hash,
};

use crate::maps::{BACKENDS, FLOWS, MAGLEV, PORT_CURSOR, REPLIES};

/// Source ports tried before a new flow is dropped as `DROP_NO_NAT_PORT`.
const PORT_TRIES: u32 = 8;

/// Choose a backend for a new flow through the VIP's Maglev ring and claim a source
/// port (recording the reply entry). The caller records the flow itself with
/// [`save_flow`] once forwarding has filled in its next hop. `Err` is the drop counter.
#[inline(always)]
pub fn new_flow(
    key: &FlowKey,
    vip: &VipInfo,
    snat: &[u32; 4],
    cfg: &DatapathConfig,
) -> Result<FlowState, u32> {
    if vip.ring_size == 0 || vip.ring_size > MAGLEV_SIZE_MAX {
        return Err(DROP_NO_BACKEND);
    }
    let slot = vip.vip_id * MAGLEV_SIZE_MAX + flow_hash(key) % vip.ring_size;
    let backend_id = *MAGLEV.get(slot).ok_or(DROP_NO_BACKEND)?;
    if backend_id == BACKEND_NONE {
        return Err(DROP_NO_BACKEND);
    }
    let backend = BACKENDS.get(backend_id).ok_or(DROP_NO_BACKEND)?;
    let mut flow = FlowState {
        backend_be: backend.addr_be,
        backend_port_be: backend.port_be,
        nat_port_be: 0,
        backend_id,
        next_hop: NextHop::default(),
    };
    if backend.flags & BACKEND_F_LOCAL == 0 {
        if *snat == [0; 4] {
            return Err(DROP_NO_SNAT_ADDR);
        }
        let reply = ReplyState {
            client_be: key.src_be,
            vip_be: key.dst_be,
            client_port_be: key.sport_be,
            vip_port_be: key.dport_be,
            backend_id,
            next_hop: NextHop::default(),
        };
        flow.nat_port_be = claim_port(key, &flow, snat, cfg, &reply)?;
    }
    Ok(flow)
}

/// Record a new flow, or persist a refreshed next hop of an existing one. A refresh
/// never re-creates an entry that was removed meanwhile (`BPF_EXIST`): the removal
/// (e.g. the controller dropping a dead backend's flows) wins.
#[inline(always)]
pub fn save_flow(
    key: &FlowKey,
    flow: &FlowState,
    snat: &[u32; 4],
    is_new: bool,
) -> Result<(), u32> {
    let flags = if is_new { BPF_ANY } else { BPF_EXIST };
    if FLOWS.insert(key, flow, u64::from(flags)).is_ok() || !is_new {
        return Ok(());
    }
    if flow.nat_port_be != 0 {
        let _ = REPLIES.remove(reply_key(key, flow, snat));
    }
    Err(DROP_FLOW_INSERT)
}

/// The `REPLIES` key under which the backend's answers to `flow` arrive.
#[inline(always)]
fn reply_key(key: &FlowKey, flow: &FlowState, snat: &[u32; 4]) -> FlowKey {
    FlowKey {
        src_be: flow.backend_be,
        dst_be: *snat,
        sport_be: flow.backend_port_be,
        dport_be: flow.nat_port_be,
        proto: key.proto,
        family: key.family,
        _pad: 0,
    }
}

/// Claim a free source port towards this backend by inserting the reply entry.
///
/// A port whose reply entry outlived its forward flow (LRU evicted the flow, or the
/// client went away) is stale and is reclaimed, so ports are never leaked.
#[inline(always)]
fn claim_port(
    key: &FlowKey,
    flow: &FlowState,
    snat: &[u32; 4],
    cfg: &DatapathConfig,
    reply: &ReplyState,
) -> Result<u16, u32> {
    let (min, max) = (u32::from(cfg.port_min), u32::from(cfg.port_max));
    if min == 0 || max < min {
        return Err(DROP_NO_NAT_PORT);
    }
    let range = max - min + 1;
    let cursor = PORT_CURSOR.get_ptr_mut(0).ok_or(DROP_NO_NAT_PORT)?;
    // SAFETY: per-CPU slot, only this CPU reads and writes it.
    let start = unsafe { *cursor };
    let mut probe = FlowState { ..*flow };
    for i in 0..PORT_TRIES {
        probe.nat_port_be = ((min + start.wrapping_add(i) % range) as u16).to_be();
        let rkey = reply_key(key, &probe, snat);
        let claimed = REPLIES.insert(rkey, reply, u64::from(BPF_NOEXIST)).is_ok()
            || (is_stale(&rkey) && REPLIES.insert(rkey, reply, u64::from(BPF_ANY)).is_ok());
        if claimed {
            // SAFETY: as above.
            unsafe { *cursor = start.wrapping_add(i + 1) };
            return Ok(probe.nat_port_be);
        }
    }
    // SAFETY: as above.
    unsafe { *cursor = start.wrapping_add(PORT_TRIES) };
    Err(DROP_NO_NAT_PORT)
}

/// A reply entry is stale when its forward flow no longer maps to it.
#[inline(always)]
fn is_stale(rkey: &FlowKey) -> bool {
    // SAFETY: the value is copied out at once; a concurrent update can at worst make
    // us misjudge one port, which the next insert attempt settles.
    let Some(old) = (unsafe { REPLIES.get(rkey) }).copied() else {
        return true;
    };
    let fkey = FlowKey {
        src_be: old.client_be,
        dst_be: old.vip_be,
        sport_be: old.client_port_be,
        dport_be: old.vip_port_be,
        proto: rkey.proto,
        family: rkey.family,
        _pad: 0,
    };
    // SAFETY: as above.
    match unsafe { FLOWS.get(&fkey) } {
        Some(f) => f.nat_port_be != rkey.dport_be || f.backend_be != rkey.src_be,
        None => true,
    }
}
