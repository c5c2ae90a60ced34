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
//! 0    u8      version  1
//! 1    u8      type     1 HELLO 2 HELLO_REPLY 3 FLOWS 4 BULK_REQUEST 5 BULK_CHUNK
//!                       6 BULK_END 7 ACK 8 KEEPALIVE 9 GOODBYE
//! 2    u16     count    entries in the body (records, VIPs); 0 for the other types
//! 4    u64     seq      0 in the handshake, then 1, 2, 3, ... per session and direction
//! 12   ...     body     count x 104-byte records, count x 20-byte VIPs, or a fixed body
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

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
};

use bytes::{BufMut, Bytes, BytesMut};
use lb_common::{AF_INET, AF_INET6, ct};
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
};
use tokio_util::codec::LengthDelimitedCodec;

use super::key::Key;

/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
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
pub const MAX_VIPS: usize = MAX_BODY / VIP_LEN;
/// The longest node name, in bytes of UTF-8.
pub const NAME_MAX: usize = 64;
/// Each side's handshake nonce.
const NONCE_LEN: usize = 16;
/// HELLO: `nonce[16] name_len u8 name[64]` (the name zero-padded).
const HELLO_LEN: usize = NONCE_LEN + 1 + NAME_MAX;
/// `HELLO_REPLY`: HELLO's fields, then `slice u16 slices u16 nat_min u16 nat_max u16
/// digest[32]`.
const HELLO_REPLY_LEN: usize = HELLO_LEN + 8 + 32;
/// The first bytes of the session-key derivation. Frame tags under K start with the
/// `dir` byte (0 or 1), this with `a`, so no frame tag is ever a session key.
const KDF_LABEL: &[u8] = b"apilb-sync-v1";
/// `dir` of frames from the dialer to the listener.
const DIR_FROM_DIALER: u8 = 0;
/// `dir` of frames from the listener to the dialer.
const DIR_FROM_LISTENER: u8 = 1;
/// The TCP states a synced flow can be in. Half-open flows are never exported
/// (state is earned: a SYN flood must not become sync traffic) and `CT_NONE` is
/// never stored, so `CT_ESTABLISHED` up to `CT_CLOSE`.
const SYNCED_STATES: RangeInclusive<u8> = ct::CT_ESTABLISHED..=ct::CT_CLOSE;

/// The codec that splits the TCP stream into frames: a 4-byte big-endian length of
/// what follows, at most [`MAX_FRAME`]; a larger one is an error before any of the
/// frame is buffered. What it yields goes to [`SessionCodec::open`] (or a
/// handshake), what [`SessionCodec::seal`] returns goes to it.
pub fn framing() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Why a peer's frame was refused, one label per reason for
/// `apilb_sync_rejected_total{reason}` ([`Reject::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    /// The length is out of bounds, the type unknown (or not expected here), the body
    /// does not fit the type and count, or a handshake field is not valid.
    #[error("malformed frame")]
    Malformed,
    /// A protocol version other than [`VERSION`].
    #[error("unknown protocol version")]
    Version,
    /// The tag does not verify: another key, another session, another direction, or
    /// a changed byte.
    #[error("frame fails authentication")]
    Auth,
    /// The sequence number is not the last one plus one: a replayed, reordered or
    /// lost frame.
    #[error("frame out of sequence")]
    Replay,
    /// The peer's [`Hello`] does not fit ours ([`Hello::check_peer`]).
    #[error("peer's sync configuration does not match ours")]
    ConfigMismatch,
    /// A record (or a VIP of a `BULK_REQUEST`) this version cannot use: unknown kind or
    /// family, mixed families, a state a synced flow cannot be in, or port 0. It is
    /// skipped and counted; the session stays up.
    #[error("flow record not usable")]
    BadRecord,
}

impl Reject {
    /// Every reason, e.g. to register each metric label up front.
    pub const ALL: [Reject; 6] = [
        Reject::Malformed,
        Reject::Version,
        Reject::Auth,
        Reject::Replay,
        Reject::ConfigMismatch,
        Reject::BadRecord,
    ];

    /// The metric and status label for this reason; stable.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::Version => "version",
            Reject::Auth => "auth",
            Reject::Replay => "replay",
            Reject::ConfigMismatch => "config_mismatch",
            Reject::BadRecord => "bad_record",
        }
    }

    /// Whether the caller must close the connection: every reason but
    /// [`Reject::BadRecord`].
    pub fn closes_session(self) -> bool {
        self != Reject::BadRecord
    }
}

/// Why a message cannot be sent. Each is a bug in the caller, caught before a frame
/// the peer would refuse leaves this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("sync node name {name:?} is {len} bytes long; it must be 1 to {NAME_MAX} bytes")]
    NodeName { name: String, len: usize },
    #[error("a {kind} frame carries at most {max} entries, not {count}")]
    TooLarge {
        kind: &'static str,
        count: usize,
        max: usize,
    },
    #[error("flow record mixes address families: client {client}, {field} {addr}")]
    MixedFamilies {
        client: SocketAddr,
        field: &'static str,
        addr: IpAddr,
    },
    #[error("the system's random number generator failed")]
    Random,
}

/// A node's name in the handshake (1 to 64 bytes of UTF-8). It enters the session
/// key, so both ends agree on who is who.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeName(String);

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, WireError> {
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(WireError::NodeName {
                name: name.to_owned(),
                len: name.len(),
            });
        }
        Ok(NodeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dialer's configuration, in its `HELLO_REPLY`: what must agree between two
/// nodes for one to take over the other's flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// This node's slice of `nat_ports` (0-based).
    pub slice: u16,
    /// The number of slices, the same on every node.
    pub slices: u16,
    /// `datapath.nat_ports`.
    pub nat_ports: RangeInclusive<u16>,
    /// SHA-256 of the VIPs with their SNAT pools, which must match too.
    pub config_digest: [u8; 32],
}

