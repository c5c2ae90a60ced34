//! Passive failure events from the datapath: a backend that refused a connection
//! on the wire (a RST or an ICMP unreachable answering a SYN it never accepted), or
//! left a SYN unanswered until the client sent it again (a silent host). Probes
//! notice a dead apiserver only after `fall` intervals; the datapath sees the first
//! refused SYN, so this reader hands each event to the daemon within milliseconds,
//! and the daemon takes the backend out of rotation at once.
//!
//! The datapath sends an event once a backend has failed `passive_threshold` times
//! in a row, at most one per backend per `PASSIVE_EVENT_GAP_NS`; the counts by
//! kind are in `PASSIVE_STATS` (see `/metrics`).

use std::fmt;

use aya::maps::{MapData, RingBuf};
use lb_common::{PASSIVE_KIND_ICMP, PASSIVE_KIND_RST, PassiveEvent};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::warn;

/// How a backend failed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassiveKind {
    Rst,
    Icmp,
    Silent,
}

impl PassiveKind {
    /// The kind of a `PassiveEvent` (`PASSIVE_KIND_*`).
    #[must_use]
    pub fn from_raw(kind: u32) -> Self {
        match kind {
            PASSIVE_KIND_RST => Self::Rst,
            PASSIVE_KIND_ICMP => Self::Icmp,
            _ => Self::Silent,
        }
    }

    /// The label of `/metrics`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Rst => "rst",
            Self::Icmp => "icmp",
            Self::Silent => "silent",
        }
    }
}

impl fmt::Display for PassiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rst => "it answered a client's SYN with a RST",
            Self::Icmp => "an ICMP destination unreachable came back for a client's SYN",
            Self::Silent => "it left a client's SYN unanswered until the client sent it again",
        })
    }
}

/// Drain `ring` in a task, sending each event's backend id and kind to `events`.
/// The task ends when the receiver is gone.
pub fn spawn(
    ring: RingBuf<MapData>,
    events: mpsc::Sender<(u32, PassiveKind)>,
) -> Result<JoinHandle<()>, std::io::Error> {
    // SAFETY: the ring buffer owns its map descriptor, which stays open and the
    // same until the AsyncFd (which owns the ring buffer) drops.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    warn!("passive events: the ring buffer failed: {e}");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            let mut ids = Vec::new();
            while let Some(item) = ring.next() {
                if let Some(event) = decode(&item) {
                    ids.push(event);
                }
            }
            guard.clear_ready();
            for id in ids {
                if events.send(id).await.is_err() {
                    return;
                }
            }
        }
    }))
}

/// The backend id and kind of one ring record, if it is a whole `PassiveEvent`.
fn decode(bytes: &[u8]) -> Option<(u32, PassiveKind)> {
    if bytes.len() < std::mem::size_of::<PassiveEvent>() {
        return None;
    }
    let id = u32::from_ne_bytes(bytes[..4].try_into().ok()?);
    let kind = u32::from_ne_bytes(bytes[4..8].try_into().ok()?);
    Some((id, PassiveKind::from_raw(kind)))
}
