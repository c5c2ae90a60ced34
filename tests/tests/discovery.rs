//! Masters discovered from the `default/kubernetes` `EndpointSlice`: the stub
//! apiservers serve it from a file each test rewrites (`tests::sliceapi`), the
//! real `apilb run` reads it with kube-rs through a kubeconfig for the VIP, and
//! the client's connections and watch streams through the VIP show what that did.
//! Nothing but the slice changes: apilb's config file is never edited, and it
//! gets no SIGHUP. Each test prints its numbers as one `discovery ...` line.
//! Root; namespaces are prefixed `disc`.
//!
//! The tests run one at a time (`SERIAL`): they measure time and spread, and two
//! sharing the machine's two CPUs would measure each other.

use std::{
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{FOURTH_MASTER, MASTERS, Shape},
    endpointslice::{SliceFile, fail_file},
    live::{https_via_vip, metric_sum, metrics},
    plane::{ControlPlane, FAILOVER_TARGET},
    traffic::Traffic,
};

static SERIAL: Mutex<()> = Mutex::new(());

const EVERY: Duration = Duration::from_millis(10);
const STREAMS: usize = 30;
/// The three masters and the fourth.
const ALL_FOUR: [&str; 4] = [MASTERS[0], MASTERS[1], MASTERS[2], FOURTH_MASTER];

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn four() -> Shape {
    Shape {
        masters: 4,
        ..Shape::default()
    }
}

/// The value of `series` on apilb's `/metrics` (0 if absent).
fn metric(p: &ControlPlane, series: &str) -> u64 {
    metric_sum(&metrics(p.t.lb()), series)
}

/// Wait (at most `limit`) until `series` reads `want`.
fn wait_metric(p: &ControlPlane, series: &str, want: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let got = metric(p, series);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {got}, not {want}, after {limit:?}; apilb's log:\n{}",
            p.apilb.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The plane with the three masters in the slice (version 1) and `discovery`
/// lines in `[discovery]`, once apilb has read the slice and the VIP serves.
fn plane(prefix: &str, shape: Shape, discovery: &str) -> ControlPlane {
    let p =
        ControlPlane::start_discovering(prefix, shape, &SliceFile::of(1, &MASTERS), "", discovery);
    synced(&p);
    p.wait_serving(Duration::from_secs(10));
    p
}

fn synced(p: &ControlPlane) {
    wait_metric(
        p,
        "apilb_discovery_state{state=\"synced\"}",
        1,
        Duration::from_secs(10),
    );
}

fn membership(addr: &str, source: &str, stage: &str) -> String {
    format!("apilb_backend_membership{{backend=\"{addr}\",source=\"{source}\",stage=\"{stage}\"}}")
}

fn refusals(p: &ControlPlane) -> Vec<u64> {
    let m = metrics(p.t.lb());
    ["empty", "wrong_family", "bogus_port", "healthy_dropped"]
        .map(|r| {
            metric_sum(
                &m,
                &format!("apilb_discovery_refusals_total{{reason=\"{r}\"}}"),
            )
        })
        .to_vec()
}

/// `n` https requests through the VIP from the client, each on a new connection:
/// the masters that answered, by name, and how many failed.
fn spread(p: &ControlPlane, n: usize) -> (std::collections::BTreeMap<String, usize>, usize) {
    let mut by = std::collections::BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match https_via_vip(&p.t.client, p.ca(), "/version") {
            Some(m) => *by.entry(m).or_insert(0) += 1,
            None => failed += 1,
        }
    }
    (by, failed)
}

/// Serve `slice`, which leaves the static `master` out, and wait until apilb
/// drains it: when the slice changed, and when the master was leaving.
fn unlist(p: &ControlPlane, slice: &SliceFile, master: &str) -> (Instant, Instant) {
    let removed = Instant::now();
    p.set_slice(slice);
    wait_metric(
        p,
        &membership(master, "static", "leaving"),
        1,
        Duration::from_secs(5),
    );
    (removed, Instant::now())
}