impl Hello {
    /// [`Reject::ConfigMismatch`] unless a peer with `peer` can sync with a node with
    /// `self`: the same slices, NAT ports and digest, and another slice (two nodes on
    /// one slice would hand out the same `(VIP, port)`), in range.
    pub fn check_peer(&self, peer: &Hello) -> Result<(), Reject> {
        let fits = peer.slices == self.slices
            && peer.nat_ports == self.nat_ports
            && peer.config_digest == self.config_digest
            && peer.slice < peer.slices
            && peer.slice != self.slice;
        if fits {
            Ok(())
        } else {
            Err(Reject::ConfigMismatch)
        }
    }
}

/// Why a record is sent; the values match the datapath's sync events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// The flow was promoted (the client's ACK), or it is live in a bulk.
    Established,
    /// The flow reached `CT_TIME_WAIT` or `CT_CLOSE`.
    Closed,
    /// The flow left the owner's table (its port was reclaimed, or it was forgotten).
    Removed,
}

impl RecordKind {
    fn to_wire(self) -> u8 {
        match self {
            RecordKind::Established => 1,
            RecordKind::Closed => 2,
            RecordKind::Removed => 3,
        }
    }

    fn from_wire(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Established),
            2 => Some(RecordKind::Closed),
            3 => Some(RecordKind::Removed),
            _ => None,
        }
    }
}

/// One flow as the owner knows it, without anything local to the owner (ids,
/// indexes, clocks): what a peer needs to carry the flow on. All addresses share
/// one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub kind: RecordKind,
    /// `ct::CT_*`, `CT_ESTABLISHED` to `CT_CLOSE`.
    pub state: u8,
    /// `FlowState::flags`.
    pub flags: u32,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub backend: SocketAddr,
    /// The SNAT address (not the owner's pool index): peers' pools differ.
    pub snat: IpAddr,
    pub nat_port: u16,
    pub ts_off: u32,
    pub fin_tsval: u32,
    pub seq: u32,
    pub ack: u32,
    /// Milliseconds since the owner last saw the flow: clocks differ per node, so an
    /// age travels, not an instant.
    pub age_ms: u32,
}

/// A message after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Live records, as the owner's datapath reports them.
    Flows(Vec<FlowRecord>),
    /// Asks the peer for a bulk of its flows on these VIPs.
    BulkRequest(Vec<IpAddr>),
    /// Part of a bulk.
    BulkChunk(Vec<FlowRecord>),
    /// The end of a bulk: which one, and how many records it had.
    BulkEnd {
        generation: u32,
        count: u32,
    },
    /// Every frame up to `seq` in the other direction arrived.
    Ack {
        seq: u64,
    },
    Keepalive,
    /// The sender is closing the session on purpose.
    Goodbye,
}

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

/// The frame types, by their wire value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FrameType {
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
    fn from_wire(b: u8) -> Option<FrameType> {
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
    fn body_len(self, count: usize) -> Option<usize> {
        let fixed = |len| (count == 0).then_some(len);
        match self {
            FrameType::Hello => fixed(HELLO_LEN),
            FrameType::HelloReply => fixed(HELLO_REPLY_LEN),
            FrameType::Flows | FrameType::BulkChunk => Some(count * RECORD_LEN),
            FrameType::BulkRequest => Some(count * VIP_LEN),
            FrameType::BulkEnd | FrameType::Ack => fixed(8),
            FrameType::Keepalive | FrameType::Goodbye => fixed(0),
        }
    }
}

/// A frame whose length, version, type and body size are valid; not yet
/// authenticated.
struct Frame<'a> {
    kind: FrameType,
    seq: u64,
    /// Header and body: what the tag covers after `dir`.
    signed: &'a [u8],
    body: &'a [u8],
    tag: &'a [u8],
}

impl Frame<'_> {
    fn parse(frame: &[u8]) -> Result<Frame<'_>, Reject> {
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
    fn verify(
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
struct Header {
    kind: FrameType,
    count: u16,
    seq: u64,
}

/// Appends one frame to `out`: `header`, the body `put_body` writes (as long as the
/// header's type and count say), and the tag under `key` over `dir`, the frame and
/// `extra`.
fn put_frame(
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

/// An address in 16 bytes: IPv6 as is, IPv4 in the first 4 and zeros after (as the
/// datapath stores it).
fn put_addr(out: &mut BytesMut, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            out.put_slice(&a.octets());
            out.put_bytes(0, 12);
        }
        IpAddr::V6(a) => out.put_slice(&a.octets()),
    }
}

/// The 16-byte address of `family`; `None` for an unknown family, or an IPv4
/// address whose last 12 bytes are not zero (an address of another family in an
/// IPv4 record).
fn addr_of(family: u8, b: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => {
            let (v4, rest) = b.split_first_chunk::<4>()?;
            rest.iter()
                .all(|&x| x == 0)
                .then(|| IpAddr::V4(Ipv4Addr::from(*v4)))
        }
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*b))),
        _ => None,
    }
}

fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

impl FlowRecord {
    /// [`WireError::MixedFamilies`] unless every address has the client's family: a
    /// record carries one family byte.
    fn check_families(&self) -> Result<(), WireError> {
        let fields = [
            ("vip", self.vip.ip()),
            ("backend", self.backend.ip()),
            ("snat", self.snat),
        ];
        match fields
            .into_iter()
            .find(|(_, ip)| ip.is_ipv4() != self.client.is_ipv4())
        {
            Some((field, addr)) => Err(WireError::MixedFamilies {
                client: self.client,
                field,
                addr,
            }),
            None => Ok(()),
        }
    }

