//! One LB node's balancer in an "LB node dies" scenario, and the ways it can end:
//! `apilb run` (VRRP or etcd, flow sync on or off), or keepalived + haproxy as
//! kubeadm's HA guide sets them up (the VIP moving between two haproxies that
//! both listen on `*:6443`).

use std::{path::Path, time::Duration};

use crate::{
    cluster::{Topology, VIP_ADDR},
    elect::{
        Keepalived, Node, VrrpVip, etcd_election, node_config, sync_key, sync_tables, vrrp_vip,
    },
    proxies::{Haproxy, Proxy, kubeadm_keepalived},
};

/// How apilb elects the VIP's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Election {
    /// VRRP, 100 ms adverts, preempt; lb1 priority 150, lb2 100.
    Vrrp,
    /// An etcd lease of 3 s (one member in the router namespace); no preemption.
    Etcd,
}

/// What balances the VIP on both LB nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    Apilb {
        election: Election,
        sync: bool,
    },
    /// keepalived + haproxy, kubeadm's HA guide (`advert_int` 1 s, preempt; lb1
    /// MASTER 101, lb2 BACKUP 100).
    KeepalivedHaproxy,
}

impl Stack {
    /// Whether the first node takes the VIP back when it returns.
    #[must_use]
    pub fn preempts(self) -> bool {
        !matches!(
            self,
            Self::Apilb {
                election: Election::Etcd,
                ..
            }
        )
    }

    /// A short name, for reports.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::Apilb { election, sync } => format!(
                "apilb {}, sync {}",
                match election {
                    Election::Vrrp => "VRRP 100 ms",
                    Election::Etcd => "etcd 3 s lease",
                },
                if sync { "on" } else { "off" }
            ),
            Self::KeepalivedHaproxy => "keepalived + haproxy (kubeadm guide)".to_owned(),
        }
    }
}

/// The balancer on one LB node.
pub enum Side {
    Apilb(Node),
    Classic {
        keepalived: Option<Keepalived>,
        haproxy: Option<Haproxy>,
        index: usize,
        starts: usize,
    },
}

impl Side {
    /// Start `stack` on LB node `index` (0 is the preferred owner), its files
    /// under `dir`; returns once it runs (haproxy: once every master passed a
    /// check).
    #[must_use]
    pub fn start(t: &Topology, dir: &Path, prefix: &str, index: usize, stack: Stack) -> Self {
        match stack {
            Stack::Apilb { election, sync } => {
                if sync {
                    let _ = sync_key(dir);
                }
                let vip = match election {
                    Election::Vrrp => vrrp_vip(VrrpVip {
                        addr: VIP_ADDR,
                        vrid: 51,
                        priority: [150, 100][index],
                    }),
                    Election::Etcd => format!("address = \"{VIP_ADDR}\"\nelection = \"etcd\""),
                };
                let tables = election_tables(index, dir, sync, election);
                Self::Apilb(Node::start(t, dir, prefix, index, |instance| {
                    node_config(index, instance, std::slice::from_ref(&vip), &tables)
                }))
            }
            Stack::KeepalivedHaproxy => {
                let mut side = Self::Classic {
                    keepalived: None,
                    haproxy: None,
                    index,
                    starts: 0,
                };
                side.restart(t, dir);
                side
            }
        }
    }

    /// SIGKILL: apilb (its pinned datapath stays), or keepalived and haproxy.
    pub fn kill(&mut self) {
        match self {
            Self::Apilb(n) => n.kill(),
            Self::Classic {
                keepalived,
                haproxy,
                ..
            } => {
                if let Some(k) = keepalived.as_mut() {
                    k.kill();
                }
                drop(haproxy.take());
            }
        }
    }

    /// SIGTERM, as `systemctl stop` sends it: apilb hands its VIP over;
    /// keepalived sends a priority-0 advert, then haproxy stops.
    pub fn terminate(&mut self) {
        match self {
            Self::Apilb(n) => n.terminate(),
            Self::Classic {
                keepalived,
                haproxy,
                ..
            } => {
                if let Some(k) = keepalived.as_mut() {
                    k.terminate();
                }
                if let Some(h) = haproxy.as_mut() {
                    h.terminate();
                }
            }
        }
    }

    /// Start it again (after [`Side::kill`] or [`Side::terminate`]), with the
    /// same config.
    pub fn restart(&mut self, t: &Topology, dir: &Path) {
        match self {
            Self::Apilb(n) => n.restart(t, dir),
            Self::Classic {
                keepalived,
                haproxy,
                index,
                starts,
            } => {
                *starts += 1;
                let sub = dir.join(format!("lb{}-{starts}", *index + 1));
                std::fs::create_dir_all(&sub).expect("dir");
                let h = Haproxy::start(&t.lbs[*index], &sub, Proxy::HaproxyKubeadm, "*:6443");
                h.wait_checked(Duration::from_secs(15));
                *haproxy = Some(h);
                let role = [("MASTER", 101), ("BACKUP", 100)][*index];
                *keepalived = Some(kubeadm_keepalived(&t.lbs[*index], &sub, "ka", role));
            }
        }
    }

    /// apilb's log, if it is apilb.
    #[must_use]
    pub fn log(&self) -> String {
        match self {
            Self::Apilb(n) => Some(n.logs_text()),
            Self::Classic { .. } => None,
        }
        .unwrap_or_default()
    }
}

/// Node `node`'s `[election]` tables (VRRP with 100 ms adverts and preemption,
/// or etcd with a 3 s lease) and, with `sync`, its `[sync]` tables naming the
/// other node, with the key file `dir/sync.key`.
#[must_use]
pub fn election_tables(node: usize, dir: &Path, sync: bool, election: Election) -> String {
    let mut t = match election {
        Election::Etcd => etcd_election(node, "3s", 1),
        Election::Vrrp => {
            String::from("[election.vrrp]\nadvert_interval = \"100ms\"\npreempt = true\n")
        }
    };
    if sync {
        t.push_str(&sync_tables(node, &dir.join("sync.key")));
    }
    t
}