/// Wait until master `name` has served a new connection since `t`; when.
fn first_served(p: &ControlPlane, traffic: &Traffic, name: &str, t: Instant) -> Instant {
    p.first_served(
        traffic,
        name,
        t,
        FAILOVER_TARGET * 5 + Duration::from_secs(2),
    )
}

#[test]
fn a_fourth_master_added_to_the_slice_takes_a_quarter_of_new_connections_and_no_stream_moves() {
    let _serial = serial();
    let p = plane("disc-add", four(), "");
    let config_before = std::fs::read(&p.config).expect("config");
    let traffic = Traffic::start(&p.t.client, p.ca(), STREAMS, Some(EVERY));
    thread::sleep(Duration::from_secs(1));
    let streams_before = traffic.record().watches_per_master();

    let added = Instant::now();
    p.set_slice(&SliceFile::of(2, &ALL_FOUR));
    let joined = first_served(&p, &traffic, "master-4", added);
    thread::sleep(Duration::from_secs(8));
    let r = traffic.stop();
    let m = metrics(p.t.lb());
    eprintln!(
        "discovery scale-out: master-4 served {:.2} s after the slice listed it; {}; before {streams_before:?}",
        (joined - added).as_secs_f64(),
        r.assert_joined("master-4", joined),
    );
    assert_eq!(r.watches_per_master(), streams_before, "no stream moved");
    assert_eq!(
        metric_sum(&m, &membership(FOURTH_MASTER, "discovered", "member")),
        1
    );
    assert_eq!(
        metric_sum(&m, &membership(MASTERS[0], "static", "member")),
        1
    );
    assert_eq!(metric_sum(&m, "apilb_discovery_resource_version"), 2);
    // Added with no edit on the LB node: the same file, and no reload.
    assert_eq!(std::fs::read(&p.config).expect("config"), config_before);
    assert_eq!(metric_sum(&m, "apilb_config_reloads_total"), 0);
}

#[test]
fn a_master_removed_from_the_slice_gets_no_new_flows_and_keeps_its_streams() {
    let _serial = serial();
    let mut p = plane("disc-remove", Shape::default(), "hold = \"60s\"");
    let traffic = Traffic::start(&p.t.client, p.ca(), STREAMS, Some(EVERY));
    thread::sleep(Duration::from_secs(1));
    let on_it = traffic.record().watches_on("master-2");

    let (removed, drained) = unlist(&p, &SliceFile::of(2, &[MASTERS[0], MASTERS[2]]), MASTERS[1]);
    thread::sleep(Duration::from_secs(5));
    let r = traffic.record();
    // Until it closes them: its apiserver stops.
    p.kill_master(1);
    thread::sleep(Duration::from_secs(3));
    let closed = traffic.stop().broken_watches();
    let last = r.last_served_by("master-2", removed);
    let (after, failed) = r.spread_since(drained);
    let broken = r.broken_watches();
    eprintln!(
        "discovery removal: master-2 left the slice; drained {:.2} s later, its last new \
         connection {:?} after the removal; since then {after:?}, {failed} failed; broken \
         streams {broken:?} ({on_it} streams on master-2); once it stopped, broken {closed:?}",
        (drained - removed).as_secs_f64(),
        last.map(|t| t - removed),
    );
    assert!(drained - removed <= FAILOVER_TARGET * 5);
    assert_eq!(
        after.get("master-2"),
        None,
        "no new flow to a leaving master: {after:?}"
    );
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(failed, 0);
    assert!(on_it > 0, "some streams were on master-2");
    assert!(broken.is_empty(), "its streams stay: {broken:?}");
    assert!(
        r.watches
            .iter()
            .all(|w| w.last_event > drained + Duration::from_secs(4))
    );
    assert_eq!(
        closed,
        [("master-2".to_owned(), on_it)].into(),
        "then exactly its own streams end, when it closes them"
    );
}

