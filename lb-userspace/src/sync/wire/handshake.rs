//! The handshake's two halves, [`ListenerHandshake`] and [`DialerHandshake`]: HELLO
//! and `HELLO_REPLY` under the cluster key, then the session key both sides derive
//! from the nonces and names. Each half is consumed by its one step, so a handshake
//! makes one session only.

use bytes::{Bytes, BytesMut};
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};

use super::{
    DIR_FROM_DIALER, DIR_FROM_LISTENER, HELLO_LEN, NONCE_LEN,
    errors::{Reject, WireError},
    frame::{Frame, FrameType, Header, put_frame},
    hello::{Hello, NodeName, parse_greeting, parse_hello, put_greeting, put_hello},
    session::SessionCodec,
};
use crate::sync::key::Key;

/// The first bytes of the session-key derivation. Frame tags under K start with the
/// `dir` byte (0 or 1), this with `a`, so no frame tag is ever a session key.
const KDF_LABEL: &[u8] = b"apilb-sync-v1";

/// A fresh nonce from the system's generator.
fn nonce() -> Result<[u8; NONCE_LEN], WireError> {
    let mut nonce = [0; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| WireError::Random)?;
    Ok(nonce)
}

/// The body of `frame` if it is a handshake frame of type `kind` under K from `dir`
/// (its tag also over `extra`), with seq 0.
fn open_handshake<'a>(
    frame: &'a [u8],
    kind: FrameType,
    key: &Key,
    dir: u8,
    extra: &[u8],
) -> Result<&'a [u8], Reject> {
    let frame = Frame::parse(frame)?;
    if frame.kind != kind {
        return Err(Reject::Malformed);
    }
    frame.verify(key.hmac(), dir, extra, &mut Vec::new())?;
    if frame.seq != 0 {
        return Err(Reject::Replay);
    }
    Ok(frame.body)
}

/// `Ks = HMAC-SHA256(K, "apilb-sync-v1" || nonce_L || nonce_D || len name_D ||
/// name_D || len name_L || name_L)`. The lengths keep two name pairs with the same
/// concatenation apart.
fn session_key(
    key: &Key,
    nonce_l: &[u8; NONCE_LEN],
    nonce_d: &[u8; NONCE_LEN],
    name_d: &NodeName,
    name_l: &NodeName,
) -> hmac::Key {
    let mut ctx = hmac::Context::with_key(key.hmac());
    ctx.update(KDF_LABEL);
    ctx.update(nonce_l);
    ctx.update(nonce_d);
    for name in [name_d, name_l] {
        let name = name.as_str().as_bytes();
        ctx.update(&[u8::try_from(name.len()).unwrap_or(u8::MAX)]);
        ctx.update(name);
    }
    hmac::Key::new(hmac::HMAC_SHA256, ctx.sign().as_ref())
}

/// The listener's half of the handshake: it sends HELLO as soon as a peer
/// connects, then takes the dialer's `HELLO_REPLY`.
pub struct ListenerHandshake {
    key: Key,
    name: NodeName,
    nonce: [u8; NONCE_LEN],
}

/// What the listener learns from a valid `HELLO_REPLY`.
#[derive(Debug)]
pub struct Accepted {
    pub codec: SessionCodec,
    /// The dialer's name, authenticated.
    pub peer: NodeName,
    /// The dialer's configuration, for [`Hello::check_peer`].
    pub hello: Hello,
}

impl ListenerHandshake {
    /// A handshake with a fresh `nonce_L`.
    pub fn new(key: &Key, name: NodeName) -> Result<ListenerHandshake, WireError> {
        Ok(ListenerHandshake {
            key: key.clone(),
            name,
            nonce: nonce()?,
        })
    }

    /// The HELLO frame to send.
    pub fn hello(&self) -> Bytes {
        let mut out = BytesMut::new();
        put_frame(
            &mut out,
            self.key.hmac(),
            DIR_FROM_LISTENER,
            &Header {
                kind: FrameType::Hello,
                count: 0,
                seq: 0,
            },
            &[],
            |out| put_greeting(out, &self.nonce, &self.name),
        );
        out.freeze()
    }

