//! A flow's life under NAT: recorded half-open when its SYN is balanced, proven
//! when its handshake completes, tracked through its close (`ct`), until its port
//! is reclaimed.
//!
//! A flow has two entries: one by the client's key (client -> VIP, so later
//! packets keep their backend whatever Maglev says) and one by the backend's reply
//! (backend -> SNAT address:port, to undo the NAT on the way back; also the NAT
//! port's lease, see `ports`). Until the client acknowledges the backend's SYN-ACK
//! both live in the half-open tables (`HALF_FLOWS`, `HALF_REPLIES`); then
//! [`promote`] moves them to `FLOWS` and `REPLIES`. The tables are LRU, so a flood
//! of SYNs that never complete evicts only other half-open flows, never a proven
//! one. Tables evict independently, so a live flow puts its reply entry back when
//! it finds it gone ([`restore_reply`]).
//!
//! The client's SYN, FIN and RST (and the last ACK of a close) move the state in
//! `ingress`; the backend's in `reply`, through [`update_flow`].
#![cfg(target_arch = "bpf")]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    BACKEND_F_LOCAL, FLOW_F_REFUSED, FLOW_F_TS, FlowKey, FlowState, NextHop, REPLY_F_SYNC,
    REPLY_F_TRACK, REPLY_F_TS, ReplyState, SYNC_EV_CLOSED, SYNC_EV_ESTABLISHED, VIP_F_SYNC,
    VipInfo,
    counters::{
        DROP_FLOW_INSERT, DROP_NO_SNAT_ADDR, FIN_UNPROVEN, FLOW_ESTABLISHED, HALF_OPEN_LOST,
        REPLY_RESTORED, RST_UNPROVEN,
    },
    ct::{self, CT_SYN_SENT, FLOW_F_FROM_PEER, FLOW_F_SYNC, FROM_BACKEND},
    flow_hash,
};

use crate::{
    maps::{CONFIG, FLOWS, HALF_FLOWS, HALF_REPLIES, REPLIES, SCRATCH, Scratch, count},
    ports::{claim_port, snat_addr},
    select::pick,
    sync,
};

/// [`update_flow`]'s `how`, besides the segment's TCP flags in its low byte: the
/// reply entry is in the half-open table.
pub const HOW_HALF: u32 = 0x100;
/// The segment is a SYN-ACK without timestamps: the connection uses none.
pub const HOW_NO_TS: u32 = 0x200;
/// Passive detection is on, and the segment refuses the flow's SYN (a RST, an ICMP
/// unreachable): if the SYN is unanswered, mark the flow refused instead of
/// moving its state.
pub const HOW_REFUSAL: u32 = 0x400;

