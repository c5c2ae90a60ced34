//! An LB node dies and no client notices (issue 19): two apilb nodes share the
//! VIP in the `tests::cluster` topology, with flow sync between them, in front of
//! TLS stub apiservers, under 30 watch streams, 100 new https connections a second
//! and a kubectl loop (`tests::lbdeath`). The owner, lb1, gets SIGKILL, has its
//! cable cut for 5 s, gets SIGTERM, or gets SIGKILL and is started again (and,
//! under VRRP, preempts back); each with VRRP (100 ms adverts) and with etcd (3 s
//! lease). With sync, no watch stream breaks; a connection opened in the moment
//! before the failure may wait for one SYN retransmit, and each test prints how
//! many did. A new connection or kubectl run fails only if its handshake
//! straddled the very instant the VIP changed hands, at most one per handover
//! (most runs have none), and never under SIGTERM. The same
//! scenarios without sync show what sync buys, and check the harness: streams
//! must break there. Each prints one `lbdeath ...` line. Root.
//!
//! The tests run one at a time (`SERIAL`): each runs two apilb nodes, the stubs
//! and the load, and the numbers are about timing.

use std::sync::Mutex;

use tests::lbdeath::{self, Election, Fate, MOVE_LIMIT, Outcome, Stack};

static SERIAL: Mutex<()> = Mutex::new(());

fn scenario(prefix: &str, election: Election, sync: bool, fate: Fate) -> Outcome {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let stack = Stack::Apilb { election, sync };
    let out = lbdeath::run(prefix, stack, fate);
    eprintln!(
        "lbdeath {}, {}: {}",
        stack.name(),
        fate.name(),
        out.summary()
    );
    assert!(
        out.moved.is_some_and(|d| d < MOVE_LIMIT),
        "traffic never went to lb2"
    );
    if matches!(fate, Fate::CableCut | Fate::KillAndBack) {
        assert!(
            out.settled.is_some(),
            "the VIP did not settle on one node after lb1 returned"
        );
    }
    out
}

/// With sync, lb1's `fate` breaks no stream, and fails no new connection or
/// kubectl run but, at most one a handover, one whose handshake straddled the
/// instant the VIP changed hands (README, "Failure window"); a SIGTERM fails
/// none.
fn unnoticed(prefix: &str, election: Election, fate: Fate) -> Outcome {
    let out = scenario(prefix, election, true, fate);
    assert_eq!(
        out.broken, 0,
        "broken streams: {:?}\n{}",
        out.broken_why, out.logs
    );
    assert_eq!(
        out.failed_away_from_handovers(),
        Vec::<&(f64, String)>::new(),
        "new connections failed away from the handovers at {:?} s\n{}",
        out.handovers(),
        out.logs
    );
    let at_handovers = out.failed.len() + out.kubectl_failed.len();
    assert!(
        at_handovers < out.handovers().len(),
        "{at_handovers} new connections and kubectl runs failed at the handovers at {:?} s: \
         {:?} {:?}\n{}",
        out.handovers(),
        out.failed,
        out.kubectl_failed,
        out.logs
    );
    // A SIGTERM hands over with no handshake caught halfway: nothing fails.
    if matches!(fate, Fate::Terminate) {
        assert_eq!(
            (&out.failed, &out.kubectl_failed),
            (&Vec::new(), &Vec::new()),
            "SIGTERM\n{}",
            out.logs
        );
    }
    out
}

/// Without sync the same move breaks streams: what sync buys, and proof that the
/// harness sees a break.
fn breaks_without_sync(prefix: &str, election: Election, fate: Fate) {
    let out = scenario(prefix, election, false, fate);
    assert!(out.broken > 0, "no stream broke without sync\n{}", out.logs);
}

#[test]
fn vrrp_owner_sigkilled_with_sync_breaks_nothing() {
    let out = unnoticed("apilb-ldvk", Election::Vrrp, Fate::Kill);
    // The survivor runs VRRP, sync and probes: every series the shipped alerting
    // rules name must be in its /metrics, or that alert could never fire.
    assert_eq!(
        tests::alerts::missing_from(&out.survivor_metrics),
        Vec::<String>::new(),
        "series docs/apilb-alerts.yaml names that apilb does not serve"
    );
}

#[test]
fn vrrp_owner_cable_cut_with_sync_breaks_nothing() {
    unnoticed("apilb-ldvc", Election::Vrrp, Fate::CableCut);
}

#[test]
fn vrrp_owner_sigtermed_with_sync_breaks_nothing() {
    unnoticed("apilb-ldvt", Election::Vrrp, Fate::Terminate);
}

#[test]
fn vrrp_owner_sigkilled_and_preempting_back_with_sync_breaks_nothing() {
    unnoticed("apilb-ldvb", Election::Vrrp, Fate::KillAndBack);
}

#[test]
fn etcd_owner_sigkilled_with_sync_breaks_nothing() {
    unnoticed("apilb-ldek", Election::Etcd, Fate::Kill);
}

#[test]
fn etcd_owner_cable_cut_with_sync_breaks_nothing() {
    unnoticed("apilb-ldec", Election::Etcd, Fate::CableCut);
}

#[test]
fn etcd_owner_sigtermed_with_sync_breaks_nothing() {
    unnoticed("apilb-ldet", Election::Etcd, Fate::Terminate);
}

#[test]
fn etcd_owner_sigkilled_and_back_with_sync_breaks_nothing() {
    unnoticed("apilb-ldeb", Election::Etcd, Fate::KillAndBack);
}

#[test]
fn vrrp_owner_sigkilled_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldvkn", Election::Vrrp, Fate::Kill);
}

#[test]
fn vrrp_owner_cable_cut_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldvcn", Election::Vrrp, Fate::CableCut);
}

#[test]
fn vrrp_owner_sigtermed_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldvtn", Election::Vrrp, Fate::Terminate);
}

#[test]
fn vrrp_owner_sigkilled_and_preempting_back_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldvbn", Election::Vrrp, Fate::KillAndBack);
}

#[test]
fn etcd_owner_sigkilled_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldekn", Election::Etcd, Fate::Kill);
}

#[test]
fn etcd_owner_cable_cut_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldecn", Election::Etcd, Fate::CableCut);
}

#[test]
fn etcd_owner_sigtermed_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldetn", Election::Etcd, Fate::Terminate);
}

#[test]
fn etcd_owner_sigkilled_and_back_without_sync_breaks_streams() {
    breaks_without_sync("apilb-ldebn", Election::Etcd, Fate::KillAndBack);
}
