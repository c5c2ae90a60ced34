//! The reconcile step: config and health in, map contents out.
//!
//! [`Reconciler::desired`] is a function of the config, each backend's [`Health`]
//! (and since when it is down), the VIPs this node owns and the time: which backends and VIPs exist, under which
//! ids, and each VIP's Maglev ring. [`Reconciler::apply`] converges the datapath to
//! it with the fewest writes: only changed entries, only the ring slots that moved,
//! and flow removal only for backends that are down or gone. The controller is the
//! only writer of the config maps, and this is the only place it writes them: the
//! redirect targets (`TX_PORTS`) included. Flow entries are the datapath's own;
//! besides it, only two threads the controller starts touch them, each with its own
//! map handles so that nothing slow runs on the daemon loop: the reaper removes a
//! down master's flows (`crate::reaper`), and flow sync installs the peers' flows
//! and sweeps the stale ones (`crate::sync`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Instant,
};

use lb_common::{BACKEND_NONE, IfaceMode};

use crate::{
    config::{BackendSettings, Config, Election, VipSnat},
    datapath::{BackendEntry, Datapath, DatapathError, NodeConfig, Vip},
    health::Health,
    maglev::{self, WeightedBackend},
};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("interface {0:?} does not exist in this network namespace")]
    NoInterface(String),
}

/// What the maps should hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub node: NodeConfig,
    /// The interfaces rewritten packets may be redirected out of
    /// (`datapath.interfaces`, the ones the balancer is attached to).
    pub tx_interfaces: Vec<String>,
    /// Backend id -> backend.
    pub backends: BTreeMap<u32, BackendSettings>,
    /// Per VIP: the VIP and its Maglev ring (one backend id per slot).
    pub vips: Vec<(Vip, Vec<u32>)>,
    /// Node-local extra addresses (`[local] addresses`), each standing for the
    /// first VIP of its family: its id and ring, balanced only in `connect()`.
    pub aliases: Vec<Vip>,
    /// Backend ids that hold ring slots.
    pub in_rotation: BTreeSet<u32>,
    /// Backend id -> the next one of its family by address, wrapping around: the
    /// fallback order, the same on every node whatever the ids.
    pub fallback: BTreeMap<u32, u32>,
    /// Backends whose flows stay: healthy ones (drained included) and any in
    /// rotation. Flows to every other backend are removed.
    pub keep_flows: BTreeSet<SocketAddr>,
    /// Some VIP has no healthy backend of its family, so all of them are in its
    /// rotation: better a possibly-dead master than a certainly-black-holed VIP.
    pub fail_open: bool,
}

impl Desired {
    /// Every address in `VIPS`: the VIPs and the node-local aliases.
    pub fn vip_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.vips
            .iter()
            .map(|(v, _)| v.addr)
            .chain(self.aliases.iter().map(|a| a.addr))
    }

    /// Backend `id` as the datapath should hold it.
    #[must_use]
    pub fn entry(&self, id: u32) -> Option<BackendEntry> {
        let b = self.backends.get(&id)?;
        Some(BackendEntry {
            addr: b.addr,
            local: b.local,
            down: !self.in_rotation.contains(&id),
            fallback: self.fallback.get(&id).copied().unwrap_or(BACKEND_NONE),
        })
    }
}

/// What `apply` changed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub backends_written: usize,
    pub vips_written: usize,
    pub vips_removed: usize,
    pub ring_slots_written: usize,
    /// The backends whose flows may stay, when that set changed: flows to any
    /// other (down or gone) are to be removed, by `crate::reaper` off the daemon
    /// loop, since dumping the flow tables takes longer than a release may wait.
    pub keep_flows: Option<BTreeSet<SocketAddr>>,
}

