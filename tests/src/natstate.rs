//! apilb's NAT state as the benchmarks and the soak read it from outside: the
//! datapath counters that say whether a new flow found a NAT port, and how full
//! the pinned flow tables are.
//!
//! Counters are read by name from the admin endpoint's `/metrics`, and the names
//! come from `lb_common::COUNTER_NAMES`, so one harness reads the datapath that
//! holds a closed flow's port for a fixed grace (`port_reclaimed`) and the one that
//! tracks each flow's TCP state (`reclaim_half_open`, `reclaim_idle`,
//! `reclaim_closed`, `reclaim_orphan`) alike; a name a build lacks reads as 0.
//! The flow tables are found the same way, by shape in `lb_common::maps::MAPS`
//! (LRU hashes keyed by `FlowKey`), so the half-open tables count where they exist.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{COUNTER_NAMES, FlowKey, FlowState, ReplyState, maps::MapType};

use crate::{
    live::{metric_sum, metrics},
    netns::Netns,
};

/// Counters of the NAT datapath at one moment, or their movement between two.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatCounters {
    /// New flows balanced (`flow_new`).
    pub flow_new: u64,
    /// SYNs dropped because no NAT port was free (`drop_no_nat_port`).
    pub dropped: u64,
    /// Ports given to a new flow, by counter name (`reclaim_*`, or
    /// `port_reclaimed` on a datapath before per-state timeouts).
    pub reclaimed: BTreeMap<&'static str, u64>,
}

/// The names of the counters that count reclaimed NAT ports, in this build.
pub fn reclaim_counters() -> impl Iterator<Item = &'static str> {
    COUNTER_NAMES
        .iter()
        .copied()
        .filter(|n| n.starts_with("reclaim_") || *n == "port_reclaimed")
}

fn series(name: &str) -> String {
    format!("apilb_datapath_packets_total{{counter=\"{name}\"}}")
}

impl NatCounters {
    /// From the `/metrics` of the apilb running in `lb` (the default admin address).
    #[must_use]
    pub fn read(lb: &Netns) -> Self {
        Self::parse(&metrics(lb))
    }

    /// From `/metrics` text.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        Self {
            flow_new: metric_sum(text, &series("flow_new")),
            dropped: metric_sum(text, &series("drop_no_nat_port")),
            reclaimed: reclaim_counters()
                .map(|n| (n, metric_sum(text, &series(n))))
                .collect(),
        }
    }

    /// What moved since `before`.
    #[must_use]
    pub fn since(&self, before: &Self) -> Self {
        Self {
            flow_new: self.flow_new.saturating_sub(before.flow_new),
            dropped: self.dropped.saturating_sub(before.dropped),
            reclaimed: self
                .reclaimed
                .iter()
                .map(|(n, v)| (*n, v.saturating_sub(*before.reclaimed.get(n).unwrap_or(&0))))
                .collect(),
        }
    }

    #[must_use]
    pub fn reclaimed_total(&self) -> u64 {
        self.reclaimed.values().sum()
    }

    /// `total (kind n, ...)`, the kinds that moved, `reclaim_` left off.
    #[must_use]
    pub fn reclaimed_text(&self) -> String {
        let kinds: Vec<String> = self
            .reclaimed
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(n, v)| format!("{} {v}", n.trim_start_matches("reclaim_")))
            .collect();
        if kinds.len() > 1 || (kinds.len() == 1 && self.reclaimed.len() > 1) {
            format!("{} ({})", self.reclaimed_total(), kinds.join(", "))
        } else {
            self.reclaimed_total().to_string()
        }
    }
}

/// One flow table: its name, entries counted, and size.
#[derive(Clone, Copy, Debug)]
pub struct TableCount {
    pub name: &'static str,
    pub entries: usize,
    pub size: u32,
}

/// Count the entries of every flow table pinned under `pins` (an instance's pin
/// directory). A table changing during the walk can make a key show up twice
/// (a hash map walk starts over when its key is gone), so keys are counted once
/// each, and the walk stops at twice the table's size.
#[must_use]
pub fn flow_tables(pins: &Path) -> Vec<TableCount> {
    let dir = lb_userspace::loader::maps_dir(pins);
    let flow_key = u32::try_from(size_of::<FlowKey>()).expect("key size");
    let flow_state = u32::try_from(size_of::<FlowState>()).expect("value size");
    lb_common::maps::MAPS
        .iter()
        .filter(|m| m.map_type == MapType::LruHash && m.key_size == flow_key)
        .map(|m| {
            let data = MapData::from_pin(dir.join(m.name))
                .unwrap_or_else(|e| panic!("opening pinned map {}: {e}", m.name));
            let size = data.info().expect("map info").max_entries();
            let entries = if m.value_size == Some(flow_state) {
                count_keys::<FlowState>(data, size)
            } else {
                count_keys::<ReplyState>(data, size)
            };
            TableCount {
                name: m.name,
                entries,
                size,
            }
        })
        .collect()
}

fn count_keys<V: aya::Pod>(data: MapData, size: u32) -> usize {
    let map: HashMap<MapData, FlowKey, V> =
        HashMap::try_from(Map::LruHashMap(data)).expect("a flow table");
    let mut seen = std::collections::HashSet::new();
    for key in map.keys().take(2 * size as usize) {
        let Ok(key) = key else { break };
        seen.insert(key);
    }
    seen.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_missing_from_the_metrics_read_as_zero() {
        let text = "apilb_datapath_packets_total{counter=\"flow_new\"} 10\n\
                    apilb_datapath_packets_total{counter=\"drop_no_nat_port\"} 3\n";
        let c = NatCounters::parse(text);
        assert_eq!((c.flow_new, c.dropped, c.reclaimed_total()), (10, 3, 0));
        assert_eq!(c.reclaimed.len(), reclaim_counters().count());
    }

    #[test]
    fn movement_is_per_counter() {
        let name = reclaim_counters().next().expect("a reclaim counter");
        let at = |v: u64| {
            NatCounters::parse(&format!(
                "{} {v}\n{} {v}\n",
                series(name),
                series("drop_no_nat_port")
            ))
        };
        let d = at(25).since(&at(5));
        assert_eq!((d.dropped, d.reclaimed[name]), (20, 20));
    }
}
