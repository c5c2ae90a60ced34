//! A reference model of the XDP datapath, in Rust, for the fuzzer: given the
//! datapath's configuration (as the controller wrote it), its flow tables and a
//! frame, what the program must answer (verdict, output bytes, counters) and how
//! its tables must change.
//!
//! The model is written from the README's rules ("The datapath", "NAT flow
//! lifecycle", "Passive detection"), with its own parse and checksums
//! ([`frame`]); it shares with the datapath only lb-common's types and the pure,
//! host-tested functions of the TCP state machine (`ct`) and the flow hash. It
//! mirrors every table the program keeps (`FLOWS`, `HALF_FLOWS`, `REPLIES`,
//! `HALF_REPLIES`, the port cursors) entry by entry, so that the runner can hold
//! the kernel's tables against it field by field.
//!
//! A step is a pure function of the model and the time ([`Model::step`]): it
//! returns a [`Prediction`], whose changes [`Model::apply`] makes. The runner
//! can thus ask for the answer at two clock readings when the kernel's coarse
//! clock ticked during a frame, and keep the one the kernel gave.
//!
//! - [`frame`]: parsing, checksums, field writers.
//! - [`offload`]: partial checksums, finished and put back.
//! - [`paths`]: the two directions, new flows and ports, passive detection, PMTU.
//! - [`gen`]: the frame generator (seeds and mutations).
//! - [`run`]: the fuzzing loop against a [`crate::fixture::Lab`].

pub mod frame;
pub mod generate;
pub mod offload;
pub mod paths;
pub mod run;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use lb_common::{
    AF_INET, BACKEND_F_DOWN, BACKEND_F_LOCAL, FlowKey, FlowState, ReplyState, VipKey, ct,
};
use lb_userspace::{controller::Desired, datapath::addr_words};

use crate::{
    fixture::{FX0_MAC, FX1_MAC, Lab},
    packets::Mac,
};

/// A VIP as the model knows it.
#[derive(Clone, Debug)]
pub struct VipEntry {
    pub id: u32,
    pub owned: bool,
    /// Its Maglev ring, shared: the model is cloned to try alternatives.
    pub ring: Arc<Vec<u32>>,
    /// `(first, count)`: its run of its family's SNAT pool.
    pub snat: (u8, u8),
}

/// A backend as the `BACKENDS` array holds it.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendEntry {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    pub flags: u32,
    pub fallback: u32,
}

/// The node settings the datapath reads from `CONFIG`.
#[derive(Clone, Debug)]
pub struct Cfg {
    pub snat4: Vec<[u32; 4]>,
    pub snat6: Vec<[u32; 4]>,
    pub port_min: u16,
    pub port_max: u16,
    /// This node's slice of the range, where it claims.
    pub claim: std::ops::RangeInclusive<u16>,
    pub ttl_ns: u64,
    pub timeouts_ms: [u32; ct::CT_STATES],
    pub passive: bool,
}

/// A neighbour the lab's FIB resolves: interface, its MAC, the neighbour's MAC.
#[derive(Clone, Copy, Debug)]
pub struct Neigh {
    pub ifindex: u32,
    pub smac: Mac,
    pub dmac: Mac,
}

/// Which table of a pair: the established one or the half-open one.
pub type Half = bool;

/// The model: the datapath's configuration and tables.
#[derive(Clone, Debug)]
pub struct Model {
    pub cfg: Cfg,
    pub vips: HashMap<VipKey, VipEntry>,
    pub backends: HashMap<u32, BackendEntry>,
    /// `(half, key)` -> flow: `FLOWS` and `HALF_FLOWS`.
    pub flows: HashMap<(Half, FlowKey), FlowState>,
    /// `(half, key)` -> lease: `REPLIES` and `HALF_REPLIES`.
    pub replies: HashMap<(Half, FlowKey), ReplyState>,
    pub cursor: HashMap<u32, u32>,
    /// Addresses (as `addr_words`, with family) the FIB resolves, and how.
    pub neigh: HashMap<([u32; 4], u8), Neigh>,
    pub mtu: u16,
    pub tx_ports: HashSet<u32>,
    /// Passive failures by backend id: (rst, silent, icmp).
    pub passive: HashMap<u32, [u64; 3]>,
}

