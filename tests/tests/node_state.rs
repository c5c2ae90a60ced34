//! What `apilb run` changes on the node, and `apilb detach` puts back, measured
//! in the LB node's namespace (net sysctls are per namespace):
//! `accept_local` on the datapath's interface, the NAT ports in
//! `ip_local_reserved_ports` (keeping another's reservation, even where the kernel
//! merged it with apilb's), the cgroup links of node-local mode, the pin directory
//! and `apilb/` above it. And `apilb check --offline`, for a machine that is not
//! the node. Root.

use std::time::Duration;

use tests::{
    cluster::{LB_DEV, VIP},
    fixture::sa,
    live::{Client, TempDir},
    nodelocal::Local,
};

#[test]
fn apilb_detach_restores_accept_local_and_the_reserved_ports_and_releases_the_cgroup_links() {
    let accept_local = format!("net.ipv4.conf.{LB_DEV}.accept_local");
    let reserved = "net.ipv4.ip_local_reserved_ports";
    // Another's reservation, overlapping apilb's NAT ports [30005, 31999].
    let theirs = "29000,30000-30010";
    let mut local = Local::start_custom(
        "apilb-pv-state",
        |t| {
            t.lb()
                .exec("sysctl", &["-qw", &format!("{accept_local}=0")]);
            t.lb()
                .exec("sysctl", &["-qw", &format!("{reserved}={theirs}")]);
        },
        "nat_ports = [30005, 31999]",
        "",
    );
    let lb = local.t.lb().name().to_owned();
    let sysctl = |name: &str| {
        tests::netns::run("ip", &["netns", "exec", &lb, "sysctl", "-n", name])
            .trim()
            .to_owned()
    };
    let during = (sysctl(&accept_local), sysctl(reserved));
    eprintln!("node state: while apilb runs: accept_local {during:?}");
    assert_eq!(
        during,
        ("1".to_owned(), "29000,30000-31999".to_owned()),
        "apilb set accept_local and added its ports (the kernel merges the ranges)"
    );
    local.apilb.signal(libc::SIGTERM);
    assert_eq!(local.apilb.wait(Duration::from_secs(10)), Some(0));
    // Still balancing: SIGTERM leaves the pinned datapath.
    assert!(Client::connect_to(local.t.lb(), sa(VIP)).is_ok());

    let instance = local.pins.instance();
    let said = tests::netns::run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{lb}"),
            tests::live::apilb_bin().to_str().expect("path"),
            "detach",
            "--instance",
            &instance,
        ],
    );
    eprintln!("node state: apilb detach said:\n{said}");
    let after = (sysctl(&accept_local), sysctl(reserved));
    assert_eq!(
        after,
        ("0".to_owned(), theirs.to_owned()),
        "detach put back accept_local and kept only the other's ports"
    );
    assert!(
        said.contains(&format!("restored net.ipv4.conf.{LB_DEV}.accept_local = 0")),
        "{said}"
    );
    assert!(!local.pins.0.exists(), "the pin directory is gone");
    let parent = local.pins.0.parent().expect("apilb/");
    assert!(
        !parent.exists() || std::fs::read_dir(parent).expect("apilb/").count() > 0,
        "apilb/ stays only while another instance uses it"
    );
    // The cgroup links go with their pins: the VIP, on no interface, is
    // unreachable again.
    local.wait_unbalanced();
}

/// `apilb check` with `args`, on this machine: (success, stdout + stderr).
fn check(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(tests::live::apilb_bin())
        .arg("check")
        .args(args)
        .output()
        .expect("apilb check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_offline_passes_a_config_for_another_machine_and_plain_check_names_each_key() {
    let dir = TempDir::new("apilb-pv-check");
    let write = |interface: &str, health: &str| {
        let path = dir.0.join(format!("{interface}.toml"));
        let text = format!(
            "[datapath]\ninterfaces = [\"{interface}\"]\nsnat_ipv4 = \"192.0.2.9\"\n\
             [[vip]]\naddress = \"192.0.2.100\"\n[[backend]]\naddress = \"192.0.2.11:6443\"\n\
             [health]\n{health}\n"
        );
        std::fs::write(&path, text).expect("config");
        path.to_str().expect("utf-8").to_owned()
    };
    let https = "kind = \"https\"\nca_file = \"/nonexistent/apilb-pv/ca.pem\"";
    let elsewhere = write("apilb-pv-nope0", https);

    let (ok, said) = check(&["--offline", "-c", &elsewhere]);
    eprintln!("check --offline:\n{said}");
    assert!(ok, "{said}");
    for line in [
        "health https every",
        "offline, not checked: interface \"apilb-pv-nope0\" exists: not looked up",
        "offline, not checked: health.ca_file = \"/nonexistent/apilb-pv/ca.pem\": not read",
    ] {
        assert!(said.contains(line), "{line:?} in:\n{said}");
    }

    let (ok, said) = check(&["-c", &elsewhere]);
    eprintln!("check:\n{said}");
    assert!(!ok, "{said}");
    assert!(said.contains("datapath.interfaces[0]"), "{said}");
    assert!(said.contains("apilb-pv-nope0"), "{said}");
    let (ok, said) = check(&["-c", &write("lo", https)]);
    eprintln!("check:\n{said}");
    assert!(!ok, "{said}");
    assert!(said.contains("health.ca_file"), "{said}");

    // The probe kind as the config spells it.
    let (ok, said) = check(&["-c", &write("lo", "kind = \"tcp\"")]);
    assert!(ok && said.contains("health tcp every"), "{said}");
}