#[test]
fn an_unreadable_slice_keeps_the_last_good_set_and_a_compacted_watch_relists() {
    let _serial = serial();
    let p = plane("disc-unread", four(), "");
    let lists_before = metric(&p, "apilb_discovery_lists_total");

    // Unreadable (403, as without the RBAC grant): the three stay.
    std::fs::write(fail_file(&p.slice_file()), "").expect("fail file");
    wait_metric(
        &p,
        "apilb_discovery_state{state=\"unreadable\"}",
        1,
        Duration::from_secs(10),
    );
    let (unreadable, failed_unreadable) = spread(&p, 150);
    // Readable again: listed anew, the same three.
    std::fs::remove_file(fail_file(&p.slice_file())).expect("readable");
    synced(&p);
    let lists_readable = metric(&p, "apilb_discovery_lists_total");

    // Compaction under an open watch: its resume gets 410 Gone, the watcher
    // lists again and finds master-4.
    let mut slice = SliceFile::of(20, &ALL_FOUR);
    slice.compacted = 20;
    p.set_slice(&slice);
    wait_metric(
        &p,
        &membership(FOURTH_MASTER, "discovered", "member"),
        1,
        Duration::from_secs(10),
    );
    let lists_after = metric(&p, "apilb_discovery_lists_total");
    let expired = metric(&p, "apilb_discovery_watches_expired_total");
    let (four_masters, failed_after) = spread(&p, 200);
    eprintln!(
        "discovery unreadable: while unreadable {unreadable:?}, {failed_unreadable} failed; lists \
         {lists_before} -> {lists_readable} (readable again) -> {lists_after} (after {expired} 410 Gone); \
         then {four_masters:?}, {failed_after} failed; refusals {:?}",
        refusals(&p)
    );
    assert_eq!(failed_unreadable, 0);
    assert_eq!(
        unreadable.len(),
        3,
        "the last good set stays: {unreadable:?}"
    );
    assert!(lists_readable > lists_before);
    assert!(
        lists_after > lists_readable,
        "the 410 made the watcher list again"
    );
    assert_eq!(expired, 1, "one watch resumed past the compaction");
    assert_eq!(metric(&p, "apilb_discovery_resource_version"), 20);
    assert_eq!(failed_after, 0);
    assert_eq!(four_masters.len(), 4, "{four_masters:?}");
    assert_eq!(refusals(&p), [0, 0, 0, 0]);
}