/// What one frame does, by the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub verdict: u32,
    pub output: Vec<u8>,
    /// The outcome counter.
    pub outcome: u32,
    /// Every counter bumped, the outcome among them, once per bump.
    pub counters: Vec<u32>,
    pub changes: Changes,
    /// Whether the clock's value mattered (a decision or a value stored).
    pub timed: bool,
}

/// Table changes of one frame: `None` removes the entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub flows: Vec<((Half, FlowKey), Option<FlowState>)>,
    pub replies: Vec<((Half, FlowKey), Option<ReplyState>)>,
    pub cursor: Vec<(u32, u32)>,
    pub passive: Vec<(u32, usize)>,
}

/// A frame's work in progress: reads see the model through the changes made so
/// far.
pub struct Tx<'a> {
    pub m: &'a Model,
    pub now: u64,
    pub timed: bool,
    flows: HashMap<(Half, FlowKey), Option<FlowState>>,
    replies: HashMap<(Half, FlowKey), Option<ReplyState>>,
    order_flows: Vec<(Half, FlowKey)>,
    order_replies: Vec<(Half, FlowKey)>,
    cursor: HashMap<u32, u32>,
    passive: Vec<(u32, usize)>,
    pub counters: Vec<u32>,
}

impl<'a> Tx<'a> {
    pub fn new(m: &'a Model, now: u64) -> Self {
        Self {
            m,
            now,
            timed: false,
            flows: HashMap::new(),
            replies: HashMap::new(),
            order_flows: Vec::new(),
            order_replies: Vec::new(),
            cursor: HashMap::new(),
            passive: Vec::new(),
            counters: Vec::new(),
        }
    }

    /// The clock, noting that it mattered.
    pub fn now(&mut self) -> u64 {
        self.timed = true;
        self.now
    }

    pub fn count(&mut self, c: u32) {
        self.counters.push(c);
    }

    pub fn flow(&self, half: Half, key: &FlowKey) -> Option<FlowState> {
        match self.flows.get(&(half, *key)) {
            Some(v) => *v,
            None => self.m.flows.get(&(half, *key)).copied(),
        }
    }

    pub fn set_flow(&mut self, half: Half, key: FlowKey, v: Option<FlowState>) {
        if self.flows.insert((half, key), v).is_none() {
            self.order_flows.push((half, key));
        }
    }

    pub fn reply(&self, half: Half, key: &FlowKey) -> Option<ReplyState> {
        match self.replies.get(&(half, *key)) {
            Some(v) => *v,
            None => self.m.replies.get(&(half, *key)).copied(),
        }
    }

    pub fn set_reply(&mut self, half: Half, key: FlowKey, v: Option<ReplyState>) {
        if self.replies.insert((half, key), v).is_none() {
            self.order_replies.push((half, key));
        }
    }

    pub fn cursor(&self, backend: u32) -> u32 {
        self.cursor
            .get(&backend)
            .or_else(|| self.m.cursor.get(&backend))
            .copied()
            .unwrap_or(0)
    }

    pub fn set_cursor(&mut self, backend: u32, v: u32) {
        self.cursor.insert(backend, v);
    }

    /// A passive failure of `backend`: 0 RST, 1 silent, 2 ICMP.
    pub fn failure(&mut self, backend: u32, kind: usize) {
        self.passive.push((backend, kind));
    }

    fn changes(self) -> Changes {
        let mut cursor: Vec<(u32, u32)> = self.cursor.into_iter().collect();
        cursor.sort_unstable();
        Changes {
            flows: self
                .order_flows
                .iter()
                .map(|k| (*k, self.flows[k]))
                .collect(),
            replies: self
                .order_replies
                .iter()
                .map(|k| (*k, self.replies[k]))
                .collect(),
            cursor,
            passive: self.passive,
        }
    }
}

