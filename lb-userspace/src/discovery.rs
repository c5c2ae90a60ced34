//! Discovery: the masters come from the cluster itself, the `default/kubernetes`
//! `EndpointSlice` that every apiserver keeps itself in (it adds its address at
//! start and removes it on graceful shutdown), so that adding or replacing a
//! control-plane node needs no edit on any LB node or worker.
//!
//! - **The reader** (`task`) lists and watches the slices with kube-runtime's
//!   watcher (it resumes from the last `resourceVersion`, relists on `410 Gone`,
//!   takes bookmarks) in a task of its own, and reports the whole set after every
//!   change, or that it cannot read it.
//! - **The checks** (`slice`) refuse a slice that is empty, of the wrong family,
//!   or has a bogus port; **the membership** (`members`) refuses one that would
//!   take out more than half of the masters the probes see ready, joins new
//!   masters without slots until their probes pass, and drains the ones that
//!   left. Refusals are counted by reason.
//! - **The daemon** feeds the reports to the membership in its loop, and gives
//!   the members to the controller as the backend list: the controller stays the
//!   only writer of the maps, and discovery is one more of its inputs.
//!
//! # The bootstrap loop, and why it cannot deadlock
//!
//! apilb balances the apiservers, and reads the slice from an apiserver. Going
//! through apilb's own VIP would make discovery depend on the datapath it feeds
//! (and an LB node cannot reach its own VIP through XDP at all). So the reader
//! never uses the VIP or the server the kubeconfig names: it dials **a master the
//! probes see ready, at its own address**, from the current members, and verifies
//! the certificate for the host the kubeconfig names (the VIP or a DNS name, which
//! every apiserver's certificate carries) or its `tls-server-name`. It tries the
//! next ready master after two errors in a row.
//!
//! - At start the members are the static `[[backend]]` list, probed and balanced
//!   as without discovery: the VIP serves before any slice is read, and the
//!   reader's first master comes from that list. It needs one listed master to be
//!   alive, no more.
//! - While the slice cannot be read (no master answers, RBAC refuses, the
//!   kubeconfig is bad), the last members stay: the static list if no slice was
//!   ever taken, else the last slice taken. Nothing is removed for an error.
//! - The reader depends on probes, which depend on nothing but the masters; the
//!   datapath depends on the members. No cycle goes through the VIP.
//!
//! Keep at least one master of the static list alive and listed, so that a
//! restarted apilb can reach the cluster again.

mod client;
pub mod members;
pub mod slice;
pub mod task;

use std::{collections::HashMap, net::SocketAddr, time::Instant};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, DiscoverySettings},
    health::Health,
};
pub use members::{Member, Membership, Offer, Source, Stage};
pub use slice::{Families, Refusal};
pub use task::Report;

/// `/status`'s view of discovery.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    /// `bootstrap` (no slice taken yet: the static list), `synced` (the last read
    /// succeeded) or `unreadable` (it failed; the last members stay).
    pub state: String,
    /// The `resourceVersion` of the last slice read.
    pub resource_version: String,
    /// The master the reader asks.
    pub server: String,
    /// Why the last read failed, if it did.
    pub last_error: String,
    /// Lists since start (each relist adds one).
    pub lists: u64,
    /// Watches too old to resume (`410 Gone`), each followed by a list.
    pub expired: u64,
    /// Slice updates taken.
    pub accepted: u64,
    /// Slice updates refused, every reason from 0.
    pub refusals: Vec<(String, u64)>,
}

