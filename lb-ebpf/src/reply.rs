//! The backend -> client direction: a backend's reply to a flow under NAT is
//! matched in `REPLIES` and rewritten back to VIP:port -> client, and an ICMP error
//! about a flow's SYN, or a RST to it, is passive detection's (`passive`).
//!
//! Everything that matches no reply entry passes untouched: it is not the
//! balancer's.
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    CONFIG_F_PASSIVE, PASSIVE_KIND_RST, REPLY_F_SYNC, REPLY_F_TRACK, REPLY_F_TS,
    counters::{
        DROP_PASSIVE_RST, DROP_SYNC_DOWN, DROP_UNPROVEN_REFUSAL, PASS_MALFORMED, PASS_NOT_VIP,
        REPLY_HIT,
    },
    csum::Delta,
    ct::{CT_NONE, CT_SYN_SENT, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

use crate::{
    flow::{HOW_HALF, HOW_NO_TS, HOW_REFUSAL, coarse_now, update_flow},
    forward::{Tuple, forward, rewrite},
    maps::{BACKEND_STATS, CONFIG, HALF_REPLIES, REPLIES, account, count},
    outcome::Outcome,
    packet::{Parsed, seq_ack, tsval_at},
    passive::{icmp_refusal, passive_answered, refuse},
    ports::is_snat_addr,
    sync::alive,
    ts::shift_tsecr,
};

/// Possibly a backend's reply to a flow under NAT: undo the NAT and send it on.
/// Or an ICMP error about a flow's SYN: passive detection.
/// A BPF-to-BPF call, like `ingress::to_backend`, so that each path's stack frame
/// stands alone on top of `apilb_xdp`'s, within the 512 bytes the verifier allows
/// the deepest call chain.
#[inline(never)]
pub fn to_client(ctx: &XdpContext, p: &Parsed) -> Result<Outcome, Outcome> {
    let not_ours = Outcome::pass(PASS_NOT_VIP);
    let cfg = CONFIG.get(0).ok_or(not_ours)?;
    let port = u16::from_be(p.key.dport_be);
    if port < cfg.port_min_host
        || port > cfg.port_max_host
        || !is_snat_addr(cfg, p.key.family, &p.key.dst_be)
    {
        return Err(Outcome::pass(PASS_NOT_VIP));
    }
    // Established flows first; then the half-open ones.
    let mut how = 0;
    let entry = match REPLIES.get_ptr_mut(&p.key) {
        Some(e) => e,
        None => {
            how = HOW_HALF;
            HALF_REPLIES
                .get_ptr_mut(&p.key)
                .ok_or(Outcome::pass(PASS_NOT_VIP))?
        }
    };
    // SAFETY: a valid entry pointer from the map. Only `next_hop` and `flags` are
    // written in place; a reader on another CPU could see a half-written hop only
    // while two CPUs refresh the same flow's hop to different answers at once, and
    // the next refresh (within one TTL) mends it. Copying the whole entry instead
    // would not fit the BPF stack.
    let reply = unsafe { &mut *entry };
    count(REPLY_HIT);
    let passive = cfg.flags & CONFIG_F_PASSIVE != 0;
    if p.icmp != 0 {
        return icmp_refusal(ctx, p, reply, passive, how);
    }
    let tcp = p.tcp_flags;
    // Only segments that can move the flow's state look it up: SYN-ACK, FIN, RST,
    // and, once the backend has sent its FIN (`update_flow` marks it), its ACKs
    // (the last ACK of a close).
    if tcp & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || reply.flags & REPLY_F_TRACK != 0 {
        let syn_ack = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
        if syn_ack && tsval_at(ctx, p).is_none() {
            how |= HOW_NO_TS;
        }
        let rst = tcp & TCP_RST != 0;
        if rst && passive {
            how |= HOW_REFUSAL;
        }
        let before = update_flow(reply, &p.key, how | u32::from(tcp), seq_ack(ctx, p));
        if before == CT_NONE {
            return Ok(Outcome::drop(DROP_UNPROVEN_REFUSAL));
        }
        if syn_ack {
            passive_answered(reply.backend_id);
            // The master answered, but a node whose controller is gone must not
            // complete a handshake its peers would never hear of: the client's
            // SYN retransmit goes to the node that takes the VIP over.
            if how & HOW_HALF != 0 && reply.flags & REPLY_F_SYNC != 0 && !alive(ctx) {
                return Ok(Outcome::drop(DROP_SYNC_DOWN));
            }
        }
        // A RST to a SYN the backend never answered: nothing listens there. With
        // passive detection the client does not see it; its SYN retransmit is
        // balanced afresh, away from this backend.
        if rst && passive && before == CT_SYN_SENT {
            return Ok(refuse(
                reply,
                &p.key,
                PASSIVE_KIND_RST,
                DROP_PASSIVE_RST,
                how,
            ));
        }
    }
    account(
        &BACKEND_STATS,
        reply.backend_id,
        (ctx.data_end() - ctx.data()) as u64,
        false,
    );
    let mut l4 = Delta::default();
    if reply.flags & REPLY_F_TS != 0
        && let Some(delta) = shift_tsecr(ctx, p, reply.ts_off)
    {
        l4 = delta;
    }
    let t = Tuple {
        src_be: reply.vip_be,
        dst_be: reply.client_be,
        sport_be: reply.vip_port_be,
        dport_be: reply.client_port_be,
    };
    rewrite(ctx, p, &t, l4).map_err(|()| Outcome::pass(PASS_MALFORMED))?;
    let mut hop = reply.next_hop;
    let (outcome, hop_changed) = forward(ctx, p, &t, &mut hop, cfg.nexthop_ttl_ns, coarse_now());
    if hop_changed {
        reply.next_hop = hop;
    }
    Ok(outcome)
}
