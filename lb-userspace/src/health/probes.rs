//! The probers of the configured backends and their latest verdicts: what the
//! daemon's loop keeps so that a reload starts, stops or restarts exactly the
//! probers that changed.
//!
//! A prober starts in the state its backend is known to be in: masters configured
//! at start are ready (a restarted controller must not pull not-yet-probed masters,
//! and their flows, out of the ring one by one), a master added by a reload is down
//! until `rise` probes prove it, and one whose prober restarts with new settings
//! keeps its last verdict.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use tokio::sync::mpsc;

use super::{Health, HealthError, HealthEvent, ProbeSpec, Prober, ProberHandle};
use crate::passive::PassiveKind;

/// One prober per configured backend, and each backend's latest health.
pub struct Probes {
    prober: Prober,
    spec: ProbeSpec,
    handles: HashMap<SocketAddr, ProberHandle>,
    health: HashMap<SocketAddr, Health>,
    events: mpsc::Sender<HealthEvent>,
}

impl Probes {
    /// Probe `backends`, each starting ready; verdicts go to `events`.
    pub fn start(
        spec: &ProbeSpec,
        backends: impl IntoIterator<Item = SocketAddr>,
        events: mpsc::Sender<HealthEvent>,
    ) -> Result<Self, HealthError> {
        let health: HashMap<SocketAddr, Health> =
            backends.into_iter().map(|a| (a, Health::Ready)).collect();
        let wanted: Vec<SocketAddr> = health.keys().copied().collect();
        let mut p = Self {
            prober: Prober::new(spec.clone())?,
            spec: spec.clone(),
            handles: HashMap::new(),
            health,
            events,
        };
        p.sync(wanted);
        Ok(p)
    }

    /// Probe exactly `backends`; one not seen before starts down.
    fn sync(&mut self, backends: impl IntoIterator<Item = SocketAddr>) {
        let wanted: HashSet<SocketAddr> = backends.into_iter().collect();
        self.handles.retain(|a, _| wanted.contains(a));
        self.health.retain(|a, _| wanted.contains(a));
        for addr in wanted {
            let health = *self.health.entry(addr).or_insert(Health::Down);
            self.handles
                .entry(addr)
                .or_insert_with(|| self.prober.spawn(addr, health, self.events.clone()));
        }
    }

    /// Apply a reloaded config: every prober restarts, from its last verdict, if
    /// the spec changed; backends added or removed get or lose theirs. A spec whose
    /// files cannot be loaded changes nothing.
    pub fn reconfigure(
        &mut self,
        spec: &ProbeSpec,
        backends: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<(), HealthError> {
        if *spec != self.spec {
            self.prober = Prober::new(spec.clone())?;
            self.spec = spec.clone();
            self.handles.clear();
        }
        self.sync(backends);
        Ok(())
    }

    /// Take in a prober's verdict; returns the backend's new health, or `None` for
    /// an event from a prober a reload has stopped since.
    pub fn record(&mut self, ev: &HealthEvent) -> Option<Health> {
        if !self.handles.contains_key(&ev.backend) {
            return None;
        }
        let health = ev.health();
        self.health.insert(ev.backend, health);
        Some(health)
    }

    /// Every probed backend's health.
    pub fn health(&self) -> &HashMap<SocketAddr, Health> {
        &self.health
    }

    /// The latest probe of `backend`, state change or not.
    pub fn latest(&self, backend: SocketAddr) -> Option<HealthEvent> {
        self.handles.get(&backend).map(ProberHandle::latest)
    }

    /// A passive hint about `backend`: probe it now (see [`ProberHandle::confirm`]).
    pub fn confirm(&self, backend: SocketAddr, why: PassiveKind) {
        if let Some(h) = self.handles.get(&backend) {
            h.confirm(why);
        }
    }
}