    /// The record's 104 bytes, once [`FlowRecord::check_families`] passed:
    ///
    /// ```text
    /// 0 kind u8, 1 state u8, 2 family u8, 3 reserved u8, 4 flags u32,
    /// 8 client[16], 24 vip[16], 40 backend[16], 56 snat[16],
    /// 72 client_port u16, 74 vip_port u16, 76 backend_port u16, 78 nat_port u16,
    /// 80 ts_off u32, 84 fin_tsval u32, 88 seq u32, 92 ack u32, 96 age_ms u32,
    /// 100 reserved u32
    /// ```
    fn put(&self, out: &mut BytesMut) {
        out.put_u8(self.kind.to_wire());
        out.put_u8(self.state);
        out.put_u8(family_of(self.client.ip()));
        out.put_u8(0);
        out.put_u32(self.flags);
        for ip in [
            self.client.ip(),
            self.vip.ip(),
            self.backend.ip(),
            self.snat,
        ] {
            put_addr(out, ip);
        }
        for port in [
            self.client.port(),
            self.vip.port(),
            self.backend.port(),
            self.nat_port,
        ] {
            out.put_u16(port);
        }
        for word in [
            self.ts_off,
            self.fin_tsval,
            self.seq,
            self.ack,
            self.age_ms,
            0,
        ] {
            out.put_u32(word);
        }
    }

    /// The record in `b`, or `None` for a [`Reject::BadRecord`]. Reserved bytes are
    /// ignored, so that a later version can use them.
    fn parse(b: &[u8; RECORD_LEN]) -> Option<FlowRecord> {
        let u16_at = |at: usize| Some(u16::from_be_bytes(*b[at..].first_chunk()?));
        let u32_at = |at: usize| Some(u32::from_be_bytes(*b[at..].first_chunk()?));
        let addr_at = |at: usize| addr_of(b[2], b[at..].first_chunk()?);
        let port_at = |at: usize| u16_at(at).filter(|&p| p != 0);

        let kind = RecordKind::from_wire(b[0])?;
        let state = Some(b[1]).filter(|s| SYNCED_STATES.contains(s))?;
        Some(FlowRecord {
            kind,
            state,
            flags: u32_at(4)?,
            client: SocketAddr::new(addr_at(8)?, port_at(72)?),
            vip: SocketAddr::new(addr_at(24)?, port_at(74)?),
            backend: SocketAddr::new(addr_at(40)?, port_at(76)?),
            snat: addr_at(56)?,
            nat_port: port_at(78)?,
            ts_off: u32_at(80)?,
            fin_tsval: u32_at(84)?,
            seq: u32_at(88)?,
            ack: u32_at(92)?,
            age_ms: u32_at(96)?,
        })
    }
}

/// Records parsed from a body of whole records: the good ones, and how many were
/// not.
fn parse_records(body: &[u8]) -> (Vec<FlowRecord>, usize) {
    let (chunks, _) = body.as_chunks::<RECORD_LEN>();
    let mut records = Vec::with_capacity(chunks.len());
    records.extend(chunks.iter().filter_map(FlowRecord::parse));
    let bad = chunks.len() - records.len();
    (records, bad)
}

/// VIPs parsed from a `BULK_REQUEST` body: the good ones, and how many were not.
fn parse_vips(body: &[u8]) -> (Vec<IpAddr>, usize) {
    let (chunks, _) = body.as_chunks::<VIP_LEN>();
    let vips: Vec<IpAddr> = chunks
        .iter()
        .filter_map(|c| addr_of(c[0], c[4..].first_chunk()?))
        .collect();
    let bad = chunks.len() - vips.len();
    (vips, bad)
}

impl Message {
    fn frame_type(&self) -> FrameType {
        match self {
            Message::Flows(_) => FrameType::Flows,
            Message::BulkRequest(_) => FrameType::BulkRequest,
            Message::BulkChunk(_) => FrameType::BulkChunk,
            Message::BulkEnd { .. } => FrameType::BulkEnd,
            Message::Ack { .. } => FrameType::Ack,
            Message::Keepalive => FrameType::Keepalive,
            Message::Goodbye => FrameType::Goodbye,
        }
    }

    /// [`WireError`] if [`SessionCodec::seal`] would refuse this message (too many
    /// entries, mixed address families), so that a queue can refuse it up front
    /// instead of the sender finding out later.
    pub fn check(&self) -> Result<(), WireError> {
        self.count().map(drop)
    }

    /// The header's count, once the message is known to fit a frame.
    fn count(&self) -> Result<u16, WireError> {
        let (kind, count, max) = match self {
            Message::Flows(r) => ("FLOWS", r.len(), MAX_RECORDS),
            Message::BulkChunk(r) => ("BULK_CHUNK", r.len(), MAX_RECORDS),
            Message::BulkRequest(v) => ("BULK_REQUEST", v.len(), MAX_VIPS),
            _ => return Ok(0),
        };
        if count > max {
            return Err(WireError::TooLarge { kind, count, max });
        }
        if let Message::Flows(records) | Message::BulkChunk(records) = self {
            records.iter().try_for_each(FlowRecord::check_families)?;
        }
        // MAX_RECORDS and MAX_VIPS are below u16::MAX.
        Ok(u16::try_from(count).unwrap_or(u16::MAX))
    }

