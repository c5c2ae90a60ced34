//! The client -> backend direction: a packet to a VIP this node owns is sent, under
//! NAT, to its flow's backend, picked for the flow's SYN and kept for the flow's life.
//!
//! Anything that is not for a VIP goes on to `reply`, which knows the other
//! direction. Established packets cost one `FLOWS` lookup, a rewrite with incremental
//! checksums and a cached next hop (`forward`).
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    BACKEND_NONE, FLOW_F_TS, FLOW_SEEN_GRANULARITY_NS, FlowState, VIP_F_OWNED, VIP_F_SYNC, VipKey,
    counters::{
        DROP_FLOW_INSERT, DROP_NO_SNAT_ADDR, DROP_SYNC_DOWN, FLOW_NEW, PASS_LOCAL_BACKEND,
        PASS_MALFORMED, PASS_NO_FLOW, PASS_NOT_OWNED,
    },
    csum::Delta,
    ct::{
        self, CT_CLOSE, CT_ESTABLISHED, CT_LAST_ACK, CT_TIME_WAIT, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN,
    },
};

use crate::{
    flow::{coarse_now, forget, new_flow, promote, record, restore_reply, save_flow, track_client},
    forward::{Tuple, forward, rewrite},
    maps::{BACKEND_STATS, CONFIG, FLOWS, HALF_FLOWS, SCRATCH, VIP_STATS, VIPS, account, count},
    offload,
    outcome::Outcome,
    packet::{ICMP_TOO_BIG, Parsed, parse, seq_ack},
    passive::forget_failed,
    ports::snat_addr,
    reply::to_client,
    sync::alive,
    toobig::too_big,
    ts::{shift_tsval, syn_tsval},
};

/// Balance one packet: to its flow's backend if it is a client's packet to an
/// owned VIP, back to the client if it is a backend's reply, else pass it.
/// `Ok` and `Err` are both the outcome; `Err` lets `?` end a path early.
///
/// A segment that arrived with a partial checksum is finished first and, where
/// the kernel keeps its partial state, left partial again after (`offload`).
#[inline(always)]
pub fn try_balance(ctx: &XdpContext) -> Result<Outcome, Outcome> {
    let p = parse(ctx).map_err(Outcome::pass)?;
    offload::finish(ctx, &p);
    let outcome = match balance(ctx, &p) {
        Ok(o) | Err(o) => o,
    };
    offload::restore(ctx, &p, &outcome);
    Ok(outcome)
}

