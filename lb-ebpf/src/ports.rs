//! NAT sources: the node's SNAT address, and leasing a source port for a new flow.
//!
//! Under NAT a flow's packets leave from the node's SNAT address and a source port
//! of the configured range that the datapath picks itself. The flow's `REPLIES`
//! entry (backend -> SNAT address:port) is the port's lease: it is inserted with
//! `BPF_NOEXIST`, which makes the port ours atomically, even against other CPUs. Each
//! CPU walks the range from its own cursor, which userspace staggers.
//!
//! A lease is taken over only when its flow is over: the flow entry is gone, or it
//! saw a FIN or RST and `flow_close_grace_ns` has passed since its last packet, or it
//! has been idle for `flow_idle_timeout_ns`; and never within `PORT_CLAIM_GRACE_NS`
//! of the claim, while the claimer is still recording its flow. The old flow entry
//! is removed at takeover, so a late packet of it cannot reach the new flow.
#![cfg(target_arch = "bpf")]

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::{
    AF_INET, DatapathConfig, FLOW_F_CLOSING, FlowKey, NextHop, PORT_CLAIM_GRACE_NS,
    counters::{DROP_NO_NAT_PORT, PORT_RECLAIMED},
};

use crate::maps::{FLOWS, PORT_CURSOR, REPLIES, Scratch, count};

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

/// Claim a free source port towards this backend by inserting the reply entry.
#[inline(always)]
pub fn claim_port(
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
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a port of the range, at most `port_max_host`"
        )]
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
