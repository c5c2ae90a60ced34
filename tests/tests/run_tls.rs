//! `apilb run` against TLS apiservers: three stub apiservers (certificates from a
//! CA made for the test, SANs for their address and the VIP) in the master
//! namespaces, apilb probing `GET /readyz` over https with that CA every 100 ms, and
//! real `curl --cacert` requests through the VIP from the client namespace. A master
//! whose /readyz fails leaves rotation after `fall` probes and returns after `rise`.
//! Root.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{Topology, VIP_ADDR, apilb_config},
    live::{Apilb, PinDir, https_via_vip, master_names, stub_apiservers},
    netns::Netns,
    pki::Pki,
};

/// `n` https requests through the VIP, each on a new connection: how many each
/// master answered, and how many failed.
fn spread(client: &Netns, ca: &Path, n: usize) -> (HashMap<String, usize>, usize) {
    let mut by = HashMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match https_via_vip(client, ca, "/version") {
            Some(name) => *by.entry(name).or_insert(0) += 1,
            None => failed += 1,
        }
    }
    (by, failed)
}

fn wait_spread(
    client: &Netns,
    ca: &Path,
    limit: Duration,
    pred: impl Fn(&HashMap<String, usize>, usize) -> bool,
) -> (HashMap<String, usize>, usize) {
    let deadline = Instant::now() + limit;
    loop {
        let (by, failed) = spread(client, ca, 20);
        if pred(&by, failed) || Instant::now() > deadline {
            return (by, failed);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_master_whose_readyz_fails_leaves_rotation_and_returns_over_https_probes() {
    let t = Topology::new("apilb-tls");
    let dir = std::env::temp_dir().join(format!("apilb-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let _cleanup = scopeguard(dir.clone());
    let pki = Pki::generate(&dir, &master_names(), &[VIP_ADDR.parse().expect("vip")]);
    let _stubs = stub_apiservers(&t, &pki, &dir);
    let pins = PinDir::new("test-tls");
    let instance = pins.instance();
    let text = apilb_config(
        &instance,
        "nat_ports = [40000, 40999]\nmaglev_size = 1009",
        &format!(
            "kind = \"https\"\npath = \"/readyz\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\n\
             jitter = 0.0\nca_file = \"{}\"",
            pki.ca_pem.display()
        ),
    );
    let config = dir.join("apilb.toml");
    std::fs::write(&config, text).expect("config");
    let apilb = Apilb::start(t.lb(), &config, &dir.join("apilb.log"));

    let (by, failed) = wait_spread(&t.client, &pki.ca_pem, Duration::from_secs(15), |b, f| {
        f == 0 && b.len() == 3
    });
    assert_eq!(
        (by.len(), failed),
        (3, 0),
        "all three masters answer over TLS: {by:?}\n{}",
        apilb.log_text()
    );

    // master-2's /readyz starts failing (HTTP 500): it leaves rotation.
    let fail = dir.join("master-2").join("readyz-fail");
    std::fs::write(&fail, "").expect("fail readyz");
    let started = Instant::now();
    let (by, failed) = wait_spread(&t.client, &pki.ca_pem, Duration::from_secs(5), |b, f| {
        f == 0 && !b.contains_key("master-2")
    });
    let took = started.elapsed();
    eprintln!("master-2 out of rotation {took:?} after its /readyz began failing; spread {by:?}");
    assert!(
        !by.contains_key("master-2") && failed == 0,
        "{by:?}, {failed} failed"
    );
    assert!(
        apilb.wait_log("http status 500", Duration::from_secs(2)),
        "the reason is logged:\n{}",
        apilb.log_text()
    );

    // It is ready again: back in rotation after rise probes.
    std::fs::remove_file(&fail).expect("ready again");
    let (by, _) = wait_spread(&t.client, &pki.ca_pem, Duration::from_secs(5), |b, _| {
        b.contains_key("master-2")
    });
    assert!(by.contains_key("master-2"), "master-2 rejoined: {by:?}");
}

/// Removes the test's temporary directory on drop.
fn scopeguard(dir: PathBuf) -> impl Drop {
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    Rm(dir)
}
