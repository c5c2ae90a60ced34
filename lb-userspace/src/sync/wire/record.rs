//! One flow as it travels between nodes: [`FlowRecord`] and its fixed 104-byte
//! layout. A record is judged on its own, so a bad one is skipped and counted
//! without failing the frame that carries it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
};

use bytes::{BufMut, BytesMut};
use lb_common::{AF_INET, AF_INET6, ct};

use super::{RECORD_LEN, errors::WireError};

/// The TCP states a synced flow can be in. Half-open flows are never exported
/// (state is earned: a SYN flood must not become sync traffic) and `CT_NONE` is
/// never stored, so `CT_ESTABLISHED` up to `CT_CLOSE`.
pub(super) const SYNCED_STATES: RangeInclusive<u8> = ct::CT_ESTABLISHED..=ct::CT_CLOSE;

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

/// An address in 16 bytes: IPv6 as is, IPv4 in the first 4 and zeros after (as the
/// datapath stores it).
pub(super) fn put_addr(out: &mut BytesMut, ip: IpAddr) {
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
pub(super) fn addr_of(family: u8, b: &[u8; 16]) -> Option<IpAddr> {
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

pub(super) fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

impl FlowRecord {
    /// [`WireError::MixedFamilies`] unless every address has the client's family: a
    /// record carries one family byte.
    pub(super) fn check_families(&self) -> Result<(), WireError> {
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
    pub(super) fn put(&self, out: &mut BytesMut) {
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
    ///
    /// [`Reject::BadRecord`]: super::Reject::BadRecord
    pub(super) fn parse(b: &[u8; RECORD_LEN]) -> Option<FlowRecord> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{
        testing::key,
        wire::{
            HEADER_LEN, MIN_FRAME, VERSION, VIP_LEN,
            message::Message,
            testing::{record_bytes, record_v4, record_v6, seal_raw, session, v4},
        },
    };

    #[test]
    fn a_flow_record_is_laid_out_as_the_table_says() {
        let (mut listener, _) = session(&key(1));
        let frame = listener
            .seal(&Message::Flows(vec![record_v4(0xabcd)]))
            .unwrap();
        assert_eq!(frame.len(), MIN_FRAME + RECORD_LEN);
        assert_eq!(frame[..4], [2, 3, 0, 1]);
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
            .seal(&Message::BulkRequest {
                generation: 1,
                vips: vec!["2001:db8::1".parse().unwrap()],
            })
            .unwrap();
        assert_eq!(frame[..4], [2, 4, 0, 1]);
        // The generation, then each VIP.
        assert_eq!(frame[HEADER_LEN..HEADER_LEN + 4], [0, 0, 0, 1]);
        let v = &frame[HEADER_LEN + 4..HEADER_LEN + 4 + VIP_LEN];
        assert_eq!(v[..6], [AF_INET6, 0, 0, 0, 0x20, 0x01]);
        assert_eq!(v[19], 1);
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
}
