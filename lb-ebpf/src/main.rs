//! apilb's XDP balancer: VIP:6443 connections to healthy masters, in NAT mode.
//!
//! Per packet: parse (`packet`), look up the VIP, then either keep the flow's recorded
//! backend or pick one with the VIP's Maglev ring (`nat`), rewrite with incremental
//! checksums and forward through the FIB (`forward`). A backend's reply is matched in
//! `REPLIES` and rewritten back to VIP:port. Everything else passes untouched. Every
//! packet bumps exactly one outcome counter; nothing is logged per packet.
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
mod program {
    use aya_ebpf::{
        bindings::{BPF_EXIST, xdp_action},
        macros::xdp,
        programs::XdpContext,
    };
    use lb_common::{AF_INET, VIP_F_OWNED, VipInfo, VipKey, counters::*};

    use crate::{
        forward::{Tuple, forward, rewrite},
        maps::{BACKEND_STATS, CONFIG, FLOWS, REPLIES, VIP_STATS, VIPS, account, count},
        nat::{new_flow, save_flow},
        packet::{Parsed, parse},
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
        let vip_key = VipKey {
            addr_be: p.key.dst_be,
            port_be: p.key.dport_be,
            proto: p.key.proto,
            family: p.key.family,
        };
        // SAFETY: the value is copied out at once; the controller replaces VIP entries
        // whole, so at worst we see the previous version for this one packet.
        match unsafe { VIPS.get(&vip_key) }.copied() {
            Some(vip) => to_backend(ctx, &p, &vip),
            None => to_client(ctx, &p),
        }
    }

    /// The node's SNAT address for the packet's family.
    #[inline(always)]
    fn snat_addr(cfg: &lb_common::DatapathConfig, family: u8) -> [u32; 4] {
        if family == AF_INET {
            [cfg.snat_v4_be, 0, 0, 0]
        } else {
            cfg.snat_v6_be
        }
    }

    /// A client's packet to a VIP: keep or choose its backend, NAT it, send it on.
    #[inline(always)]
    fn to_backend(ctx: &XdpContext, p: &Parsed, vip: &VipInfo) -> Result<Outcome, Outcome> {
        if vip.flags & VIP_F_OWNED == 0 {
            return Err(Outcome::pass(PASS_NOT_OWNED));
        }
        let cfg = CONFIG.get(0).copied().unwrap_or_default();
        let snat = snat_addr(&cfg, p.key.family);
        // SAFETY: copied out at once; a flow entry is replaced whole, never edited.
        let (mut flow, is_new) = match unsafe { FLOWS.get(&p.key) }.copied() {
            Some(flow) => (flow, false),
            None => (
                new_flow(&p.key, vip, &snat, &cfg).map_err(Outcome::drop)?,
                true,
            ),
        };
        let outcome = if flow.nat_port_be == 0 {
            Outcome::pass(PASS_LOCAL_BACKEND)
        } else {
            let t = Tuple {
                src_be: snat,
                dst_be: flow.backend_be,
                sport_be: flow.nat_port_be,
                dport_be: flow.backend_port_be,
            };
            rewrite(ctx, p, &t).map_err(|()| Outcome::pass(PASS_TRUNCATED))?;
            let (outcome, hop_changed) =
                forward(ctx, p, &t, &mut flow.next_hop, cfg.nexthop_ttl_ns);
            if hop_changed && !is_new {
                let _ = save_flow(&p.key, &flow, &snat, false);
            }
            outcome
        };
        if is_new {
            save_flow(&p.key, &flow, &snat, true).map_err(Outcome::drop)?;
            count(FLOW_NEW);
        }
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        account(&VIP_STATS, vip.vip_id, bytes, is_new);
        account(&BACKEND_STATS, flow.backend_id, bytes, is_new);
        Ok(outcome)
    }

    /// Possibly a backend's reply to a NATed flow: undo the NAT and send it on.
    #[inline(always)]
    fn to_client(ctx: &XdpContext, p: &Parsed) -> Result<Outcome, Outcome> {
        let not_ours = Outcome::pass(PASS_NOT_VIP);
        let cfg = CONFIG.get(0).ok_or(not_ours)?;
        let port = u16::from_be(p.key.dport_be);
        if port < cfg.port_min
            || port > cfg.port_max
            || p.key.dst_be != snat_addr(cfg, p.key.family)
        {
            return Err(Outcome::pass(PASS_NOT_VIP));
        }
        // SAFETY: copied out at once; entries are replaced whole, never edited.
        let mut reply = unsafe { REPLIES.get(&p.key) }
            .copied()
            .ok_or(Outcome::pass(PASS_NOT_VIP))?;
        count(REPLY_HIT);
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
        rewrite(ctx, p, &t).map_err(|()| Outcome::pass(PASS_TRUNCATED))?;
        let (outcome, hop_changed) = forward(ctx, p, &t, &mut reply.next_hop, cfg.nexthop_ttl_ns);
        if hop_changed {
            let _ = REPLIES.insert(&p.key, &reply, u64::from(BPF_EXIST));
        }
        Ok(outcome)
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
