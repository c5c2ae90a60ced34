//! One session on one connection, after its handshake: a reader and a writer
//! polled side by side, so that reading (ACKs above all) never waits for a write
//! and a write never waits for the caller to take what was read.

use std::{fmt, io, pin::pin, sync::Mutex};

use bytes::Bytes;
use tokio::{
    select,
    sync::{Notify, mpsc},
    time::{Instant, sleep_until, timeout},
};
use tracing::error;

use super::{
    ACK_DELAY, ACK_EVERY, Fault, GOODBYE_GRACE, InFlight, Inbound, KEEPALIVE_EVERY, Link, Peer,
    Queued, SILENCE_TIMEOUT, Shared, Traffic,
    frames::{FrameReader, FrameWriter, LENGTH_FIELD, ReadError},
    lock, stopping,
};
use crate::sync::wire::{Message, Reject, SessionCodec};

/// Frames written together at most: enough to fill a segment train, few enough
/// that a burst of queued messages does not delay an ACK for long.
const WRITE_BATCH: usize = 32;

/// A connection whose handshake is done.
pub(super) struct Conn {
    pub(super) reader: FrameReader,
    pub(super) writer: FrameWriter,
    pub(super) codec: SessionCodec,
}

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
    /// The peer said GOODBYE.
    Goodbye,
    /// The peer closed the connection.
    Closed,
    /// We said GOODBYE ([`super::Links::shutdown`]).
    Shutdown,
    /// A newer session from the same peer took this one's place.
    Replaced,
    /// Counted against the peer.
    Fault(Fault),
    Io(io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Goodbye => f.write_str("the peer said goodbye"),
            End::Closed => f.write_str("the peer closed the connection"),
            End::Shutdown => f.write_str("shut down"),
            End::Replaced => f.write_str("replaced by a newer session"),
            End::Fault(Fault::Rejected(reject)) => write!(f, "{reject} ({})", reject.as_str()),
            End::Fault(Fault::Timeout) => {
                write!(f, "nothing received for {}s", SILENCE_TIMEOUT.as_secs())
            }
            End::Fault(fault) => f.write_str(fault.as_str()),
            End::Io(error) => write!(f, "{error}"),
        }
    }
}

/// What the reader and the writer share: the codec (the reader opens, the writer
/// seals) and what is still to be acknowledged.
struct State {
    codec: SessionCodec,
    /// The seq of the last message handed to the caller.
    handed: u64,
    /// Messages handed since the last ACK.
    unacked: u32,
    /// When the first of them was handed.
    first_unacked: Option<Instant>,
}

impl State {
    /// When an ACK is due, if one is.
    fn ack_due(&self) -> Option<Instant> {
        let first = self.first_unacked?;
        Some(if self.unacked >= ACK_EVERY {
            first
        } else {
            first + ACK_DELAY
        })
    }

    /// The message `seq` was handed over; `true` if that makes the writer's next
    /// move another (an ACK timer to arm, or an ACK due now).
    fn handed(&mut self, seq: u64, now: Instant) -> bool {
        self.handed = seq;
        self.unacked += 1;
        if self.first_unacked.is_none() {
            self.first_unacked = Some(now);
        }
        self.unacked == 1 || self.unacked == ACK_EVERY
    }

    /// The ACK of everything handed over.
    fn seal_ack(&mut self) -> Bytes {
        self.unacked = 0;
        self.first_unacked = None;
        self.seal(&Message::Ack { seq: self.handed })
    }

    /// The links' own messages always fit a frame.
    fn seal(&mut self, message: &Message) -> Bytes {
        self.codec
            .seal(message)
            .unwrap_or_else(|e| unreachable!("{message:?} does not seal: {e}"))
    }
}

/// Runs the session on `link` with `peer` until it ends. What the caller queued
/// comes from `queue`.
pub(super) async fn run(
    shared: &Shared,
    peer: &Peer,
    link: Link,
    conn: Conn,
    queue: &mut mpsc::Receiver<Queued>,
) -> End {
    let Conn {
        mut reader,
        mut writer,
        codec,
    } = conn;
    let state = Mutex::new(State {
        codec,
        handed: 0,
        unacked: 0,
        first_unacked: None,
    });
    let wake = Notify::new();
    let session = Session {
        shared,
        peer,
        link,
        state: &state,
        wake: &wake,
    };
    let mut reading = pin!(session.read(&mut reader));
    let writing = session.write(&mut writer, queue);
    select! {
        end = &mut reading => end,
        written = writing => {
            if let Err(error) = written {
                return End::Io(error);
            }
            // Our GOODBYE and FIN are out. Read what the peer still sends (its ACKs,
            // its own GOODBYE) up to its end of stream: closing with unread input
            // would reset the connection.
            let _ = timeout(GOODBYE_GRACE, reading).await;
            End::Shutdown
        }
    }
}

