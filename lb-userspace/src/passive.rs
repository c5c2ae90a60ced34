//! Passive failure events from the datapath: a backend that refused a connection
//! on the wire (a RST to a SYN it never answered), or left a SYN unanswered until
//! the client sent it again (a silent host). Probes notice a dead apiserver
//! only after `fall` intervals; the datapath sees the first refused SYN, so this
//! reader hands each event to the daemon within milliseconds, and the daemon takes
//! the backend out of rotation at once.
//!
//! The datapath sends at most one event per backend per `PASSIVE_EVENT_GAP_NS`;
//! the exact counts are in `PASSIVE_STATS`, which the daemon reads on each event.

use aya::maps::{MapData, RingBuf};
use lb_common::PassiveEvent;
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};
use tracing::warn;

/// Drain `ring` in a task, sending each event's backend id to `events`. The task
/// ends when the receiver is gone.
pub fn spawn(
    ring: RingBuf<MapData>,
    events: mpsc::Sender<u32>,
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
                if let Some(id) = backend_id(&item) {
                    ids.push(id);
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

/// The backend id of one ring record, if it is a whole `PassiveEvent`.
fn backend_id(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < std::mem::size_of::<PassiveEvent>() {
        return None;
    }
    Some(u32::from_ne_bytes(bytes[..4].try_into().ok()?))
}
