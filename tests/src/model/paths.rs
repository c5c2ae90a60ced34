//! The model's two directions: a client's packet to an owned VIP (its flow kept or
//! a new one balanced, with a NAT port), a master's reply (turned back to the
//! VIP), passive detection's refusals, and ICMP packet-too-big translated back.
//! Each function is the README's rule for its case; `Tx` holds the tables.

use lb_common::{
    AF_INET, BACKEND_F_DOWN, BACKEND_F_LOCAL, BACKEND_NONE, FALLBACK_HOPS, FLOW_F_REFUSED,
    FLOW_F_TS, FLOW_SEEN_GRANULARITY_NS, FlowKey, FlowState, MAGLEV_SIZE_MAX, NextHop,
    PASSIVE_SILENT_NS, PORT_CLAIM_GRACE_NS, PORT_TRIES, REPLY_F_TRACK, REPLY_F_TS, ReplyState,
    VipKey,
    counters::{
        DROP_NO_BACKEND, DROP_NO_NAT_PORT, DROP_NO_SNAT_ADDR, DROP_PASSIVE_ICMP, DROP_PASSIVE_RST,
        DROP_UNPROVEN_REFUSAL, FALLBACK, FIB_LOOKUP, FIN_UNPROVEN, FLOW_ESTABLISHED, FLOW_NEW,
        HALF_OPEN_LOST, ICMP_TOO_BIG_TRANSLATED, PASS_FIB_MISS, PASS_LOCAL_BACKEND, PASS_NO_FLOW,
        PASS_NO_TX_PORT, PASS_NOT_OWNED, PASS_NOT_VIP, PASS_VLAN, PASSIVE_SILENT, RECLAIM_CLOSED,
        RECLAIM_HALF_OPEN, RECLAIM_IDLE, RECLAIM_ORPHAN, REDIRECT, REPLY_HIT, REPLY_RESTORED,
        RST_UNPROVEN, TX,
    },
    ct::{
        self, CT_CLOSE, CT_ESTABLISHED, CT_LAST_ACK, CT_NONE, CT_SYN_SENT, CT_TIME_WAIT,
        FROM_BACKEND, FROM_CLIENT, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    flow_hash, port_try_offset,
};

use super::{
    BackendEntry, Half, Tx, VipEntry,
    frame::{self, Icmp, Parsed, be16, be32, fix, put, seq_ack, tsval_at, wire},
};
use crate::fixture::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

/// A verdict and its outcome counter.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub action: u32,
    pub counter: u32,
}

const fn pass(counter: u32) -> Outcome {
    Outcome {
        action: XDP_PASS,
        counter,
    }
}

const fn drop(counter: u32) -> Outcome {
    Outcome {
        action: XDP_DROP,
        counter,
    }
}

/// Where a rewritten packet goes: source and destination.
struct Tuple {
    src: [u32; 4],
    dst: [u32; 4],
    sport_be: u16,
    dport_be: u16,
}

/// The whole program: parse, then a client's packet, a master's reply, or an
/// ICMP error about a flow.
pub fn balance(tx: &mut Tx, f: &mut [u8], ingress: u32) -> Outcome {
    let p = match frame::parse(f) {
        Ok(p) => p,
        Err(c) => return pass(c),
    };
    let partial = super::offload::finish(tx, f, &p);
    let o = balance_parsed(tx, f, &p, ingress);
    if partial {
        super::offload::restore(f, &p, o.action);
    }
    o
}

