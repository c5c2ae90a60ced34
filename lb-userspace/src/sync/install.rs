//! Between the datapath's flow tables and the wire: a `SyncEvent` the datapath
//! exported becomes a [`FlowRecord`] for the peers ([`record_of`]), and a peer's
//! record becomes this node's two entries ([`entries_of`]), written by
//! [`Datapath::install_peer_flow`].
//!
//! Everything node-local is translated, nothing is copied: pool indexes become
//! addresses and back, backend ids become addresses and back, instants become
//! ages and back (clocks differ per node). An installed flow is marked
//! `FLOW_F_FROM_PEER`: the datapath adopts its client's sequence numbers at its
//! first plain segment, since the record dates from the flow's establishment.
//! It is unused until this node owns the VIP: a client's packets to a VIP it
//! does not own pass before any flow lookup, and the masters' replies to the VIP
//! reach only its owner. One the peer stopped speaking of ([`stale`]) is swept.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
};

use lb_common::{
    AF_INET, FlowKey, FlowState, IPPROTO_TCP, NextHop, REPLY_F_TRACK, REPLY_F_TS, ReplyState,
    SYNC_EV_CLOSED, SYNC_EV_ESTABLISHED, SyncEvent,
    ct::{CT_FIN_WAIT, CT_STATES, FLOW_F_BACKEND_FIRST, FLOW_F_FROM_PEER, FLOW_F_SYNC, FLOW_F_TS},
};

use super::wire::{FlowRecord, RecordKind};
use crate::datapath::{addr_words, socket_addr};

/// What translating needs of this node: its SNAT pools (`NodeConfig`), its
/// backend ids, the VIPs that sync, the NAT port range, the TCP timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub snat_v4: Vec<Ipv4Addr>,
    pub snat_v6: Vec<Ipv6Addr>,
    pub backend_ids: HashMap<SocketAddr, u32>,
    pub vips: HashSet<SocketAddr>,
    /// The VIP addresses this node owns: their flows are what a bulk sends.
    pub owned: HashSet<IpAddr>,
    pub nat_ports: RangeInclusive<u16>,
    /// How long after its last packet a flow in each TCP state (`ct::CT_*`)
    /// holds its NAT port: a flow a peer synced here and has not refreshed for
    /// longer (and a resync interval) is over on the peer too ([`stale`]).
    pub timeouts_ms: [u32; CT_STATES],
}

/// Whether a flow a peer synced here (parked: its VIP is not ours) is over:
/// silent, as of the peer's last word on it, for longer than its state's
/// timeout plus `slack_ns` (a resync interval: every bulk refreshes it). The
/// peer itself would have given its port to another flow by then, so the
/// entry only holds table space, and a peer's flow lost on a broken link
/// (its close never sent) would otherwise stay until the LRU evicts it.
#[must_use]
pub fn stale(view: &View, key: &FlowKey, flow: &FlowState, now_ns: u64, slack_ns: u64) -> bool {
    let vip = socket_addr(&key.dst_be, key.family, key.dport_be).ip();
    let timeout_ms = view
        .timeouts_ms
        .get(usize::from(flow.state))
        .copied()
        .unwrap_or(0);
    !view.owned.contains(&vip)
        && now_ns.saturating_sub(flow.last_seen_ns) > u64::from(timeout_ms) * 1_000_000 + slack_ns
}

/// Why a peer's record was not installed, for `apilb_sync_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstallReject {
    /// Its VIP is not one this node syncs.
    UnknownVip,
    /// Its SNAT address is not in this node's pool.
    ForeignSnat,
    /// Its backend is not configured here.
    UnknownBackend,
    /// Its NAT port lies outside `nat_ports`.
    BadPort,
    /// A live flow of this node's own holds the client's tuple, or the NAT
    /// port's lease.
    Conflict,
    /// Writing the entries failed (logged).
    WriteFailed,
}

impl InstallReject {
    /// Every reason, e.g. for `/metrics` to show each at 0 from the start.
    pub const ALL: [InstallReject; 6] = [
        Self::UnknownVip,
        Self::ForeignSnat,
        Self::UnknownBackend,
        Self::BadPort,
        Self::Conflict,
        Self::WriteFailed,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownVip => "unknown_vip",
            Self::ForeignSnat => "foreign_snat",
            Self::UnknownBackend => "unknown_backend",
            Self::BadPort => "bad_port",
            Self::Conflict => "conflict",
            Self::WriteFailed => "write_failed",
        }
    }
}