    /// The session, if `reply` is a `HELLO_REPLY` to this handshake's HELLO under K.
    /// Consumes the handshake: a reply is good for one session only.
    pub fn finish(self, reply: &[u8]) -> Result<Accepted, Reject> {
        let body = open_handshake(
            reply,
            FrameType::HelloReply,
            &self.key,
            DIR_FROM_DIALER,
            &self.nonce,
        )?;
        let (nonce_d, peer) = parse_greeting(body)?;
        let hello = parse_hello(body.get(HELLO_LEN..).ok_or(Reject::Malformed)?)?;
        let ks = session_key(&self.key, &self.nonce, &nonce_d, &peer, &self.name);
        Ok(Accepted {
            codec: SessionCodec::new(ks, DIR_FROM_LISTENER),
            peer,
            hello,
        })
    }
}

/// The dialer's half of the handshake: it waits for the listener's HELLO and
/// answers it.
pub struct DialerHandshake {
    key: Key,
    name: NodeName,
    hello: Hello,
    nonce: [u8; NONCE_LEN],
}

/// What the dialer makes of a valid HELLO.
#[derive(Debug)]
pub struct Answered {
    pub codec: SessionCodec,
    /// The listener's name, authenticated.
    pub peer: NodeName,
    /// The `HELLO_REPLY` frame to send.
    pub reply: Bytes,
}

impl DialerHandshake {
    /// A handshake with a fresh `nonce_D`, to offer `hello`.
    pub fn new(key: &Key, name: NodeName, hello: Hello) -> Result<DialerHandshake, WireError> {
        Ok(DialerHandshake {
            key: key.clone(),
            name,
            hello,
            nonce: nonce()?,
        })
    }

    /// The session and the reply, if `hello` is a listener's HELLO under K.
    pub fn answer(self, hello: &[u8]) -> Result<Answered, Reject> {
        let body = open_handshake(hello, FrameType::Hello, &self.key, DIR_FROM_LISTENER, &[])?;
        let (nonce_l, peer) = parse_greeting(body)?;
        let mut out = BytesMut::new();
        put_frame(
            &mut out,
            self.key.hmac(),
            DIR_FROM_DIALER,
            &Header {
                kind: FrameType::HelloReply,
                count: 0,
                seq: 0,
            },
            &nonce_l,
            |out| {
                put_greeting(out, &self.nonce, &self.name);
                put_hello(out, &self.hello);
            },
        );
        let ks = session_key(&self.key, &nonce_l, &self.nonce, &self.name, &peer);
        Ok(Answered {
            codec: SessionCodec::new(ks, DIR_FROM_DIALER),
            peer,
            reply: out.freeze(),
        })
    }
}

