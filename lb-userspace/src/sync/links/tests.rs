//! The links' pure parts: config checks, backoff, fault labels and log limits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{faults::LOG_EVERY, *};
use crate::sync::testing::{hello, key, name};

const DEAD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 1);

fn config(me: &str, listen: SocketAddr, peers: &[(&str, SocketAddr)], slice: u16) -> LinksConfig {
    let peers = peers
        .iter()
        .map(|&(peer, addr)| PeerConfig {
            name: name(peer),
            addr,
        })
        .collect();
    LinksConfig::new(name(me), listen, peers, key(7), hello(slice))
}

#[test]
fn a_config_naming_ourselves_or_a_peer_twice_is_refused() {
    let me: SocketAddr = "127.0.0.1:9465".parse().unwrap();
    let other: SocketAddr = "127.0.0.2:9465".parse().unwrap();
    let cases = [
        (config("a", me, &[("a", other)], 0), "own name"),
        (config("a", me, &[("b", me)], 0), "own address"),
        (
            config("a", me, &[("b", other), ("b", DEAD)], 0),
            "duplicate name",
        ),
        (
            config("a", me, &[("b", other), ("c", other)], 0),
            "duplicate address",
        ),
    ];
    for (cfg, what) in cases {
        let err = validate(&cfg).unwrap_err();
        let ok = match what {
            "own name" => matches!(err, LinksError::OwnName { .. }),
            "own address" => matches!(err, LinksError::OwnAddress { .. }),
            "duplicate name" => matches!(err, LinksError::DuplicatePeer { .. }),
            _ => matches!(err, LinksError::DuplicateAddress { .. }),
        };
        assert!(ok, "{what}: {err}");
    }
    let mut cfg = config("a", me, &[("b", other)], 0);
    validate(&cfg).unwrap();
    cfg.queue_len = 0;
    assert!(matches!(validate(&cfg), Err(LinksError::QueueLen { .. })));
}

#[test]
fn backoff_doubles_from_100_ms_to_5_s_jittered_and_starts_over_on_reset() {
    let ms = Duration::from_millis;
    let mut backoff = dial::Backoff::new();
    let steps = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
    for _ in 0..200 {
        backoff.reset();
        for step in steps {
            let wait = backoff.next_wait();
            assert!(
                (ms(step / 2)..ms(step * 3 / 2)).contains(&wait),
                "step {step} ms: waited {wait:?}"
            );
        }
    }
}

#[test]
fn fault_labels_are_stable_and_each_is_logged_at_most_once_a_second() {
    let labels: Vec<&str> = Fault::ALL.iter().map(|f| f.as_str()).collect();
    let rejects: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(labels[..rejects.len()], rejects, "the codec's first");
    assert_eq!(
        labels[rejects.len()..],
        ["unknown_peer", "timeout", "overflow"]
    );
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        assert_eq!(fault.index(), i);
    }

    let mut log = FaultLog::default();
    let t0 = Instant::now();
    let replay = Fault::Rejected(Reject::Replay);
    assert_eq!(log.record(replay, 1, t0), Some(0), "the first is logged");
    assert_eq!(log.record(replay, 2, t0 + Duration::from_millis(500)), None);
    assert_eq!(
        log.record(Fault::Timeout, 1, t0 + Duration::from_millis(500)),
        Some(0),
        "another reason has its own clock"
    );
    assert_eq!(
        log.record(replay, 1, t0 + LOG_EVERY),
        Some(2),
        "with the 2 unlogged"
    );
    assert_eq!(log.counts.get(replay), 4);
    assert_eq!(log.counts.total(), 5);
    assert_eq!(
        format!("{:?}", log.counts),
        r#"{"replay": 4, "timeout": 1}"#
    );
}
