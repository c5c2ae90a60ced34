//! apilb as deployed with least privilege: a non-root user (`tests::least::UID`,
//! no passwd entry) holding exactly the capabilities of
//! `lb_userspace::privilege::CAPABILITIES`, pinning into the directory that the
//! documented root pre-step (`privilege::pin_dir_commands`) gave it. It passes the
//! root scenarios with the same numbers: end to end through the VIP with a master
//! out and back (`run.rs`), node-local mode (`local.rs`), a VRRP VIP moving
//! between two nodes (`election_vrrp.rs`). Each capability is shown needed:
//! without it `apilb run` refuses to start, naming it; capabilities held only in
//! a user namespace get past that check, and the kernel's refusal says why. Pins
//! are 0600 and their directories 0700, all the user's, and a bpffs apilb mounts
//! is not world-writable. Root (to drop privileges).
//!
//! `APILB_TEST_LEAST_PRIVILEGE=1 cargo test -p tests --test run --test local ...`
//! runs any other suite the same way.

use std::{
    collections::HashMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::Output,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use lb_userspace::privilege::{CAP_NET_ADMIN, CAPABILITIES, Capability};
use tests::{
    cluster::{LB_DEV, MASTERS, Topology, VIP, VIP_ADDR, apilb_config},
    elect::{VrrpVip, node_config, vrrp_vip},
    fixture::sa,
    least,
    live::{Apilb, EchoServer, PinDir, TempDir},
    netns::Netns,
    nodelocal::Local,
};

/// One at a time: each measures failover or spread on two shared CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    least::enable();
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `apilb <args>` in `ns`, as [`least::UID`] holding `caps` only.
fn apilb_as(ns: &Netns, caps: &[Capability], args: &[&str]) -> Output {
    std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args(least::setpriv(caps))
        .arg(tests::live::apilb_bin())
        .args(args)
        .output()
        .expect("run apilb")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn without_any_one_capability_apilb_run_refuses_to_start_naming_it() {
    let _serial = serial();
    let ns = Netns::new("apilb-pv-caps");
    // The config is checked first: its interface must exist.
    ns.ip(&[
        "link", "add", LB_DEV, "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["link", "set", LB_DEV, "up"]);
    let dir = TempDir::new("apilb-pv-caps");
    let instance = format!("apilb-pv-caps-{}", std::process::id());
    let config = dir.0.join("apilb.toml");
    // A VRRP VIP: CAP_NET_RAW is needed only for elected VIPs.
    let vip = vrrp_vip(VrrpVip {
        addr: VIP_ADDR,
        vrid: 51,
        priority: 100,
    });
    std::fs::write(&config, node_config(0, &instance, &[vip], "")).expect("config");
    let config = config.to_str().expect("utf-8 path");
    for cap in CAPABILITIES {
        let others: Vec<Capability> = CAPABILITIES
            .iter()
            .filter(|c| c.name != cap.name)
            .copied()
            .collect();
        let out = apilb_as(&ns, &others, &["run", "-c", config]);
        let said = text(&out);
        eprintln!(
            "least privilege: without {}: exit {:?}: {}",
            cap.name,
            out.status.code(),
            said.trim()
        );
        assert_eq!(out.status.code(), Some(1), "{said}");
        let (lacks, _) = said.split_once("; grant exactly").expect("the refusal");
        assert!(
            lacks.contains(&format!(
                "lacks {}, needed for {}",
                cap.name, cap.needed_for
            )),
            "{said}"
        );
        for other in &others {
            assert!(
                !lacks.contains(other.name),
                "only {} lacks: {said}",
                cap.name
            );
        }
        assert!(
            !lb_userspace::loader::pin_dir(&instance).exists(),
            "refused before touching anything"
        );
    }
}

/// Every entry under `dir`: directories 0700, pins 0600, all [`least::UID`]'s.
/// Returns (directories, pins) counted.
fn assert_private(dir: &Path) -> (usize, usize) {
    let (mut dirs, mut pins) = (1, 0);
    let meta = std::fs::metadata(dir).expect("pin dir");
    assert_eq!(
        (meta.permissions().mode() & 0o7777, meta.uid()),
        (0o700, least::UID),
        "{}",
        dir.display()
    );
    for entry in std::fs::read_dir(dir).expect("pin dir").flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).expect("metadata");
        if meta.file_type().is_dir() {
            let (d, p) = assert_private(&entry.path());
            dirs += d;
            pins += p;
        } else if meta.file_type().is_file() {
            assert_eq!(
                (meta.permissions().mode() & 0o7777, meta.uid()),
                (0o600, least::UID),
                "{}",
                entry.path().display()
            );
            pins += 1;
        }
    }
    (dirs, pins)
}

/// The capabilities process `pid` holds in its effective set, as `capsh` names
/// them, sorted.
fn effective(pid: i32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    tests::least::decode_caps(&tests::least::status_field(&status, "CapEff:"))
        .into_iter()
        .collect()
}

fn wait_for(
    t: &Topology,
    limit: Duration,
    pred: impl Fn(&HashMap<String, usize>, usize) -> bool,
) -> (HashMap<String, usize>, usize) {
    let deadline = Instant::now() + limit;
    loop {
        let (m, f) = tests::live::spread(&t.client, sa(VIP), 30);
        if pred(&m, f) || Instant::now() > deadline {
            return (m, f);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `apilb` runs as [`least::UID`] holding exactly [`CAPABILITIES`], and its
/// pins under `pins` are private.
fn assert_least_privileged(apilb: &Apilb, pins: &Path) {
    let uid = std::fs::metadata(format!("/proc/{}", apilb.pid()))
        .expect("apilb's /proc")
        .uid();
    let mut want: Vec<String> = CAPABILITIES
        .iter()
        .map(|c| c.name.to_ascii_lowercase())
        .collect();
    want.sort();
    let held = effective(apilb.pid());
    eprintln!("least privilege: apilb runs as uid {uid} holding {held:?}");
    assert_eq!((uid, held), (least::UID, want));
    let (dirs, pinned) = assert_private(pins);
    eprintln!("least privilege: {dirs} directories 0700 and {pinned} pins 0600, uid {uid}'s");
    assert!(pinned > 10, "the maps and the XDP link: {pinned}");
}

/// `apilb <args>` as [`least::UID`] without `CAP_NET_ADMIN` fails naming it, and
/// removes nothing from `pins`.
fn refused_without_net_admin(ns: &Netns, args: &[&str], pins: &Path) {
    let no_admin: Vec<Capability> = CAPABILITIES
        .iter()
        .filter(|c| c.name != CAP_NET_ADMIN)
        .copied()
        .collect();
    let out = apilb_as(ns, &no_admin, args);
    let said = text(&out);
    eprintln!(
        "least privilege: detach without CAP_NET_ADMIN: {}",
        said.trim()
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("denied: apilb lacks {CAP_NET_ADMIN}, needed for")),
        "{said}"
    );
    assert!(pins.exists(), "nothing removed");
}

#[test]
fn non_root_balances_through_the_vip_follows_a_master_out_and_back_and_pins_privately() {
    let _serial = serial();
    let t = Topology::new("apilb-pv-run");
    let pins = PinDir::new("apilb-pv-run");
    let dir = TempDir::new("apilb-pv-run");
    let mut servers: Vec<Option<EchoServer>> = MASTERS
        .iter()
        .map(|m| Some(EchoServer::start(t.master_ns(m), m, Duration::from_mins(2))))
        .collect();
    let config = dir.0.join("apilb.toml");
    let text_of = apilb_config(
        &pins.instance(),
        "nat_ports = [40000, 40999]\nmaglev_size = 1009",
        "kind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\njitter = 0.0",
    );
    std::fs::write(&config, text_of).expect("config");
    let sysctl = |name: &str| t.lb().exec("sysctl", &["-n", name]).trim().to_owned();
    let accept_local = format!("net.ipv4.conf.{LB_DEV}.accept_local");
    let before = (
        sysctl(&accept_local),
        sysctl("net.ipv4.ip_local_reserved_ports"),
    );
    let mut apilb = Apilb::start(t.lb(), &config, &dir.0.join("apilb.log"));
    let (by, failed) = wait_for(&t, Duration::from_secs(15), |m, f| f == 0 && m.len() == 3);
    assert_eq!((by.len(), failed), (3, 0), "{by:?}\n{}", apilb.log_text());

    assert_least_privileged(&apilb, &pins.0);
    assert_eq!(
        (
            sysctl(&accept_local),
            sysctl("net.ipv4.ip_local_reserved_ports")
        ),
        ("1".to_owned(), "40000-40999".to_owned()),
        "the net sysctls, written with CAP_NET_ADMIN"
    );

    // A master out (its port closes) and back, as in run.rs.
    let dead = MASTERS[1];
    drop(servers[1].take());
    let started = Instant::now();
    let (by, failed) = wait_for(&t, Duration::from_secs(5), |m, f| {
        f == 0 && !m.contains_key(dead)
    });
    let left = started.elapsed();
    assert!(
        !by.contains_key(dead) && failed == 0,
        "{by:?}, {failed} failed"
    );
    servers[1] = Some(EchoServer::start(
        t.master_ns(dead),
        dead,
        Duration::from_mins(2),
    ));
    let back = Instant::now();
    let (by, _) = wait_for(&t, Duration::from_secs(5), |m, _| m.contains_key(dead));
    eprintln!(
        "least privilege: {dead} out of rotation {left:?} after its port closed, back {:?} \
         after it reopened: {by:?}",
        back.elapsed()
    );
    assert!(by.contains_key(dead), "{dead} rejoined: {by:?}");

    apilb.signal(libc::SIGTERM);
    assert_eq!(
        apilb.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        apilb.log_text()
    );
    // Detach as the same user: without CAP_NET_ADMIN the sysctls cannot be put
    // back, which it says, changing nothing; with it, everything goes back.
    let instance = pins.instance();
    let detach = ["detach", "--instance", instance.as_str()];
    refused_without_net_admin(t.lb(), &detach, &pins.0);
    let out = apilb_as(t.lb(), CAPABILITIES, &detach);
    let said = text(&out);
    eprintln!("least privilege: detach: {}", said.trim());
    assert!(out.status.success(), "{said}");
    assert_eq!(
        (
            sysctl(&accept_local),
            sysctl("net.ipv4.ip_local_reserved_ports")
        ),
        before,
        "detach put the sysctls back"
    );
}

#[test]
fn non_root_node_local_mode_spreads_the_nodes_own_connects_within_ten_percent() {
    const N: usize = 3000;
    let _serial = serial();
    let local = Local::start("apilb-pv-local");
    local.assert_even_spread("least privilege: local", N);
    let socket_links = std::fs::read_dir(&local.pins.0)
        .expect("pins")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sock-"))
        .count();
    assert_eq!(
        socket_links, 4,
        "the cgroup links, pinned by the non-root user"
    );
}

#[test]
fn non_root_vrrp_moves_the_vip_to_the_other_node_and_back() {
    let _serial = serial();
    let (takeover, preemption) =
        tests::elect::vrrp_kill_and_preempt("apilb-pv-vrrp", Duration::from_secs(5));
    eprintln!("least privilege: vrrp: taken over in {takeover:?}, preempted in {preemption:?}");
}

#[test]
fn capabilities_held_only_in_a_user_namespace_pass_the_start_check_and_the_kernel_refusal_says_why()
{
    let _serial = serial();
    let pins = PinDir::new("apilb-pv-userns");
    let dir = TempDir::new("apilb-pv-userns");
    let config = dir.0.join("apilb.toml");
    let text_of = apilb_config(
        &pins.instance(),
        "nat_ports = [40000, 40999]",
        "kind = \"tcp\"",
    )
    .replace(&format!("[\"{LB_DEV}\"]"), "[\"lo\"]");
    std::fs::write(&config, text_of).expect("config");
    // Root of a new user namespace, with a network namespace of its own: every
    // capability there, none that counts for bpf(2).
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net"])
        .arg(tests::live::apilb_bin())
        .args(["run", "-c", config.to_str().expect("utf-8")])
        .output()
        .expect("unshare");
    let said = text(&out);
    let refusal = said.lines().last().unwrap_or_default();
    eprintln!("least privilege: in a user namespace: {refusal}");
    assert!(!out.status.success(), "{said}");
    assert!(
        refusal.contains("loading the eBPF object into the kernel failed; denied although apilb holds CAP_BPF, CAP_NET_ADMIN: capabilities held in a user namespace do not count"),
        "{said}"
    );
}

/// A bpffs mount that is removed on drop.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_bpffs_apilb_mounts_itself_is_not_world_writable() {
    let dir = TempDir::new("apilb-pv-bpffs");
    let mounted = lb_userspace::loader::ensure_bpffs(&dir.0).expect("mount bpffs");
    let _mount = Mounted(dir.0.clone());
    assert!(mounted, "a tmp directory is no bpffs: apilb mounts one");
    let mode = std::fs::metadata(&dir.0)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    eprintln!("least privilege: bpffs mounted by apilb has mode {mode:o}");
    assert_eq!(
        mode & 0o077,
        0,
        "neither group nor others may enter: {mode:o}"
    );
    assert!(
        !lb_userspace::loader::ensure_bpffs(&dir.0).expect("statfs"),
        "mounted once only"
    );
}
