//! apilb's XDP balancer: VIP:6443 connections to healthy masters, in NAT mode.
//!
//! Per packet: parse (`packet`), look up the VIP, then either keep the flow's recorded
//! backend or pick one with the VIP's Maglev ring (`nat`), rewrite with incremental
//! checksums and forward through the FIB (`forward`). A backend's reply is matched in
//! `REPLIES` and rewritten back to VIP:port. Everything else passes untouched. Every
//! packet bumps exactly one outcome counter; nothing is logged per packet.
//!
//! The node's own processes never reach the XDP hook; `sock` balances their
//! `connect()` calls with the same rings.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod sock;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, macros::xdp,
        programs::XdpContext,
    };
    use lb_common::{
        BACKEND_NONE, CONFIG_F_PASSIVE, FLOW_F_ANSWERED, FLOW_F_CLOSING, FLOW_SEEN_GRANULARITY_NS,
        FlowState, PASSIVE_KIND_ICMP, PASSIVE_KIND_RST, VIP_F_OWNED, VipKey, counters::*,
    };

    use crate::{
        forward::{Tuple, forward, rewrite},
        maps::{
            BACKEND_STATS, CONFIG, FLOWS, REPLIES, SCRATCH, VIP_STATS, VIPS, account, count,
            passive_answered, passive_failure,
        },
        nat::{
            forget_failed, new_flow, refuse_flow, restore_reply, save_flow, set_flow_flags,
            snat_addr,
        },
        packet::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse},
    };

    /// What to do with a packet, and the outcome counter that says why.
    pub struct Outcome {
        pub action: u32,
        pub counter: u32,
    }

    impl Outcome {
        pub const fn pass(counter: u32) -> Self {
            Self {
                action: xdp_action::XDP_PASS,
                counter,
            }
        }
        pub const fn drop(counter: u32) -> Self {
            Self {
                action: xdp_action::XDP_DROP,
                counter,
            }
        }
    }

    #[xdp]
    pub fn apilb_xdp(ctx: XdpContext) -> u32 {
        let outcome = match try_balance(&ctx) {
            Ok(o) | Err(o) => o,
        };
        count(outcome.counter);
        outcome.action
    }

    /// The benchmark floor: the cheapest possible XDP program.
    #[xdp]
    pub fn apilb_xdp_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }

    #[inline(always)]
    fn try_balance(ctx: &XdpContext) -> Result<Outcome, Outcome> {
        let p = parse(ctx).map_err(Outcome::pass)?;
        if p.icmp {
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
        let is_syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let mut found = FLOWS.get_ptr_mut(&p.key);
        // The client sending its SYN again, refused or unanswered: with passive
        // detection the flow is forgotten here and the SYN balanced as a new flow
        // below, away from the backend that failed it.
        let mut avoid = BACKEND_NONE;
        if is_syn && let Some(e) = found {
            avoid = forget_failed(&p.key, e, now);
            if avoid != BACKEND_NONE {
                found = None;
            }
        }
        let (entry, is_new) = match found {
            Some(entry) => {
                // SAFETY: a valid entry pointer from the map. `flags` and
                // `last_seen_ns` are written in place, racing at worst with the same
                // writes from another CPU.
                let e = unsafe { &mut *entry };
                if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                    e.flags |= FLOW_F_CLOSING;
                } else if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    // The client reuses the tuple for a new connection.
                    e.flags &= !(FLOW_F_CLOSING | FLOW_F_ANSWERED);
                }
                if now.wrapping_sub(e.last_seen_ns) >= FLOW_SEEN_GRANULARITY_NS {
                    e.last_seen_ns = now;
                }
                (entry, false)
            }
            // Only a SYN opens a flow: a stray segment must not take a port.
            None if !is_syn => {
                return Err(Outcome::pass(PASS_NO_FLOW));
            }
            None => {
                let scratch = SCRATCH
                    .get_ptr_mut(0)
                    .ok_or(Outcome::drop(DROP_FLOW_INSERT))?;
                // SAFETY: this CPU's scratch slot; XDP runs to completion on a CPU,
                // so nothing else uses it meanwhile.
                let s = unsafe { &mut *scratch };
                s.avoid = avoid;
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

    /// A client's packet on a flow: NAT it to the flow's backend and send it on.
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
        let t = Tuple {
            src_be: snat_addr(cfg, p.key.family),
            dst_be: flow.backend_be,
            sport_be: flow.nat_port_be,
            dport_be: flow.backend_port_be,
        };
        if rewrite(ctx, p, &t).is_err() {
            return Outcome::pass(PASS_MALFORMED);
        }
        let mut hop = flow.next_hop;
        let (outcome, hop_changed) = forward(ctx, p, &t, &mut hop, cfg.nexthop_ttl_ns, now);
        if hop_changed {
            flow.next_hop = hop;
            // A no-op for a new flow, whose reply entry `new_flow` just wrote.
            restore_reply(&p.key, flow, now);
        }
        outcome
    }

    /// Possibly a backend's reply to a flow under NAT: undo the NAT and send it on.
    /// Or an ICMP error about a flow's SYN: passive detection.
    /// A BPF-to-BPF call (see `to_backend`).
    #[inline(never)]
    fn to_client(ctx: &XdpContext, p: &Parsed) -> Result<Outcome, Outcome> {
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
            // The backend's host, or a router before it, refused a segment of this
            // flow. Only a SYN's refusal is acted on; the stack may have the rest.
            let answered = set_flow_flags(reply, &p.key, 0) & FLOW_F_ANSWERED != 0;
            if !passive || answered {
                return Err(Outcome::pass(PASS_NOT_VIP));
            }
            passive_failure(reply.backend_id, PASSIVE_KIND_ICMP, coarse_now());
            refuse_flow(reply, &p.key);
            return Ok(Outcome::drop(DROP_PASSIVE_ICMP));
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
                passive_failure(reply.backend_id, PASSIVE_KIND_RST, coarse_now());
                refuse_flow(reply, &p.key);
                return Ok(Outcome::drop(DROP_PASSIVE_RST));
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
        let (outcome, hop_changed) =
            forward(ctx, p, &t, &mut hop, cfg.nexthop_ttl_ns, coarse_now());
        if hop_changed {
            reply.next_hop = hop;
        }
        Ok(outcome)
    }

    /// The coarse monotonic clock: jiffy resolution, a fraction of the fine clock's
    /// cost, which is all flow ageing and next-hop expiry need.
    #[inline(always)]
    fn coarse_now() -> u64 {
        // SAFETY: a helper without arguments or preconditions (Linux 5.11+).
        unsafe { bpf_ktime_get_coarse_ns() }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program with a reachable panic path, so a
        // program that loads never gets here.
        unsafe { core::hint::unreachable_unchecked() }
    }
}

#[cfg(target_arch = "bpf")]
pub use program::Outcome;

/// Built for the host only so that workspace-wide commands do not fail; the real
/// program exists only for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
