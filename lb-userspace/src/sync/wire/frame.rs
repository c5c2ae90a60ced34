//! The frame around every message: the length-delimited [`framing`] of the stream,
//! the header (version, type, count, seq) and the HMAC tag. Frames are checked here
//! for size and type before any tag is computed, and sealed here for both the
//! handshake and the session.

use bytes::{BufMut, BytesMut};
use ring::hmac;
use tokio_util::codec::LengthDelimitedCodec;

use super::{
    HEADER_LEN, HELLO_LEN, HELLO_REPLY_LEN, MAX_FRAME, MIN_FRAME, RECORD_LEN, TAG_LEN, VERSION,
    VIP_LEN, errors::Reject,
};

/// The codec that splits the TCP stream into frames: a 4-byte big-endian length of
/// what follows, at most [`MAX_FRAME`]; a larger one is an error before any of the
/// frame is buffered. What it yields goes to [`SessionCodec::open`] (or a
/// handshake), what [`SessionCodec::seal`] returns goes to it.
///
/// [`SessionCodec::open`]: super::SessionCodec::open
/// [`SessionCodec::seal`]: super::SessionCodec::seal
pub fn framing() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// The frame types, by their wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FrameType {
    Hello = 1,
    HelloReply = 2,
    Flows = 3,
    BulkRequest = 4,
    BulkChunk = 5,
    BulkEnd = 6,
    Ack = 7,
    Keepalive = 8,
    Goodbye = 9,
}

impl FrameType {
    pub(super) fn from_wire(b: u8) -> Option<FrameType> {
        Some(match b {
            1 => FrameType::Hello,
            2 => FrameType::HelloReply,
            3 => FrameType::Flows,
            4 => FrameType::BulkRequest,
            5 => FrameType::BulkChunk,
            6 => FrameType::BulkEnd,
            7 => FrameType::Ack,
            8 => FrameType::Keepalive,
            9 => FrameType::Goodbye,
            _ => return None,
        })
    }

    /// The body length of a frame of this type with `count` entries, if `count` is
    /// valid for it.
    pub(super) fn body_len(self, count: usize) -> Option<usize> {
        let fixed = |len| (count == 0).then_some(len);
        match self {
            FrameType::Hello => fixed(HELLO_LEN),
            FrameType::HelloReply => fixed(HELLO_REPLY_LEN),
            FrameType::Flows | FrameType::BulkChunk => Some(count * RECORD_LEN),
            FrameType::BulkRequest => Some(4 + count * VIP_LEN),
            FrameType::BulkEnd | FrameType::Ack => fixed(8),
            FrameType::Keepalive | FrameType::Goodbye => fixed(0),
        }
    }
}

/// A frame whose length, version, type and body size are valid; not yet
/// authenticated.
pub(super) struct Frame<'a> {
    pub(super) kind: FrameType,
    pub(super) seq: u64,
    /// Header and body: what the tag covers after `dir`.
    signed: &'a [u8],
    pub(super) body: &'a [u8],
    tag: &'a [u8],
}

impl Frame<'_> {
    pub(super) fn parse(frame: &[u8]) -> Result<Frame<'_>, Reject> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(Reject::Malformed);
        }
        let (signed, tag) = frame.split_at(frame.len() - TAG_LEN);
        let Some((&[version, kind, c0, c1, s0, s1, s2, s3, s4, s5, s6, s7], body)) =
            signed.split_first_chunk::<HEADER_LEN>()
        else {
            return Err(Reject::Malformed);
        };
        if version != VERSION {
            return Err(Reject::Version);
        }
        let kind = FrameType::from_wire(kind).ok_or(Reject::Malformed)?;
        let count = usize::from(u16::from_be_bytes([c0, c1]));
        if kind.body_len(count) != Some(body.len()) {
            return Err(Reject::Malformed);
        }
        Ok(Frame {
            kind,
            seq: u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            signed,
            body,
            tag,
        })
    }

    /// [`Reject::Auth`] unless the tag is `key`'s over `dir`, the frame and `extra`.
    /// `ring::hmac::verify` wants its input in one piece, so it is gathered in
    /// `scratch`: a copy costs a fraction of the hash over the same bytes.
    pub(super) fn verify(
        &self,
        key: &hmac::Key,
        dir: u8,
        extra: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), Reject> {
        scratch.clear();
        scratch.push(dir);
        scratch.extend_from_slice(self.signed);
        scratch.extend_from_slice(extra);
        hmac::verify(key, scratch, self.tag).map_err(|_| Reject::Auth)
    }
}

/// The header of a frame to write.
pub(super) struct Header {
    pub(super) kind: FrameType,
    pub(super) count: u16,
    pub(super) seq: u64,
}