/// The coarse monotonic clock: jiffy resolution, a fraction of the fine clock's
/// cost, which is all flow ageing and next-hop expiry need.
#[inline(always)]
pub fn coarse_now() -> u64 {
    // SAFETY: a helper without arguments or preconditions (Linux 5.11+).
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Choose a backend for a new flow through the VIP's Maglev ring (and the fallback
/// order, past one out of rotation or `s.avoid`) and claim a source port (recording
/// the lease), filling in `s.flow`. The caller records the flow itself with
/// [`save_flow`] once forwarding has filled in its next hop. `Err` is the drop
/// counter.
///
/// Not inlined: this is the cold path, and as a BPF-to-BPF call its stack frame does
/// not add to the hot path's. BPF calls take at most five arguments (the result
/// is one), hence the config read here and the rest in the scratch.
#[inline(never)]
pub fn new_flow(key: &FlowKey, vip: &VipInfo, now: u64, s: &mut Scratch) -> Result<(), u32> {
    let cfg = CONFIG.get(0).ok_or(DROP_NO_SNAT_ADDR)?;
    let hash = flow_hash(key);
    let (backend_id, backend) = pick(vip, hash, key.family, s.avoid)?;
    s.flow = FlowState {
        backend_be: backend.addr_be,
        backend_port_be: backend.port_be,
        nat_port_be: 0,
        backend_id,
        flags: 0,
        state: CT_SYN_SENT,
        snat_index: 0,
        client_fin: 0,
        backend_fin: 0,
        ts_off: 0,
        fin_tsval: 0,
        last_seen_ns: now,
        seq: s.syn_seq,
        ack: 0,
        next_hop: NextHop::default(),
    };
    if backend.flags & BACKEND_F_LOCAL != 0 {
        return Ok(());
    }
    // Fields are written in place: a whole `ReplyState` value would sit on the stack.
    s.reply.client_be = key.src_be;
    s.reply.vip_be = key.dst_be;
    s.reply.client_port_be = key.sport_be;
    s.reply.vip_port_be = key.dport_be;
    s.reply.backend_id = backend_id;
    s.reply.claimed_ns = now;
    s.reply.ts_off = 0;
    s.reply.flags = 0;
    s.reply.next_hop = NextHop::default();
    if vip.flags & VIP_F_SYNC != 0 {
        s.flow.flags = FLOW_F_SYNC;
        s.reply.flags = REPLY_F_SYNC;
    }
    claim_port(key, vip, hash, cfg, now, s)
}

/// Record a new flow in the half-open table; on failure, release its NAT port.
#[inline(always)]
pub fn save_flow(key: &FlowKey, flow: &FlowState) -> Result<(), u32> {
    if HALF_FLOWS.insert(key, flow, u64::from(BPF_ANY)).is_ok() {
        return Ok(());
    }
    if flow.nat_port_be != 0
        && let Some(cfg) = CONFIG.get(0)
    {
        let _ = HALF_REPLIES.remove(reply_key(
            key,
            flow,
            &snat_addr(cfg, key.family, flow.snat_index),
        ));
    }
    Err(DROP_FLOW_INSERT)
}

/// The client acknowledged the backend's SYN-ACK: move the half-open flow at
/// `half` (client's key `key`) and its lease to the established tables, and return
/// its new entry. The lease goes first, so that a claimer always finds the port
/// taken in one table or the other. `Err` if its lease was evicted meanwhile (a
/// flood filled the half-open tables): the flow is forgotten, and the segment
/// passes to the stack, which resets it.
#[inline(never)]
pub fn promote(key: &FlowKey, half: *mut FlowState) -> Result<*mut FlowState, ()> {
    let (Some(cfg), Some(scratch)) = (CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else {
        return Err(());
    };
    // SAFETY: a valid entry pointer from `HALF_FLOWS`, read before it is removed.
    let flow = unsafe { &*half };
    // SAFETY: this CPU's scratch slot; only its `reply_key` is written, through the
    // raw pointer.
    let rkey = unsafe { &mut (*scratch).reply_key };
    *rkey = reply_key(key, flow, &snat_addr(cfg, key.family, flow.snat_index));
    let ours = if flow.nat_port_be == 0 {
        true
    } else {
        // SAFETY: entries are replaced whole; a stale read only fails the match.
        match unsafe { HALF_REPLIES.get(&*rkey) } {
            Some(r) if r.client_be == key.src_be && r.client_port_be == key.sport_be => {
                REPLIES.insert(&*rkey, r, u64::from(BPF_ANY)).is_ok()
            }
            _ => false,
        }
    };
    let moved = ours && FLOWS.insert(key, flow, u64::from(BPF_ANY)).is_ok();
    if flow.nat_port_be != 0 && ours {
        // Moved: the half-open lease goes. Not moved: the copy just made goes, and
        // the half-open lease is left for a claimer to find orphaned.
        let _ = if moved {
            HALF_REPLIES.remove(&*rkey)
        } else {
            REPLIES.remove(&*rkey)
        };
    }
    let _ = HALF_FLOWS.remove(key);
    if !moved {
        count(HALF_OPEN_LOST);
        return Err(());
    }
    count(FLOW_ESTABLISHED);
    let entry = FLOWS.get_ptr_mut(key).ok_or(())?;
    if flow.flags & FLOW_F_SYNC != 0 {
        sync::emit(u32::from(SYNC_EV_ESTABLISHED), key, entry);
    }
    Ok(entry)
}

/// Put back an established flow's reply entry if the LRU evicted it (the two
/// tables evict independently). Called when the flow refreshes its next hop, so a
/// lost entry is restored within one next-hop TTL. A call, not inlined, building
/// its entry in the scratch slot's reply fields (which `new_flow` is done with by
/// now): it runs once per TTL, and the entry would otherwise sit on the hot path's
/// stack.
#[inline(never)]
pub fn restore_reply(key: &FlowKey, flow: &FlowState, now: u64) {
    let (Some(cfg), Some(scratch)) = (CONFIG.get(0), SCRATCH.get_ptr_mut(0)) else {
        return;
    };
    // SAFETY: this CPU's scratch slot. Only its reply fields are written, through
    // the raw pointer: `flow` may point at the slot's `flow` field, which must not
    // be covered by a `&mut` to the whole slot.
    unsafe {
        let r = &mut (*scratch).reply;
        r.client_be = key.src_be;
        r.vip_be = key.dst_be;
        r.client_port_be = key.sport_be;
        r.vip_port_be = key.dport_be;
        r.backend_id = flow.backend_id;
        r.claimed_ns = now;
        r.ts_off = flow.ts_off;
        r.flags = if flow.flags & FLOW_F_TS != 0 {
            REPLY_F_TS
        } else {
            0
        } | if flow.state >= ct::CT_FIN_WAIT {
            REPLY_F_TRACK
        } else {
            0
        };
        // No next hop cached (`ifindex` 0). Not a whole `NextHop::default()`:
        // LLVM makes that a `memset` call, a fourth frame under main, the
        // outbound path and this, which 5.15 and 6.1 sum past 512 bytes.
        r.next_hop.ifindex = 0;
        r.next_hop.checked_ns = 0;
        (*scratch).reply_key = reply_key(key, flow, &snat_addr(cfg, key.family, flow.snat_index));
        if REPLIES
            .insert(
                &(*scratch).reply_key,
                &(*scratch).reply,
                u64::from(BPF_NOEXIST),
            )
            .is_ok()
        {
            count(REPLY_RESTORED);
        }
    }
}

/// A client's segment with TCP flags `tcp` and sequence and acknowledgement
/// numbers `seq_ack` (`packet::seq_ack`) on the flow at `entry`: move its state
/// (`ct::next`), its last-seen time and its record of both numbers; return the
/// new state. A RST or FIN not near the recorded sequence number moves nothing,
/// the record included (see `ct`). A call, not inlined: the state machine's many
/// branches would otherwise each carry the rest of the packet's path through the
/// verifier.
#[inline(never)]
pub fn track_client(key: &FlowKey, entry: *mut FlowState, tcp: u32, now: u64, seq_ack: u64) -> u8 {
    // SAFETY: a valid entry pointer from the map; the fields written race only
    // with the same writes from another CPU, or the backend direction's
    // (`ct::settled`).
    let e = unsafe { &mut *entry };
    #[expect(clippy::cast_possible_truncation, reason = "the high half")]
    let seq = (seq_ack >> 32) as u32;
    if tcp & u32::from(ct::TCP_RST) != 0 && !ct::near(seq, e.seq) {
        count(RST_UNPROVEN);
        return e.state;
    }
    if tcp & u32::from(ct::TCP_FIN) != 0 {
        if !ct::fin_proven(ct::FROM_CLIENT, 0, seq, 0, e.seq) {
            count(FIN_UNPROVEN);
            return e.state;
        }
        e.client_fin = 1;
    }
    if tcp & u32::from(ct::TCP_SYN | ct::TCP_RST) == 0 {
        record(e, seq_ack);
    }
    #[expect(clippy::cast_possible_truncation, reason = "TCP flags: one byte")]
    let (state, flags) = ct::next(e.state, e.flags, ct::FROM_CLIENT, tcp as u8);
    // A half-open flow's clock restarts only when its state moves or its client
    // sends the SYN again: a forged segment that proves nothing (an ACK before
    // any SYN-ACK) must not keep a spoofed SYN's port held past its timeout.
    if state != e.state || !ct::half_open(state) || tcp & u32::from(ct::TCP_SYN) != 0 {
        e.last_seen_ns = now;
    }
    let ends = sync::ends(e.state, state, flags);
    e.state = state;
    e.flags = flags;
    if ends {
        sync::emit(u32::from(SYNC_EV_CLOSED), key, entry);
    }
    state
}

/// Record a client segment's sequence and acknowledgement numbers (`seq_ack`) in
/// its flow, each only if it moved forward by less than `ct::SEQ_ADVANCE_MAX`
/// (a forged segment far off does not move the record).
#[inline(always)]
pub fn record(e: &mut FlowState, seq_ack: u64) {
    #[expect(clippy::cast_possible_truncation, reason = "the two halves")]
    let (seq, ack) = ((seq_ack >> 32) as u32, seq_ack as u32);
    if e.flags & FLOW_F_FROM_PEER != 0 {
        // A peer's record dates from the flow's establishment, perhaps gigabytes
        // back, past what `ct::advance` moves: this segment, its first here,
        // re-anchors it.
        e.seq = seq;
        e.ack = ack;
        e.flags &= !FLOW_F_FROM_PEER;
        return;
    }
    e.seq = ct::advance(e.seq, seq);
    e.ack = ct::advance(e.ack, ack);
}

/// Forget the flow at `entry` (client's key `key`; in the half-open tables if
/// `half` is 1) and release its NAT port: a client reusing the 4-tuple of a
/// connection that is over. A call, not inlined: the reply key would otherwise
/// sit on the hot path's stack.
#[inline(never)]
pub fn forget(key: &FlowKey, entry: *const FlowState, half: u32) {
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    // SAFETY: a valid entry pointer from the map, read before the entry is removed.
    let f = unsafe { &*entry };
    // A refused flow gave its port back when it was refused: the lease under it
    // may be another flow's by now.
    if f.nat_port_be != 0 && f.flags & FLOW_F_REFUSED == 0 {
        let rkey = reply_key(key, f, &snat_addr(cfg, key.family, f.snat_index));
        let _ = if half != 0 {
            HALF_REPLIES.remove(&rkey)
        } else {
            REPLIES.remove(&rkey)
        };
    }
    let _ = if half != 0 {
        HALF_FLOWS.remove(key)
    } else {
        FLOWS.remove(key)
    };
}

/// The client-side key of the flow a reply entry belongs to.
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

/// A backend's segment on the flow of `reply` (its key `rkey`): move the flow's
/// TCP state by the segment's flags (`how`'s low byte, and `HOW_*`). `seq_ack` is the segment's sequence and acknowledgement
/// numbers (`packet::seq_ack`), or for an ICMP error (no flags) the quoted
/// segment's sequence number in its high half. Returns the state before, or
/// `CT_NONE` for a refusal of an unanswered SYN that does not match it (see
/// `ct::refuses_syn`), which moves nothing; a RST not near where the client
/// expects it (`ct::near`), or a FIN that does not acknowledge near where the
/// client is (`ct::fin_proven`), moves nothing either. A proven FIN marks the
/// reply entry for tracking its ACKs (`REPLY_F_TRACK`). A call, not inlined: only the
/// segments that can change a state need it, and the flow key would otherwise
/// sit on the reply path's stack. A flow that is gone (evicted) reads as
/// established: there is nothing left to re-steer.
#[inline(never)]
pub fn update_flow(reply: &mut ReplyState, rkey: &FlowKey, how: u32, seq_ack: u64) -> u8 {
    let fkey = flow_key_of(reply, rkey);
    let found = if how & HOW_HALF != 0 {
        HALF_FLOWS.get_ptr_mut(&fkey)
    } else {
        FLOWS.get_ptr_mut(&fkey)
    };
    let Some(f) = found else {
        return ct::CT_ESTABLISHED;
    };
    // SAFETY: a valid entry pointer from the map; the fields written race only with
    // the same writes from another CPU, or a whole-entry replacement.
    let f = unsafe { &mut *f };
    let before = f.state;
    #[expect(clippy::cast_possible_truncation, reason = "the low byte: TCP flags")]
    let tcp = how as u8;
    #[expect(clippy::cast_possible_truncation, reason = "the two halves")]
    let (seq, ack) = ((seq_ack >> 32) as u32, seq_ack as u32);
    if before == CT_SYN_SENT && (how & HOW_REFUSAL != 0 || tcp & ct::TCP_RST != 0) {
        let genuine = if tcp == 0 {
            seq == f.seq
        } else {
            ct::refuses_syn(tcp, ack, f.seq)
        };
        if !genuine {
            return ct::CT_NONE;
        }
        if how & HOW_REFUSAL != 0 {
            f.flags |= FLOW_F_REFUSED;
            return before;
        }
    } else if tcp & ct::TCP_RST != 0 && !ct::near(seq, f.ack) {
        count(RST_UNPROVEN);
        return before;
    } else if tcp & ct::TCP_FIN != 0 {
        if !ct::fin_proven(FROM_BACKEND, tcp, seq, ack, f.seq) {
            count(FIN_UNPROVEN);
            return before;
        }
        f.backend_fin = 1;
        reply.flags |= REPLY_F_TRACK;
    }
    if tcp & (ct::TCP_SYN | ct::TCP_ACK) == ct::TCP_SYN | ct::TCP_ACK && ct::half_open(before) {
        // The backend's ISN: the client acknowledges from here on.
        f.ack = seq.wrapping_add(1);
    }
    let (state, flags) = ct::next(before, f.flags, FROM_BACKEND, tcp);
    f.state = state;
    f.flags = if how & HOW_NO_TS != 0 {
        flags & !FLOW_F_TS
    } else {
        flags
    };
    if sync::ends(before, state, flags) {
        sync::emit(u32::from(SYNC_EV_CLOSED), &fkey, f);
    }
    // An ICMP error (no TCP flags) is no sign of life: forged ones must not keep
    // a flow's port held.
    if how & 0xff != 0 {
        f.last_seen_ns = coarse_now();
    }
    before
}

/// The reply-table key under which the backend's answers to `flow` arrive.
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
