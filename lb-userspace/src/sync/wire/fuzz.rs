//! Random bytes and randomly damaged frames against the session and both handshake
//! halves: none may open, and none may panic, whatever a peer sends.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use fastrand::Rng;

use super::{
    DialerHandshake, FlowRecord, HEADER_LEN, ListenerHandshake, MAX_FRAME, MIN_FRAME, Message,
    RECORD_LEN, RecordKind, Reject, VERSION, VIP_LEN,
    frame::FrameType,
    record::SYNCED_STATES,
    testing::{copy, session},
};
use crate::sync::testing::{hello as config, key, name};

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
        2 => Message::BulkRequest {
            generation: rng.u32(..),
            vips: (0..n)
                .map(|_| {
                    let v6 = rng.bool();
                    random_ip(rng, v6)
                })
                .collect(),
        },
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
            FrameType::BulkRequest => body.saturating_sub(4) / VIP_LEN,
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
