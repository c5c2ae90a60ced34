//! What a session carries after the handshake: [`Message`], one per frame type, and
//! its body in and out of bytes. Sizes are checked before a frame is sealed, so that
//! a message the peer would refuse never leaves this node.

use std::net::IpAddr;

use bytes::{BufMut, BytesMut};

use super::{
    MAX_RECORDS, MAX_VIPS, RECORD_LEN, VIP_LEN,
    errors::WireError,
    frame::FrameType,
    record::{FlowRecord, addr_of, family_of, put_addr},
};

/// A message after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Live records, as the owner's datapath reports them.
    Flows(Vec<FlowRecord>),
    /// Asks the peer for a bulk of its flows on these VIPs; its `BULK_END`
    /// carries `generation` back, which tells that bulk from one left in the
    /// peer's queue by an earlier session.
    BulkRequest {
        generation: u32,
        vips: Vec<IpAddr>,
    },
    /// Part of a bulk.
    BulkChunk(Vec<FlowRecord>),
    /// The end of a bulk: which one (the request's generation, 0 if unasked),
    /// and how many records it had.
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
    pub(super) fn frame_type(&self) -> FrameType {
        match self {
            Message::Flows(_) => FrameType::Flows,
            Message::BulkRequest { .. } => FrameType::BulkRequest,
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
    ///
    /// [`SessionCodec::seal`]: super::SessionCodec::seal
    pub fn check(&self) -> Result<(), WireError> {
        self.count().map(drop)
    }

    /// The header's count, once the message is known to fit a frame.
    pub(super) fn count(&self) -> Result<u16, WireError> {
        let (kind, count, max) = match self {
            Message::Flows(r) => ("FLOWS", r.len(), MAX_RECORDS),
            Message::BulkChunk(r) => ("BULK_CHUNK", r.len(), MAX_RECORDS),
            Message::BulkRequest { vips, .. } => ("BULK_REQUEST", vips.len(), MAX_VIPS),
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

    pub(super) fn put_body(&self, out: &mut BytesMut) {
        match self {
            Message::Flows(records) | Message::BulkChunk(records) => {
                for r in records {
                    r.put(out);
                }
            }
            Message::BulkRequest { generation, vips } => {
                out.put_u32(*generation);
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
    pub(super) fn parse(kind: FrameType, body: &[u8]) -> Option<(Message, usize)> {
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
                let (vips, bad) = parse_vips(body.get(4..)?);
                let generation = u32_at(0)?;
                (Message::BulkRequest { generation, vips }, bad)
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

#[cfg(test)]
mod tests {
    use lb_common::{AF_INET, AF_INET6, ct};

    use super::*;
    use crate::sync::{
        testing::key,
        wire::{
            HEADER_LEN, MAX_FRAME, MIN_FRAME, Opened, RecordKind, Reject, VERSION,
            testing::{record_bytes, record_v4, record_v6, seal_raw, session},
        },
    };

    /// One message of each type, with IPv4 and IPv6 entries.
    fn every_message() -> Vec<Message> {
        vec![
            Message::Flows(vec![record_v4(40_000), record_v6()]),
            Message::BulkRequest {
                generation: 9,
                vips: vec![
                    "198.51.100.100".parse().unwrap(),
                    "2001:db8:1::100".parse().unwrap(),
                ],
            },
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
    fn a_keepalive_is_version_type_count_seq_and_a_tag() {
        let (mut listener, _) = session(&key(1));
        listener.seal(&Message::Goodbye).unwrap();
        let frame = listener.seal(&Message::Keepalive).unwrap();
        assert_eq!(frame.len(), MIN_FRAME);
        assert_eq!(frame[..HEADER_LEN], [2, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);

        let frame = listener.seal(&Message::Ack { seq: 0x0102 }).unwrap();
        assert_eq!(frame[..4], [2, 7, 0, 0]);
        assert_eq!(frame[HEADER_LEN..HEADER_LEN + 8], [0, 0, 0, 0, 0, 0, 1, 2]);
        let frame = listener
            .seal(&Message::BulkEnd {
                generation: 5,
                count: 0x0304,
            })
            .unwrap();
        assert_eq!(frame[..2], [2, 6]);
        assert_eq!(frame[HEADER_LEN..HEADER_LEN + 8], [0, 0, 0, 5, 0, 0, 3, 4]);
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
    fn bad_vips_in_a_bulk_request_are_skipped_and_counted() {
        let (mut listener, mut dialer) = session(&key(1));
        let mut body = vec![0, 0, 0, 3];
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
            (
                Message::BulkRequest {
                    generation: 3,
                    vips: want
                },
                2
            )
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
            listener.seal(&Message::BulkRequest {
                generation: 1,
                vips: vec![vip; MAX_VIPS + 1]
            }),
            Err(WireError::TooLarge {
                kind: "BULK_REQUEST",
                count: 3275,
                max: 3274
            })
        );
        assert_eq!(listener.last_sent(), 0);
        let frame = listener
            .seal(&Message::BulkRequest {
                generation: 1,
                vips: vec![vip; MAX_VIPS],
            })
            .unwrap();
        assert!(frame.len() <= MAX_FRAME);
        assert_eq!(dialer.open(&frame).unwrap().seq, 1);
    }
}
