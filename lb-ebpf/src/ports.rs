//! NAT sources: the node's pool of SNAT addresses, and leasing a source port at
//! one of them for a new flow.
//!
//! Under NAT a flow's packets leave from one of the pool's addresses (chosen by
//! the flow's hash, the next one when its ports are taken) and a source port of the
//! configured range that the datapath picks itself. The flow's reply entry (backend
//! -> SNAT address:port) is the port's lease. A new flow's lease goes into
//! `HALF_REPLIES` with `BPF_NOEXIST`, which makes the port ours atomically, even
//! against other CPUs; it must then not be an established flow's, in `REPLIES`
//! (an established flow's entry moves there before it leaves `HALF_REPLIES`, see
//! `flow::promote`, so one of the two lookups always sees it). Each backend's
//! ports are taken in turn from one cursor that every CPU shares, so the next
//! port towards a backend is the one its oldest flow left. (Per-CPU cursors, which
//! this replaced, drifted into each other's recent ports and dropped a few SYNs
//! in 100,000 for want of a port while most ports were free.)
//!
//! A lease is taken over only when its flow is over by its TCP state's timeout
//! (`ct::reusable`), or when the flow is gone; but a half-open lease without a
//! flow not within `PORT_CLAIM_GRACE_NS` of its claim, while its claimer may still
//! be recording the flow. The old flow entry is removed at takeover, so a late packet of it
//! cannot reach the new flow.
#![cfg(target_arch = "bpf")]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    AF_INET, DatapathConfig, FLOW_F_TS, FlowKey, PORT_CLAIM_GRACE_NS, PORT_TRIES, REPLY_F_TS,
    ReplyState, SNAT_POOL_MAX, VipInfo,
    counters::{
        DROP_NO_NAT_PORT, DROP_NO_SNAT_ADDR, RECLAIM_CLOSED, RECLAIM_HALF_OPEN, RECLAIM_IDLE,
        RECLAIM_ORPHAN,
    },
    ct::{self, CT_ESTABLISHED},
    port_try_offset,
};

use crate::maps::{FLOWS, HALF_FLOWS, HALF_REPLIES, PORT_CURSOR, REPLIES, Scratch, count};

/// How many SNAT addresses the pool has for a family. Not clamped to the pool's
/// size: `snat_addr` masks each index instead, a bound the verifier can see (LLVM
/// would drop the mask of an index it knows to be below a clamped count, and the
/// verifier does not follow a modulo).
#[inline(always)]
pub fn snat_count(cfg: &DatapathConfig, family: u8) -> u32 {
    u32::from(if family == AF_INET {
        cfg.snat_v4_count
    } else {
        cfg.snat_v6_count
    })
}

/// The pool's SNAT address `index` for a family (all zero if unset).
#[inline(always)]
pub fn snat_addr(cfg: &DatapathConfig, family: u8, index: u8) -> [u32; 4] {
    let i = usize::from(index) & (SNAT_POOL_MAX - 1);
    if family == AF_INET {
        [cfg.snat_v4_be[i], 0, 0, 0]
    } else {
        cfg.snat_v6_be[i]
    }
}

/// Whether `addr` is one of the pool's addresses for its family.
#[inline(always)]
pub fn is_snat_addr(cfg: &DatapathConfig, family: u8, addr: &[u32; 4]) -> bool {
    let n = snat_count(cfg, family);
    let mut i = 0;
    while i < SNAT_POOL_MAX as u32 {
        #[expect(clippy::cast_possible_truncation, reason = "below SNAT_POOL_MAX")]
        if i < n && snat_addr(cfg, family, i as u8) == *addr {
            return true;
        }
        i += 1;
    }
    false
}

