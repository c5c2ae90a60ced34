//! Passive failure detection in the kernel: a backend that refuses or ignores the
//! SYNs the balancer sends it is seen on the wire, long before a health probe would.
//!
//! Three signs, each only for a SYN the backend never answered (`CT_SYN_SENT`):
//! a RST that acknowledges that SYN (nothing listens there), an ICMP destination
//! unreachable quoting it, and silence until the client sends the same SYN again.
//! With passive detection on (`CONFIG_F_PASSIVE`) the refusal is dropped, so the
//! client does not see it, and the flow is marked refused and its NAT port
//! released; the client's SYN retransmit then forgets the flow and is balanced
//! afresh, away from that backend. That much is per flow. Every failure is counted
//! per backend (`PASSIVE_STATS`), and a run of them reaching `passive_threshold`
//! is reported to the controller through `PASSIVE_EVENTS` as a hint: the
//! controller probes the backend at once, and only a failed probe takes it out
//! for everyone. The wire cannot tell a dead backend from a lost, corrupted or
//! forged SYN; a probe can.
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    BACKEND_NONE, CONFIG_F_PASSIVE, FLOW_F_REFUSED, FlowKey, FlowState, PASSIVE_EVENT_GAP_NS,
    PASSIVE_KIND_ICMP, PASSIVE_KIND_RST, PASSIVE_KIND_SILENT, PASSIVE_SILENT_NS, PassiveEvent,
    ReplyState,
    counters::{DROP_PASSIVE_ICMP, DROP_UNPROVEN_REFUSAL, PASS_NOT_VIP, PASSIVE_SILENT},
    ct::{CT_NONE, CT_SYN_SENT},
};

use crate::{
    flow::{HOW_HALF, HOW_REFUSAL, coarse_now, forget, update_flow},
    maps::{
        CONFIG, FLOWS, HALF_FLOWS, HALF_REPLIES, PASSIVE_EVENTS, PASSIVE_STATE, PASSIVE_STATS,
        REPLIES, count,
    },
    outcome::Outcome,
    packet::{Parsed, quoted_seq},
};

/// With passive detection on, whether the flow at `entry` (client's key `key`; in
/// the half-open tables if `half` is 1), now seeing its client's SYN (sequence
/// number `seq`) again, failed: refused by its backend, or never answered for
/// `PASSIVE_SILENT_NS` or more (which counts against the backend and is
/// reported; only for the same SYN sent again, not another). If so the flow is
/// forgotten and the backend's id returned, for the new flow to avoid; else
/// [`BACKEND_NONE`].
#[inline(never)]
pub fn forget_failed(key: &FlowKey, entry: *mut FlowState, now: u64, half: u32, seq: u32) -> u32 {
    let Some(cfg) = CONFIG.get(0) else {
        return BACKEND_NONE;
    };
    // SAFETY: a valid entry pointer from the map, read before the entry is removed.
    let f = unsafe { &*entry };
    let refused = f.flags & FLOW_F_REFUSED != 0;
    if cfg.flags & CONFIG_F_PASSIVE == 0
        || f.state != CT_SYN_SENT
        || f.nat_port_be == 0
        || (!refused && (now.wrapping_sub(f.last_seen_ns) < PASSIVE_SILENT_NS || seq != f.seq))
    {
        return BACKEND_NONE;
    }
    let failed = f.backend_id;
    // A refused flow's port was released when it was refused, and may be another
    // flow's by now; a silent flow's is still its own.
    if refused {
        let _ = if half != 0 {
            HALF_FLOWS.remove(key)
        } else {
            FLOWS.remove(key)
        };
    } else {
        passive_failure(failed, PASSIVE_KIND_SILENT, now);
        count(PASSIVE_SILENT);
        forget(key, entry, half);
    }
    failed
}

/// An ICMP destination unreachable `p` about the flow of `reply` (`how` may say
/// `HOW_HALF`): the backend's host, or a router before it, refused a segment of
/// this flow. Only the refusal of a SYN the backend never answered is acted on,
/// with passive detection on (`passive`), and only if it quotes that SYN's
/// sequence number; one that quotes another is dropped. The stack may have the
/// rest.
#[inline(always)]
pub fn icmp_refusal(
    ctx: &XdpContext,
    p: &Parsed,
    reply: &mut ReplyState,
    passive: bool,
    how: u32,
) -> Result<Outcome, Outcome> {
    if !passive || how & HOW_HALF == 0 {
        return Err(Outcome::pass(PASS_NOT_VIP));
    }
    let seq = quoted_seq(ctx, p).ok_or(Outcome::pass(PASS_NOT_VIP))?;
    match update_flow(reply, &p.key, how | HOW_REFUSAL, u64::from(seq) << 32) {
        CT_SYN_SENT => Ok(refuse(
            reply,
            &p.key,
            PASSIVE_KIND_ICMP,
            DROP_PASSIVE_ICMP,
            how,
        )),
        CT_NONE => Err(Outcome::drop(DROP_UNPROVEN_REFUSAL)),
        _ => Err(Outcome::pass(PASS_NOT_VIP)),
    }
}

/// A half-open flow its backend refused (`kind`, a `PASSIVE_KIND_*`), already
/// marked refused (`FLOW_F_REFUSED`, by `update_flow`): count it against the
/// backend and release its NAT port (the reply entry, in the table `how` says), so
/// that the client's SYN retransmit finds the flow and is balanced afresh, away
/// from that backend, by [`forget_failed`]. The refusal is dropped, counted as
/// `drop`. Inlined: as a call of its own it would make the reply path four calls
/// deep, whose frames the 6.1 verifier sums past the 512-byte stack.
#[inline(always)]
pub fn refuse(reply: &ReplyState, rkey: &FlowKey, kind: u32, drop: u32, how: u32) -> Outcome {
    passive_failure(reply.backend_id, kind, coarse_now());
    let _ = if how & HOW_HALF != 0 {
        HALF_REPLIES.remove(rkey)
    } else {
        REPLIES.remove(rkey)
    };
    Outcome::drop(drop)
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