fn balance_parsed(tx: &mut Tx, f: &mut [u8], p: &Parsed, ingress: u32) -> Outcome {
    let p = p.clone();
    match p.icmp {
        Icmp::TooBig => return too_big(tx, f, &p, ingress),
        Icmp::Unreach => return to_client(tx, f, &p, ingress),
        Icmp::No => {}
    }
    let vk = VipKey {
        addr_be: p.key.dst_be,
        port_be: p.key.dport_be,
        proto: p.key.proto,
        family: p.key.family,
    };
    let model = tx.m;
    let Some(vip) = model.vips.get(&vk) else {
        return to_client(tx, f, &p, ingress);
    };
    if !vip.owned {
        return pass(PASS_NOT_OWNED);
    }
    let key = p.key;
    let now = tx.now;
    let tcp = p.flags;
    let is_syn = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let (seq, ack) = seq_ack(f, &p);
    let mut half = false;
    let mut found = tx.flow(false, &key);
    if found.is_none() {
        found = tx.flow(true, &key);
        half = found.is_some();
    }
    let mut avoid = BACKEND_NONE;
    if is_syn && let Some(e) = found {
        avoid = forget_failed(tx, &key, &e, half, seq);
        if avoid != BACKEND_NONE {
            found = None;
        } else if e.state == CT_TIME_WAIT || e.state == CT_CLOSE {
            forget(tx, &key, &e, half);
            found = None;
        }
    }
    let (mut flow, table, is_new) = match found {
        Some(mut e) => {
            let mut table = half;
            if half || tcp & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || e.state == CT_LAST_ACK {
                let state = track_client(tx, &mut e, tcp, seq, ack);
                tx.set_flow(half, key, Some(e));
                if half && state == CT_ESTABLISHED {
                    if promote(tx, &key, &e).is_err() {
                        return pass(PASS_NO_FLOW);
                    }
                    table = false;
                }
            } else if now.wrapping_sub(e.last_seen_ns) >= FLOW_SEEN_GRANULARITY_NS
                || ct::record_stale(seq, ack, e.seq, e.ack)
            {
                tx.timed = true;
                e.last_seen_ns = now;
                e.seq = ct::advance(e.seq, seq);
                e.ack = ct::advance(e.ack, ack);
                tx.set_flow(half, key, Some(e));
            } else {
                tx.timed = true;
            }
            (e, table, false)
        }
        None if !is_syn => return pass(PASS_NO_FLOW),
        None => {
            let tsval = tsval_at(f, &p).and_then(|at| be32(f, at));
            match new_flow(tx, &key, vip, avoid, tsval, seq) {
                Ok(fl) => (fl, true, true),
                Err(c) => return drop(c),
            }
        }
    };
    let out = to_backend(tx, f, &p, &key, &mut flow, ingress, table);
    tx.set_flow(table, key, Some(flow));
    if is_new {
        tx.count(FLOW_NEW);
    }
    out
}

/// With passive detection, a SYN sent again on a half-open flow its master
/// refused or left unanswered: forget the flow and return the master to avoid.
fn forget_failed(tx: &mut Tx, key: &FlowKey, e: &FlowState, half: Half, seq: u32) -> u32 {
    if !tx.m.cfg.passive || e.state != CT_SYN_SENT || e.nat_port_be == 0 {
        return BACKEND_NONE;
    }
    let refused = e.flags & FLOW_F_REFUSED != 0;
    if !refused {
        let now = tx.now();
        if now.wrapping_sub(e.last_seen_ns) < PASSIVE_SILENT_NS || seq != e.seq {
            return BACKEND_NONE;
        }
    }
    if refused {
        tx.set_flow(half, *key, None);
    } else {
        tx.failure(e.backend_id, 1);
        tx.count(PASSIVE_SILENT);
        forget(tx, key, e, half);
    }
    e.backend_id
}

/// The lease key of `flow` (client key `key`).
fn reply_key(tx: &Tx, key: &FlowKey, flow: &FlowState) -> FlowKey {
    FlowKey {
        src_be: flow.backend_be,
        dst_be: snat_addr(tx, key.family, flow.snat_index),
        sport_be: flow.backend_port_be,
        dport_be: flow.nat_port_be,
        proto: key.proto,
        family: key.family,
        _pad: 0,
    }
}

fn snat_addr(tx: &Tx, family: u8, index: u8) -> [u32; 4] {
    tx.m.snat(family)
        .get(usize::from(index) & 3)
        .copied()
        .unwrap_or_default()
}

/// Forget a flow and its lease (a refused flow has given its lease back: the
/// port may be another flow's by now).
fn forget(tx: &mut Tx, key: &FlowKey, f: &FlowState, half: Half) {
    if f.nat_port_be != 0 && f.flags & FLOW_F_REFUSED == 0 {
        let rk = reply_key(tx, key, f);
        tx.set_reply(half, rk, None);
    }
    tx.set_flow(half, *key, None);
}

