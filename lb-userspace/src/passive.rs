//! Passive failure detection, on the controller's side: a backend that refused a
//! connection on the wire (a RST or an ICMP unreachable answering a SYN it never
//! accepted), or left a SYN unanswered until the client sent it again (a silent
//! host). Probes notice a dead apiserver only after `fall` intervals; the datapath
//! sees the first refused SYN, so this module reads its events within milliseconds.
//!
//! An event is a hint, not a verdict: the wire cannot tell a dead master from a
//! SYN that was lost, carried a bad checksum, or was forged, so the daemon asks the
//! backend's prober to probe at once (`health::ProberHandle::confirm`), and only a
//! failed probe takes the backend out.
//!
//! The datapath (`lb-ebpf/src/passive.rs`) sends an event once a backend has failed
//! `passive_threshold` times in a row, at most one per backend per
//! `PASSIVE_EVENT_GAP_NS`; the counts by kind are in `PASSIVE_STATS` (see
//! `/metrics`).

use std::fmt;

use aya::maps::{MapData, RingBuf};
use lb_common::{PASSIVE_KIND_ICMP, PASSIVE_KIND_RST, PASSIVE_KIND_SILENT, PassiveEvent};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::warn;

/// `health.passive` and `health.passive_threshold`, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveSettings {
    /// Whether the datapath drops a refusal of an unanswered SYN and reports it.
    pub enabled: bool,
    /// Passive failures in a row (no SYN-ACK between) that take a backend out
    /// (1-1000).
    pub threshold: u32,
}

/// How a backend failed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassiveKind {
    Rst,
    Icmp,
    Silent,
}

impl PassiveKind {
    /// The kind of a `PassiveEvent` (`PASSIVE_KIND_*`); `None` for a kind this
    /// apilb does not know (a newer datapath's), which is then not acted on.
    #[must_use]
    pub fn from_raw(kind: u32) -> Option<Self> {
        match kind {
            PASSIVE_KIND_RST => Some(Self::Rst),
            PASSIVE_KIND_ICMP => Some(Self::Icmp),
            PASSIVE_KIND_SILENT => Some(Self::Silent),
            _ => None,
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

/// The backend id and kind of one ring record, if it is a whole `PassiveEvent` of
/// a known kind.
fn decode(bytes: &[u8]) -> Option<(u32, PassiveKind)> {
    if bytes.len() < std::mem::size_of::<PassiveEvent>() {
        return None;
    }
    let id = u32::from_ne_bytes(bytes[..4].try_into().ok()?);
    let kind = u32::from_ne_bytes(bytes[4..8].try_into().ok()?);
    Some((id, PassiveKind::from_raw(kind)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_kind_decodes_and_an_unknown_one_does_not() {
        let record = |kind: u32| {
            let mut b = 7u32.to_ne_bytes().to_vec();
            b.extend_from_slice(&kind.to_ne_bytes());
            b.resize(std::mem::size_of::<PassiveEvent>(), 0);
            b
        };
        assert_eq!(
            decode(&record(PASSIVE_KIND_RST)),
            Some((7, PassiveKind::Rst))
        );
        assert_eq!(
            decode(&record(PASSIVE_KIND_ICMP)),
            Some((7, PassiveKind::Icmp))
        );
        assert_eq!(
            decode(&record(PASSIVE_KIND_SILENT)),
            Some((7, PassiveKind::Silent))
        );
        assert_eq!(decode(&record(99)), None, "a kind from a newer datapath");
        assert_eq!(
            decode(&record(PASSIVE_KIND_RST)[..6]),
            None,
            "a short record"
        );
    }
}
