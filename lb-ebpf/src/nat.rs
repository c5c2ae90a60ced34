//! Flow state for NAT mode: picking a backend for a new flow, claiming a source port
//! for it, and letting ports go once their flows are over.
//!
//! A new flow gets two entries: `FLOWS` (client -> VIP, so later packets keep their
//! backend whatever Maglev says) and `REPLIES` (backend -> SNAT address:port, to undo
//! the NAT on the way back). The reply entry is the port's lease: it is inserted with
//! `BPF_NOEXIST`, which makes the port ours atomically, even against other CPUs.
//!
//! A lease is taken over only when its flow is over: the flow entry is gone, or it
//! saw a FIN or RST and `flow_close_grace_ns` has passed since its last packet, or it
//! has been idle for `flow_idle_timeout_ns`; and never within `PORT_CLAIM_GRACE_NS`
//! of the claim, while the claimer is still recording its flow. The old flow entry
//! is removed at takeover, so a late packet of it cannot reach the new flow.
//!
//! A new flow whose Maglev slot names a backend out of rotation (`BACKEND_F_DOWN`:
//! the controller marks it before rewriting the rings) follows the backends'
//! fallback order to the next one in rotation. Every node has the same order, so
//! all LB nodes still agree on where a flow goes.

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    AF_INET, BACKEND_F_DOWN, BACKEND_F_LOCAL, BACKEND_NONE, Backend, CONFIG_F_PASSIVE,
    DatapathConfig, FALLBACK_HOPS, FLOW_F_ANSWERED, FLOW_F_CLOSING, FLOW_F_REFUSED, FlowKey,
    FlowState, MAGLEV_SIZE_MAX, NextHop, PASSIVE_KIND_SILENT, PASSIVE_SILENT_NS,
    PORT_CLAIM_GRACE_NS, ReplyState, VipInfo, counters::*, flow_hash,
};

use crate::maps::{
    BACKENDS, CONFIG, FLOWS, MAGLEV, PORT_CURSOR, REPLIES, SCRATCH, Scratch, count, passive_failure,
};

/// Source ports tried before a new flow is dropped as `DROP_NO_NAT_PORT`.
const PORT_TRIES: u32 = 8;

