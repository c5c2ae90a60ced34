//! Removing the flows of down or removed masters, on a thread of its own.
//!
//! The daemon loop must act on an election's release within the etcd guard
//! (500 ms at the shortest), and listing two flow tables of 131,072 entries each
//! takes longer than that. So a reconcile only decides which masters' flows may
//! stay (`Applied::keep_flows`) and hands that set over; this thread lists the
//! tables on handles of its own (`Datapath::flow_tables`) and removes the rest.
//! Whether a flow is doomed is asked again as it is removed, against the newest
//! set, so a master back in rotation while a listing runs loses no new flow.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::Duration,
};

use tracing::{error, warn};

use crate::datapath::Datapath;

/// The handle the daemon keeps: a new set wakes the thread; dropping it stops
/// the thread after its current pass.
pub struct Reaper {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// The set the next pass uses, if newer than the current one.
    pending: Option<BTreeSet<SocketAddr>>,
    /// The set the running pass uses.
    keep: BTreeSet<SocketAddr>,
    stop: bool,
}

impl Reaper {
    /// Starts the thread on `tables` (see [`Datapath::flow_tables`]).
    pub fn spawn(tables: Datapath) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        thread::Builder::new()
            .name("apilb-reaper".into())
            .spawn(move || run(&worker, tables))?;
        Ok(Self { shared })
    }

    /// Flows to any backend outside `keep` are to go.
    pub fn keep_only(&self, keep: BTreeSet<SocketAddr>) {
        self.shared.lock().pending = Some(keep);
        self.shared.wake.notify_one();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether flows to `backend` are to go, by the newest set.
    fn doomed(&self, backend: SocketAddr) -> bool {
        let s = self.lock();
        !s.pending.as_ref().unwrap_or(&s.keep).contains(&backend)
    }
}

fn run(shared: &Shared, mut tables: Datapath) {
    loop {
        {
            let mut s = shared.lock();
            while s.pending.is_none() && !s.stop {
                s = shared.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            if s.stop {
                return;
            }
            s.keep = s.pending.take().unwrap_or_default();
        }
        match tables.remove_flows(|b| shared.doomed(b)) {
            Ok(removed) => {
                for (backend, flows) in removed {
                    warn!(%backend, flows, "backend down or removed; its flows were removed so its clients reconnect now");
                }
            }
            Err(e) => {
                error!("removing the flows of down backends (retrying in a second): {e}");
                thread::sleep(Duration::from_secs(1));
                let mut s = shared.lock();
                if s.pending.is_none() {
                    s.pending = Some(std::mem::take(&mut s.keep));
                }
            }
        }
    }
}
