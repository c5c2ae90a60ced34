//! Established flows written straight into a running apilb's pinned flow tables,
//! each a copy of one the datapath made itself, with a client and a NAT port of
//! its own: a bulk resync can then be timed at a table size that real
//! connections would take minutes to build, and the peer receives them exactly
//! as it would receive real ones (same VIP, backends, SNAT index and flags).

use std::{collections::BTreeMap, net::Ipv4Addr, ops::RangeInclusive, path::Path};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    FlowKey, FlowState, REPLY_F_TS, ReplyState,
    ct::{CT_ESTABLISHED, FLOW_F_SYNC, FLOW_F_TS},
    maps::{FLOWS, REPLIES},
};
use lb_userspace::sync::node::coarse_ns;

/// The flows written, and the NAT ports skipped because a flow already held them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Preloaded {
    pub flows: usize,
    pub ports_taken: usize,
}

fn open<V: aya::Pod>(pins: &Path, name: &str) -> HashMap<MapData, FlowKey, V> {
    let dir = lb_userspace::loader::maps_dir(pins);
    let data = MapData::from_pin(dir.join(name))
        .unwrap_or_else(|e| panic!("opening pinned map {name}: {e}"));
    HashMap::try_from(Map::LruHashMap(data)).expect("a flow table")
}

/// Write up to `n` established flows of a synced VIP into the tables pinned
/// under `pins` (an instance's pin directory), NAT ports taken from `ports` (the
/// node's own slice), for each backend in turn. Each copies a synced flow the
/// datapath already holds towards the same backend, so at least one must exist
/// per backend it is to use; clients are `100.64.0.0/10` addresses, never seen
/// on any link. A port already leased is left to its flow.
///
/// # Panics
/// If the tables cannot be opened or hold no synced flow.
#[must_use]
pub fn established_copies(pins: &Path, ports: RangeInclusive<u16>, n: usize) -> Preloaded {
    let mut flows: HashMap<MapData, FlowKey, FlowState> = open(pins, FLOWS.name);
    let mut replies: HashMap<MapData, FlowKey, ReplyState> = open(pins, REPLIES.name);
    // One template per backend: a synced flow's key (its VIP) and entry, and the
    // key of a lease of the same VIP and backend (its SNAT address).
    let mut templates: BTreeMap<u32, (FlowKey, FlowState)> = BTreeMap::new();
    for (k, f) in flows.iter().filter_map(Result::ok) {
        if f.flags & FLOW_F_SYNC != 0 {
            templates.entry(f.backend_id).or_insert((k, f));
        }
    }
    let mut leases: BTreeMap<u32, FlowKey> = BTreeMap::new();
    for (rk, r) in replies.iter().filter_map(Result::ok) {
        if templates
            .get(&r.backend_id)
            .is_some_and(|(k, _)| k.dst_be == r.vip_be)
        {
            leases.entry(r.backend_id).or_insert(rk);
        }
    }
    templates.retain(|b, _| leases.contains_key(b));
    assert!(!templates.is_empty(), "no synced flow to copy");
    let now = coarse_ns();
    let mut done = Preloaded::default();
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    'ports: for port in ports {
        for (b, (key, tmpl)) in &templates {
            if done.flows >= n {
                break 'ports;
            }
            let i = u32::try_from(done.flows).expect("count");
            let client = base + i / 50_000;
            let key = FlowKey {
                src_be: [client.to_be(), 0, 0, 0],
                sport_be: u16::try_from(10_000 + i % 50_000).expect("port").to_be(),
                ..*key
            };
            let flow = FlowState {
                nat_port_be: port.to_be(),
                state: CT_ESTABLISHED,
                client_fin: 0,
                backend_fin: 0,
                last_seen_ns: now,
                ..*tmpl
            };
            let rkey = FlowKey {
                dport_be: port.to_be(),
                ..leases[b]
            };
            let reply = ReplyState {
                client_be: key.src_be,
                vip_be: key.dst_be,
                client_port_be: key.sport_be,
                vip_port_be: key.dport_be,
                backend_id: tmpl.backend_id,
                claimed_ns: now,
                ts_off: tmpl.ts_off,
                flags: if tmpl.flags & FLOW_F_TS != 0 {
                    REPLY_F_TS
                } else {
                    0
                },
                next_hop: tmpl.next_hop,
            };
            // BPF_NOEXIST: a port a live flow leases stays its.
            if replies.insert(rkey, reply, 1).is_err() {
                done.ports_taken += 1;
                continue;
            }
            flows.insert(key, flow, 0).expect("writing a flow");
            done.flows += 1;
        }
    }
    done
}