/// [`try_balance`] for a parsed packet.
#[inline(always)]
fn balance(ctx: &XdpContext, p: &Parsed) -> Result<Outcome, Outcome> {
    if p.icmp != 0 {
        if p.icmp == ICMP_TOO_BIG {
            return Ok(too_big(ctx, &p));
        }
        return to_client(ctx, &p);
    }
    let vip_key = VipKey {
        addr_be: p.key.dst_be,
        port_be: p.key.dport_be,
        proto: p.key.proto,
        family: p.key.family,
    };
    // SAFETY: the controller replaces VIP entries whole, so the fields read through
    // this reference are at worst the previous version's, for this one packet.
    let Some(vip) = (unsafe { VIPS.get(&vip_key) }) else {
        return to_client(ctx, &p);
    };
    if vip.flags & VIP_F_OWNED == 0 {
        return Err(Outcome::pass(PASS_NOT_OWNED));
    }
    let now = coarse_now();
    // The flow is found or created here and handed to `to_backend` as a pointer
    // (into its map entry or, for a new flow, into this CPU's scratch slot), so
    // that `new_flow` and `to_backend` are sibling calls: the verifier sums the
    // stack frames of nested calls, and these two would not fit nested.
    let tcp = p.tcp_flags;
    let is_syn = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // Established flows first: the hot path is one lookup.
    let mut half = false;
    let mut found = FLOWS.get_ptr_mut(&p.key);
    if found.is_none() {
        found = HALF_FLOWS.get_ptr_mut(&p.key);
        half = found.is_some();
    }
    // The client sending its SYN again, refused or unanswered: with passive
    // detection the flow is forgotten here and the SYN balanced as a new flow
    // below, away from the backend that failed it.
    let mut avoid = BACKEND_NONE;
    if is_syn && let Some(e) = found {
        #[expect(clippy::cast_possible_truncation, reason = "the high half")]
        let seq = (seq_ack(ctx, &p) >> 32) as u32;
        avoid = forget_failed(&p.key, e, now, u32::from(half), seq);
        // A client reusing the 4-tuple of a connection that is over opens a new
        // connection: it is balanced afresh (the old backend may be out of
        // rotation by now), as IPVS's `conn_reuse_mode` does, and the old one's
        // port is released.
        // SAFETY: a valid entry pointer from the map.
        let state = unsafe { (*e).state };
        if avoid != BACKEND_NONE {
            found = None;
        } else if state == CT_TIME_WAIT || state == CT_CLOSE {
            forget(&p.key, e, u32::from(half));
            found = None;
        }
    }
    let (entry, is_new) = match found {
        Some(mut entry) => {
            // SAFETY: a valid entry pointer from the map. `state`, `flags` and
            // `last_seen_ns` are written in place, racing at worst with the same
            // writes from another CPU.
            let e = unsafe { &mut *entry };
            if half || tcp & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || e.state == CT_LAST_ACK {
                let state = track_client(&p.key, entry, u32::from(tcp), now, seq_ack(ctx, &p));
                if half && state == CT_ESTABLISHED {
                    entry = promote(&p.key, entry).map_err(|()| Outcome::pass(PASS_NO_FLOW))?;
                }
            } else {
                // The record follows the flow every second, and within a stride
                // (`ct::record_stale`), so that its own RST or FIN is near it.
                let sa = seq_ack(ctx, &p);
                #[expect(clippy::cast_possible_truncation, reason = "the two halves")]
                let (seq, ack) = ((sa >> 32) as u32, sa as u32);
                if now.wrapping_sub(e.last_seen_ns) >= FLOW_SEEN_GRANULARITY_NS
                    || ct::record_stale(seq, ack, e.seq, e.ack)
                {
                    e.last_seen_ns = now;
                    record(e, sa);
                }
            }
            (entry, false)
        }
        // Only a SYN opens a flow: a stray segment must not take a port.
        None if !is_syn => {
            return Err(Outcome::pass(PASS_NO_FLOW));
        }
        None => {
            // A node whose controller is gone opens no flow its peers would miss.
            if vip.flags & VIP_F_SYNC != 0 && !alive(ctx) {
                return Err(Outcome::drop(DROP_SYNC_DOWN));
            }
            let scratch = SCRATCH
                .get_ptr_mut(0)
                .ok_or(Outcome::drop(DROP_FLOW_INSERT))?;
            // SAFETY: this CPU's scratch slot; XDP runs to completion on a CPU,
            // so nothing else uses it meanwhile.
            let s = unsafe { &mut *scratch };
            s.avoid = avoid;
            let tsval = syn_tsval(ctx, &p);
            s.syn_ts = u32::from(tsval.is_some());
            s.syn_tsval = tsval.unwrap_or(0);
            #[expect(clippy::cast_possible_truncation, reason = "the high half")]
            let syn_seq = (seq_ack(ctx, &p) >> 32) as u32;
            s.syn_seq = syn_seq;
            new_flow(&p.key, vip, now, s).map_err(Outcome::drop)?;
            (&raw mut s.flow, true)
        }
    };
    let outcome = to_backend(ctx, &p, entry, now);
    if is_new {
        // SAFETY: `entry` is this CPU's scratch slot, filled by `new_flow`.
        let flow = unsafe { &*entry };
        save_flow(&p.key, flow).map_err(Outcome::drop)?;
        count(FLOW_NEW);
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    account(&VIP_STATS, vip.vip_id, bytes, is_new);
    // SAFETY: as above, or the flow's map entry.
    account(
        &BACKEND_STATS,
        unsafe { (*entry).backend_id },
        bytes,
        is_new,
    );
    Ok(outcome)
}

/// A client's packet on a flow: NAT it to the flow's backend (its TSval shifted
/// to the port's clock, `ts`) and send it on. A hop refresh also restores an
/// established flow's reply entry, if it was evicted.
/// A BPF-to-BPF call, like `to_client`, so that each path's stack frame stands
/// alone on top of `apilb_xdp`'s, within the 512 bytes the verifier allows the
/// deepest call chain.
#[inline(never)]
fn to_backend(ctx: &XdpContext, p: &Parsed, entry: *mut FlowState, now: u64) -> Outcome {
    // SAFETY: `entry` points into a map entry or the scratch slot, both valid for
    // the rest of this run. A next hop refreshed in place could be seen
    // half-written by another CPU only while two CPUs refresh one flow to
    // different answers at once; the next refresh, within a TTL, mends it.
    let flow = unsafe { &mut *entry };
    if flow.nat_port_be == 0 {
        return Outcome::pass(PASS_LOCAL_BACKEND);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Outcome::drop(DROP_NO_SNAT_ADDR);
    };
    let mut l4 = Delta::default();
    if flow.flags & FLOW_F_TS != 0
        && let Some((delta, sent)) = shift_tsval(ctx, p, flow.ts_off)
    {
        l4 = delta;
        if p.tcp_flags & TCP_FIN != 0 {
            flow.fin_tsval = sent;
        }
    }
    let t = Tuple {
        src_be: snat_addr(cfg, p.key.family, flow.snat_index),
        dst_be: flow.backend_be,
        sport_be: flow.nat_port_be,
        dport_be: flow.backend_port_be,
    };
    if rewrite(ctx, p, &t, l4).is_err() {
        return Outcome::pass(PASS_MALFORMED);
    }
    let mut hop = flow.next_hop;
    let (outcome, hop_changed) = forward(ctx, p, &t, &mut hop, cfg.nexthop_ttl_ns, now);
    if hop_changed {
        flow.next_hop = hop;
        // Only for a flow of the established table: a half-open one's lease is in
        // the half-open table, and one that ended before its handshake (a client
        // RST) is still there, with no lease of its own in `REPLIES` to restore.
        if !ct::half_open(flow.state) && FLOWS.get_ptr_mut(&p.key) == Some(entry) {
            restore_reply(&p.key, flow, now);
        }
    }
    outcome
}