/// A client's segment on its flow: the state machine, the record of its numbers.
fn track_client(tx: &mut Tx, e: &mut FlowState, tcp: u8, seq: u32, ack: u32) -> u8 {
    if tcp & TCP_RST != 0 && !ct::near(seq, e.seq) {
        tx.count(RST_UNPROVEN);
        return e.state;
    }
    if tcp & TCP_FIN != 0 {
        if !ct::fin_proven(FROM_CLIENT, tcp, seq, ack, e.seq) {
            tx.count(FIN_UNPROVEN);
            return e.state;
        }
        e.client_fin = 1;
    }
    if tcp & (TCP_SYN | TCP_RST) == 0 {
        e.seq = ct::advance(e.seq, seq);
        e.ack = ct::advance(e.ack, ack);
    }
    let (state, flags) = ct::next(e.state, e.flags, FROM_CLIENT, tcp);
    if state != e.state || !ct::half_open(state) || tcp & TCP_SYN != 0 {
        e.last_seen_ns = tx.now();
    }
    e.state = state;
    e.flags = flags;
    state
}

/// The handshake is complete: move the flow and its lease to the established
/// tables.
fn promote(tx: &mut Tx, key: &FlowKey, flow: &FlowState) -> Result<(), ()> {
    let rk = reply_key(tx, key, flow);
    let ours = if flow.nat_port_be == 0 {
        true
    } else {
        match tx.reply(true, &rk) {
            Some(r) if r.client_be == key.src_be && r.client_port_be == key.sport_be => {
                tx.set_reply(false, rk, Some(r));
                true
            }
            _ => false,
        }
    };
    if ours {
        tx.set_flow(false, *key, Some(*flow));
        if flow.nat_port_be != 0 {
            tx.set_reply(true, rk, None);
        }
    }
    tx.set_flow(true, *key, None);
    if ours {
        tx.count(FLOW_ESTABLISHED);
        Ok(())
    } else {
        tx.count(HALF_OPEN_LOST);
        Err(())
    }
}

/// A new flow: a backend from the ring (or the fallback order), and a NAT port.
fn new_flow(
    tx: &mut Tx,
    key: &FlowKey,
    vip: &VipEntry,
    avoid: u32,
    tsval: Option<u32>,
    syn_seq: u32,
) -> Result<FlowState, u32> {
    let now = tx.now();
    let hash = flow_hash(key);
    let (bid, b) = pick(tx, vip, hash, key.family, avoid)?;
    let mut fl = FlowState {
        backend_be: b.addr_be,
        backend_port_be: b.port_be,
        backend_id: bid,
        state: CT_SYN_SENT,
        last_seen_ns: now,
        seq: syn_seq,
        ..FlowState::default()
    };
    if b.flags & BACKEND_F_LOCAL != 0 {
        return Ok(fl);
    }
    let mut reply = ReplyState {
        client_be: key.src_be,
        vip_be: key.dst_be,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        backend_id: bid,
        claimed_ns: now,
        ..ReplyState::default()
    };
    claim_port(tx, key, vip.snat, hash, &mut fl, &mut reply, tsval)?;
    Ok(fl)
}

fn backend(tx: &Tx, id: u32) -> Option<BackendEntry> {
    if id >= lb_common::MAX_BACKENDS {
        return None;
    }
    Some(tx.m.backends.get(&id).copied().unwrap_or_default())
}