/// Claim a free source port towards this backend by inserting the reply entry
/// `s.reply` (whose client side the caller filled in) into `HALF_REPLIES`, trying
/// the pool's addresses in turn from the one `hash` picks. Fills in `s.flow.nat_port_be`
/// and `s.flow.snat_index`, and the timestamp offset of both entries.
#[inline(always)]
pub fn claim_port(
    key: &FlowKey,
    vip: &VipInfo,
    hash: u32,
    cfg: &DatapathConfig,
    now: u64,
    s: &mut Scratch,
) -> Result<(), u32> {
    // The VIP's run of the pool: the node's addresses, or the VIP's own.
    let (base, addrs) = (u32::from(vip.snat_first), u32::from(vip.snat_count));
    if addrs == 0 {
        return Err(DROP_NO_SNAT_ADDR);
    }
    // This node's slice of the range: two nodes that both think they own a VIP
    // (a preemption, a split brain) never give out the same port.
    let (min, max) = (u32::from(cfg.claim_min_host), u32::from(cfg.claim_max_host));
    if min == 0 || max < min {
        return Err(DROP_NO_NAT_PORT);
    }
    let range = max - min + 1;
    // Fields are written in place: building the key as a value first would put a
    // copy of it on the stack, which has no room to spare.
    s.reply_key.src_be = s.flow.backend_be;
    s.reply_key.sport_be = s.flow.backend_port_be;
    s.reply_key.proto = key.proto;
    s.reply_key.family = key.family;
    s.reply_key._pad = 0;
    let cursor = PORT_CURSOR
        .get_ptr_mut(s.flow.backend_id)
        .ok_or(DROP_NO_NAT_PORT)?;
    // SAFETY: a valid array slot, shared by CPUs, read plainly and moved on only
    // by atomic adds (`advance`). The BPF target's generic CPU has no fetching
    // atomics, so two CPUs that read it together try the same ports, and
    // `BPF_NOEXIST` gives each port to one of them.
    let start = unsafe { *cursor };
    // One loop of `PORT_TRIES`, the addresses taking turns from the one the hash
    // picks: nested loops over addresses and ports would unroll into more states
    // than older verifiers explore.
    let first = hash % addrs;
    for i in 0..PORT_TRIES {
        #[expect(clippy::cast_possible_truncation, reason = "masked by `snat_addr`")]
        let index = (base + (first + i) % addrs) as u8;
        s.reply_key.dst_be = snat_addr(cfg, key.family, index);
        let off = port_try_offset(i);
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a port of the range, at most `claim_max_host`"
        )]
        let port_be = ((min + start.wrapping_add(off) % range) as u16).to_be();
        s.reply_key.dport_be = port_be;
        // Never the VIP's own port: at a VIP that is its flows' source, a master's
        // reply to it would be taken for a client's packet to the VIP.
        if port_be != key.dport_be && try_claim(s, cfg, now) {
            advance(cursor, off + 1);
            s.flow.nat_port_be = port_be;
            s.flow.snat_index = index;
            return Ok(());
        }
    }
    advance(cursor, port_try_offset(PORT_TRIES - 1) + 1);
    Err(DROP_NO_NAT_PORT)
}

/// Move a backend's port cursor on by the `tried` ports a claim used, by an
/// atomic add (non-fetching, which the generic BPF CPU has). Not by writing back
/// what the claim read plus `tried`: a claim on one CPU that stalls (a vCPU the
/// hypervisor descheduled) while the other CPU claims on would then move the
/// cursor back onto ports just claimed, and the next claims would find a run of
/// live flows there.
#[inline(always)]
fn advance(cursor: *mut u32, tried: u32) {
    // SAFETY: `cursor` is a valid, aligned array slot; every write to it is
    // this atomic add. Its result (the old value) is unused, as it must be: the
    // generic CPU's add does not fetch.
    let _ = unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(cursor, tried) };
}

/// Set both entries' timestamp offset for the port under `s.reply_key`, past
/// `s.ts_floor` (`ct::ts_offset`).
#[inline(always)]
fn set_ts_offset(s: &mut Scratch, now: u64) {
    if s.syn_ts == 0 {
        return;
    }
    let off = ct::ts_offset(s.syn_tsval, ct::ts_clock(now), s.ts_floor);
    s.flow.ts_off = off;
    s.flow.flags |= FLOW_F_TS;
    s.reply.ts_off = off;
    s.reply.flags |= REPLY_F_TS;
}