/// Discovery as the daemon runs it: the reader task, and the membership it feeds.
pub struct Discovery {
    membership: Membership,
    /// The `resourceVersion` last refused: the same version offered again (a
    /// relist) is not judged, nor counted, twice.
    refused_version: Option<String>,
    /// The `resourceVersion` of the slice held for `healthy_dropped`.
    held_version: String,
    families: Families,
    status: DiscoveryStatus,
    ready: watch::Sender<Vec<SocketAddr>>,
    task: JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery {
    /// Start the reader; its reports go to `reports`, for [`Discovery::take`].
    pub fn start(
        config: &Config,
        settings: &DiscoverySettings,
        reports: mpsc::Sender<Report>,
    ) -> Self {
        let membership = Membership::new(config.backends.clone(), settings.hold);
        let (ready, ready_rx) = watch::channel(config.backend_addrs().collect());
        let task = tokio::spawn(task::run(settings.credentials.clone(), ready_rx, reports));
        info!(hold = ?settings.hold, "discovery: the static backends serve until the EndpointSlice is read");
        Self {
            membership,
            refused_version: None,
            held_version: String::new(),
            families: Families {
                v4: config.vips.iter().any(|v| v.addr.is_ipv4()),
                v6: config.vips.iter().any(|v| v.addr.is_ipv6()),
            },
            status: DiscoveryStatus {
                state: "bootstrap".to_owned(),
                ..DiscoveryStatus::default()
            },
            ready,
            task,
        }
    }

    /// The members, for the controller.
    #[must_use]
    pub fn members(&self) -> Vec<Member> {
        self.membership.members()
    }

    /// A reload's static list.
    pub fn set_statics(&mut self, config: &Config) {
        self.membership.set_statics(config.backends.clone());
    }

    /// Take a report from the reader. Returns whether the members changed.
    pub fn take(
        &mut self,
        report: Report,
        health: &HashMap<SocketAddr, Health>,
        now: Instant,
    ) -> bool {
        match report {
            Report::Unreadable { error, server } => {
                if self.membership.synced() {
                    "unreadable".clone_into(&mut self.status.state);
                }
                self.status.last_error = error;
                if let Some(s) = server {
                    self.status.server = s.to_string();
                }
                false
            }
            Report::Slices {
                slices,
                resource_version,
                server,
                lists,
                expired,
            } => {
                self.status.server = server.to_string();
                self.status.lists = lists;
                self.status.expired = expired;
                self.status.last_error.clear();
                if self.refused_version.as_ref() == Some(&resource_version) {
                    return false;
                }
                let offer = match slice::masters(&slices, self.families) {
                    Ok(set) => self.membership.offer(set, health, now),
                    Err(why) => {
                        self.membership.refuse(why);
                        Offer::Refused(why)
                    }
                };
                match offer {
                    Offer::Accepted { changed } => {
                        self.refused_version = None;
                        "synced".clone_into(&mut self.status.state);
                        self.status.resource_version = resource_version;
                        self.status.accepted += 1;
                        if changed {
                            info!(resource_version = %self.status.resource_version, members = %self.describe(), "discovery: slice taken");
                        }
                        changed
                    }
                    Offer::Refused(why) => {
                        if why == Refusal::HealthyDropped {
                            self.held_version.clone_from(&resource_version);
                        }
                        self.refused_version = Some(resource_version.clone());
                        error!(
                            resource_version,
                            reason = why.label(),
                            "discovery: slice refused; the members stay as they are"
                        );
                        false
                    }
                }
            }
        }
    }

    /// The probes' verdicts changed (see [`Membership::observe`]).
    pub fn observe(&mut self, health: &HashMap<SocketAddr, Health>, now: Instant) -> bool {
        let held = self.membership.holds();
        let changed = self.membership.observe(health, now);
        if held && !self.membership.holds() {
            "synced".clone_into(&mut self.status.state);
            self.status.resource_version = std::mem::take(&mut self.held_version);
            self.status.accepted += 1;
            self.refused_version = None;
            info!(
                resource_version = %self.status.resource_version,
                "discovery: the held slice is taken: the masters it dropped stopped passing their probes"
            );
        }
        if changed {
            info!(members = %self.describe(), "discovery: members changed with their health");
        }
        self.publish_ready(health);
        changed
    }

    /// Leaving masters past their hold are gone.
    pub fn expire(&mut self, now: Instant) -> bool {
        let changed = self.membership.expire(now);
        if changed {
            warn!(members = %self.describe(), "discovery: a leaving master's hold passed; its flows go");
        }
        changed
    }

    /// Tell the reader which masters to ask: the ready members, else all.
    pub fn publish_ready(&self, health: &HashMap<SocketAddr, Health>) {
        let members: Vec<SocketAddr> = self
            .membership
            .members()
            .iter()
            .filter(|m| m.stage != Stage::Leaving)
            .map(|m| m.settings.addr)
            .collect();
        let ready: Vec<SocketAddr> = members
            .iter()
            .copied()
            .filter(|a| health.get(a) == Some(&Health::Ready))
            .collect();
        let ask = if ready.is_empty() { members } else { ready };
        self.ready.send_if_modified(|old| {
            let changed = *old != ask;
            if changed {
                old.clone_from(&ask);
            }
            changed
        });
    }

    #[must_use]
    pub fn status(&self) -> DiscoveryStatus {
        DiscoveryStatus {
            refusals: self
                .membership
                .refusals()
                .iter()
                .map(|(r, n)| (r.label().to_owned(), *n))
                .collect(),
            ..self.status.clone()
        }
    }

    /// `addr (stage)` of each member, for the log.
    fn describe(&self) -> String {
        self.membership
            .members()
            .iter()
            .map(|m| format!("{} ({})", m.settings.addr, m.stage.label()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
