//! The flow-sync wire format: frames, flow records, the handshake and the session
//! key. Sans-IO (bytes in, typed messages out; no socket, no clock), so that every
//! way a peer's frame can be refused is a host test.
//!
//! **Framing.** One TCP connection per ordered node pair carries frames, each a
//! big-endian `u32` length (of what follows: 44 to 65,536 bytes; [`framing`] is the
//! codec that splits the stream) and then, big-endian, addresses and ports as on
//! the wire:
//!
//! ```text
//! 0    u8      version  2
//! 1    u8      type     1 HELLO 2 HELLO_REPLY 3 FLOWS 4 BULK_REQUEST 5 BULK_CHUNK
//!                       6 BULK_END 7 ACK 8 KEEPALIVE 9 GOODBYE
//! 2    u16     count    entries in the body (records, VIPs); 0 for the other types
//! 4    u64     seq      0 in the handshake, then 1, 2, 3, ... per session and direction
//! 12   ...     body     count x 104-byte records, a u32 generation and count x
//!                       20-byte VIPs (BULK_REQUEST), or a fixed body
//! end  u8[32]  tag      HMAC-SHA256(key, dir || bytes 0..end-32)
//! ```
//!
//! `dir` is 0 from the dialer to the listener and 1 back; it is not sent.
//!
//! **Security model.** Whoever can write flows can steer traffic, so every frame is
//! authenticated; nothing is encrypted (flow tuples are visible on the link, as
//! VRRP adverts are). All nodes share one key K ([`super::key`]). The listener sends
//! HELLO {name, `nonce_L`} and the dialer answers `HELLO_REPLY` {name, `nonce_D`, its
//! [`Hello`]}, both tagged under K, the reply's tag also over `nonce_L` so that it
//! fits no other handshake. Every later frame is tagged under the session key
//! `Ks = HMAC(K, "apilb-sync-v1" || nonce_L || nonce_D || name_D || name_L)` (each
//! name preceded by its length) and must carry the last `seq` plus one: a frame from
//! another session fails its tag, a replayed, reordered or deleted one breaks the
//! sequence, and one reflected to its sender fails for its `dir`. Tags are checked
//! in constant time (`ring::hmac::verify`). Not TLS: rustls has no external
//! pre-shared keys, and mutual TLS means a PKI where the issue asks for one key file.
//!
//! A [`Reject`] of a frame is a stream fault: the caller closes the connection and
//! the dialer reconnects. A record this version cannot use is skipped and counted
//! instead ([`Opened::bad_records`]): it is authenticated, so it is a bug or a
//! version skew, not an attack.
//!
//! **Parts.** `frame` is the envelope every message travels in (length, header, tag);
//! `record` and `message` are what it carries; `hello` and `handshake` start a
//! session and `session` carries it on; `errors` holds the refusals all of them
//! return. This module keeps the sizes they share and the public names.

mod errors;
mod frame;
#[cfg(test)]
mod fuzz;
mod handshake;
mod hello;
mod message;
mod record;
mod session;
#[cfg(test)]
mod testing;

pub use self::{
    errors::{Reject, WireError},
    frame::framing,
    handshake::{Accepted, Answered, DialerHandshake, ListenerHandshake},
    hello::{Hello, NodeName},
    message::Message,
    record::{FlowRecord, RecordKind},
    session::{Opened, SessionCodec},
};

/// The protocol version this module speaks.
pub const VERSION: u8 = 2;
/// The largest frame after its length field. A full frame of records
/// ([`MAX_RECORDS`]) fits; a larger length is refused before it is buffered.
pub const MAX_FRAME: usize = 65_536;
/// Version, type, count, seq.
const HEADER_LEN: usize = 12;
/// An HMAC-SHA256 tag.
const TAG_LEN: usize = 32;
/// The smallest frame after its length field: a header and a tag, no body.
pub const MIN_FRAME: usize = HEADER_LEN + TAG_LEN;
/// The largest body a frame can carry.
const MAX_BODY: usize = MAX_FRAME - MIN_FRAME;
/// One flow record on the wire.
pub const RECORD_LEN: usize = 104;
/// The most records one FLOWS or `BULK_CHUNK` frame carries (629).
pub const MAX_RECORDS: usize = MAX_BODY / RECORD_LEN;
/// One VIP of a `BULK_REQUEST`: family, 3 reserved bytes, the address in 16 bytes.
const VIP_LEN: usize = 20;
/// The most VIPs one `BULK_REQUEST` carries (3,274).
pub const MAX_VIPS: usize = (MAX_BODY - 4) / VIP_LEN;
/// The longest node name, in bytes of UTF-8.
pub const NAME_MAX: usize = 64;
/// Each side's handshake nonce.
const NONCE_LEN: usize = 16;
/// HELLO: `nonce[16] name_len u8 name[64]` (the name zero-padded).
const HELLO_LEN: usize = NONCE_LEN + 1 + NAME_MAX;
/// `HELLO_REPLY`: HELLO's fields, then `slice u16 slices u16 nat_min u16 nat_max u16
/// digest[32]`.
const HELLO_REPLY_LEN: usize = HELLO_LEN + 8 + 32;
/// `dir` of frames from the dialer to the listener.
const DIR_FROM_DIALER: u8 = 0;
/// `dir` of frames from the listener to the dialer.
const DIR_FROM_LISTENER: u8 = 1;