/// Take the port under `s.reply_key` if it is free or its lease may be taken over.
/// One takeover path for both tables, so that each try is one walk for the
/// verifier.
#[inline(always)]
fn try_claim(s: &mut Scratch, cfg: &DatapathConfig, now: u64) -> bool {
    s.ts_floor = 0;
    set_ts_offset(s, now);
    let inserted = HALF_REPLIES
        .insert(&s.reply_key, &s.reply, u64::from(BPF_NOEXIST))
        .is_ok();
    // Ours in the half-open table: free unless an established flow holds it.
    // Not ours: a half-open flow holds it.
    // SAFETY: entries are replaced whole, never edited but for their next hop and
    // flags, so the fields read through this reference are consistent.
    let old = unsafe {
        if inserted {
            REPLIES.get(&s.reply_key)
        } else {
            HALF_REPLIES.get(&s.reply_key)
        }
    };
    let Some(old) = old else {
        return inserted;
    };
    if !reclaimable(s, old, !inserted, cfg, now) {
        if inserted {
            let _ = HALF_REPLIES.remove(&s.reply_key);
        }
        return false;
    }
    if inserted {
        let _ = REPLIES.remove(&s.reply_key);
    }
    // The lease, ours now, is written in place: the old flow may have left a
    // timestamp floor. Not by a second insert, which in an LRU map takes a fresh
    // node even for a key it holds and can fail for want of one.
    set_ts_offset(s, now);
    let Some(lease) = HALF_REPLIES.get_ptr_mut(&s.reply_key) else {
        return false;
    };
    // SAFETY: a valid entry pointer; its old flow is gone, and a reader on another
    // CPU may see the new lease half-written only for that flow's late packets.
    unsafe {
        (*lease).client_be = s.reply.client_be;
        (*lease).vip_be = s.reply.vip_be;
        (*lease).client_port_be = s.reply.client_port_be;
        (*lease).vip_port_be = s.reply.vip_port_be;
        (*lease).backend_id = s.reply.backend_id;
        (*lease).claimed_ns = s.reply.claimed_ns;
        (*lease).ts_off = s.reply.ts_off;
        (*lease).flags = s.reply.flags;
        (*lease).next_hop.ifindex = 0;
    }
    true
}

/// Whether the lease `old` (under `s.reply_key`, in the half-open table if
/// `half`) may be taken over (see the module docs). On yes, its flow entry is
/// removed and the takeover counted by kind. A call, not inlined: the verifier
/// then walks its branches once per try, not the rest of the claim once per
/// branch.
#[inline(never)]
fn reclaimable(
    s: &mut Scratch,
    old: &ReplyState,
    half: bool,
    cfg: &DatapathConfig,
    now: u64,
) -> bool {
    s.flow_key.src_be = old.client_be;
    s.flow_key.dst_be = old.vip_be;
    s.flow_key.sport_be = old.client_port_be;
    s.flow_key.dport_be = old.vip_port_be;
    s.flow_key.proto = s.reply_key.proto;
    s.flow_key.family = s.reply_key.family;
    s.flow_key._pad = 0;
    // SAFETY: as in `try_claim`; `state`, `flags` and `last_seen_ns` may change
    // under us, which can only delay a takeover to the next attempt.
    let found = unsafe {
        if half {
            HALF_FLOWS.get(&s.flow_key)
        } else {
            FLOWS.get(&s.flow_key)
        }
    };
    let Some(f) = found else {
        // A half-open lease whose flow is not recorded yet is its claimer's,
        // still running on another CPU.
        if half && now.wrapping_sub(old.claimed_ns) < PORT_CLAIM_GRACE_NS {
            return false;
        }
        count(RECLAIM_ORPHAN);
        return true;
    };
    if f.nat_port_be != s.reply_key.dport_be || f.backend_be != s.reply_key.src_be {
        count(RECLAIM_ORPHAN);
        return true;
    }
    let idle_ms = now.wrapping_sub(f.last_seen_ns) / 1_000_000;
    let state = ct::settled(f.state, f.client_fin, f.backend_fin);
    if !ct::reusable(state, f.flags, idle_ms, &cfg.timeouts_ms, s.syn_ts != 0) {
        return false;
    }
    if f.flags & FLOW_F_TS != 0 && f.fin_tsval != 0 {
        s.ts_floor = f.fin_tsval.wrapping_add(1);
    }
    let kind = if ct::half_open(f.state) {
        RECLAIM_HALF_OPEN
    } else if f.state == CT_ESTABLISHED {
        RECLAIM_IDLE
    } else {
        RECLAIM_CLOSED
    };
    count(kind);
    let _ = if half {
        HALF_FLOWS.remove(&s.flow_key)
    } else {
        FLOWS.remove(&s.flow_key)
    };
    true
}
