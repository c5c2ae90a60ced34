//! Which config changes a SIGHUP may apply in place, and which take a restart:
//! kept beside the config so that a new key's author decides it where the key is
//! defined. What is not named here applies in place: among others the TCP
//! timeouts (`datapath.tcp_timeouts`), which the controller writes to `CONFIG`
//! with the rest of the node's settings, and `datapath.expected_connection_rate`,
//! which only `apilb check` reads.
//!
//! Of the election, the VRRP tuning applies in place, as keepalived's reload
//! applies it: each VIP's `priority`, `election.vrrp.track_weight`, `preempt`
//! and `preempt_delay` (`crate::election::vrrp::Tuning`). A restart for them
//! would move a master's VIP twice.

use std::net::SocketAddr;

use super::{Config, Election, ElectionSettings};

/// The VIPs that have an election, with it, but for the VRRP priority.
fn elected(c: &Config) -> impl Iterator<Item = (SocketAddr, Election)> + '_ {
    c.vips
        .iter()
        .filter(|v| v.election != Election::Static)
        .map(|v| match v.election {
            Election::Vrrp { vrid, .. } => (v.addr, Election::Vrrp { vrid, priority: 0 }),
            e => (v.addr, e),
        })
}

/// The election settings but for what a reload applies in place.
fn fixed(e: &ElectionSettings) -> ElectionSettings {
    let mut e = e.clone();
    e.vrrp.track_weight = 0;
    e.vrrp.preempt = false;
    e.vrrp.preempt_delay = std::time::Duration::ZERO;
    e
}

/// The first election key that changed and that only a restart applies.
fn election_change(old: &ElectionSettings, new: &ElectionSettings) -> Option<&'static str> {
    if fixed(old) == fixed(new) {
        return None;
    }
    let (o, n) = (&old.vrrp, &new.vrrp);
    [
        (old.interface != new.interface, "election.interface"),
        (
            old.announce_count != new.announce_count,
            "election.announce_count",
        ),
        (
            old.announce_interval != new.announce_interval,
            "election.announce_interval",
        ),
        (o.version != n.version, "election.vrrp.version"),
        (
            o.advert_interval != n.advert_interval,
            "election.vrrp.advert_interval",
        ),
        (o.source != n.source, "election.vrrp.source"),
        (
            o.unicast_peers != n.unicast_peers,
            "election.vrrp.unicast_peers",
        ),
        (o.auth_pass != n.auth_pass, "election.vrrp.auth_pass"),
        (old.etcd != new.etcd, "election.etcd"),
    ]
    .into_iter()
    .find_map(|(changed, key)| changed.then_some(key))
    .or(Some("election"))
}

impl Config {
    /// The first key whose change from `self` to `new` only a restart can apply,
    /// or `None` if a reload can apply all of them.
    pub fn restart_needed(&self, new: &Config) -> Option<&'static str> {
        let (old, new) = (self, new);
        if old.instance != new.instance {
            Some("instance")
        } else if old.datapath.interfaces != new.datapath.interfaces {
            Some("datapath.interfaces")
        } else if old.datapath.xdp_mode != new.datapath.xdp_mode {
            Some("datapath.xdp_mode")
        } else if old.datapath.flow_table_size != new.datapath.flow_table_size {
            // Map sizes are fixed when the maps are created.
            Some("datapath.flow_table_size")
        } else if old.datapath.half_open_table_size != new.datapath.half_open_table_size {
            Some("datapath.half_open_table_size")
        } else if old.admin_listen != new.admin_listen {
            Some("admin.listen")
        } else if old.datapath.nat_ports != new.datapath.nat_ports {
            // Replies of open flows arrive on the old ports, which the datapath would
            // no longer recognise, and the new range is reserved only at start.
            Some("datapath.nat_ports")
        } else if old.datapath.nat_slice != new.datapath.nat_slice {
            // The ports of open flows may lie outside the new slice.
            Some("datapath.nat_slice")
        } else if old.datapath.snat_v4 != new.datapath.snat_v4
            || old.datapath.snat_v6 != new.datapath.snat_v6
        {
            // Likewise: replies of open flows come back to the old address.
            // A pool that shrinks or reorders would also move flows' `snat_index`.
            Some("datapath.snat_ipv4/snat_ipv6")
        } else if let Some(key) = election_change(&old.election, &new.election) {
            Some(key)
        } else if old.local.enabled != new.local.enabled || old.local.cgroup != new.local.cgroup {
            // The socket programs are attached, or not, at start.
            Some("local.enabled/local.cgroup")
        } else if elected(old).ne(elected(new)) {
            // Elections run for a fixed set of VIPs; changing it means restarting them.
            Some("an elected vip (its address, election or vrid)")
        } else if old.discovery != new.discovery {
            // The discovery task holds its client and credentials from the start.
            Some("discovery")
        } else {
            // The sync thread holds its listener, key and sessions from the start;
            // a peer's sessions and the bulks they carry are not rebuilt in place.
            match (&old.sync, &new.sync) {
                (None, None) => None,
                (Some(old), Some(new)) => old.first_change(new),
                _ => Some("sync"),
            }
        }
    }
}
