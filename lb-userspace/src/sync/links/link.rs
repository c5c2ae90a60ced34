//! One link's queue, counters and messages in flight: what the API (which queues
//! and reads the status) and the link's task (which sends, and learns of ACKs)
//! share.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::mpsc::{self, error::TrySendError},
    time::Instant,
};

use super::{LinkState, LinkStatus, Traffic, lock};
use crate::sync::wire::Message;

/// A message in a link's queue, with its ticket: its place among everything
/// queued on the link, for [`super::Links::flush`].
pub(super) struct Queued {
    pub(super) ticket: u64,
    pub(super) message: Arc<Message>,
}

/// A message sent and not yet acknowledged.
pub(super) struct InFlight {
    pub(super) seq: u64,
    pub(super) ticket: u64,
    pub(super) sent_at: Instant,
}

/// One link's queue and counters, shared by the API and the link's task.
pub(super) struct LinkShared {
    queue: mpsc::Sender<Queued>,
    /// The last ticket queued; the lock keeps tickets in queue order.
    pub(super) queued: Mutex<u64>,
    /// The last ticket acknowledged.
    pub(super) acked: AtomicU64,
    pub(super) inner: Mutex<LinkInner>,
}

pub(super) struct LinkInner {
    pub(super) state: LinkState,
    pub(super) sessions: u64,
    sent: Traffic,
    received: Traffic,
    /// This session's messages sent and not acknowledged, oldest first.
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) last_error: Option<String>,
}

impl LinkShared {
    pub(super) fn new(queue_len: usize, state: LinkState) -> (LinkShared, mpsc::Receiver<Queued>) {
        let (queue, rx) = mpsc::channel(queue_len);
        let link = LinkShared {
            queue,
            queued: Mutex::new(0),
            acked: AtomicU64::new(0),
            inner: Mutex::new(LinkInner {
                state,
                sessions: 0,
                sent: Traffic::default(),
                received: Traffic::default(),
                in_flight: VecDeque::new(),
                last_error: None,
            }),
        };
        (link, rx)
    }

    /// Queues `message` with the next ticket. The queue is closed once the link's
    /// task has stopped.
    pub(super) fn enqueue(&self, message: Arc<Message>) -> Result<(), TrySendError<Queued>> {
        let mut queued = lock(&self.queued);
        let ticket = *queued + 1;
        self.queue.try_send(Queued { ticket, message })?;
        *queued = ticket;
        Ok(())
    }

    pub(super) fn set_state(&self, state: LinkState) {
        lock(&self.inner).state = state;
    }

    pub(super) fn set_error(&self, error: String) {
        let mut inner = lock(&self.inner);
        inner.state = LinkState::Down;
        inner.last_error = Some(error);
    }

    pub(super) fn count_sent(&self, traffic: Traffic) {
        lock(&self.inner).sent.add(traffic);
    }

    pub(super) fn count_received(&self, traffic: Traffic) {
        lock(&self.inner).received.add(traffic);
    }

    /// The messages just sealed, before they are written (so that no ACK can
    /// come before them).
    pub(super) fn sending(&self, sent: impl IntoIterator<Item = InFlight>) {
        lock(&self.inner).in_flight.extend(sent);
    }

    /// The peer acknowledged every frame up to `seq`. `false` if that is more than the
    /// session has sent: a broken peer.
    pub(super) fn acked(&self, seq: u64, last_sent: u64) -> bool {
        if seq > last_sent {
            return false;
        }
        let mut inner = lock(&self.inner);
        let mut ticket = None;
        while inner.in_flight.front().is_some_and(|m| m.seq <= seq) {
            ticket = inner.in_flight.pop_front().map(|m| m.ticket);
        }
        if let Some(ticket) = ticket {
            self.acked.fetch_max(ticket, Ordering::AcqRel);
        }
        true
    }

    pub(super) fn status(&self, now: Instant) -> LinkStatus {
        let inner = lock(&self.inner);
        LinkStatus {
            state: inner.state,
            sessions: inner.sessions,
            lag: inner
                .in_flight
                .front()
                .map_or(Duration::ZERO, |m| now.saturating_duration_since(m.sent_at)),
            queued: self.queue.max_capacity() - self.queue.capacity(),
            sent: inner.sent,
            received: inner.received,
            last_error: inner.last_error.clone(),
        }
    }
}