/// The ring's backend for `hash`, past one out of rotation or `avoid`.
fn pick(
    tx: &mut Tx,
    vip: &VipEntry,
    hash: u32,
    family: u8,
    avoid: u32,
) -> Result<(u32, BackendEntry), u32> {
    let size = u32::try_from(vip.ring.len()).unwrap_or(0);
    if size == 0 || size > MAGLEV_SIZE_MAX {
        return Err(DROP_NO_BACKEND);
    }
    let mut id = vip.ring[(hash % size) as usize];
    if id == BACKEND_NONE {
        return Err(DROP_NO_BACKEND);
    }
    let mut b = backend(tx, id).ok_or(DROP_NO_BACKEND)?;
    if b.flags & BACKEND_F_DOWN != 0 || id == avoid {
        let mut next = b.fallback;
        for _ in 0..FALLBACK_HOPS {
            if next == BACKEND_NONE || next == id {
                break;
            }
            let Some(nb) = backend(tx, next) else { break };
            if nb.flags & BACKEND_F_DOWN == 0 && next != avoid && nb.family == family {
                (id, b) = (next, nb);
                tx.count(FALLBACK);
                break;
            }
            next = nb.fallback;
        }
    }
    if b.family != family {
        return Err(DROP_NO_BACKEND);
    }
    Ok((id, b))
}

/// Claim a NAT port towards the flow's backend: the VIP's run of the pool in
/// turn from the hash's address, the ports of the node's slice in turn from the
/// backend's cursor (never the VIP's own port), eight tries.
fn claim_port(
    tx: &mut Tx,
    key: &FlowKey,
    (base, count): (u8, u8),
    hash: u32,
    fl: &mut FlowState,
    reply: &mut ReplyState,
    tsval: Option<u32>,
) -> Result<(), u32> {
    let addrs = u32::from(count);
    if addrs == 0 {
        return Err(DROP_NO_SNAT_ADDR);
    }
    let claim = tx.m.cfg.claim.clone();
    let (min, max) = (u32::from(*claim.start()), u32::from(*claim.end()));
    if min == 0 || max < min {
        return Err(DROP_NO_NAT_PORT);
    }
    let range = max - min + 1;
    let mut rk = FlowKey {
        src_be: fl.backend_be,
        sport_be: fl.backend_port_be,
        proto: key.proto,
        family: key.family,
        ..FlowKey::default()
    };
    let start = tx.cursor(fl.backend_id);
    let first = hash % addrs;
    for i in 0..PORT_TRIES {
        let index = u8::try_from(u32::from(base) + (first + i) % addrs).expect("small");
        rk.dst_be = snat_addr(tx, key.family, index);
        let off = port_try_offset(i);
        let port = u16::try_from(min + start.wrapping_add(off) % range).expect("a port");
        rk.dport_be = port.to_be();
        if rk.dport_be != key.dport_be && try_claim(tx, &rk, fl, reply, tsval) {
            tx.set_cursor(fl.backend_id, start.wrapping_add(off + 1));
            fl.nat_port_be = port.to_be();
            fl.snat_index = index;
            return Ok(());
        }
    }
    tx.set_cursor(
        fl.backend_id,
        start.wrapping_add(port_try_offset(PORT_TRIES - 1) + 1),
    );
    Err(DROP_NO_NAT_PORT)
}

/// The flow's timestamp offset, when its SYN carries timestamps.
fn set_ts(tx: &mut Tx, fl: &mut FlowState, reply: &mut ReplyState, tsval: Option<u32>, floor: u32) {
    if let Some(v) = tsval {
        let off = ct::ts_offset(v, ct::ts_clock(tx.now()), floor);
        fl.ts_off = off;
        fl.flags |= FLOW_F_TS;
        reply.ts_off = off;
        reply.flags |= REPLY_F_TS;
    }
}

/// Take the port under `rk` if it is free or its lease is over.
fn try_claim(
    tx: &mut Tx,
    rk: &FlowKey,
    fl: &mut FlowState,
    reply: &mut ReplyState,
    tsval: Option<u32>,
) -> bool {
    set_ts(tx, fl, reply, tsval, 0);
    let inserted = tx.reply(true, rk).is_none();
    if inserted {
        tx.set_reply(true, *rk, Some(*reply));
    }
    let old = tx.reply(!inserted, rk);
    let Some(old) = old else {
        return inserted;
    };
    let Some(floor) = reclaimable(tx, &old, !inserted, rk, tsval.is_some()) else {
        if inserted {
            tx.set_reply(true, *rk, None);
        }
        return false;
    };
    if inserted {
        tx.set_reply(false, *rk, None);
    }
    set_ts(tx, fl, reply, tsval, floor);
    let mut lease = tx.reply(true, rk).expect("the lease just taken");
    lease.client_be = reply.client_be;
    lease.vip_be = reply.vip_be;
    lease.client_port_be = reply.client_port_be;
    lease.vip_port_be = reply.vip_port_be;
    lease.backend_id = reply.backend_id;
    lease.claimed_ns = reply.claimed_ns;
    lease.ts_off = reply.ts_off;
    lease.flags = reply.flags;
    lease.next_hop.ifindex = 0;
    tx.set_reply(true, *rk, Some(lease));
    true
}