impl Applied {
    /// What was written, for the log: only what changed, e.g. "1 VIP entry" when
    /// an election moved a VIP, so that an untouched table does not read as empty.
    #[must_use]
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.backends_written, "backend entry", "backend entries"),
            (self.vips_written, "VIP entry", "VIP entries"),
            (self.vips_removed, "VIP removed", "VIPs removed"),
            (self.ring_slots_written, "Maglev slot", "Maglev slots"),
        ]
        .into_iter()
        .filter(|&(n, _, _)| n > 0)
        .map(|(n, one, many)| format!("{n} {}", if n == 1 { one } else { many }))
        .collect();
        if parts.is_empty() {
            "nothing".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// Keeps ids stable across reconciles and remembers what the maps hold.
#[derive(Debug, Default)]
pub struct Reconciler {
    backend_ids: BTreeMap<SocketAddr, u32>,
    vip_ids: BTreeMap<SocketAddr, u32>,
    current: Option<Desired>,
    /// The node's network namespace, for node-local mode (see `NodeConfig`).
    netns_cookie: u64,
    /// The interfaces whose packets may carry partial checksums (`NodeConfig`).
    ifaces: Vec<IfaceMode>,
    /// When each configured backend that is down went down (see
    /// [`Reconciler::desired`] on its flows).
    down_since: HashMap<SocketAddr, Instant>,
    /// When each configured backend that is ready became ready.
    ready_since: HashMap<SocketAddr, Instant>,
}

/// Whether `addr` is down: so probed, or not probed at all.
fn is_down(health: &HashMap<SocketAddr, Health>, addr: &SocketAddr) -> bool {
    !matches!(health.get(addr), Some(Health::Ready | Health::NotReady))
}

/// The datapath's SNAT pools and each VIP's run of its family's pool.
struct SnatPools {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    runs: HashMap<SocketAddr, (u8, u8)>,
}

impl SnatPools {
    /// The node's own addresses first, then the address of each VIP that is its
    /// flows' source (`snat = "vip"`), once per address. `crate::config` has
    /// checked that they fit the pool.
    fn of(config: &Config) -> Self {
        fn run<A: PartialEq + Copy>(pool: &mut Vec<A>, a: A) -> (u8, u8) {
            let at = pool.iter().position(|p| *p == a).unwrap_or_else(|| {
                pool.push(a);
                pool.len() - 1
            });
            (u8::try_from(at).unwrap_or(u8::MAX), 1)
        }
        let d = &config.datapath;
        let node = |n: usize| (0, u8::try_from(n).unwrap_or(0));
        let (mut v4, mut v6) = (d.snat_v4.clone(), d.snat_v6.clone());
        let (node_v4, node_v6) = (node(v4.len()), node(v6.len()));
        let runs = config
            .vips
            .iter()
            .map(|v| {
                let run = match (v.snat, v.addr.ip()) {
                    (VipSnat::Node, IpAddr::V4(_)) => node_v4,
                    (VipSnat::Node, IpAddr::V6(_)) => node_v6,
                    (VipSnat::Vip, IpAddr::V4(a)) => run(&mut v4, a),
                    (VipSnat::Vip, IpAddr::V6(a)) => run(&mut v6, a),
                };
                (v.addr, run)
            })
            .collect();
        Self { v4, v6, runs }
    }
}

/// The node-local aliases: each address stands for the first VIP of its family.
fn aliases(config: &Config, vips: &[(Vip, Vec<u32>)]) -> Vec<Vip> {
    config
        .local
        .addresses
        .iter()
        .filter_map(|a| {
            let (vip, _) = vips.iter().find(|(v, _)| v.addr.is_ipv4() == a.is_ipv4())?;
            Some(Vip {
                addr: *a,
                owned: false,
                ..*vip
            })
        })
        .collect()
}

/// Give every address an id, keeping the ids of addresses seen before and reusing
/// those of addresses gone, smallest first, starting at `first`.
fn assign_ids(ids: &mut BTreeMap<SocketAddr, u32>, addrs: &[SocketAddr], first: u32) {
    let wanted: HashSet<&SocketAddr> = addrs.iter().collect();
    ids.retain(|a, _| wanted.contains(a));
    for a in addrs {
        if !ids.contains_key(a) {
            let used: HashSet<u32> = ids.values().copied().collect();
            let id = (first..=u32::MAX)
                .find(|i| !used.contains(i))
                .expect("fewer ids in use than u32 has");
            ids.insert(*a, id);
        }
    }
}

impl Reconciler {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The desired map contents for `config` given each backend's health (a
    /// backend missing from `health` is down) and the elected VIPs this node owns
    /// (a static VIP is always owned).
    pub fn desired(
        &mut self,
        config: &Config,
        health: &HashMap<SocketAddr, Health>,
        owned: &HashSet<IpAddr>,
    ) -> Desired {
        self.desired_at(config, health, owned, Instant::now())
    }

    /// [`Reconciler::desired`] at time `now`.
    pub fn desired_at(
        &mut self,
        config: &Config,
        health: &HashMap<SocketAddr, Health>,
        owned: &HashSet<IpAddr>,
        now: Instant,
    ) -> Desired {
        let is = |addr: &SocketAddr, h: Health| health.get(addr) == Some(&h);
        self.note_since(config, health, now);
        let addrs: Vec<SocketAddr> = config.backends.iter().map(|b| b.addr).collect();
        assign_ids(&mut self.backend_ids, &addrs, 1);
        let vip_addrs: Vec<SocketAddr> = config.vips.iter().map(|v| v.addr).collect();
        assign_ids(&mut self.vip_ids, &vip_addrs, 0);
        let backends: BTreeMap<u32, BackendSettings> = config
            .backends
            .iter()
            .map(|b| (self.backend_ids[&b.addr], *b))
            .collect();
        let pools = SnatPools::of(config);
        let mut in_rotation = BTreeSet::new();
        let mut fail_open = false;
        let vips: Vec<(Vip, Vec<u32>)> = config
            .vips
            .iter()
            .map(|v| {
                // A VIP balances over the weighted backends of its own address family
                // that pass their probes; if none does, it fails open to all of them.
                let family: Vec<&BackendSettings> = config
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0 && b.addr.is_ipv4() == v.addr.is_ipv4())
                    .collect();
                let live: Vec<&BackendSettings> = family
                    .iter()
                    .copied()
                    .filter(|b| is(&b.addr, Health::Ready))
                    .collect();
                let rotation = if live.is_empty() {
                    fail_open = true;
                    family
                } else {
                    live
                };
                let weighted: Vec<WeightedBackend> = rotation
                    .iter()
                    .map(|b| {
                        let id = self.backend_ids[&b.addr];
                        in_rotation.insert(id);
                        WeightedBackend {
                            key: b.addr.to_string(),
                            id,
                            weight: b.weight,
                        }
                    })
                    .collect();
                let vip = Vip {
                    addr: v.addr,
                    id: self.vip_ids[&v.addr],
                    ring_size: config.datapath.maglev_size,
                    owned: v.election == Election::Static || owned.contains(&v.addr.ip()),
                    local: config.local.enabled,
                    snat: pools.runs.get(&v.addr).copied().unwrap_or_default(),
                    // Elected VIPs that are their own source sync, when `[sync]` is on.
                    sync: config.sync.is_some()
                        && v.election != Election::Static
                        && v.snat == VipSnat::Vip,
                };
                (
                    vip,
                    maglev::build_table(&weighted, config.datapath.maglev_size),
                )
            })
            .collect();
        let keep_flows = self.keep_flows(config, health, &in_rotation, now);
        let d = &config.datapath;
        let node = NodeConfig {
            snat_v4: pools.v4,
            snat_v6: pools.v6,
            ports: d.nat_ports.clone(),
            claim: d.nat_slice.of(&d.nat_ports),
            nexthop_ttl: d.nexthop_ttl,
            tcp_timeouts: d.tcp_timeouts,
            passive: config.passive,
            netns_cookie: if config.local.enabled {
                self.netns_cookie
            } else {
                0
            },
            sync_listener: config.sync.as_ref().map(|s| s.listen),
            ifaces: self.ifaces.clone(),
        };
        Desired {
            node,
            tx_interfaces: config.datapath.interfaces.clone(),
            backends,
            aliases: aliases(config, &vips),
            vips,
            in_rotation,
            fallback: self.fallback_order(),
            keep_flows,
            fail_open,
        }
    }

    /// Since when each configured backend has been down, and each ready.
    fn note_since(&mut self, config: &Config, health: &HashMap<SocketAddr, Health>, now: Instant) {
        let configured = |a: &SocketAddr| config.backends.iter().any(|b| b.addr == *a);
        let ready = |a: &SocketAddr| health.get(a) == Some(&Health::Ready);
        self.down_since
            .retain(|a, _| is_down(health, a) && configured(a));
        self.ready_since.retain(|a, _| ready(a) && configured(a));
        for b in &config.backends {
            if is_down(health, &b.addr) {
                self.down_since.entry(b.addr).or_insert(now);
            }
            if ready(&b.addr) {
                self.ready_since.entry(b.addr).or_insert(now);
            }
        }
    }

    /// The backends whose flows stay (see the comment inside), given each one's
    /// health, the ids in rotation, and the time.
    fn keep_flows(
        &self,
        config: &Config,
        health: &HashMap<SocketAddr, Health>,
        in_rotation: &BTreeSet<u32>,
        now: Instant,
    ) -> BTreeSet<SocketAddr> {
        let down = |addr: &SocketAddr| is_down(health, addr);
        // Flows are kept to every configured backend that still answers, ready or
        // not, drained (weight 0) or not, and to every backend in rotation (which,
        // failing open, includes down ones). Only a down master loses its flows,
        // and only once the LB node has shown that it can still reach a master:
        // it has been down for `fall + 1` probe intervals, by when an outage on
        // this node's side would have taken every master down, and another master
        // of its family has been ready as long. So while every master is failing,
        // none loses a flow, not even the first to fail; and when this node's own
        // outage ends (a cable plugged back in), the masters come back one probe
        // apart, and none loses its flows for being the last.
        let settle = config.health.interval * (config.health.fall + 1);
        let family_ready = |v4: bool| {
            config.backends.iter().any(|b| {
                b.addr.is_ipv4() == v4
                    && self
                        .ready_since
                        .get(&b.addr)
                        .is_some_and(|&t| now.duration_since(t) >= settle)
            })
        };
        config
            .backends
            .iter()
            .filter(|b| {
                !down(&b.addr)
                    || in_rotation.contains(&self.backend_ids[&b.addr])
                    || self
                        .down_since
                        .get(&b.addr)
                        .is_none_or(|&t| now.duration_since(t) < settle)
                    || !family_ready(b.addr.is_ipv4())
            })
            .map(|b| b.addr)
            .collect()
    }

    /// What flow sync translates records with: the pools, the backend ids (as the
    /// last [`Reconciler::desired`] assigned them), the VIPs that sync (elected,
    /// their own flows' source).
    #[must_use]
    pub fn sync_view(&self, config: &Config) -> crate::sync::install::View {
        let pools = SnatPools::of(config);
        crate::sync::install::View {
            snat_v4: pools.v4,
            snat_v6: pools.v6,
            backend_ids: self.backend_ids.iter().map(|(a, i)| (*a, *i)).collect(),
            vips: config
                .vips
                .iter()
                .filter(|v| v.election != Election::Static && v.snat == VipSnat::Vip)
                .map(|v| v.addr)
                .collect(),
            owned: self
                .current
                .iter()
                .flat_map(|c| c.vips.iter())
                .filter(|(v, _)| v.owned)
                .map(|(v, _)| v.addr.ip())
                .collect(),
            nat_ports: config.datapath.nat_ports.clone(),
            timeouts_ms: config.datapath.tcp_timeouts.by_state_ms(),
        }
    }

    /// Whether a down backend out of rotation keeps flows that a later reconcile
    /// may remove (see [`Reconciler::desired`]): the daemon then reconciles every
    /// tick. Not while failing open, when every backend is in rotation.
    #[must_use]
    pub fn removal_pending(&self) -> bool {
        self.current.as_ref().is_some_and(|c| {
            self.down_since.keys().any(|a| {
                c.keep_flows.contains(a)
                    && self
                        .backend_ids
                        .get(a)
                        .is_some_and(|id| !c.in_rotation.contains(id))
            })
        })
    }

    /// Each backend id -> the next of its family by address, wrapping around.
    fn fallback_order(&self) -> BTreeMap<u32, u32> {
        let mut fallback = BTreeMap::new();
        for v4 in [true, false] {
            let order: Vec<u32> = self
                .backend_ids
                .iter()
                .filter(|(a, _)| a.is_ipv4() == v4)
                .map(|(_, id)| *id)
                .collect();
            for (i, id) in order.iter().enumerate() {
                let next = order[(i + 1) % order.len()];
                fallback.insert(*id, if next == *id { BACKEND_NONE } else { next });
            }
        }
        fallback
    }

    /// Node-local mode balances the sockets of the network namespace with this
    /// cookie (the node's, where apilb runs).
    pub fn set_netns_cookie(&mut self, cookie: u64) {
        self.netns_cookie = cookie;
    }

    /// The interfaces whose packets may carry partial checksums, as the loader
    /// attached them ([`crate::loader::Programs::ifaces`]).
    pub fn set_ifaces(&mut self, ifaces: Vec<IfaceMode>) {
        self.ifaces = ifaces;
    }

    /// What the last `apply` wrote.
    #[must_use]
    pub fn current(&self) -> Option<&Desired> {
        self.current.as_ref()
    }

    /// Converge `dp` to `desired`, writing only what differs from what this
    /// reconciler applied last (everything, the first time).
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        desired: Desired,
    ) -> Result<Applied, ControllerError> {
        let mut out = Applied::default();
        // What the maps hold is known from the last apply; without one (the first
        // apply, maybe adopting pinned maps from an earlier process) it is read back,
        // so VIPs and flows a previous configuration left are cleaned up too.
        let old = self.current.as_ref();
        if old.is_none_or(|o| o.node != desired.node) {
            dp.set_node_config(&desired.node)?;
        }
        // The kernel resolves a redirect target's index in the writing thread's
        // namespace, so the index is looked up here, just before the write: the
        // daemon reconciles in the namespace it attached the interfaces in.
        if old.is_none_or(|o| o.tx_interfaces != desired.tx_interfaces) {
            for name in &desired.tx_interfaces {
                let ifindex = crate::loader::ifindex(name)
                    .ok_or_else(|| ControllerError::NoInterface(name.clone()))?;
                dp.add_tx_port(ifindex)?;
            }
        }
        // Backends first: one leaving rotation is marked before the rings are
        // rewritten without it, so new flows meanwhile take the fallback.
        for id in desired.backends.keys() {
            let entry = desired.entry(*id);
            if old.and_then(|o| o.entry(*id)) != entry
                && let Some(entry) = entry
            {
                dp.set_backend(*id, &entry)?;
                out.backends_written += 1;
            }
        }
        for (vip, ring) in &desired.vips {
            let old_vip = old.and_then(|o| o.vips.iter().find(|(v, _)| v.addr == vip.addr));
            if old_vip.is_none_or(|(v, _)| v != vip) {
                dp.set_vip(vip)?;
                out.vips_written += 1;
            }
            // A VIP that moved to another id has a ring that was never written.
            let old_ring = old_vip
                .filter(|(v, _)| v.id == vip.id)
                .map_or(&[][..], |(_, r)| &r[..]);
            let delta = maglev::delta(old_ring, ring);
            dp.write_maglev(vip.id, &delta)?;
            out.ring_slots_written += delta.len();
        }
        for alias in &desired.aliases {
            if old.is_none_or(|o| !o.aliases.contains(alias)) {
                dp.set_vip(alias)?;
                out.vips_written += 1;
            }
        }
        let stale_vips: Vec<SocketAddr> = match old {
            Some(o) => o.vip_addrs().collect(),
            None => dp.vip_addrs()?,
        };
        for addr in stale_vips {
            if !desired.vip_addrs().any(|a| a == addr) {
                dp.remove_vip(addr)?;
                out.vips_removed += 1;
            }
        }
        // Flows to backends that are neither answering nor in rotation (dead, or no
        // longer configured) are to be removed, so their clients reconnect now rather
        // than after a TCP timeout. Matched by address, not id: ids can move between
        // configurations. Flows to every other backend are never touched.
        if old.is_none_or(|o| o.keep_flows != desired.keep_flows) {
            out.keep_flows = Some(desired.keep_flows.clone());
        }
        self.current = Some(desired);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, path::Path, time::Duration};

    use super::*;

    fn config(backends: &[(&str, u32)]) -> Config {
        let mut text = String::from(
            "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"10.0.0.1\"\nmaglev_size = 1009\n\
             [[vip]]\naddress = \"10.0.0.100\"\n[health]\nkind = \"tcp\"\n",
        );
        for (addr, weight) in backends {
            let _ = write!(
                text,
                "[[backend]]\naddress = \"{addr}\"\nweight = {weight}\n"
            );
        }
        Config::parse(&text, Path::new("test.toml")).expect("valid test config")
    }

    /// `addrs` ready, every other backend down.
    fn healthy(addrs: &[&str]) -> HashMap<SocketAddr, Health> {
        addrs
            .iter()
            .map(|a| (a.parse().unwrap(), Health::Ready))
            .collect()
    }

    fn share(d: &Desired, id: u32) -> usize {
        d.vips[0].1.iter().filter(|&&b| b == id).count()
    }

    const A: &str = "10.0.0.11:6443";
    const B: &str = "10.0.0.12:6443";
    const C: &str = "10.0.0.13:6443";

    #[test]
    fn the_log_names_only_what_was_written() {
        let moved = Applied {
            vips_written: 1,
            ..Applied::default()
        };
        assert_eq!(moved.summary(), "1 VIP entry");
        let start = Applied {
            backends_written: 3,
            vips_written: 1,
            ring_slots_written: 1009,
            ..Applied::default()
        };
        assert_eq!(
            start.summary(),
            "3 backend entries, 1 VIP entry, 1009 Maglev slots"
        );
        assert_eq!(Applied::default().summary(), "nothing");
    }

    #[test]
    fn only_healthy_backends_get_slots() {
        let mut r = Reconciler::new();
        let cfg = config(&[(A, 1), (B, 1), (C, 1)]);
        let d = r.desired(&cfg, &healthy(&[A, C]), &HashSet::new());
        assert!(!d.fail_open);
        assert_eq!(d.in_rotation, BTreeSet::from([1, 3]));
        assert_eq!((share(&d, 1) + share(&d, 3), share(&d, 2)), (1009, 0));
    }

    #[test]
    fn backends_out_of_rotation_are_marked_and_fall_back_in_address_order() {
        // Listed out of order: ids follow the list, the fallback order the address.
        let cfg = config(&[(C, 1), (A, 1), (B, 1), ("[fd00::11]:6443", 1)]);
        let d = Reconciler::new().desired(&cfg, &healthy(&[A, C]), &HashSet::new());
        let next = |addr: &str| {
            let id = d.backends.iter().find(|(_, b)| b.addr.to_string() == addr);
            let e = d.entry(*id.expect("configured").0).expect("entry");
            let to = d.backends.get(&e.fallback).map(|b| b.addr.to_string());
            (e.down, to)
        };
        assert_eq!(next(A), (false, Some(B.to_owned())));
        assert_eq!(next(B), (true, Some(C.to_owned())));
        assert_eq!(next(C), (false, Some(A.to_owned())));
        // The only IPv6 backend has nowhere to fall back to.
        assert_eq!(next("[fd00::11]:6443"), (true, None));
    }

    #[test]
    fn with_no_healthy_backend_every_configured_one_serves() {
        let mut r = Reconciler::new();
        let d = r.desired(
            &config(&[(A, 1), (B, 1), (C, 0)]),
            &healthy(&[]),
            &HashSet::new(),
        );
        assert!(d.fail_open);
        assert_eq!(
            d.in_rotation,
            BTreeSet::from([1, 2]),
            "fail-open keeps drained backends out"
        );
        assert_eq!(share(&d, 1) + share(&d, 2), 1009);
    }

    #[test]
    fn ids_stay_with_their_address_across_config_changes() {
        let mut r = Reconciler::new();
        let d1 = r.desired(
            &config(&[(A, 1), (B, 1), (C, 1)]),
            &healthy(&[A, B, C]),
            &HashSet::new(),
        );
        let d2 = r.desired(
            &config(&[(C, 1), (A, 1)]),
            &healthy(&[A, C]),
            &HashSet::new(),
        );
        let id = |d: &Desired, a: &str| {
            *d.backends
                .iter()
                .find(|(_, b)| b.addr == a.parse().unwrap())
                .unwrap()
                .0
        };
        assert_eq!((id(&d1, A), id(&d1, C)), (id(&d2, A), id(&d2, C)));
        // B's id is free again and goes to the next new backend.
        let d3 = r.desired(
            &config(&[(C, 1), (A, 1), ("10.0.0.14:6443", 1)]),
            &healthy(&[A, C]),
            &HashSet::new(),
        );
        assert_eq!(id(&d3, "10.0.0.14:6443"), id(&d1, B));
    }

    #[test]
    fn a_drained_backend_leaves_the_ring_but_keeps_its_flows() {
        let mut r = Reconciler::new();
        let d = r.desired(
            &config(&[(A, 1), (B, 0)]),
            &healthy(&[A, B]),
            &HashSet::new(),
        );
        assert_eq!(d.in_rotation, BTreeSet::from([1]), "weight 0: no slots");
        assert!(
            d.keep_flows.contains(&B.parse().unwrap()),
            "but its open flows stay"
        );
        let t0 = Instant::now();
        let cfg = config(&[(A, 1), (B, 0)]);
        let d = r.desired_at(&cfg, &healthy(&[A]), &HashSet::new(), t0);
        assert!(
            d.keep_flows.contains(&B.parse().unwrap()),
            "down, but only just"
        );
        let d = r.desired_at(&cfg, &healthy(&[A]), &HashSet::new(), t0 + SETTLED);
        assert!(
            !d.keep_flows.contains(&B.parse().unwrap()),
            "until it has been down while another master is ready"
        );
    }

    /// Longer than `fall + 1` intervals of [`config`]'s probes (500 ms, fall 2).
    const SETTLED: Duration = Duration::from_secs(2);

    #[test]
    fn while_every_master_is_failing_none_loses_its_flows() {
        let mut r = Reconciler::new();
        let cfg = config(&[(A, 1), (B, 1), (C, 1)]);
        let all = [A, B, C].map(|a| a.parse::<SocketAddr>().unwrap());
        let t0 = Instant::now();
        // An outage on the LB's side: A's probes fail first, then B's, then C's,
        // as their schedules fall.
        let d = r.desired_at(&cfg, &healthy(&[B, C]), &HashSet::new(), t0);
        assert!(d.keep_flows.contains(&all[0]), "A just went down");
        let d = r.desired_at(
            &cfg,
            &healthy(&[C]),
            &HashSet::new(),
            t0 + Duration::from_millis(700),
        );
        assert!(d.keep_flows.contains(&all[0]) && d.keep_flows.contains(&all[1]));
        for later in [SETTLED, SETTLED * 10] {
            let d = r.desired_at(&cfg, &healthy(&[]), &HashSet::new(), t0 + later);
            assert!(d.fail_open);
            assert!(all.iter().all(|a| d.keep_flows.contains(a)), "{later:?}");
        }
        // The outage ends: B and C pass again, A not yet (its probe comes a
        // little later): it keeps its flows, since the node has not yet shown
        // for the settling time that it reaches another master.
        let back = t0 + SETTLED * 11;
        let d = r.desired_at(&cfg, &healthy(&[B, C]), &HashSet::new(), back);
        assert!(all.iter().all(|a| d.keep_flows.contains(a)));
        // A still down once B has been ready that long: its own fault now, and
        // its flows go.
        let d = r.desired_at(&cfg, &healthy(&[B, C]), &HashSet::new(), back + SETTLED);
        assert!(!d.keep_flows.contains(&all[0]));
        assert!(d.keep_flows.contains(&all[1]) && d.keep_flows.contains(&all[2]));
    }

    #[test]
    fn a_down_master_alone_loses_its_flows_once_settled() {
        let mut r = Reconciler::new();
        let cfg = config(&[(A, 1), (B, 1)]);
        let a: SocketAddr = A.parse().unwrap();
        let t0 = Instant::now();
        let d = r.desired_at(&cfg, &healthy(&[B]), &HashSet::new(), t0);
        assert!(d.keep_flows.contains(&a));
        let d = r.desired_at(&cfg, &healthy(&[B]), &HashSet::new(), t0 + SETTLED);
        assert!(!d.keep_flows.contains(&a));
    }

    #[test]
    fn a_not_ready_backend_leaves_the_ring_and_keeps_its_flows_until_it_is_down() {
        let mut r = Reconciler::new();
        let cfg = config(&[(A, 1), (B, 1)]);
        let mut health = healthy(&[A]);
        health.insert(B.parse().unwrap(), Health::NotReady);
        let d = r.desired(&cfg, &health, &HashSet::new());
        assert_eq!(d.in_rotation, BTreeSet::from([1]));
        assert!(d.keep_flows.contains(&B.parse().unwrap()));
        health.insert(B.parse().unwrap(), Health::Down);
        let t0 = Instant::now();
        let d = r.desired_at(&cfg, &health, &HashSet::new(), t0);
        assert!(d.keep_flows.contains(&B.parse().unwrap()), "down just now");
        let d = r.desired_at(&cfg, &health, &HashSet::new(), t0 + SETTLED);
        assert!(!d.keep_flows.contains(&B.parse().unwrap()));
    }

    #[test]
    fn each_vip_fails_open_over_its_own_family_only() {
        let mut text = String::from(
            "[datapath]\ninterfaces = [\"lo\"]\nsnat_ipv4 = \"10.0.0.1\"\nsnat_ipv6 = \"fd00::1\"\nmaglev_size = 1009\n\
             [[vip]]\naddress = \"10.0.0.100\"\n[[vip]]\naddress = \"fd00::100\"\n[health]\nkind = \"tcp\"\n",
        );
        for a in [A, "[fd00::11]:6443", "[fd00::12]:6443"] {
            let _ = write!(text, "[[backend]]\naddress = \"{a}\"\n");
        }
        let cfg = Config::parse(&text, Path::new("test.toml")).expect("valid");
        let mut r = Reconciler::new();
        // The IPv4 master is up, both IPv6 masters are down.
        let d = r.desired(&cfg, &healthy(&[A]), &HashSet::new());
        assert!(d.fail_open);
        let v6_ring = &d.vips[1].1;
        assert!(
            v6_ring.iter().all(|&b| b == 2 || b == 3),
            "the IPv6 VIP fails open to its own masters"
        );
        assert_eq!(
            v6_ring.iter().filter(|&&b| b == 2).count()
                + v6_ring.iter().filter(|&&b| b == 3).count(),
            1009
        );
        assert!(
            d.vips[0].1.iter().all(|&b| b == 1),
            "the IPv4 VIP keeps its healthy master only"
        );
    }

    #[test]
    fn weights_follow_into_the_ring() {
        let mut r = Reconciler::new();
        let d = r.desired(
            &config(&[(A, 1), (B, 3)]),
            &healthy(&[A, B]),
            &HashSet::new(),
        );
        let (a, b) = (share(&d, 1) as f64, share(&d, 2) as f64);
        assert!((b / a - 3.0).abs() < 0.1, "shares {a} and {b}");
    }
}