    fn put_body(&self, out: &mut BytesMut) {
        match self {
            Message::Flows(records) | Message::BulkChunk(records) => {
                for r in records {
                    r.put(out);
                }
            }
            Message::BulkRequest(vips) => {
                for &vip in vips {
                    out.put_u8(family_of(vip));
                    out.put_bytes(0, 3);
                    put_addr(out, vip);
                }
            }
            Message::BulkEnd { generation, count } => {
                out.put_u32(*generation);
                out.put_u32(*count);
            }
            Message::Ack { seq } => out.put_u64(*seq),
            Message::Keepalive | Message::Goodbye => {}
        }
    }

    /// The message in an authenticated frame's body, and how many of its entries
    /// were bad. `None` for the handshake types, which are not messages.
    fn parse(kind: FrameType, body: &[u8]) -> Option<(Message, usize)> {
        let u32_at = |at: usize| Some(u32::from_be_bytes(*body.get(at..)?.first_chunk()?));
        Some(match kind {
            FrameType::Hello | FrameType::HelloReply => return None,
            FrameType::Flows => {
                let (records, bad) = parse_records(body);
                (Message::Flows(records), bad)
            }
            FrameType::BulkChunk => {
                let (records, bad) = parse_records(body);
                (Message::BulkChunk(records), bad)
            }
            FrameType::BulkRequest => {
                let (vips, bad) = parse_vips(body);
                (Message::BulkRequest(vips), bad)
            }
            FrameType::BulkEnd => (
                Message::BulkEnd {
                    generation: u32_at(0)?,
                    count: u32_at(4)?,
                },
                0,
            ),
            FrameType::Ack => (
                Message::Ack {
                    seq: u64::from_be_bytes(*body.first_chunk()?),
                },
                0,
            ),
            FrameType::Keepalive => (Message::Keepalive, 0),
            FrameType::Goodbye => (Message::Goodbye, 0),
        })
    }
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
    fn new(session_key: hmac::Key, tx_dir: u8) -> SessionCodec {
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

/// A fresh nonce from the system's generator.
fn nonce() -> Result<[u8; NONCE_LEN], WireError> {
    let mut nonce = [0; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| WireError::Random)?;
    Ok(nonce)
}

/// `nonce[16] name_len u8 name[64]`, the start of both handshake bodies.
fn put_greeting(out: &mut BytesMut, nonce: &[u8; NONCE_LEN], name: &NodeName) {
    out.put_slice(nonce);
    let name = name.as_str().as_bytes();
    // NodeName holds at most NAME_MAX (64) bytes.
    out.put_u8(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.put_slice(name);
    out.put_bytes(0, NAME_MAX - name.len());
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

/// The nonce and name at the start of a handshake body.
fn parse_greeting(body: &[u8]) -> Result<([u8; NONCE_LEN], NodeName), Reject> {
    let (nonce, rest) = body
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(Reject::Malformed)?;
    let (&len, name) = rest.split_first().ok_or(Reject::Malformed)?;
    let name = name.get(..usize::from(len)).ok_or(Reject::Malformed)?;
    let name = std::str::from_utf8(name).map_err(|_| Reject::Malformed)?;
    let name = NodeName::new(name).map_err(|_| Reject::Malformed)?;
    Ok((*nonce, name))
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

/// `slice u16 slices u16 nat_min u16 nat_max u16 digest[32]`.
fn parse_hello(b: &[u8]) -> Result<Hello, Reject> {
    let (&[s0, s1, n0, n1, lo0, lo1, hi0, hi1], digest) =
        b.split_first_chunk::<8>().ok_or(Reject::Malformed)?;
    Ok(Hello {
        slice: u16::from_be_bytes([s0, s1]),
        slices: u16::from_be_bytes([n0, n1]),
        nat_ports: u16::from_be_bytes([lo0, lo1])..=u16::from_be_bytes([hi0, hi1]),
        config_digest: *digest.first_chunk().ok_or(Reject::Malformed)?,
    })
}

fn put_hello(out: &mut BytesMut, hello: &Hello) {
    out.put_u16(hello.slice);
    out.put_u16(hello.slices);
    out.put_u16(*hello.nat_ports.start());
    out.put_u16(*hello.nat_ports.end());
    out.put_slice(&hello.config_digest);
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

#[cfg(test)]
mod tests {
    use fastrand::Rng;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::sync::testing::{hello as config, key, name};

    /// A completed handshake under `k` between listener lb1 and dialer lb2: the
    /// listener's codec, then the dialer's.
    fn session(k: &Key) -> (SessionCodec, SessionCodec) {
        let listener = ListenerHandshake::new(k, name("lb1")).unwrap();
        let dialer = DialerHandshake::new(k, name("lb2"), config(1)).unwrap();
        let answered = dialer.answer(&listener.hello()).unwrap();
        let accepted = listener.finish(&answered.reply).unwrap();
        (accepted.codec, answered.codec)
    }

    /// The same handshake again, for a test that consumes one per try.
    fn copy(l: &ListenerHandshake) -> ListenerHandshake {
        ListenerHandshake {
            key: l.key.clone(),
            name: l.name.clone(),
            nonce: l.nonce,
        }
    }

    fn v4(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn record_v4(client_port: u16) -> FlowRecord {
        FlowRecord {
            kind: RecordKind::Established,
            state: ct::CT_ESTABLISHED,
            flags: lb_common::FLOW_F_TS,
            client: v4(&format!("203.0.113.7:{client_port}")),
            vip: v4("198.51.100.100:6443"),
            backend: v4("192.168.19.160:6443"),
            snat: "198.51.100.100".parse().unwrap(),
            nat_port: 1025,
            ts_off: 0x0102_0304,
            fin_tsval: 0x0506_0708,
            seq: 0x090a_0b0c,
            ack: 0x0d0e_0f10,
            age_ms: 1500,
        }
    }

    fn record_v6() -> FlowRecord {
        FlowRecord {
            kind: RecordKind::Removed,
            state: ct::CT_TIME_WAIT,
            flags: lb_common::FLOW_F_BACKEND_FIRST,
            client: "[2001:db8::7]:50000".parse().unwrap(),
            vip: "[2001:db8:1::100]:6443".parse().unwrap(),
            backend: "[fd00::160]:6443".parse().unwrap(),
            snat: "2001:db8:1::100".parse().unwrap(),
            nat_port: 32_767,
            ts_off: 0,
            fin_tsval: u32::MAX,
            seq: 1,
            ack: 2,
            age_ms: 0,
        }
    }

    /// One message of each type, with IPv4 and IPv6 entries.
    fn every_message() -> Vec<Message> {
        vec![
            Message::Flows(vec![record_v4(40_000), record_v6()]),
            Message::BulkRequest(vec![
                "198.51.100.100".parse().unwrap(),
                "2001:db8:1::100".parse().unwrap(),
            ]),
            Message::BulkChunk(vec![
                FlowRecord {
                    kind: RecordKind::Closed,
                    state: ct::CT_CLOSE,
                    ..record_v4(40_001)
                };
                3
            ]),
            Message::BulkChunk(Vec::new()),
            Message::BulkEnd {
                generation: 7,
                count: 1_000_000,
            },
            Message::Ack { seq: u64::MAX - 1 },
            Message::Keepalive,
            Message::Goodbye,
        ]
    }

    /// A frame with any header and body, tagged as `key` would tag it from `dir`:
    /// what a buggy or newer peer that holds the key can send.
    fn tag_raw(key: &hmac::Key, dir: u8, head: [u8; 4], seq: u64, body: &[u8]) -> Vec<u8> {
        let mut frame = head.to_vec();
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.extend_from_slice(body);
        let mut signed = vec![dir];
        signed.extend_from_slice(&frame);
        frame.extend_from_slice(hmac::sign(key, &signed).as_ref());
        frame
    }

    /// The next frame of `codec` with any version, type, count and body.
    fn seal_raw(
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

    /// The body bytes of `records`, to be damaged before [`seal_raw`].
    fn record_bytes(records: &[FlowRecord]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for r in records {
            r.put(&mut out);
        }
        out.to_vec()
    }

    #[test]
    fn every_message_round_trips_both_ways_with_consecutive_seqs() {
        let (mut listener, mut dialer) = session(&key(1));
        for (i, msg) in every_message().into_iter().enumerate() {
            let seq = u64::try_from(i).unwrap() + 1;
            let want = Opened {
                seq,
                message: msg.clone(),
                bad_records: 0,
            };
            let frame = listener.seal(&msg).unwrap();
            assert_eq!(dialer.open(&frame), Ok(want.clone()), "{msg:?}");
            let frame = dialer.seal(&msg).unwrap();
            assert_eq!(listener.open(&frame), Ok(want), "{msg:?}");
        }
        assert_eq!((listener.last_sent(), listener.last_received()), (8, 8));
        assert_eq!((dialer.last_sent(), dialer.last_received()), (8, 8));
    }

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
    fn a_keepalive_is_version_type_count_seq_and_a_tag() {
        let (mut listener, _) = session(&key(1));
        listener.seal(&Message::Goodbye).unwrap();
        let frame = listener.seal(&Message::Keepalive).unwrap();
        assert_eq!(frame.len(), MIN_FRAME);
        assert_eq!(frame[..HEADER_LEN], [1, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);

        let frame = listener.seal(&Message::Ack { seq: 0x0102 }).unwrap();
        assert_eq!(frame[..4], [1, 7, 0, 0]);
        assert_eq!(frame[HEADER_LEN..HEADER_LEN + 8], [0, 0, 0, 0, 0, 0, 1, 2]);
        let frame = listener
            .seal(&Message::BulkEnd {
                generation: 5,
                count: 0x0304,
            })
            .unwrap();
        assert_eq!(frame[..2], [1, 6]);
        assert_eq!(frame[HEADER_LEN..HEADER_LEN + 8], [0, 0, 0, 5, 0, 0, 3, 4]);
    }

    #[test]
    fn a_flow_record_is_laid_out_as_the_table_says() {
        let (mut listener, _) = session(&key(1));
        let frame = listener
            .seal(&Message::Flows(vec![record_v4(0xabcd)]))
            .unwrap();
        assert_eq!(frame.len(), MIN_FRAME + RECORD_LEN);
        assert_eq!(frame[..4], [1, 3, 0, 1]);
        let r = &frame[HEADER_LEN..HEADER_LEN + RECORD_LEN];
        assert_eq!(
            r[..8],
            [1, 3, AF_INET, 0, 0, 0, 0, 16],
            "kind state family _ flags"
        );
        assert_eq!(
            r[8..24],
            [203, 0, 113, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(r[24..28], [198, 51, 100, 100], "vip");
        assert_eq!(r[40..44], [192, 168, 19, 160], "backend");
        assert_eq!(r[56..60], [198, 51, 100, 100], "snat");
        assert_eq!(
            r[72..80],
            [0xab, 0xcd, 0x19, 0x2b, 0x19, 0x2b, 0x04, 0x01],
            "ports"
        );
        assert_eq!(
            r[80..96],
            (1..=16).collect::<Vec<u8>>()[..],
            "ts_off .. ack"
        );
        assert_eq!(
            r[96..104],
            [0, 0, 0x05, 0xdc, 0, 0, 0, 0],
            "age_ms, reserved"
        );

        let frame = listener
            .seal(&Message::BulkRequest(vec!["2001:db8::1".parse().unwrap()]))
            .unwrap();
        assert_eq!(frame[..4], [1, 4, 0, 1]);
        let v = &frame[HEADER_LEN..HEADER_LEN + VIP_LEN];
        assert_eq!(v[..6], [AF_INET6, 0, 0, 0, 0x20, 0x01]);
        assert_eq!(v[19], 1);
    }

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
        let hello_seq_1 = tag_raw(k.hmac(), DIR_FROM_LISTENER, [1, 1, 0, 0], 1, &body);
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        assert_eq!(dialer.answer(&hello_seq_1).unwrap_err(), Reject::Replay);
        let hello_seq_0 = tag_raw(k.hmac(), DIR_FROM_LISTENER, [1, 1, 0, 0], 0, &body);
        let dialer = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
        assert_eq!(dialer.answer(&hello_seq_0).unwrap().peer, name("lb1"));
    }

    #[test]
    fn a_hello_with_a_bad_name_is_malformed() {
        let k = key(1);
        for (len, name) in [(0, &b""[..]), (65, &[b'a'; 65][..]), (2, &[0xff, 0xfe][..])] {
            let mut body = vec![7; NONCE_LEN];
            body.push(len);
            body.extend_from_slice(name);
            body.resize(HELLO_LEN, 0);
            let hello = tag_raw(k.hmac(), DIR_FROM_LISTENER, [1, 1, 0, 0], 0, &body);
            let dialer =
                DialerHandshake::new(&k, NodeName::new("lb2").unwrap(), config(1)).unwrap();
            assert_eq!(
                dialer.answer(&hello).unwrap_err(),
                Reject::Malformed,
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_count_that_does_not_fit_the_body_is_malformed() {
        let (mut listener, mut dialer) = session(&key(1));
        let one = record_bytes(&[record_v4(1)]);
        let cases: [(u8, u16, &[u8]); 6] = [
            (3, 2, &one),    // FLOWS: 2 records announced, 1 sent
            (5, 0, &one),    // BULK_CHUNK: 0 announced
            (4, 1, &one),    // BULK_REQUEST: a record is no VIP
            (8, 1, &[]),     // KEEPALIVE with a count
            (6, 0, &[0; 7]), // BULK_END one byte short
            (7, 0, &[0; 9]), // ACK one byte long
        ];
        for (kind, count, body) in cases {
            let frame = seal_raw(&mut listener, VERSION, kind, count, body);
            assert_eq!(
                dialer.open(&frame),
                Err(Reject::Malformed),
                "type {kind} count {count}"
            );
        }
    }

    #[test]
    fn unknown_types_and_versions_are_refused() {
        let (mut listener, mut dialer) = session(&key(1));
        for kind in [0, 10, 255] {
            let frame = seal_raw(&mut listener, VERSION, kind, 0, &[]);
            assert_eq!(dialer.open(&frame), Err(Reject::Malformed), "type {kind}");
        }
        for version in [0, 2, 255] {
            let frame = seal_raw(&mut listener, version, 8, 0, &[]);
            assert_eq!(
                dialer.open(&frame),
                Err(Reject::Version),
                "version {version}"
            );
        }
        assert_eq!(dialer.last_received(), 0);
    }

    /// Patches to one v4 record's bytes that each make it a bad record.
    fn bad_patches() -> Vec<(&'static str, usize, u8)> {
        let mut patches = vec![
            ("kind 0", 0, 0),
            ("kind 4", 0, 4),
            ("family 0", 2, 0),
            ("family 3", 2, 3),
            ("state CT_NONE", 1, ct::CT_NONE),
            ("state CT_SYN_SENT", 1, ct::CT_SYN_SENT),
            ("state CT_SYN_RECV", 1, ct::CT_SYN_RECV),
            ("state 8", 1, 8),
            ("state 255", 1, 255),
        ];
        // An IPv6-looking address in an IPv4 record: bytes past the first 4.
        for (field, at) in [("client", 8), ("vip", 24), ("backend", 40), ("snat", 56)] {
            patches.push((field, at + 4, 1));
            patches.push((field, at + 15, 0x80));
        }
        patches
    }

    #[test]
    fn bad_records_are_skipped_and_counted_and_the_session_stays_up() {
        let (mut listener, mut dialer) = session(&key(1));
        let good = [record_v4(1), record_v4(2), record_v6()];
        for (what, at, value) in bad_patches() {
            let mut bad = record_bytes(&[record_v4(99)]);
            bad[at] = value;
            let mut body = record_bytes(&good[..1]);
            body.extend_from_slice(&bad);
            body.extend_from_slice(&record_bytes(&good[1..]));
            let frame = seal_raw(&mut listener, VERSION, 3, 4, &body);
            let opened = dialer
                .open(&frame)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(opened.message, Message::Flows(good.to_vec()), "{what}");
            assert_eq!(opened.bad_records, 1, "{what}");
        }
        // Each port 0, through the typed API: the sender does not judge records.
        let zero_ports = [
            FlowRecord {
                client: v4("203.0.113.7:0"),
                ..record_v4(1)
            },
            FlowRecord {
                vip: v4("198.51.100.100:0"),
                ..record_v4(1)
            },
            FlowRecord {
                backend: v4("192.168.19.160:0"),
                ..record_v4(1)
            },
            FlowRecord {
                nat_port: 0,
                ..record_v4(1)
            },
        ];
        let frame = listener
            .seal(&Message::BulkChunk(zero_ports.to_vec()))
            .unwrap();
        let opened = dialer.open(&frame).unwrap();
        assert_eq!(
            (opened.message, opened.bad_records),
            (Message::BulkChunk(Vec::new()), 4)
        );
        let frame = listener.seal(&Message::Keepalive).unwrap();
        assert_eq!(dialer.open(&frame).unwrap().message, Message::Keepalive);
    }

    #[test]
    fn every_state_a_synced_flow_can_be_in_is_accepted() {
        let (mut listener, mut dialer) = session(&key(1));
        let records: Vec<FlowRecord> = (ct::CT_ESTABLISHED..=ct::CT_CLOSE)
            .map(|state| FlowRecord {
                state,
                ..record_v6()
            })
            .collect();
        assert_eq!(records.len(), 5);
        let frame = listener.seal(&Message::Flows(records.clone())).unwrap();
        let opened = dialer.open(&frame).unwrap();
        assert_eq!(
            (opened.message, opened.bad_records),
            (Message::Flows(records), 0)
        );
    }

    #[test]
    fn bad_vips_in_a_bulk_request_are_skipped_and_counted() {
        let (mut listener, mut dialer) = session(&key(1));
        let mut body = Vec::new();
        for (family, last) in [(AF_INET, 0), (9, 0), (AF_INET, 1), (AF_INET6, 1)] {
            let mut vip = [0; VIP_LEN];
            vip[0] = family;
            vip[4..8].copy_from_slice(&[198, 51, 100, 100]);
            vip[19] = last;
            body.extend_from_slice(&vip);
        }
        let frame = seal_raw(&mut listener, VERSION, 4, 4, &body);
        let opened = dialer.open(&frame).unwrap();
        let want: Vec<IpAddr> = vec![
            "198.51.100.100".parse().unwrap(),
            "c633:6464::1".parse().unwrap(),
        ];
        assert_eq!(
            (opened.message, opened.bad_records),
            (Message::BulkRequest(want), 2)
        );
    }

    #[test]
    fn seal_refuses_mixed_families_and_oversized_frames_without_spending_a_seq() {
        let (mut listener, mut dialer) = session(&key(1));
        let mixed = FlowRecord {
            backend: "[fd00::160]:6443".parse().unwrap(),
            ..record_v4(1)
        };
        assert_eq!(
            listener.seal(&Message::Flows(vec![record_v4(2), mixed])),
            Err(WireError::MixedFamilies {
                client: mixed.client,
                field: "backend",
                addr: mixed.backend.ip(),
            })
        );
        let mixed = FlowRecord {
            snat: "2001:db8::1".parse().unwrap(),
            ..record_v4(1)
        };
        assert!(matches!(
            listener.seal(&Message::BulkChunk(vec![mixed])),
            Err(WireError::MixedFamilies { field: "snat", .. })
        ));
        assert_eq!(
            listener.seal(&Message::BulkChunk(vec![record_v4(1); MAX_RECORDS + 1])),
            Err(WireError::TooLarge {
                kind: "BULK_CHUNK",
                count: 630,
                max: 629
            })
        );
        let vip: IpAddr = "198.51.100.100".parse().unwrap();
        assert_eq!(
            listener.seal(&Message::BulkRequest(vec![vip; MAX_VIPS + 1])),
            Err(WireError::TooLarge {
                kind: "BULK_REQUEST",
                count: 3275,
                max: 3274
            })
        );
        assert_eq!(listener.last_sent(), 0);
        let frame = listener
            .seal(&Message::BulkRequest(vec![vip; MAX_VIPS]))
            .unwrap();
        assert!(frame.len() <= MAX_FRAME);
        assert_eq!(dialer.open(&frame).unwrap().seq, 1);
    }

    #[test]
    fn node_names_are_1_to_64_bytes_of_utf8() {
        assert!(NodeName::new("").is_err());
        assert!(NodeName::new(&"a".repeat(64)).is_ok());
        assert_eq!(
            NodeName::new(&"a".repeat(65)),
            Err(WireError::NodeName {
                name: "a".repeat(65),
                len: 65
            })
        );
        assert!(NodeName::new(&"é".repeat(32)).is_ok(), "64 bytes");
        assert!(NodeName::new(&"é".repeat(33)).is_err(), "66 bytes");
    }

    #[test]
    fn check_peer_refuses_every_difference_and_our_own_slice() {
        let ours = config(0);
        assert_eq!(ours.check_peer(&config(1)), Ok(()));
        let mismatches = [
            config(0),
            Hello {
                slices: 3,
                ..config(1)
            },
            Hello {
                slice: 2,
                ..config(1)
            },
            Hello {
                nat_ports: 1024..=32_766,
                ..config(1)
            },
            Hello {
                config_digest: [0; 32],
                ..config(1)
            },
        ];
        for peer in mismatches {
            assert_eq!(
                ours.check_peer(&peer),
                Err(Reject::ConfigMismatch),
                "{peer:?}"
            );
        }
    }

    #[test]
    fn reject_labels_are_stable_and_only_bad_records_keep_the_session() {
        let labels: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "version",
                "auth",
                "replay",
                "config_mismatch",
                "bad_record"
            ]
        );
        let closing: Vec<bool> = Reject::ALL.iter().map(|r| r.closes_session()).collect();
        assert_eq!(closing, [true, true, true, true, true, false]);
    }

    fn random_ip(rng: &mut Rng, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::from(rng.u128(..)))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.u32(..)))
        }
    }

    fn random_record(rng: &mut Rng) -> FlowRecord {
        let v6 = rng.bool();
        let kinds = [
            RecordKind::Established,
            RecordKind::Closed,
            RecordKind::Removed,
        ];
        FlowRecord {
            kind: kinds[rng.usize(..kinds.len())],
            state: rng.u8(SYNCED_STATES),
            flags: rng.u32(..),
            client: SocketAddr::new(random_ip(rng, v6), rng.u16(1..)),
            vip: SocketAddr::new(random_ip(rng, v6), rng.u16(1..)),
            backend: SocketAddr::new(random_ip(rng, v6), rng.u16(1..)),
            snat: random_ip(rng, v6),
            nat_port: rng.u16(1..),
            ts_off: rng.u32(..),
            fin_tsval: rng.u32(..),
            seq: rng.u32(..),
            ack: rng.u32(..),
            age_ms: rng.u32(..),
        }
    }

    fn random_message(rng: &mut Rng) -> Message {
        let n = rng.usize(..4);
        match rng.u8(..7) {
            0 => Message::Flows((0..n).map(|_| random_record(rng)).collect()),
            1 => Message::BulkChunk((0..n).map(|_| random_record(rng)).collect()),
            2 => Message::BulkRequest(
                (0..n)
                    .map(|_| {
                        let v6 = rng.bool();
                        random_ip(rng, v6)
                    })
                    .collect(),
            ),
            3 => Message::BulkEnd {
                generation: rng.u32(..),
                count: rng.u32(..),
            },
            4 => Message::Ack { seq: rng.u64(..) },
            5 => Message::Keepalive,
            _ => Message::Goodbye,
        }
    }

    /// `frame` changed at random: bits flipped, cut, extended, bytes overwritten,
    /// or the header kept and the rest replaced.
    fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        match rng.u8(..6) {
            0 => {
                for _ in 0..rng.usize(1..=4) {
                    let i = rng.usize(..f.len());
                    f[i] ^= 1 << rng.u8(..8);
                }
            }
            1 => f.truncate(rng.usize(..f.len())),
            2 => f.extend((0..rng.usize(1..=40)).map(|_| rng.u8(..))),
            3 => {
                let i = rng.usize(..f.len());
                f[i] = rng.u8(..);
            }
            4 => {
                let i = rng.usize(..f.len());
                let n = rng.usize(1..=(f.len() - i).min(16));
                rng.fill(&mut f[i..i + n]);
            }
            _ => rng.fill(&mut f[HEADER_LEN..]),
        }
        f
    }

    /// Random bytes; one in four has a valid header for its length, so that it
    /// reaches the tag check.
    fn random_frame(rng: &mut Rng) -> Vec<u8> {
        let len = if rng.u8(..100) == 0 {
            rng.usize(..=MAX_FRAME + 8)
        } else {
            rng.usize(..2048)
        };
        let mut f = vec![0; len];
        rng.fill(&mut f);
        if rng.u8(..4) == 0 && len >= MIN_FRAME {
            let kind = FrameType::from_wire(rng.u8(1..=9)).unwrap();
            let body = len - MIN_FRAME;
            let count = match kind {
                FrameType::Flows | FrameType::BulkChunk => body / RECORD_LEN,
                FrameType::BulkRequest => body / VIP_LEN,
                _ => 0,
            };
            let want = MIN_FRAME + kind.body_len(count).unwrap();
            f.resize(want, 0);
            f[..4].copy_from_slice(&[VERSION, kind as u8, 0, u8::try_from(count % 256).unwrap()]);
            f[2] = u8::try_from(count / 256).unwrap();
        }
        f
    }

    #[test]
    fn random_bytes_never_open_and_never_panic() {
        let mut rng = Rng::with_seed(19);
        let k = key(1);
        let (_, mut dialer) = session(&k);
        let listener = ListenerHandshake::new(&k, name("lb1")).unwrap();
        let mut reasons = std::collections::HashMap::new();
        for i in 0..100_000 {
            let frame = random_frame(&mut rng);
            let reject = dialer.open(&frame).unwrap_err();
            *reasons.entry(reject).or_insert(0) += 1;
            assert!(
                copy(&listener).finish(&frame).is_err(),
                "try {i}: {frame:02x?}"
            );
            if i % 8 == 0 {
                let d = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
                assert!(d.answer(&frame).is_err(), "try {i}: {frame:02x?}");
            }
        }
        assert_eq!(dialer.last_received(), 0);
        // A quarter had a valid header; those of the 7 session types (of 9) failed
        // only at the tag.
        let auth = reasons[&Reject::Auth];
        assert!((15_000..25_000).contains(&auth), "{reasons:?}");
        assert!(reasons[&Reject::Version] > 50_000, "{reasons:?}");
    }

    #[test]
    fn mutated_frames_never_open_and_never_panic() {
        let mut rng = Rng::with_seed(5);
        let k = key(1);
        let (mut listener, mut dialer) = session(&k);
        let (mut mutations, mut round) = (0, 0);
        while mutations < 100_000 {
            round += 1;
            let msg = random_message(&mut rng);
            let frame = listener.seal(&msg).unwrap();
            for _ in 0..9 {
                let bad = mutate(&mut rng, &frame);
                if bad[..] == frame[..] {
                    continue;
                }
                mutations += 1;
                assert!(dialer.open(&bad).is_err(), "{bad:02x?} from {msg:?}");
            }
            assert_eq!(dialer.open(&frame).unwrap().message, msg);

            // The handshake's two frames, now and then.
            if round % 10 == 0 {
                let l = ListenerHandshake::new(&k, name("lb1")).unwrap();
                let hello = l.hello();
                let bad = mutate(&mut rng, &hello);
                let d = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
                if bad[..] != hello[..] {
                    mutations += 1;
                    assert!(d.answer(&bad).is_err(), "{bad:02x?}");
                }
                let d = DialerHandshake::new(&k, name("lb2"), config(1)).unwrap();
                let reply = d.answer(&hello).unwrap().reply;
                let bad = mutate(&mut rng, &reply);
                if bad[..] != reply[..] {
                    mutations += 1;
                    assert!(copy(&l).finish(&bad).is_err(), "{bad:02x?}");
                }
                l.finish(&reply).unwrap();
            }
        }
    }
}