/// What the reader and the writer of a session refer to.
#[derive(Clone, Copy)]
struct Session<'a> {
    shared: &'a Shared,
    peer: &'a Peer,
    link: Link,
    state: &'a Mutex<State>,
    /// Wakes the writer when an ACK timer is to be armed, or an ACK is due now.
    wake: &'a Notify,
}

impl Session<'_> {
    /// Reads frames until the session ends.
    async fn read(self, reader: &mut FrameReader) -> End {
        let link = self.peer.link(self.link);
        loop {
            let frame = match timeout(SILENCE_TIMEOUT, reader.next()).await {
                Err(_) => return End::Fault(Fault::Timeout),
                Ok(Ok(Some(frame))) => frame,
                Ok(Ok(None)) => return End::Closed,
                Ok(Err(ReadError::TooLong)) => {
                    return End::Fault(Fault::Rejected(Reject::Malformed));
                }
                Ok(Err(ReadError::Io(error))) => return End::Io(error),
            };
            let bytes = frame.len() as u64 + LENGTH_FIELD;
            let opened = lock(self.state).codec.open(&frame);
            let opened = match opened {
                Ok(opened) => opened,
                Err(reject) => {
                    // Framing or authentication can no longer be trusted.
                    debug_assert!(reject.closes_session(), "{reject:?}");
                    link.count_received(Traffic::frame(bytes, 0));
                    return End::Fault(Fault::Rejected(reject));
                }
            };
            link.count_received(Traffic::frame(bytes, records(&opened.message)));
            if opened.bad_records > 0 {
                self.shared.fault(
                    Some(self.peer),
                    Fault::Rejected(Reject::BadRecord),
                    opened.bad_records as u64,
                    format_args!("{} records skipped", opened.bad_records),
                );
            }
            match opened.message {
                Message::Ack { seq } => {
                    let last_sent = lock(self.state).codec.last_sent();
                    if !link.acked(seq, last_sent) {
                        return End::Fault(Fault::Rejected(Reject::Malformed));
                    }
                    self.shared.progress.send_modify(|()| {});
                }
                Message::Keepalive => {}
                Message::Goodbye => return End::Goodbye,
                message => {
                    // Each message has one link to travel on; on the other it is a
                    // broken peer.
                    if Link::sending(&message) != Some(self.link.other()) {
                        return End::Fault(Fault::Rejected(Reject::Malformed));
                    }
                    self.shared
                        .emit(Inbound::Message {
                            peer: self.peer.name.clone(),
                            message,
                        })
                        .await;
                    if lock(self.state).handed(opened.seq, Instant::now()) {
                        self.wake.notify_one();
                    }
                }
            }
        }
    }

    /// Writes queued messages, ACKs and KEEPALIVEs until shutdown (`Ok`, after a
    /// GOODBYE and the end of stream) or a write fails.
    async fn write(
        self,
        writer: &mut FrameWriter,
        queue: &mut mpsc::Receiver<Queued>,
    ) -> io::Result<()> {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut last_write = Instant::now();
        loop {
            let ack_due = lock(self.state).ack_due();
            if ack_due.is_some_and(|at| at <= Instant::now()) {
                let ack = lock(self.state).seal_ack();
                self.write_own(writer, ack).await?;
                last_write = Instant::now();
                continue;
            }
            select! {
                biased;
                () = stopping(&mut shutdown) => break,
                () = self.wake.notified() => {}
                () = sleep_until(ack_due.unwrap_or(last_write)), if ack_due.is_some() => {}
                queued = queue.recv() => {
                    // The sender lives in the links' shared state: gone, it is a
                    // shutdown.
                    let Some(first) = queued else { break };
                    self.write_batch(writer, first, queue).await?;
                    last_write = Instant::now();
                }
                () = sleep_until(last_write + KEEPALIVE_EVERY) => {
                    let keepalive = lock(self.state).seal(&Message::Keepalive);
                    self.write_own(writer, keepalive).await?;
                    last_write = Instant::now();
                }
            }
        }
        // ACK what the caller has, so that the peer's flush sees it, then go.
        let mut traffic = Traffic::default();
        {
            let mut state = lock(self.state);
            if state.unacked > 0 {
                traffic.add(Traffic::frame(writer.push(state.seal_ack()), 0));
            }
            traffic.add(Traffic::frame(
                writer.push(state.seal(&Message::Goodbye)),
                0,
            ));
        }
        writer.finish().await?;
        self.peer.link(self.link).count_sent(traffic);
        Ok(())
    }

    /// Writes one of the links' own frames.
    async fn write_own(self, writer: &mut FrameWriter, frame: Bytes) -> io::Result<()> {
        let bytes = writer.push(frame);
        writer.flush().await?;
        self.peer
            .link(self.link)
            .count_sent(Traffic::frame(bytes, 0));
        Ok(())
    }

    /// Writes `first` and what else is queued, up to [`WRITE_BATCH`], in one go.
    async fn write_batch(
        self,
        writer: &mut FrameWriter,
        first: Queued,
        queue: &mut mpsc::Receiver<Queued>,
    ) -> io::Result<()> {
        let now = Instant::now();
        let mut traffic = Traffic::default();
        let mut in_flight = Vec::with_capacity(WRITE_BATCH);
        {
            let mut state = lock(self.state);
            let mut next = Some(first);
            while let Some(queued) = next.take() {
                match state.codec.seal(&queued.message) {
                    Ok(frame) => {
                        let bytes = writer.push(frame);
                        traffic.add(Traffic::frame(bytes, records(&queued.message)));
                        in_flight.push(InFlight {
                            seq: state.codec.last_sent(),
                            ticket: queued.ticket,
                            sent_at: now,
                        });
                    }
                    // Links::send checked the message: a bug.
                    Err(e) => {
                        let peer = &self.peer.name;
                        error!(%peer, "sync: dropping a message that does not seal: {e}");
                    }
                }
                if in_flight.len() < WRITE_BATCH {
                    next = queue.try_recv().ok();
                }
            }
        }
        let link = self.peer.link(self.link);
        link.sending(in_flight);
        writer.flush().await?;
        link.count_sent(traffic);
        Ok(())
    }
}