/// Whether the lease `old` may be taken over; if so its flow is removed, and the
/// result is the timestamp floor it leaves.
fn reclaimable(
    tx: &mut Tx,
    old: &ReplyState,
    half: Half,
    rk: &FlowKey,
    claimant_ts: bool,
) -> Option<u32> {
    let fk = FlowKey {
        src_be: old.client_be,
        dst_be: old.vip_be,
        sport_be: old.client_port_be,
        dport_be: old.vip_port_be,
        proto: rk.proto,
        family: rk.family,
        _pad: 0,
    };
    let Some(f) = tx.flow(half, &fk) else {
        if half && tx.now().wrapping_sub(old.claimed_ns) < PORT_CLAIM_GRACE_NS {
            return None;
        }
        tx.count(RECLAIM_ORPHAN);
        return Some(0);
    };
    if f.nat_port_be != rk.dport_be || f.backend_be != rk.src_be {
        tx.count(RECLAIM_ORPHAN);
        return Some(0);
    }
    let idle_ms = tx.now().wrapping_sub(f.last_seen_ns) / 1_000_000;
    if !ct::reusable(
        ct::settled(f.state, f.client_fin, f.backend_fin),
        f.flags,
        idle_ms,
        &tx.m.cfg.timeouts_ms,
        claimant_ts,
    ) {
        return None;
    }
    let floor = if f.flags & FLOW_F_TS != 0 && f.fin_tsval != 0 {
        f.fin_tsval.wrapping_add(1)
    } else {
        0
    };
    tx.count(if ct::half_open(f.state) {
        RECLAIM_HALF_OPEN
    } else if f.state == CT_ESTABLISHED {
        RECLAIM_IDLE
    } else {
        RECLAIM_CLOSED
    });
    tx.set_flow(half, fk, None);
    Some(floor)
}

/// A client's packet on `flow` (in the half-open table if `half`): NAT to its
/// backend, timestamps shifted, sent on.
fn to_backend(
    tx: &mut Tx,
    f: &mut [u8],
    p: &Parsed,
    key: &FlowKey,
    flow: &mut FlowState,
    ingress: u32,
    half: Half,
) -> Outcome {
    if flow.nat_port_be == 0 {
        return pass(PASS_LOCAL_BACKEND);
    }
    let mut l4 = Vec::new();
    if flow.flags & FLOW_F_TS != 0
        && let Some(at) = tsval_at(f, p)
        && let Some(old) = be32(f, at)
    {
        let sent = old.wrapping_add(flow.ts_off);
        l4 = put(f, at, &sent.to_be_bytes());
        if p.flags & TCP_FIN != 0 {
            flow.fin_tsval = sent;
        }
    }
    let t = Tuple {
        src: snat_addr(tx, key.family, flow.snat_index),
        dst: flow.backend_be,
        sport_be: flow.nat_port_be,
        dport_be: flow.backend_port_be,
    };
    rewrite(f, p, &t, &l4);
    let mut hop = flow.next_hop;
    let (out, changed) = forward(tx, f, p, &t, &mut hop, ingress);
    if changed {
        flow.next_hop = hop;
        // Only a flow of the established table has its lease there to restore.
        if !ct::half_open(flow.state) && !half {
            restore_reply(tx, key, flow);
        }
    }
    out
}

