//! A flow's life under NAT: recorded when its SYN is balanced, marked as TCP goes
//! (answered, closing), its reply entry kept in step, until its port is reclaimed.
//!
//! A new flow gets two entries: `FLOWS` (client -> VIP, so later packets keep their
//! backend whatever Maglev says) and `REPLIES` (backend -> SNAT address:port, to undo
//! the NAT on the way back; also the NAT port's lease, see `ports`). The two LRU
//! tables evict independently, so a live flow puts its reply entry back when it
//! finds it gone. A client's FIN, RST or fresh SYN marks its flow in `ingress`; the
//! backend's SYN-ACK, FIN or RST marks it through [`set_flow_flags`], in `reply`.
#![cfg(target_arch = "bpf")]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    BACKEND_F_LOCAL, FLOW_F_ANSWERED, FlowKey, FlowState, NextHop, ReplyState, VipInfo,
    counters::{DROP_FLOW_INSERT, DROP_NO_SNAT_ADDR},
    flow_hash,
};

use crate::{
    maps::{CONFIG, FLOWS, REPLIES, SCRATCH, Scratch},
    ports::{claim_port, snat_addr},
    select::pick,
};

/// The coarse monotonic clock: jiffy resolution, a fraction of the fine clock's
/// cost, which is all flow ageing and next-hop expiry need.
#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: a helper without arguments or preconditions (Linux 5.11+).
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Choose a backend for a new flow through the VIP's Maglev ring (and the fallback
/// order, past one out of rotation or `s.avoid`) and claim a source port (recording
/// the reply entry), filling in `s.flow`. The caller records the flow itself with
/// [`save_flow`] once forwarding has filled in its next hop. `Err` is the drop
/// counter.
///
/// Not inlined: this is the cold path, and as a BPF-to-BPF call its stack frame does
/// not add to the hot path's. BPF calls take at most five arguments (the result
/// is one), hence the config read here and the backend to avoid in the scratch.
#[inline(never)]
pub fn new_flow(key: &FlowKey, vip: &VipInfo, now: u64, s: &mut Scratch) -> Result<(), u32> {
    let cfg = CONFIG.get(0).ok_or(DROP_NO_SNAT_ADDR)?;
    let snat = snat_addr(cfg, key.family);
    let (backend_id, backend) = pick(vip, flow_hash(key), key.family, s.avoid)?;
    s.flow = FlowState {
        backend_be: backend.addr_be,
        backend_port_be: backend.port_be,
        nat_port_be: 0,
        backend_id,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
        next_hop: NextHop::default(),
    };
    if backend.flags & BACKEND_F_LOCAL == 0 {
        if snat == [0; 4] {
            return Err(DROP_NO_SNAT_ADDR);
        }
        s.flow.nat_port_be = claim_port(key, &snat, cfg, now, s)?;
    }
    Ok(())
}

/// Record a new flow; on failure, release its NAT port.
#[inline(always)]
pub fn save_flow(key: &FlowKey, flow: &FlowState) -> Result<(), u32> {
    if FLOWS.insert(key, flow, u64::from(BPF_ANY)).is_ok() {
        return Ok(());
    }
    if flow.nat_port_be != 0
        && let Some(cfg) = CONFIG.get(0)
    {
        let _ = REPLIES.remove(reply_key(key, flow, &snat_addr(cfg, key.family)));
    }
    Err(DROP_FLOW_INSERT)
}

/// Put back a live flow's reply entry if the LRU evicted it (the two tables evict
/// independently). Called when the flow refreshes its next hop, so a lost entry is
/// restored within one next-hop TTL. A call, not inlined, building its entry in the
/// scratch slot's reply fields (which `new_flow` is done with by now): it runs once
/// per TTL, and the entry would otherwise sit on the hot path's stack.
#[inline(never)]
pub fn restore_reply(key: &FlowKey, flow: &FlowState, now: u64) {
    let (Some(cfg), Some(scratch)) = (CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: this CPU's scratch slot. Only its reply fields are written, through
    // the raw pointer: `flow` may point at the slot's `flow` field, which must not
    // be covered by a `&mut` to the whole slot.
    unsafe {
        (*scratch).reply_key = reply_key(key, flow, &snat_addr(cfg, key.family));
        (*scratch).reply = reply_state(key, flow.backend_id, now);
        let _ = REPLIES.insert(
            &(*scratch).reply_key,
            &(*scratch).reply,
            u64::from(BPF_NOEXIST),
        );
    }
}

/// The `FLOWS` key of the flow a reply entry belongs to.
#[inline(always)]
pub fn flow_key_of(reply: &ReplyState, rkey: &FlowKey) -> FlowKey {
    FlowKey {
        src_be: reply.client_be,
        dst_be: reply.vip_be,
        sport_be: reply.client_port_be,
        dport_be: reply.vip_port_be,
        proto: rkey.proto,
        family: rkey.family,
        _pad: 0,
    }
}

/// Set `bits` (`FLOW_F_*`) on the flow a reply entry belongs to, and return its
/// flags after: a SYN-ACK marks it answered, a FIN or RST closing. A call, not
/// inlined: only those segments need it, and the flow key would otherwise sit on
/// the reply path's stack. A flow that is gone (evicted) reads as answered:
/// there is nothing left to re-steer.
#[inline(never)]
pub fn set_flow_flags(reply: &ReplyState, rkey: &FlowKey, bits: u32) -> u32 {
    let Some(f) = FLOWS.get_ptr_mut(flow_key_of(reply, rkey)) else {
        return bits | FLOW_F_ANSWERED;
    };
    // SAFETY: a valid entry pointer from the map; setting flag bits races only with
    // identical writes or with a whole-entry replacement, either harmless.
    let f = unsafe { &mut *f };
    f.flags |= bits;
    f.flags
}

/// The `REPLIES` key under which the backend's answers to `flow` arrive.
#[inline(always)]
pub fn reply_key(key: &FlowKey, flow: &FlowState, snat: &[u32; 4]) -> FlowKey {
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

#[inline(always)]
fn reply_state(key: &FlowKey, backend_id: u32, now: u64) -> ReplyState {
    ReplyState {
        client_be: key.src_be,
        vip_be: key.dst_be,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        backend_id,
        claimed_ns: now,
        next_hop: NextHop::default(),
    }
}
