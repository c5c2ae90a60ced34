//! The backend -> client direction: a backend's reply to a flow under NAT is
//! matched in `REPLIES` and rewritten back to VIP:port -> client, and an ICMP error
//! about a flow's SYN, or a RST to it, is passive detection's (`passive`).
//!
//! Everything that matches no reply entry passes untouched: it is not the
//! balancer's.
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::{
    CONFIG_F_PASSIVE, FLOW_F_ANSWERED, FLOW_F_CLOSING, PASSIVE_KIND_RST,
    counters::{DROP_PASSIVE_RST, PASS_MALFORMED, PASS_NOT_VIP, REPLY_HIT},
};

use crate::{
    flow::{coarse_now, set_flow_flags},
    forward::{Tuple, forward, rewrite},
    maps::{BACKEND_STATS, CONFIG, REPLIES, account, count},
    outcome::Outcome,
    packet::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    passive::{icmp_refusal, passive_answered, refuse},
    ports::snat_addr,
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
        || p.key.dst_be != snat_addr(cfg, p.key.family)
    {
        return Err(Outcome::pass(PASS_NOT_VIP));
    }
    let entry = REPLIES
        .get_ptr_mut(&p.key)
        .ok_or(Outcome::pass(PASS_NOT_VIP))?;
    // SAFETY: a valid entry pointer from the map. Only `next_hop` is written in
    // place; a reader on another CPU could see a half-written hop only while two
    // CPUs refresh the same flow's hop to different answers at once, and the next
    // refresh (within one TTL) mends it. Copying the whole entry instead would
    // not fit the BPF stack.
    let reply = unsafe { &mut *entry };
    count(REPLY_HIT);
    let passive = cfg.flags & CONFIG_F_PASSIVE != 0;
    if p.icmp {
        return icmp_refusal(reply, &p.key, passive);
    }
    if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        set_flow_flags(reply, &p.key, FLOW_F_ANSWERED);
        passive_answered(reply.backend_id);
    } else if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let flags = set_flow_flags(reply, &p.key, FLOW_F_CLOSING);
        // A RST to a SYN the backend never answered: nothing listens there. With
        // passive detection the client does not see it; its SYN retransmit is
        // balanced afresh, away from this backend.
        if p.tcp_flags & TCP_RST != 0 && passive && flags & FLOW_F_ANSWERED == 0 {
            return Ok(refuse(reply, &p.key, PASSIVE_KIND_RST, DROP_PASSIVE_RST));
        }
    }
    account(
        &BACKEND_STATS,
        reply.backend_id,
        (ctx.data_end() - ctx.data()) as u64,
        false,
    );
    let t = Tuple {
        src_be: reply.vip_be,
        dst_be: reply.client_be,
        sport_be: reply.vip_port_be,
        dport_be: reply.client_port_be,
    };
    rewrite(ctx, p, &t).map_err(|()| Outcome::pass(PASS_MALFORMED))?;
    let mut hop = reply.next_hop;
    let (outcome, hop_changed) = forward(ctx, p, &t, &mut hop, cfg.nexthop_ttl_ns, coarse_now());
    if hop_changed {
        reply.next_hop = hop;
    }
    Ok(outcome)
}