impl Model {
    /// The model of `lab`'s datapath as its controller last configured it, with
    /// empty tables (a fresh lab).
    #[must_use]
    pub fn of(lab: &Lab) -> Self {
        let d: &Desired = lab.desired();
        let node = &d.node;
        let mut vips = HashMap::new();
        for (v, ring) in &d.vips {
            vips.insert(
                lb_userspace::datapath::vip_key(v.addr),
                VipEntry {
                    id: v.id,
                    owned: v.owned,
                    ring: Arc::new(ring.clone()),
                    snat: v.snat,
                },
            );
        }
        let mut backends = HashMap::new();
        for &id in d.backends.keys() {
            let e = d.entry(id).expect("configured");
            let (addr_be, family) = addr_words(e.addr.ip());
            backends.insert(
                id,
                BackendEntry {
                    addr_be,
                    port_be: e.addr.port().to_be(),
                    family,
                    flags: if e.local { BACKEND_F_LOCAL } else { 0 }
                        | if e.down { BACKEND_F_DOWN } else { 0 },
                    fallback: e.fallback,
                },
            );
        }
        let snat = |ips: Vec<std::net::IpAddr>| ips.into_iter().map(|a| addr_words(a).0).collect();
        let cfg = Cfg {
            snat4: snat(node.snat_v4.iter().map(|&a| a.into()).collect()),
            snat6: snat(node.snat_v6.iter().map(|&a| a.into()).collect()),
            port_min: *node.ports.start(),
            port_max: *node.ports.end(),
            claim: node.claim.clone(),
            ttl_ns: u64::try_from(node.nexthop_ttl.as_nanos()).unwrap_or(u64::MAX),
            timeouts_ms: node.tcp_timeouts.by_state_ms(),
            passive: node.passive.enabled,
        };
        let (fx0, fx1) = (
            lab.ifindex(crate::fixture::Ingress::ClientSide),
            lab.ifindex(crate::fixture::Ingress::MasterSide),
        );
        let mut neigh = HashMap::new();
        let mut add = |ip: &str, mac: Mac, on_fx1: bool| {
            let (w, fam) = addr_words(ip.parse().expect("address"));
            let (ifindex, smac) = if on_fx1 {
                (fx1, FX1_MAC)
            } else {
                (fx0, FX0_MAC)
            };
            neigh.insert(
                (w, fam),
                Neigh {
                    ifindex,
                    smac,
                    dmac: mac,
                },
            );
        };
        // The lab's permanent neighbour entries (`fixture::Lab::with_options`).
        add("192.0.2.10", crate::fixture::CLIENT_MAC, false);
        add("2001:db8:1::10", crate::fixture::CLIENT_MAC, false);
        add("192.0.2.21", crate::fixture::ONE_ARMED_MAC, false);
        for n in 1..=3u8 {
            add(
                &format!("198.51.100.1{n}"),
                crate::fixture::master_mac(n),
                true,
            );
            add(
                &format!("2001:db8:2::1{n}"),
                crate::fixture::master_mac(n),
                true,
            );
        }
        Self {
            cfg,
            vips,
            backends,
            flows: HashMap::new(),
            replies: HashMap::new(),
            cursor: HashMap::new(),
            neigh,
            mtu: 1500,
            tx_ports: [fx0, fx1].into_iter().collect(),
            passive: HashMap::new(),
        }
    }

    /// The pool's SNAT addresses for a family.
    #[must_use]
    pub fn snat(&self, family: u8) -> &[[u32; 4]] {
        if family == AF_INET {
            &self.cfg.snat4
        } else {
            &self.cfg.snat6
        }
    }

    /// What `frame`, arriving on interface `ingress`, does at coarse time `now`.
    #[must_use]
    pub fn step(&self, frame: &[u8], ingress: u32, now: u64) -> Prediction {
        let mut tx = Tx::new(self, now);
        let mut out = frame.to_vec();
        let o = paths::balance(&mut tx, &mut out, ingress);
        tx.count(o.counter);
        let timed = tx.timed;
        let counters = std::mem::take(&mut tx.counters);
        Prediction {
            verdict: o.action,
            output: out,
            outcome: o.counter,
            counters,
            changes: tx.changes(),
            timed,
        }
    }

    /// Make a prediction's table changes.
    pub fn apply(&mut self, c: &Changes) {
        for (k, v) in &c.flows {
            match v {
                Some(v) => self.flows.insert(*k, *v),
                None => self.flows.remove(k),
            };
        }
        for (k, v) in &c.replies {
            match v {
                Some(v) => self.replies.insert(*k, *v),
                None => self.replies.remove(k),
            };
        }
        for &(b, v) in &c.cursor {
            self.cursor.insert(b, v);
        }
        for &(b, kind) in &c.passive {
            self.passive.entry(b).or_default()[kind] += 1;
        }
    }
}
