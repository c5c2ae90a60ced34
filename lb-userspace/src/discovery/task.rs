//! The reader: lists and watches the `default/kubernetes` `EndpointSlice`s with
//! kube-runtime's watcher, on one ready master at a time, and reports the whole
//! current set after every change, or that it cannot read it. It never touches
//! the membership or the maps: the daemon's loop takes its reports.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, ResourceExt as _,
    runtime::watcher::{self, Event},
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::client::{self, WATCH_TIMEOUT_SECONDS};
use crate::config::Credentials;

/// The label the apiserver puts on the `kubernetes` Service's slices.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name=kubernetes";
/// Where the `kubernetes` Service lives.
pub const NAMESPACE: &str = "default";

/// What the reader tells the daemon.
#[derive(Clone, Debug)]
pub enum Report {
    /// The slices as they now are, after a (re)list or a watch event.
    Slices {
        slices: Vec<EndpointSlice>,
        /// The newest `resourceVersion` among them.
        resource_version: String,
        /// The master that answered.
        server: SocketAddr,
        /// Lists since start: 1 after the first, one more for each relist (a
        /// watch too old to resume, `410 Gone`, or a new master).
        lists: u64,
        /// Watches too old to resume (`410 Gone`) since start.
        expired: u64,
    },
    /// A request failed; the last slices taken stay.
    Unreadable {
        error: String,
        server: Option<SocketAddr>,
    },
}

/// After this many errors in a row on one master, the next ready one is asked.
const ERRORS_PER_MASTER: u32 = 2;
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Run the reader until `reports` is closed. `ready` holds the masters to ask,
/// the ones the probes see ready first (the daemon keeps it current).
pub async fn run(
    credentials: Credentials,
    ready: watch::Receiver<Vec<SocketAddr>>,
    reports: mpsc::Sender<Report>,
) {
    let mut backoff = BACKOFF_FIRST;
    let mut turn = 0usize;
    let mut lists = 0u64;
    let mut expired = 0u64;
    loop {
        let base = match client::base(&credentials).await {
            Ok(b) => b,
            Err(e) => {
                if !unreadable(&reports, error_chain(&e), None).await {
                    return;
                }
                backoff = pause(backoff).await;
                continue;
            }
        };
        let masters = ready.borrow().clone();
        if masters.is_empty() {
            backoff = pause(backoff).await;
            continue;
        }
        let master = masters[turn % masters.len()];
        turn = turn.wrapping_add(1);
        let client = match client::to_master(&base, master) {
            Ok(c) => c,
            Err(e) => {
                if !unreadable(&reports, error_chain(&e), Some(master)).await {
                    return;
                }
                backoff = pause(backoff).await;
                continue;
            }
        };
        info!(%master, "discovery: watching the {NAMESPACE}/kubernetes EndpointSlices");
        let api: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);
        let config = watcher::Config::default()
            .labels(SERVICE_LABEL)
            .timeout(WATCH_TIMEOUT_SECONDS);
        let mut stream = std::pin::pin!(watcher::watcher(api, config));
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut listing: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut errors = 0;
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(Event::Init) => {
                    listing.clear();
                    false
                }
                Ok(Event::InitApply(s)) => {
                    listing.insert(s.name_any(), s);
                    false
                }
                Ok(Event::InitDone) => {
                    lists += 1;
                    slices = std::mem::take(&mut listing);
                    true
                }
                Ok(Event::Apply(s)) => {
                    slices.insert(s.name_any(), s);
                    true
                }
                Ok(Event::Delete(s)) => {
                    slices.remove(&s.name_any());
                    true
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    // Compacted past the version the watch resumed from: not a
                    // failure, the watcher lists again at once.
                    expired += 1;
                    info!(%master, "discovery: the watch is too old to resume (410 Gone); listing again");
                    continue;
                }
                Err(e) => {
                    errors += 1;
                    if !unreadable(&reports, error_chain(&e), Some(master)).await {
                        return;
                    }
                    if errors >= ERRORS_PER_MASTER {
                        break;
                    }
                    backoff = pause(backoff).await;
                    continue;
                }
            };
            errors = 0;
            backoff = BACKOFF_FIRST;
            if changed {
                let report = Report::Slices {
                    resource_version: newest_version(slices.values()),
                    slices: slices.values().cloned().collect(),
                    server: master,
                    lists,
                    expired,
                };
                if reports.send(report).await.is_err() {
                    return;
                }
            }
        }
        backoff = pause(backoff).await;
    }
}

/// Report a failure; `false` once the daemon is gone.
async fn unreadable(
    reports: &mpsc::Sender<Report>,
    error: String,
    server: Option<SocketAddr>,
) -> bool {
    warn!(server = ?server, "discovery: cannot read the EndpointSlices: {error}");
    reports
        .send(Report::Unreadable { error, server })
        .await
        .is_ok()
}

/// Sleep `backoff`, jittered by up to a quarter, and return the next one.
async fn pause(backoff: Duration) -> Duration {
    let jitter = backoff.mul_f64(fastrand::f64() / 4.0);
    tokio::time::sleep(backoff + jitter).await;
    (backoff * 2).min(BACKOFF_MAX)
}

/// The numerically newest `resourceVersion` (they are etcd revisions), else the
/// last one seen.
fn newest_version<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> String {
    slices
        .filter_map(|s| s.metadata.resource_version.clone())
        .max_by_key(|v| (v.parse::<u64>().unwrap_or(0), v.clone()))
        .unwrap_or_default()
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