/// The same handshake again, for a test that consumes one per try.
#[cfg(test)]
pub(super) fn copy(l: &ListenerHandshake) -> ListenerHandshake {
    ListenerHandshake {
        key: l.key.clone(),
        name: l.name.clone(),
        nonce: l.nonce,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{
        testing::{hello as config, key, name},
        wire::{
            HELLO_REPLY_LEN, MIN_FRAME, TAG_LEN, VERSION,
            message::Message,
            testing::{session, tag_raw},
        },
    };

    #[test]
    fn the_handshake_carries_both_names_and_the_dialers_hello() {
        let k = key(1);
        let listener = ListenerHandshake::new(&k, name("lb-1.example")).unwrap();
        let dialer = DialerHandshake::new(&k, name("ноде-2"), config(1)).unwrap();
        let hello = listener.hello();
        assert_eq!(hello.len(), MIN_FRAME + HELLO_LEN);
        let answered = dialer.answer(&hello).unwrap();
        assert_eq!(answered.reply.len(), MIN_FRAME + HELLO_REPLY_LEN);
        assert_eq!(answered.peer, name("lb-1.example"));
        let accepted = listener.finish(&answered.reply).unwrap();
        assert_eq!(accepted.peer, name("ноде-2"));
        assert_eq!(accepted.hello, config(1));
        assert_eq!(config(0).check_peer(&accepted.hello), Ok(()));
    }

    #[test]
    fn the_session_key_is_hmac_of_label_nonces_and_length_prefixed_names() {
        let k = key(3);
        let listener = ListenerHandshake::new(&k, name("lb1")).unwrap();
        let dialer = DialerHandshake::new(&k, name("lb22"), config(1)).unwrap();
        let (nonce_l, nonce_d) = (listener.nonce, dialer.nonce);
        assert_ne!(nonce_l, nonce_d);
        let mut answered = dialer.answer(&listener.hello()).unwrap();
        let mut accepted = listener.finish(&answered.reply).unwrap();

        let mut input = b"apilb-sync-v1".to_vec();
        input.extend_from_slice(&nonce_l);
        input.extend_from_slice(&nonce_d);
        input.extend_from_slice(b"\x04lb22\x03lb1");
        let ks = hmac::sign(k.hmac(), &input);
        let ks = hmac::Key::new(hmac::HMAC_SHA256, ks.as_ref());

        // A frame from either side verifies under Ks over dir || header || body.
        for (frame, dir) in [
            (answered.codec.seal(&Message::Keepalive).unwrap(), 0),
            (accepted.codec.seal(&Message::Keepalive).unwrap(), 1),
        ] {
            let (signed, tag) = frame.split_at(frame.len() - TAG_LEN);
            let mut input = vec![dir];
            input.extend_from_slice(signed);
            hmac::verify(&ks, &input, tag).unwrap();
        }
    }

    #[test]
    fn a_frame_under_another_key_is_refused() {
        let (mut listener, _) = session(&key(1));
        let (_, mut other) = session(&key(2));
        let frame = listener.seal(&Message::Keepalive).unwrap();
        assert_eq!(other.open(&frame), Err(Reject::Auth));

        // The handshake fails both ways too.
        let l1 = ListenerHandshake::new(&key(1), name("lb1")).unwrap();
        let d2 = DialerHandshake::new(&key(2), name("lb2"), config(1)).unwrap();
        assert_eq!(d2.answer(&l1.hello()).unwrap_err(), Reject::Auth);
        let l2 = ListenerHandshake::new(&key(2), name("lb1")).unwrap();
        let d2 = DialerHandshake::new(&key(2), name("lb2"), config(1)).unwrap();
        let reply = d2.answer(&l2.hello()).unwrap().reply;
        let l1_again = copy(&l1);
        assert_eq!(l1_again.finish(&reply).unwrap_err(), Reject::Auth);
        // A reply to l1's own HELLO works.
        let d1 = DialerHandshake::new(&key(1), name("lb2"), config(1)).unwrap();
        let reply = d1.answer(&l1.hello()).unwrap().reply;
        l1.finish(&reply).unwrap();
    }

    #[test]
    fn a_reply_replayed_into_another_handshake_is_refused() {
        let k = key(1);
        let first = ListenerHandshake::new(&k, name("lb1")).unwrap();
        let second = ListenerHandshake::new(&k, name("lb1")).unwrap();
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        let reply = dialer.answer(&first.hello()).unwrap().reply;
        assert_eq!(second.finish(&reply).unwrap_err(), Reject::Auth);
        first.finish(&reply).unwrap();
    }

    #[test]
    fn handshake_and_session_frames_are_not_taken_for_each_other() {
        let k = key(1);
        let listener = ListenerHandshake::new(&k, name("lb1")).unwrap();
        let hello = listener.hello();
        let (mut session_l, mut session_d) = session(&k);
        assert_eq!(session_d.open(&hello), Err(Reject::Malformed));
        let keepalive = session_d.seal(&Message::Keepalive).unwrap();
        assert_eq!(
            copy(&listener).finish(&keepalive).unwrap_err(),
            Reject::Malformed
        );
        assert_eq!(
            copy(&listener).finish(&hello).unwrap_err(),
            Reject::Malformed,
            "reflected HELLO"
        );
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        let reply = dialer.answer(&hello).unwrap().reply;
        assert_eq!(session_l.open(&reply), Err(Reject::Malformed));
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        assert_eq!(dialer.answer(&reply).unwrap_err(), Reject::Malformed);

        // A handshake frame under K with a seq other than 0.
        let mut body = BytesMut::new();
        put_greeting(&mut body, &[7; NONCE_LEN], &name("lb1"));
        let hello_seq_1 = tag_raw(k.hmac(), DIR_FROM_LISTENER, [VERSION, 1, 0, 0], 1, &body);
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        assert_eq!(dialer.answer(&hello_seq_1).unwrap_err(), Reject::Replay);
        let hello_seq_0 = tag_raw(k.hmac(), DIR_FROM_LISTENER, [VERSION, 1, 0, 0], 0, &body);
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        assert_eq!(dialer.answer(&hello_seq_0).unwrap().peer, name("lb1"));
    }
}
