//! One established session: [`SessionCodec`] seals and opens frames under the
//! session key with consecutive sequence numbers in each direction, which is what
//! refuses a replayed, reordered, reflected or foreign frame.

use std::fmt;

use bytes::{Bytes, BytesMut};
use ring::hmac;

#[cfg(test)]
use super::testing::tag_raw;
use super::{
    MAX_FRAME,
    errors::{Reject, WireError},
    frame::{Frame, FrameType, Header, put_frame},
    message::Message,
};

/// A frame that [`SessionCodec::open`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// Its sequence number, e.g. to [`Message::Ack`] it.
    pub seq: u64,
    /// The message, without the records (or VIPs) that were refused.
    pub message: Message,
    /// Records (or VIPs) skipped as [`Reject::BadRecord`].
    pub bad_records: usize,
}

/// One established session's framing: seals outgoing messages under Ks with the
/// next sequence number, and opens incoming frames only if they carry Ks's tag in
/// the other direction and the next sequence number. Made by a handshake.
pub struct SessionCodec {
    key: hmac::Key,
    /// `dir` of the frames this side sends; the peer's is the other.
    tx_dir: u8,
    /// The seq of the last frame sealed (0: none yet).
    sent: u64,
    /// The seq of the last frame opened (0: none yet).
    received: u64,
    /// Frames are encoded here; a sealed frame is split off, and the allocation
    /// comes back once the caller has dropped it.
    out: BytesMut,
    /// Where a received frame is gathered with its `dir` for verification.
    scratch: Vec<u8>,
}

/// Sessions stay out of logs but for their counters.
impl fmt::Debug for SessionCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCodec")
            .field("tx_dir", &self.tx_dir)
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl SessionCodec {
    pub(super) fn new(session_key: hmac::Key, tx_dir: u8) -> SessionCodec {
        SessionCodec {
            key: session_key,
            tx_dir,
            sent: 0,
            received: 0,
            out: BytesMut::with_capacity(MAX_FRAME),
            scratch: Vec::with_capacity(1 + MAX_FRAME),
        }
    }

    /// `msg` as the next frame (without the length field, which [`framing`] adds).
    /// On an error nothing is sent and the sequence number is not used.
    ///
    /// [`framing`]: super::framing
    pub fn seal(&mut self, msg: &Message) -> Result<Bytes, WireError> {
        let header = Header {
            kind: msg.frame_type(),
            count: msg.count()?,
            seq: self.sent + 1,
        };
        put_frame(&mut self.out, &self.key, self.tx_dir, &header, &[], |out| {
            msg.put_body(out);
        });
        self.sent = header.seq;
        Ok(self.out.split().freeze())
    }

    /// The message in `frame` (as [`framing`] yields it), if it is the peer's next
    /// frame in this session. On a [`Reject`] the caller closes the connection; the
    /// codec's state is as before the call.
    ///
    /// [`framing`]: super::framing
    pub fn open(&mut self, frame: &[u8]) -> Result<Opened, Reject> {
        let frame = Frame::parse(frame)?;
        if matches!(frame.kind, FrameType::Hello | FrameType::HelloReply) {
            return Err(Reject::Malformed);
        }
        frame.verify(&self.key, self.tx_dir ^ 1, &[], &mut self.scratch)?;
        if frame.seq != self.received + 1 {
            return Err(Reject::Replay);
        }
        let (message, bad_records) =
            Message::parse(frame.kind, frame.body).ok_or(Reject::Malformed)?;
        self.received = frame.seq;
        Ok(Opened {
            seq: frame.seq,
            message,
            bad_records,
        })
    }

    /// The seq of the last frame sealed, e.g. to wait for its ACK (0: none yet).
    pub fn last_sent(&self) -> u64 {
        self.sent
    }

    /// The seq of the last frame opened (0: none yet).
    pub fn last_received(&self) -> u64 {
        self.received
    }
}

/// The next frame of `codec` with any version, type, count and body.
#[cfg(test)]
pub(super) fn seal_raw(
    codec: &mut SessionCodec,
    version: u8,
    kind: u8,
    count: u16,
    body: &[u8],
) -> Vec<u8> {
    codec.sent += 1;
    let [c0, c1] = count.to_be_bytes();
    tag_raw(
        &codec.key,
        codec.tx_dir,
        [version, kind, c0, c1],
        codec.sent,
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{testing::key, wire::testing::session};

    #[test]
    fn a_repeated_or_skipped_seq_is_a_replay() {
        let (mut listener, mut dialer) = session(&key(1));
        let frames: Vec<Bytes> = (0..3)
            .map(|_| listener.seal(&Message::Keepalive).unwrap())
            .collect();
        assert_eq!(dialer.open(&frames[0]).unwrap().seq, 1);
        assert_eq!(dialer.open(&frames[0]), Err(Reject::Replay), "repeated");
        assert_eq!(dialer.open(&frames[2]), Err(Reject::Replay), "skipped");
        assert_eq!(dialer.last_received(), 1);
        assert_eq!(dialer.open(&frames[1]).unwrap().seq, 2);
        assert_eq!(dialer.open(&frames[2]).unwrap().seq, 3);
        assert_eq!(dialer.open(&frames[1]), Err(Reject::Replay), "reordered");
    }

    #[test]
    fn a_frame_from_another_session_under_the_same_key_is_refused() {
        let k = key(1);
        let (mut old_listener, mut old_dialer) = session(&k);
        let (mut listener, mut dialer) = session(&k);
        // Same key, names, seq and message: only the nonces differ.
        let old = old_listener.seal(&Message::Keepalive).unwrap();
        assert_eq!(dialer.open(&old), Err(Reject::Auth));
        let old = old_dialer.seal(&Message::Keepalive).unwrap();
        assert_eq!(listener.open(&old), Err(Reject::Auth));
    }

    #[test]
    fn a_frame_reflected_to_its_sender_is_refused() {
        let (mut listener, mut dialer) = session(&key(1));
        let frame = listener.seal(&Message::Ack { seq: 1 }).unwrap();
        assert_eq!(listener.open(&frame), Err(Reject::Auth));
        let frame = dialer.seal(&Message::Ack { seq: 1 }).unwrap();
        assert_eq!(dialer.open(&frame), Err(Reject::Auth));
    }
}