#[test]
fn a_bogus_slice_is_refused_counted_and_removes_no_healthy_master() {
    let _serial = serial();
    let p = plane("disc-bogus", Shape::default(), "");
    assert_eq!(refusals(&p), [0, 0, 0, 0], "every reason from 0");
    let mut bogus = Vec::new();
    let empty = SliceFile::of(2, &[]);
    let mut v6 = SliceFile::of(3, &[]);
    v6.address_type = "IPv6".to_owned();
    v6.endpoints = vec!["fd00:198:51:100::11".to_owned()];
    let mut port = SliceFile::of(4, &MASTERS);
    port.port = 0;
    let one = SliceFile::of(5, &[MASTERS[0]]);
    for (i, slice) in [empty, v6, port, one].iter().enumerate() {
        p.set_slice(slice);
        let mut want = [0; 4];
        want[..=i].fill(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while refusals(&p) != want {
            assert!(
                Instant::now() < deadline,
                "refusals {:?}, want {want:?}",
                refusals(&p)
            );
            thread::sleep(Duration::from_millis(100));
        }
        bogus.push(spread(&p, 90));
    }
    let m = metrics(p.t.lb());
    eprintln!(
        "discovery bogus: after empty, IPv6, port 0 and one-of-three slices: {bogus:?}; refusals {:?}",
        refusals(&p)
    );
    for (by, failed) in &bogus {
        assert_eq!(*failed, 0);
        assert_eq!(by.len(), 3, "all three masters kept: {by:?}");
    }
    for master in MASTERS {
        assert_eq!(metric_sum(&m, &membership(master, "static", "member")), 1);
    }
    assert_eq!(refusals(&p), [1, 1, 1, 1]);
    assert_eq!(
        tests::alerts::missing_discovery_from(&m),
        Vec::<String>::new(),
        "the alerting rules' discovery series are served"
    );
    assert_eq!(
        metric_sum(&m, "apilb_discovery_resource_version"),
        1,
        "the last slice taken"
    );

    // The one-of-three slice is held, not forgotten: once master-2 and master-3
    // stop passing their probes it is taken, and when they pass again they are
    // leaving, so master-1 alone takes new connections.
    for i in [1, 2] {
        std::fs::write(p.readyz_fail(i), "").expect("fail /readyz");
    }
    wait_metric(
        &p,
        &membership(MASTERS[2], "static", "leaving"),
        1,
        Duration::from_secs(10),
    );
    for i in [1, 2] {
        std::fs::remove_file(p.readyz_fail(i)).expect("ready again");
    }
    thread::sleep(Duration::from_secs(3));
    let (taken, failed) = spread(&p, 60);
    let m = metrics(p.t.lb());
    eprintln!(
        "discovery bogus: the held slice taken once two masters failed: {taken:?}, {failed} failed"
    );
    assert_eq!(failed, 0);
    assert_eq!(taken.keys().collect::<Vec<_>>(), ["master-1"]);
    assert_eq!(metric_sum(&m, "apilb_discovery_resource_version"), 5);
    assert_eq!(refusals(&p), [1, 1, 1, 1], "taken, not refused again");
}

#[test]
fn node_local_mode_follows_the_slice() {
    let _serial = serial();
    let p = ControlPlane::start_discovering(
        "disc-local",
        Shape {
            masters: 4,
            vip_on_first_lb: false,
            ..Shape::default()
        },
        &SliceFile::of(1, &MASTERS),
        "[local]\nenabled = true",
        "hold = \"60s\"",
    );
    synced(&p);
    // The node's own connects to the VIP, balanced in connect().
    let traffic = Traffic::start(p.t.lb(), p.ca(), 10, Some(EVERY));
    thread::sleep(Duration::from_secs(1));
    let added = Instant::now();
    p.set_slice(&SliceFile::of(2, &ALL_FOUR));
    let joined = first_served(&p, &traffic, "master-4", added);
    thread::sleep(Duration::from_secs(4));
    let (with_four, failed_four) = traffic.record().spread_since(joined);
    let (removed, drained) = unlist(
        &p,
        &SliceFile::of(3, &[MASTERS[0], MASTERS[2], FOURTH_MASTER]),
        MASTERS[1],
    );
    thread::sleep(Duration::from_secs(3));
    let r = traffic.stop();
    let (after, failed_after) = r.spread_since(drained);
    let broken = r.broken_watches();
    eprintln!(
        "discovery node-local: master-4 served {:.2} s after it was listed: {with_four:?}, \
         {failed_four} failed; master-2 unlisted, drained after {:.2} s: since then {after:?}, \
         {failed_after} failed; broken streams {broken:?}",
        (joined - added).as_secs_f64(),
        (drained - removed).as_secs_f64(),
    );
    assert_eq!((failed_four, failed_after), (0, 0));
    assert_eq!(with_four.len(), 4, "{with_four:?}");
    let total: usize = with_four.values().sum();
    let share = with_four["master-4"] as f64 / total as f64;
    assert!(
        (0.15..=0.35).contains(&share),
        "master-4 got {share:.3} of {with_four:?}"
    );
    assert_eq!(after.get("master-2"), None, "{after:?}");
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(broken.is_empty(), "{broken:?}");
}