/// An established flow's lease, put back if it is gone.
fn restore_reply(tx: &mut Tx, key: &FlowKey, flow: &FlowState) {
    let rk = reply_key(tx, key, flow);
    if tx.reply(false, &rk).is_some() {
        return;
    }
    let r = ReplyState {
        client_be: key.src_be,
        vip_be: key.dst_be,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        backend_id: flow.backend_id,
        claimed_ns: tx.now(),
        ts_off: flow.ts_off,
        flags: if flow.flags & FLOW_F_TS != 0 {
            REPLY_F_TS
        } else {
            0
        } | if flow.state >= ct::CT_FIN_WAIT {
            REPLY_F_TRACK
        } else {
            0
        },
        next_hop: NextHop::default(),
    };
    tx.set_reply(false, rk, Some(r));
    tx.count(REPLY_RESTORED);
}

/// New addresses and ports, with the IPv4 header and TCP checksums updated for
/// them and for the other words `l4` that changed in the segment.
fn rewrite(f: &mut [u8], p: &Parsed, t: &Tuple, l4: &[(u16, u16)]) {
    let (n, src_at, dst_at) = if p.key.family == AF_INET {
        (1, p.l3 + 12, p.l3 + 16)
    } else {
        (4, p.l3 + 8, p.l3 + 24)
    };
    let mut addrs = put(f, src_at, &wire(&t.src, n));
    addrs.extend(put(f, dst_at, &wire(&t.dst, n)));
    if p.key.family == AF_INET {
        fix(f, p.l3 + 10, &addrs);
    }
    let mut words = addrs;
    words.extend(put(f, p.l4, &t.sport_be.to_ne_bytes()));
    words.extend(put(f, p.l4 + 2, &t.dport_be.to_ne_bytes()));
    words.extend_from_slice(l4);
    fix(f, p.l4 + 16, &words);
}

/// The next hop towards `t.dst` from the cache in `hop`, or from the FIB (the
/// lab's neighbours, within the MTU); the MACs written. Returns the outcome and
/// whether `hop` changed.
fn forward(
    tx: &mut Tx,
    f: &mut [u8],
    p: &Parsed,
    t: &Tuple,
    hop: &mut NextHop,
    ingress: u32,
) -> (Outcome, bool) {
    if p.vlan {
        return (pass(PASS_VLAN), false);
    }
    let mut changed = false;
    let stale = hop.ifindex == 0
        || {
            let now = tx.now();
            now.wrapping_sub(hop.checked_ns) >= tx.m.cfg.ttl_ns
        }
        || p.ip_len > hop.max_len_host;
    if stale {
        tx.count(FIB_LOOKUP);
        let found =
            tx.m.neigh
                .get(&(t.dst, p.key.family))
                .filter(|_| p.ip_len <= tx.m.mtu)
                .copied();
        let Some(n) = found else {
            changed = hop.ifindex != 0;
            *hop = NextHop::default();
            return (pass(PASS_FIB_MISS), changed);
        };
        hop.ifindex = n.ifindex;
        hop.smac = n.smac;
        hop.dmac = n.dmac;
        hop.max_len_host = p.ip_len;
        hop.checked_ns = tx.now();
        changed = true;
    }
    let out = if hop.ifindex == ingress {
        Outcome {
            action: XDP_TX,
            counter: TX,
        }
    } else if tx.m.tx_ports.contains(&hop.ifindex) {
        Outcome {
            action: XDP_REDIRECT,
            counter: REDIRECT,
        }
    } else {
        return (pass(PASS_NO_TX_PORT), changed);
    };
    f[0..6].copy_from_slice(&hop.dmac);
    f[6..12].copy_from_slice(&hop.smac);
    (out, changed)
}

fn is_snat(tx: &Tx, family: u8, addr: &[u32; 4]) -> bool {
    tx.m.snat(family).iter().any(|a| a == addr)
}

