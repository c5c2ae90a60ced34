//! `apilb run` as users run it: the real binary, in the LB namespace of the
//! `tests::cluster` topology, balancing real TCP connections over three masters, with
//! TCP health probes every 100 ms. Root.
//!
//! One test walks through the lifecycle in order, since each step builds on the
//! state the one before left: spread over healthy masters; a master that dies
//! leaves rotation after `fall` probes and returns after `rise`; a bad config on
//! SIGHUP changes nothing; a controller killed with SIGKILL leaves a pinned datapath
//! that keeps an open connection working, and a restarted one adopts it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{LB_DEV, MASTERS, Topology, VIP, apilb_config},
    fixture::sa,
    live::{Apilb, Client, EchoServer, PinDir},
};

const LIFETIME: Duration = Duration::from_mins(2);

fn config_text(instance: &str) -> String {
    apilb_config(
        instance,
        "xdp_mode = \"native\"\nnat_ports = [40000, 40999]\nmaglev_size = 1009",
        "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\njitter = 0.0",
    )
}

/// `n` new connections from the client through the VIP.
fn spread(t: &Topology, n: usize) -> (HashMap<String, usize>, usize) {
    tests::live::spread(&t.client, sa(VIP), n)
}

/// Wait (bounded) until `pred` holds for a spread of `n` connections.
fn wait_for(
    t: &Topology,
    n: usize,
    limit: Duration,
    pred: impl Fn(&HashMap<String, usize>, usize) -> bool,
) -> (HashMap<String, usize>, usize) {
    let deadline = Instant::now() + limit;
    loop {
        let (m, f) = spread(t, n);
        if pred(&m, f) || Instant::now() > deadline {
            return (m, f);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `apilb status` and `/metrics`, from inside the LB namespace.
fn admin_endpoint_reports_three_healthy_masters(t: &Topology) {
    thread::sleep(Duration::from_millis(1100)); // the snapshot is republished every second
    let netns = format!("--net=/run/netns/{}", t.lb().name());
    let bin = tests::live::apilb_bin();
    let status = tests::netns::run("nsenter", &[&netns, bin.to_str().expect("path"), "status"]);
    for m in MASTERS {
        assert!(
            status.lines().any(|l| l.contains(m) && l.contains(" yes ")),
            "{m} healthy in:\n{status}"
        );
    }
    let metrics = tests::live::metrics(t.lb());
    assert!(
        metrics.lines().any(|l| l == "apilb_fail_open 0"),
        "{metrics}"
    );
    let healthy = metrics
        .lines()
        .filter(|l| l.starts_with("apilb_backend_healthy{") && l.ends_with(" 1"))
        .count();
    assert_eq!(healthy, 3, "{metrics}");
    let new_flows = tests::live::metric_sum(
        &metrics,
        "apilb_datapath_packets_total{counter=\"flow_new\"}",
    );
    assert!(new_flows >= 30, "flow_new = {new_flows}\n{metrics}");
}

/// SIGKILL leaves the pinned datapath keeping an open connection going, a restart
/// adopts it, and SIGTERM exits 0 leaving it pinned until `pins` detaches it.
fn sigkill_restart_and_sigterm(
    t: &Topology,
    mut apilb: Apilb,
    config: &Path,
    dir: &Path,
    pins: PinDir,
) {
    // SIGKILL: the pinned datapath keeps an open connection going with no controller.
    let prog_before = xdp_prog_id(t);
    let mut open = Client::connect(&t.client).expect("connection before the kill");
    let master = open.ask_master().expect("answer before the kill");
    apilb.signal(libc::SIGKILL);
    assert!(apilb.wait(Duration::from_secs(5)).is_some(), "apilb died");
    assert!(t.lb_has_xdp(), "the pinned links stayed attached");
    assert_eq!(
        open.ask_master().expect("answer with no controller"),
        master
    );

    // A restarted controller adopts it; the open connection and new ones work.
    let mut again = Apilb::start(t.lb(), config, &dir.join("apilb-2.log"));
    let (by, failed) = wait_for(t, 30, Duration::from_secs(15), |m, f| {
        f == 0 && m.len() == 3
    });
    assert_eq!(
        (by.len(), failed),
        (3, 0),
        "after restart {by:?}, log:\n{}",
        again.log_text()
    );
    assert!(
        again.wait_log("adopted the pinned datapath", Duration::from_secs(10)),
        "log:\n{}",
        again.log_text()
    );
    assert_eq!(open.ask_master().expect("answer after the restart"), master);
    let prog_after = xdp_prog_id(t);
    assert_ne!(
        prog_after, prog_before,
        "the restarted apilb's program was swapped into the pinned link"
    );

    // SIGTERM: a clean exit that leaves the datapath pinned.
    again.signal(libc::SIGTERM);
    assert_eq!(
        again.wait(Duration::from_secs(5)),
        Some(0),
        "log:\n{}",
        again.log_text()
    );
    assert!(
        Path::new(&pins.0).exists() && t.lb_has_xdp(),
        "SIGTERM left the datapath pinned"
    );
    drop(open);
    // apilb detach, as a user runs it.
    let out = tests::netns::run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{}", t.lb().name()),
            tests::live::apilb_bin().to_str().expect("path"),
            "detach",
            "--instance",
            pins.0
                .file_name()
                .and_then(|n| n.to_str())
                .expect("instance"),
        ],
    );
    assert!(out.contains("link-eth0"), "{out}");
    assert!(
        !pins.0.exists() && !t.lb_has_xdp(),
        "apilb detach removed the datapath"
    );
    detach_on_exit_with_json_logs(t, config, dir, &pins.0);
    drop(pins);
}

/// Every master dies: apilb fails open (all three stay in the ring) and says so, in
/// /metrics and the log; when they come back it stops.
fn every_master_dies_then_returns(t: &Topology, servers: &mut [Option<EchoServer>], apilb: &Apilb) {
    for s in servers.iter_mut() {
        drop(s.take());
    }
    let fail_open = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = tests::live::metrics(t.lb());
            if m.lines().any(|l| l == want) || Instant::now() > deadline {
                return m.lines().any(|l| l == want);
            }
            thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(
        fail_open("apilb_fail_open 1"),
        "fail-open reported in /metrics"
    );
    assert!(
        apilb.wait_log("failing open", Duration::from_secs(5)),
        "and logged"
    );
    for (slot, m) in servers.iter_mut().zip(MASTERS) {
        *slot = Some(EchoServer::start(t.master_ns(m), m, LIFETIME));
    }
    assert!(fail_open("apilb_fail_open 0"), "fail-open cleared");
    let (by, failed) = wait_for(t, 30, Duration::from_secs(5), |m, f| f == 0 && m.len() == 3);
    assert_eq!((by.len(), failed), (3, 0), "all three serve again: {by:?}");
}

/// A bad config on SIGHUP is refused and changes nothing; a good one is applied as
/// a diff, keeping an open connection on its master.
/// The parts of `/status` a reload may change: VIPs and the backends' settings
/// and rotation (not traffic or probe counters), and the reload counters.
fn status_state(t: &Topology) -> (serde_json::Value, u64, u64) {
    let text = t
        .lb()
        .exec("curl", &["-sf", "http://127.0.0.1:9464/status"]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("status JSON");
    let backends: Vec<serde_json::Value> = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| serde_json::json!([b["address"], b["id"], b["weight"], b["in_rotation"]]))
        .collect();
    let vips: Vec<serde_json::Value> = v["vips"]
        .as_array()
        .expect("vips")
        .iter()
        .map(|x| serde_json::json!([x["address"], x["owned"]]))
        .collect();
    let n = |k: &str| v[k].as_u64().expect("counter");
    (
        serde_json::json!([vips, backends, v["fail_open"]]),
        n("reloads_applied"),
        n("reloads_refused"),
    )
}

fn reloads(t: &Topology, apilb: &Apilb, config: &Path, instance: &str) {
    // A bad config on SIGHUP is refused and changes nothing.
    let (before, applied, refused) = status_state(t);
    std::fs::write(
        config,
        config_text(instance).replace("timeout = \"80ms\"", "timeout = \"2s\""),
    )
    .expect("bad config");
    apilb.signal(libc::SIGHUP);
    assert!(
        apilb.wait_log("config reload refused", Duration::from_secs(5)),
        "log:\n{}",
        apilb.log_text()
    );
    let (by, failed) = spread(t, 30);
    assert_eq!(
        (by.len(), failed),
        (3, 0),
        "still balancing over all three after the refused reload: {by:?}"
    );
    thread::sleep(Duration::from_millis(1100)); // the snapshot is republished every second
    let (after, applied_after, refused_after) = status_state(t);
    assert_eq!(
        after, before,
        "the refused reload changed nothing /status shows"
    );
    assert_eq!(
        (applied_after, refused_after),
        (applied, refused + 1),
        "and was counted as refused"
    );
    // A valid reload is applied as a diff: an open connection survives it.
    let mut open = Client::connect(&t.client).expect("connection before the reload");
    let master = open.ask_master().expect("answer before the reload");
    let reweighted = config_text(instance).replacen(
        "\"198.51.100.13:6443\"\n",
        "\"198.51.100.13:6443\"\nweight = 2\n",
        1,
    );
    assert_ne!(reweighted, config_text(instance));
    std::fs::write(config, reweighted).expect("good config");
    apilb.signal(libc::SIGHUP);
    assert!(
        apilb.wait_log("config reloaded", Duration::from_secs(5)),
        "log:\n{}",
        apilb.log_text()
    );
    assert_eq!(
        open.ask_master().expect("answer after the reload"),
        master,
        "the open connection kept its master"
    );
    drop(open);
}

/// A third, fresh start with `--log-format json` and `--detach-on-exit`: every log
/// line is a JSON object, and SIGTERM takes the datapath off the interfaces and
/// removes every pin.
fn detach_on_exit_with_json_logs(t: &Topology, config: &Path, dir: &Path, pins: &Path) {
    let mut third = Apilb::start_with(
        t.lb(),
        config,
        &dir.join("apilb-3.log"),
        &["--log-format", "json", "--detach-on-exit"],
    );
    assert!(
        third.wait_log("XDP attached", Duration::from_secs(10)),
        "log:\n{}",
        third.log_text()
    );
    let log = third.log_text();
    assert!(
        log.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('{') && l.contains("\"level\":") && l.ends_with('}')),
        "every line is JSON:\n{log}"
    );
    third.signal(libc::SIGTERM);
    assert_eq!(
        third.wait(Duration::from_secs(5)),
        Some(0),
        "log:\n{}",
        third.log_text()
    );
    assert!(
        third.log_text().contains("detached the datapath"),
        "log:\n{}",
        third.log_text()
    );
    assert!(
        !t.lb_has_xdp() && !pins.exists(),
        "--detach-on-exit took the program off both interfaces and removed the pins"
    );
}

