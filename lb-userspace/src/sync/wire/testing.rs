//! What the wire tests share: a finished handshake, sample records, and frames
//! tagged by hand as a buggy or newer peer holding the key could send them.

use std::net::SocketAddr;

use bytes::BytesMut;
use lb_common::ct;
use ring::hmac;

use super::{DialerHandshake, FlowRecord, ListenerHandshake, RecordKind, SessionCodec};
pub(super) use super::{handshake::copy, session::seal_raw};
use crate::sync::{
    key::Key,
    testing::{hello as config, name},
};

/// A completed handshake under `k` between listener lb1 and dialer lb2: the
/// listener's codec, then the dialer's.
pub(super) fn session(k: &Key) -> (SessionCodec, SessionCodec) {
    let listener = ListenerHandshake::new(k, name("lb1")).unwrap();
    let dialer = DialerHandshake::new(k, name("lb2"), config(1)).unwrap();
    let answered = dialer.answer(&listener.hello()).unwrap();
    let accepted = listener.finish(&answered.reply).unwrap();
    (accepted.codec, answered.codec)
}

pub(super) fn v4(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub(super) fn record_v4(client_port: u16) -> FlowRecord {
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

pub(super) fn record_v6() -> FlowRecord {
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

/// A frame with any header and body, tagged as `key` would tag it from `dir`:
/// what a buggy or newer peer that holds the key can send.
pub(super) fn tag_raw(key: &hmac::Key, dir: u8, head: [u8; 4], seq: u64, body: &[u8]) -> Vec<u8> {
    let mut frame = head.to_vec();
    frame.extend_from_slice(&seq.to_be_bytes());
    frame.extend_from_slice(body);
    let mut signed = vec![dir];
    signed.extend_from_slice(&frame);
    frame.extend_from_slice(hmac::sign(key, &signed).as_ref());
    frame
}

/// The body bytes of `records`, to be damaged before [`seal_raw`].
pub(super) fn record_bytes(records: &[FlowRecord]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for r in records {
        r.put(&mut out);
    }
    out.to_vec()
}