/// A master's segment (or an ICMP unreachable about one) to a NAT port: back to
/// the VIP and the client, or passive detection's.
fn to_client(tx: &mut Tx, f: &mut [u8], p: &Parsed, ingress: u32) -> Outcome {
    let port = u16::from_be(p.key.dport_be);
    if port < tx.m.cfg.port_min
        || port > tx.m.cfg.port_max
        || !is_snat(tx, p.key.family, &p.key.dst_be)
    {
        return pass(PASS_NOT_VIP);
    }
    let key = p.key;
    let (half, mut r) = match tx.reply(false, &key) {
        Some(r) => (false, r),
        None => match tx.reply(true, &key) {
            Some(r) => (true, r),
            None => return pass(PASS_NOT_VIP),
        },
    };
    tx.count(REPLY_HIT);
    let passive = tx.m.cfg.passive;
    if p.icmp != Icmp::No {
        if !passive || !half {
            return pass(PASS_NOT_VIP);
        }
        let Some(seq) = quoted_seq(f, p) else {
            return pass(PASS_NOT_VIP);
        };
        return match update_flow(tx, &mut r, &key, half, 0, false, true, (seq, 0)) {
            CT_SYN_SENT => refuse(tx, &r, &key, half, 2, DROP_PASSIVE_ICMP),
            CT_NONE => drop(DROP_UNPROVEN_REFUSAL),
            _ => pass(PASS_NOT_VIP),
        };
    }
    let tcp = p.flags;
    if tcp & (TCP_SYN | TCP_FIN | TCP_RST) != 0 || r.flags & REPLY_F_TRACK != 0 {
        let syn_ack = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
        let no_ts = syn_ack && tsval_at(f, p).is_none();
        let rst = tcp & TCP_RST != 0;
        let before = update_flow(
            tx,
            &mut r,
            &key,
            half,
            tcp,
            no_ts,
            rst && passive,
            seq_ack(f, p),
        );
        if before == CT_NONE {
            return drop(DROP_UNPROVEN_REFUSAL);
        }
        if rst && passive && before == CT_SYN_SENT {
            return refuse(tx, &r, &key, half, 0, DROP_PASSIVE_RST);
        }
    }
    let mut l4 = Vec::new();
    if r.flags & REPLY_F_TS != 0
        && let Some(at) = tsval_at(f, p).map(|a| a + 4)
        && let Some(old) = be32(f, at)
    {
        l4 = put(f, at, &old.wrapping_sub(r.ts_off).to_be_bytes());
    }
    let t = Tuple {
        src: r.vip_be,
        dst: r.client_be,
        sport_be: r.vip_port_be,
        dport_be: r.client_port_be,
    };
    rewrite(f, p, &t, &l4);
    let mut hop = r.next_hop;
    let (out, changed) = forward(tx, f, p, &t, &mut hop, ingress);
    if changed {
        r.next_hop = hop;
        tx.set_reply(half, key, Some(r));
    }
    out
}

/// The quoted segment's sequence number.
fn quoted_seq(f: &[u8], p: &Parsed) -> Option<u32> {
    let inner = p.l4 + 8;
    let ihl = if p.key.family == AF_INET {
        usize::from(f.get(inner)? & 0x0f) * 4
    } else {
        40
    };
    be32(f, inner + ihl + 4)
}

/// A master's segment with TCP flags `tcp` (0 for an ICMP error) on the flow of
/// lease `r`: its state, or, for a refusal of the flow's unanswered SYN, the
/// check that it refuses that SYN. Returns the state before, `CT_NONE` for a
/// refusal that does not match, `CT_ESTABLISHED` for a flow that is gone.
#[expect(
    clippy::too_many_arguments,
    reason = "the datapath's `how` bits, spelled out"
)]
fn update_flow(
    tx: &mut Tx,
    r: &mut ReplyState,
    rk: &FlowKey,
    half: Half,
    tcp: u8,
    no_ts: bool,
    refusal: bool,
    (seq, ack): (u32, u32),
) -> u8 {
    let fk = FlowKey {
        src_be: r.client_be,
        dst_be: r.vip_be,
        sport_be: r.client_port_be,
        dport_be: r.vip_port_be,
        proto: rk.proto,
        family: rk.family,
        _pad: 0,
    };
    let Some(mut fl) = tx.flow(half, &fk) else {
        return CT_ESTABLISHED;
    };
    let before = fl.state;
    if before == CT_SYN_SENT && (refusal || tcp & TCP_RST != 0) {
        let genuine = if tcp == 0 {
            seq == fl.seq
        } else {
            ct::refuses_syn(tcp, ack, fl.seq)
        };
        if !genuine {
            return CT_NONE;
        }
        if refusal {
            fl.flags |= FLOW_F_REFUSED;
            tx.set_flow(half, fk, Some(fl));
            return before;
        }
    } else if tcp & TCP_RST != 0 && !ct::near(seq, fl.ack) {
        tx.count(RST_UNPROVEN);
        return before;
    } else if tcp & TCP_FIN != 0 {
        if !ct::fin_proven(FROM_BACKEND, tcp, seq, ack, fl.seq) {
            tx.count(FIN_UNPROVEN);
            return before;
        }
        fl.backend_fin = 1;
        r.flags |= REPLY_F_TRACK;
        tx.set_reply(half, *rk, Some(*r));
    }
    if tcp & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && ct::half_open(before) {
        fl.ack = seq.wrapping_add(1);
    }
    let (state, flags) = ct::next(before, fl.flags, FROM_BACKEND, tcp);
    fl.state = state;
    fl.flags = if no_ts { flags & !FLOW_F_TS } else { flags };
    if tcp != 0 {
        fl.last_seen_ns = tx.now();
    }
    tx.set_flow(half, fk, Some(fl));
    before
}