/// The flow the datapath exported, as its peers are told it; `None` for an event
/// this version does not know, or whose SNAT index is not in the pool.
#[must_use]
pub fn record_of(ev: &SyncEvent, view: &View, now_ns: u64) -> Option<FlowRecord> {
    let kind = match ev.kind {
        SYNC_EV_ESTABLISHED => RecordKind::Established,
        SYNC_EV_CLOSED => RecordKind::Closed,
        _ => return None,
    };
    let family = ev.key.family;
    let snat: IpAddr = if family == AF_INET {
        IpAddr::V4(*view.snat_v4.get(usize::from(ev.snat_index))?)
    } else {
        IpAddr::V6(*view.snat_v6.get(usize::from(ev.snat_index))?)
    };
    let age_ms = now_ns.saturating_sub(ev.at_ns) / 1_000_000;
    Some(FlowRecord {
        kind,
        state: ev.state,
        flags: ev.flags,
        client: socket_addr(&ev.key.src_be, family, ev.key.sport_be),
        vip: socket_addr(&ev.key.dst_be, family, ev.key.dport_be),
        backend: socket_addr(&ev.backend_be, family, ev.backend_port_be),
        snat,
        nat_port: u16::from_be(ev.nat_port_be),
        ts_off: ev.ts_off,
        fin_tsval: ev.fin_tsval,
        seq: ev.seq,
        ack: ev.ack,
        age_ms: u32::try_from(age_ms).unwrap_or(u32::MAX),
    })
}

/// An established flow of this node's tables as its peers are told it in a
/// bulk; `None` if its SNAT index is not in the pool.
#[must_use]
pub fn record_of_flow(
    key: &FlowKey,
    f: &FlowState,
    view: &View,
    now_ns: u64,
) -> Option<FlowRecord> {
    let event = SyncEvent {
        kind: SYNC_EV_ESTABLISHED,
        state: f.state,
        snat_index: f.snat_index,
        _pad0: 0,
        flags: f.flags,
        key: *key,
        backend_be: f.backend_be,
        backend_port_be: f.backend_port_be,
        nat_port_be: f.nat_port_be,
        ts_off: f.ts_off,
        fin_tsval: f.fin_tsval,
        seq: f.seq,
        ack: f.ack,
        _pad1: 0,
        at_ns: f.last_seen_ns,
    };
    record_of(&event, view, now_ns)
}

/// A peer's flow as this node's entries: the client's key and flow, the reply
/// key and its entry. `now_ns` is this node's coarse clock.
pub fn entries_of(
    r: &FlowRecord,
    view: &View,
    now_ns: u64,
) -> Result<(FlowKey, FlowState, FlowKey, ReplyState), InstallReject> {
    if !view.vips.contains(&r.vip) {
        return Err(InstallReject::UnknownVip);
    }
    let snat_index = match r.snat {
        IpAddr::V4(a) => view.snat_v4.iter().position(|p| *p == a),
        IpAddr::V6(a) => view.snat_v6.iter().position(|p| *p == a),
    }
    .and_then(|i| u8::try_from(i).ok())
    .ok_or(InstallReject::ForeignSnat)?;
    let backend_id = *view
        .backend_ids
        .get(&r.backend)
        .ok_or(InstallReject::UnknownBackend)?;
    if !view.nat_ports.contains(&r.nat_port) {
        return Err(InstallReject::BadPort);
    }
    let (client_be, family) = addr_words(r.client.ip());
    let (vip_be, _) = addr_words(r.vip.ip());
    let (backend_be, _) = addr_words(r.backend.ip());
    let (snat_be, _) = addr_words(r.snat);
    let key = FlowKey {
        src_be: client_be,
        dst_be: vip_be,
        sport_be: r.client.port().to_be(),
        dport_be: r.vip.port().to_be(),
        proto: IPPROTO_TCP,
        family,
        _pad: 0,
    };
    let over = r.state >= CT_FIN_WAIT;
    // At least a second old, so that the flow's first packet here takes the
    // record-refresh branch, which re-anchors its sequence numbers.
    let age_ns = u64::from(r.age_ms).max(1_000) * 1_000_000;
    let flow = FlowState {
        backend_be,
        backend_port_be: r.backend.port().to_be(),
        nat_port_be: r.nat_port.to_be(),
        backend_id,
        flags: (r.flags & (FLOW_F_TS | FLOW_F_BACKEND_FIRST)) | FLOW_F_SYNC | FLOW_F_FROM_PEER,
        state: r.state,
        snat_index,
        client_fin: u8::from(over),
        backend_fin: u8::from(over),
        ts_off: r.ts_off,
        fin_tsval: r.fin_tsval,
        last_seen_ns: now_ns.saturating_sub(age_ns),
        seq: r.seq,
        ack: r.ack,
        next_hop: NextHop::default(),
    };
    let rkey = FlowKey {
        src_be: backend_be,
        dst_be: snat_be,
        sport_be: r.backend.port().to_be(),
        dport_be: r.nat_port.to_be(),
        proto: IPPROTO_TCP,
        family,
        _pad: 0,
    };
    let reply = ReplyState {
        client_be,
        vip_be,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        backend_id,
        claimed_ns: now_ns,
        ts_off: r.ts_off,
        flags: if r.flags & FLOW_F_TS != 0 {
            REPLY_F_TS
        } else {
            0
        } | if over { REPLY_F_TRACK } else { 0 },
        next_hop: NextHop::default(),
    };
    Ok((key, flow, rkey, reply))
}