/// The node's SNAT address for a family (all zero when none is configured).
#[inline(always)]
pub fn snat_addr(cfg: &DatapathConfig, family: u8) -> [u32; 4] {
    if family == AF_INET {
        [cfg.snat_v4_be, 0, 0, 0]
    } else {
        cfg.snat_v6_be
    }
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

/// The backend for a new connection to `vip` whose hash is `hash`: its Maglev
/// slot's, or, if that one is out of rotation or `avoid`, the next one in rotation
/// along the fallback order. `Err` is the drop counter.
#[inline(always)]
pub fn pick(
    vip: &VipInfo,
    hash: u32,
    family: u8,
    avoid: u32,
) -> Result<(u32, &'static Backend), u32> {
    if vip.ring_size == 0 || vip.ring_size > MAGLEV_SIZE_MAX {
        return Err(DROP_NO_BACKEND);
    }
    let slot = vip.vip_id * MAGLEV_SIZE_MAX + hash % vip.ring_size;
    let mut backend_id = *MAGLEV.get(slot).ok_or(DROP_NO_BACKEND)?;
    if backend_id == BACKEND_NONE {
        return Err(DROP_NO_BACKEND);
    }
    let mut backend = BACKENDS.get(backend_id).ok_or(DROP_NO_BACKEND)?;
    if (backend.flags & BACKEND_F_DOWN != 0 || backend_id == avoid)
        && let Some((id, b)) = fallback(backend_id, backend.fallback_id, family, avoid)
    {
        (backend_id, backend) = (id, b);
        count(FALLBACK);
    }
    // An id the controller never set (family 0) or an address of the other family
    // cannot be used for this connection.
    if backend.family != family {
        return Err(DROP_NO_BACKEND);
    }
    Ok((backend_id, backend))
}

/// The first backend in rotation, of `family` and not `avoid`, along the fallback
/// order from `next` (the successor of `from`); `None` if the order comes back to
/// `from` or runs out first.
#[inline(always)]
fn fallback(from: u32, mut next: u32, family: u8, avoid: u32) -> Option<(u32, &'static Backend)> {
    for _ in 0..FALLBACK_HOPS {
        if next == BACKEND_NONE || next == from {
            return None;
        }
        let b = BACKENDS.get(next)?;
        if b.flags & BACKEND_F_DOWN == 0 && next != avoid && b.family == family {
            return Some((next, b));
        }
        next = b.fallback_id;
    }
    None
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

/// A half-open flow its backend refused: mark it refused and release its NAT port
/// (the reply entry), so that the client's SYN retransmit finds it and is balanced
/// afresh, away from that backend, by [`forget_failed`]. Inlined: as a call of
/// its own, calling `set_flow_flags`, it would make the reply path four calls deep,
/// whose frames the 6.1 verifier sums past the 512-byte stack.
#[inline(always)]
pub fn refuse_flow(reply: &ReplyState, rkey: &FlowKey) {
    set_flow_flags(reply, rkey, FLOW_F_REFUSED);
    let _ = REPLIES.remove(rkey);
}

/// With passive detection on, whether the flow at `entry` (client's key `key`),
/// now seeing its client's SYN again, failed: refused by its backend, or never
/// answered for `PASSIVE_SILENT_NS` or more (which counts against the backend and
/// is reported). If so the flow is forgotten and the backend's id returned, for
/// the new flow to avoid; else [`BACKEND_NONE`].
#[inline(never)]
pub fn forget_failed(key: &FlowKey, entry: *mut FlowState, now: u64) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return BACKEND_NONE;
    };
    // SAFETY: a valid entry pointer from the map, read before the entry is removed.
    let f = unsafe { &*entry };
    let refused = f.flags & FLOW_F_REFUSED != 0;
    if cfg.flags & CONFIG_F_PASSIVE == 0
        || f.flags & FLOW_F_ANSWERED != 0
        || f.nat_port_be == 0
        || (!refused && now.wrapping_sub(f.last_seen_ns) < PASSIVE_SILENT_NS)
    {
        return BACKEND_NONE;
    }
    let failed = f.backend_id;
    // A refused flow's port was released when it was refused, and may be another
    // flow's by now; a silent flow's is still its own.
    if !refused {
        passive_failure(failed, PASSIVE_KIND_SILENT, now);
        count(PASSIVE_SILENT);
        let _ = REPLIES.remove(reply_key(key, f, &snat_addr(cfg, key.family)));
    }
    let _ = FLOWS.remove(key);
    failed
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

/// Claim a free source port towards this backend by inserting the reply entry.
#[inline(always)]
fn claim_port(
    key: &FlowKey,
    snat: &[u32; 4],
    cfg: &DatapathConfig,
    now: u64,
    s: &mut Scratch,
) -> Result<u16, u32> {
    let (min, max) = (u32::from(cfg.port_min_host), u32::from(cfg.port_max_host));
    if min == 0 || max < min {
        return Err(DROP_NO_NAT_PORT);
    }
    let range = max - min + 1;
    let (backend_id, backend_be, backend_port_be) =
        (s.flow.backend_id, s.flow.backend_be, s.flow.backend_port_be);
    // Fields are written in place: building the entry and key as values first would
    // put copies of them on the stack, which has no room to spare.
    s.reply.client_be = key.src_be;
    s.reply.vip_be = key.dst_be;
    s.reply.client_port_be = key.sport_be;
    s.reply.vip_port_be = key.dport_be;
    s.reply.backend_id = backend_id;
    s.reply.claimed_ns = now;
    s.reply.next_hop = NextHop::default();
    s.reply_key.src_be = backend_be;
    s.reply_key.dst_be = *snat;
    s.reply_key.sport_be = backend_port_be;
    s.reply_key.proto = key.proto;
    s.reply_key.family = key.family;
    s.reply_key._pad = 0;
    let cursor = PORT_CURSOR.get_ptr_mut(0).ok_or(DROP_NO_NAT_PORT)?;
    // SAFETY: per-CPU slot, only this CPU reads and writes it.
    let start = unsafe { *cursor };
    for i in 0..PORT_TRIES {
        let port_be = ((min + start.wrapping_add(i) % range) as u16).to_be();
        s.reply_key.dport_be = port_be;
        let claimed = REPLIES
            .insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST))
            .is_ok()
            || (reclaimable(s, cfg, now)
                && REPLIES
                    .insert(&s.reply_key, &s.reply, u64::from(BPF_ANY))
                    .is_ok());
        if claimed {
            // SAFETY: as above.
            unsafe { *cursor = start.wrapping_add(i + 1) };
            return Ok(port_be);
        }
    }
    // SAFETY: as above.
    unsafe { *cursor = start.wrapping_add(PORT_TRIES) };
    Err(DROP_NO_NAT_PORT)
}

/// Whether the port leased under `s.reply_key` may be taken over (see the module
/// docs). On yes, the old flow entry is removed.
#[inline(always)]
fn reclaimable(s: &mut Scratch, cfg: &DatapathConfig, now: u64) -> bool {
    let rkey = &s.reply_key;
    // SAFETY: entries are replaced whole, never edited, so the fields read through
    // this reference are consistent; nothing is copied, to save BPF stack.
    let Some(old) = (unsafe { REPLIES.get(rkey) }) else {
        return true;
    };
    if now.wrapping_sub(old.claimed_ns) < PORT_CLAIM_GRACE_NS {
        return false;
    }
    s.flow_key.src_be = old.client_be;
    s.flow_key.dst_be = old.vip_be;
    s.flow_key.sport_be = old.client_port_be;
    s.flow_key.dport_be = old.vip_port_be;
    s.flow_key.proto = rkey.proto;
    s.flow_key.family = rkey.family;
    s.flow_key._pad = 0;
    // SAFETY: as above; `flags` and `last_seen_ns` may change under us, which can
    // only delay a takeover to the next attempt.
    let Some(f) = (unsafe { FLOWS.get(&s.flow_key) }) else {
        count(PORT_RECLAIMED);
        return true;
    };
    if f.nat_port_be != s.reply_key.dport_be || f.backend_be != s.reply_key.src_be {
        count(PORT_RECLAIMED);
        return true;
    }
    let idle = now.wrapping_sub(f.last_seen_ns);
    let over = (f.flags & FLOW_F_CLOSING != 0 && idle >= cfg.flow_close_grace_ns)
        || idle >= cfg.flow_idle_timeout_ns;
    if over {
        let _ = FLOWS.remove(&s.flow_key);
        count(PORT_RECLAIMED);
    }
    over
}