/// A refusal of a half-open flow's SYN: counted against its master, its lease
/// released, the refusal dropped.
fn refuse(tx: &mut Tx, r: &ReplyState, rk: &FlowKey, half: Half, kind: usize, c: u32) -> Outcome {
    tx.failure(r.backend_id, kind);
    tx.set_reply(half, *rk, None);
    drop(c)
}

/// An ICMP fragmentation needed or packet too big about a flow under NAT, turned
/// into one from the VIP to the client about the segment as the client sent it.
#[expect(
    clippy::many_single_char_names,
    reason = "the frame, the parse, the lease, the tuple: named as everywhere in this file"
)]
fn too_big(tx: &mut Tx, f: &mut [u8], p: &Parsed, ingress: u32) -> Outcome {
    if !is_snat(tx, p.key.family, &p.key.dst_be) {
        return pass(PASS_NOT_VIP);
    }
    let Some(r) = tx.reply(false, &p.key).or_else(|| tx.reply(true, &p.key)) else {
        return pass(PASS_NOT_VIP);
    };
    let (v4, n) = (
        p.key.family == AF_INET,
        if p.key.family == AF_INET { 1 } else { 4 },
    );
    let (vip, client) = (wire(&r.vip_be, n), wire(&r.client_be, n));
    let l3 = p.l3;
    let inner = p.l4 + 8;
    // Outer header: from the VIP to the client.
    let (osrc, odst, qsrc, qdst) = if v4 {
        (l3 + 12, l3 + 16, inner + 12, inner + 16)
    } else {
        (l3 + 8, l3 + 24, inner + 8, inner + 24)
    };
    let mut outer = put(f, osrc, &vip);
    outer.extend(put(f, odst, &client));
    if v4 {
        fix(f, l3 + 10, &outer);
    }
    // The quote: from the client to the VIP, as the client sent it.
    let mut quote = put(f, qsrc, &client);
    quote.extend(put(f, qdst, &vip));
    let mut icmp = quote.clone();
    let ports_at = if v4 {
        icmp.push(fix(f, inner + 10, &quote));
        inner + usize::from(f[inner] & 0x0f) * 4
    } else {
        icmp.extend_from_slice(&outer);
        inner + 40
    };
    let mut ports = put(f, ports_at, &r.client_port_be.to_ne_bytes());
    ports.extend(put(f, ports_at + 2, &r.vip_port_be.to_ne_bytes()));
    icmp.extend_from_slice(&ports);
    if be16(f, ports_at + 16).is_some() {
        let mut tcp = quote;
        tcp.extend_from_slice(&ports);
        icmp.push(fix(f, ports_at + 16, &tcp));
    }
    fix(f, p.l4 + 2, &icmp);
    tx.count(ICMP_TOO_BIG_TRANSLATED);
    let t = Tuple {
        src: r.vip_be,
        dst: r.client_be,
        sport_be: r.vip_port_be,
        dport_be: r.client_port_be,
    };
    let mut hop = NextHop::default();
    forward(tx, f, p, &t, &mut hop, ingress).0
}