/// The flow records `message` carries.
fn records(message: &Message) -> u64 {
    match message {
        Message::Flows(records) | Message::BulkChunk(records) => records.len() as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::sync::{
        testing::{hello, key, name},
        wire::{DialerHandshake, ListenerHandshake, Opened},
    };

    /// A state on the dialer's end of a fresh session, and the listener's codec.
    fn state() -> (State, SessionCodec) {
        let listener = ListenerHandshake::new(&key(7), name("a")).unwrap();
        let dialer = DialerHandshake::new(&key(7), name("b"), hello(1)).unwrap();
        let answered = dialer.answer(&listener.hello()).unwrap();
        let accepted = listener.finish(&answered.reply).unwrap();
        let state = State {
            codec: answered.codec,
            handed: 0,
            unacked: 0,
            first_unacked: None,
        };
        (state, accepted.codec)
    }

    #[test]
    fn an_ack_is_due_50_ms_after_the_first_unacknowledged_message_or_at_the_64th() {
        let (mut state, _) = state();
        let t0 = Instant::now();
        assert_eq!(state.ack_due(), None);
        assert!(state.handed(1, t0), "the first arms the timer");
        assert_eq!(state.ack_due(), Some(t0 + ACK_DELAY));
        for seq in 2..ACK_EVERY {
            let later = t0 + Duration::from_millis(u64::from(seq));
            assert!(!state.handed(u64::from(seq), later), "message {seq}");
            assert_eq!(state.ack_due(), Some(t0 + ACK_DELAY), "message {seq}");
        }
        assert!(
            state.handed(u64::from(ACK_EVERY), t0),
            "the 64th wakes the writer"
        );
        assert_eq!(state.ack_due(), Some(t0), "due at once");
    }

    #[test]
    fn an_ack_carries_the_last_seq_handed_over_and_clears_the_count() {
        let (mut state, mut peer) = state();
        let t0 = Instant::now();
        state.handed(3, t0);
        state.handed(5, t0);
        let ack = state.seal_ack();
        assert_eq!(state.ack_due(), None);
        let Opened { message, .. } = peer.open(&ack).unwrap();
        assert_eq!(message, Message::Ack { seq: 5 });
        assert!(state.handed(6, t0), "the next message arms the timer again");
    }
}