/// Appends one frame to `out`: `header`, the body `put_body` writes (as long as the
/// header's type and count say), and the tag under `key` over `dir`, the frame and
/// `extra`.
pub(super) fn put_frame(
    out: &mut BytesMut,
    key: &hmac::Key,
    dir: u8,
    header: &Header,
    extra: &[u8],
    put_body: impl FnOnce(&mut BytesMut),
) {
    let body_len = header.kind.body_len(usize::from(header.count));
    let start = out.len();
    out.reserve(HEADER_LEN + body_len.unwrap_or(0) + TAG_LEN);
    out.put_u8(VERSION);
    out.put_u8(header.kind as u8);
    out.put_u16(header.count);
    out.put_u64(header.seq);
    put_body(out);
    debug_assert_eq!(
        Some(out.len() - start - HEADER_LEN),
        body_len,
        "{:?} body",
        header.kind
    );
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&[dir]);
    ctx.update(&out[start..]);
    ctx.update(extra);
    out.put_slice(ctx.sign().as_ref());
}

#[cfg(test)]
mod tests {
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::sync::{
        testing::key,
        wire::{
            MAX_RECORDS, Message,
            testing::{record_v4, record_v6, seal_raw, session},
        },
    };

    #[test]
    fn frames_pass_the_length_delimited_codec_which_refuses_65537() {
        let (mut listener, mut dialer) = session(&key(1));
        let sealed = listener
            .seal(&Message::Flows(vec![record_v4(1); MAX_RECORDS]))
            .unwrap();
        assert!(sealed.len() <= MAX_FRAME, "{}", sealed.len());
        let mut stream = BytesMut::new();
        framing().encode(sealed.clone(), &mut stream).unwrap();
        assert_eq!(
            stream[..4],
            u32::try_from(sealed.len()).unwrap().to_be_bytes()
        );
        let frame = framing().decode(&mut stream).unwrap().unwrap();
        assert_eq!(frame, sealed);
        assert_eq!(
            dialer.open(&frame).unwrap().message,
            Message::Flows(vec![record_v4(1); MAX_RECORDS])
        );

        let mut at_max = BytesMut::from(&65_536_u32.to_be_bytes()[..]);
        assert_eq!(
            framing().decode(&mut at_max).unwrap(),
            None,
            "waits for the rest"
        );
        let mut too_big = BytesMut::from(&65_537_u32.to_be_bytes()[..]);
        assert!(framing().decode(&mut too_big).is_err());
    }

    #[test]
    fn lengths_0_15_43_and_65537_are_malformed() {
        let (mut listener, mut dialer) = session(&key(1));
        for len in [0, 15, MIN_FRAME - 1, MAX_FRAME + 1] {
            let mut frame = vec![0; len];
            if let Some(v) = frame.first_mut() {
                *v = VERSION;
            }
            assert_eq!(dialer.open(&frame), Err(Reject::Malformed), "length {len}");
        }
        // Still in step: nothing was consumed.
        let frame = listener.seal(&Message::Keepalive).unwrap();
        assert_eq!(dialer.open(&frame).unwrap().seq, 1);
    }

    #[test]
    fn one_flipped_bit_is_refused_wherever_it_is() {
        let (mut listener, mut dialer) = session(&key(1));
        let frame = listener
            .seal(&Message::Flows(vec![record_v4(1), record_v6()]))
            .unwrap();
        let body_end = frame.len() - TAG_LEN;
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut bad = frame.to_vec();
                bad[byte] ^= 1 << bit;
                let want = match byte {
                    0 => Reject::Version,
                    // Another type or count: no other fits this body.
                    1..4 => Reject::Malformed,
                    _ => Reject::Auth,
                };
                assert_eq!(dialer.open(&bad), Err(want), "byte {byte} bit {bit}");
            }
        }
        assert!(body_end > HEADER_LEN + 2 * RECORD_LEN - 1);
        assert_eq!(dialer.open(&frame).unwrap().seq, 1);
    }

    #[test]
    fn unknown_types_and_versions_are_refused() {
        let (mut listener, mut dialer) = session(&key(1));
        for kind in [0, 10, 255] {
            let frame = seal_raw(&mut listener, VERSION, kind, 0, &[]);
            assert_eq!(dialer.open(&frame), Err(Reject::Malformed), "type {kind}");
        }
        for version in [0, 1, 3, 255] {
            let frame = seal_raw(&mut listener, version, 8, 0, &[]);
            assert_eq!(
                dialer.open(&frame),
                Err(Reject::Version),
                "version {version}"
            );
        }
        assert_eq!(dialer.last_received(), 0);
    }
}