/// The id of the XDP program on an LB interface (`prog/xdp id N` in `ip -d link`).
fn xdp_prog_id(t: &Topology) -> u32 {
    let out = t.lb().ip(&["-d", "link", "show", "dev", LB_DEV]);
    out.split_whitespace()
        .skip_while(|w| *w != "prog/xdp")
        .nth(2)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no XDP program id in:\n{out}"))
}

struct Files(PathBuf);

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn apilb_run_follows_health_refuses_bad_reloads_and_survives_sigkill() {
    let t = Topology::new("apilb-run");
    let pins = PinDir::new("test-run");
    let instance = pins.instance();
    let dir = std::env::temp_dir().join(format!("apilb-run-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let files = Files(dir.clone());
    let config = files.0.join("apilb.toml");
    std::fs::write(&config, config_text(&instance)).expect("config");
    let mut servers: Vec<Option<EchoServer>> = MASTERS
        .iter()
        .map(|m| Some(EchoServer::start(t.master_ns(m), m, LIFETIME)))
        .collect();

    let apilb = Apilb::start(t.lb(), &config, &files.0.join("apilb-1.log"));
    // All three masters serve once apilb is up.
    let (by, failed) = wait_for(&t, 30, Duration::from_secs(15), |m, f| {
        f == 0 && m.len() == 3
    });
    assert_eq!(
        (by.len(), failed),
        (3, 0),
        "spread {by:?}, log:\n{}",
        apilb.log_text()
    );
    assert!(
        by.values().all(|&n| n >= 1),
        "each master got a share of 30: {by:?}"
    );
    admin_endpoint_reports_three_healthy_masters(&t);
    let reserved = t
        .lb()
        .exec("cat", &["/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert_eq!(
        reserved.trim(),
        "40000-40999",
        "apilb reserved its NAT ports in the LB namespace"
    );

    // Master .12 dies (its port refuses): after fall = 2 probes it leaves rotation.
    let dead = MASTERS[1];
    drop(servers[1].take());
    let started = Instant::now();
    let (by, failed) = wait_for(&t, 20, Duration::from_secs(5), |m, f| {
        f == 0 && !m.contains_key(dead)
    });
    let took = started.elapsed();
    eprintln!(
        "{dead} out of rotation, every new connect succeeding, {took:?} after its port closed (fall = 2 x 100 ms); spread after: {by:?}"
    );
    assert!(
        !by.contains_key(dead) && failed == 0,
        "{dead} still served or connects failed: {by:?}, {failed} failed"
    );
    assert!(took < Duration::from_secs(5), "left rotation in {took:?}");
    assert!(
        took >= Duration::from_millis(100),
        "left rotation only after probes failed: {took:?}"
    );
    assert!(
        apilb.wait_log("backend down", Duration::from_secs(5)),
        "log:\n{}",
        apilb.log_text()
    );

    // It comes back: after rise = 2 probes it serves again.
    servers[1] = Some(EchoServer::start(t.master_ns(dead), dead, LIFETIME));
    let (by, _) = wait_for(&t, 30, Duration::from_secs(5), |m, _| m.contains_key(dead));
    assert!(by.contains_key(dead), "{dead} rejoined: {by:?}");

    every_master_dies_then_returns(&t, &mut servers, &apilb);

    reloads(&t, &apilb, &config, &instance);

    sigkill_restart_and_sigterm(&t, apilb, &config, &files.0, pins);
}
