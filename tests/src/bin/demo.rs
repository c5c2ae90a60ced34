//! `cargo xtask demo`: apilb doing its job on a topology of its own.
//!
//! Network namespaces (client, LB node, a master namespace with three apiserver
//! addresses; see `tests::live`), three TLS stub apiservers, and `apilb run` with
//! its default health probes (https `/readyz` every 500 ms, fall 2). It spreads
//! requests over the masters, opens 30 watch streams, kills a master with SIGKILL,
//! reports how long until every new request succeeded again and how many streams on
//! the surviving masters broke, brings the master back, and removes everything.
//! All traffic stays inside the namespaces.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tests::{
    cluster::{MASTERS, Topology, VIP, VIP_ADDR, apilb_config},
    live::{Apilb, PinDir, https_via_vip, master_names, stub_apiserver},
    netns::Netns,
    pki::Pki,
};

const STREAMS: usize = 30;

fn bar(n: usize, total: usize) -> String {
    "#".repeat((n * 40).div_ceil(total.max(1)))
}

fn spread(client: &Netns, ca: &Path, n: usize) -> (BTreeMap<String, usize>, usize) {
    let mut by = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match https_via_vip(client, ca, "/version") {
            Some(m) => *by.entry(m).or_insert(0) += 1,
            None => failed += 1,
        }
    }
    (by, failed)
}

fn show(title: &str, by: &BTreeMap<String, usize>, failed: usize) {
    let total: usize = by.values().sum::<usize>() + failed;
    println!("  {title}");
    for (m, n) in by {
        println!("    {m:<9} {n:>4}  {}", bar(*n, total));
    }
    if failed > 0 {
        println!("    failed    {failed:>4}");
    }
}

/// A `curl -N` watch stream through the VIP, its headers written to a file so we
/// know which master serves it.
struct Watch {
    child: Child,
    headers: PathBuf,
}

impl Watch {
    fn open(client: &Netns, ca: &Path, headers: PathBuf) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", client.name(), "curl", "-sN", "--cacert"])
            .arg(ca)
            .arg("-D")
            .arg(&headers)
            .arg(format!(
                "https://{VIP}/api/v1/namespaces/default/pods?watch=1"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl watch");
        Self { child, headers }
    }

    fn master(&self) -> Option<String> {
        let h = std::fs::read_to_string(&self.headers).ok()?.to_lowercase();
        h.lines()
            .find_map(|l| l.strip_prefix("x-apiserver: "))
            .map(|n| n.trim().to_owned())
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// apilb's config for the demo: defaults everywhere but the topology's facts.
fn write_config(dir: &Path, pins: &PinDir, pki: &Pki) -> PathBuf {
    let config = dir.join("apilb.toml");
    let text = apilb_config(
        &pins.instance(),
        "",
        &format!("ca_file = \"{}\"", pki.ca_pem.display()),
    );
    std::fs::write(&config, &text).expect("config");
    println!(
        "config ({}):\n{}",
        config.display(),
        text.lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    config
}

/// After a master was killed: keep sending requests until 2 s pass without a
/// failure, then report how long that took and which watch streams broke.
fn failover(client: &Netns, ca: &Path, watches: &mut [Watch]) {
    let killed_at = Instant::now();
    let (mut failures, mut last_failure) = (0usize, None::<Duration>);
    while killed_at.elapsed() < Duration::from_secs(6) {
        for _ in 0..5 {
            if https_via_vip(client, ca, "/version").is_none() {
                failures += 1;
                last_failure = Some(killed_at.elapsed());
            }
        }
        // Done once 2 s have passed without a failure.
        if last_failure.is_none_or(|f| killed_at.elapsed() > f + Duration::from_secs(2))
            && killed_at.elapsed() > Duration::from_secs(2)
        {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let recovered = last_failure.unwrap_or_default();
    let (mut broken_survivors, mut broken_dead) = (0, 0);
    for w in watches.iter_mut() {
        let on_dead = w.master().as_deref() == Some("master-2");
        if !w.alive() {
            if on_dead {
                broken_dead += 1;
            } else {
                broken_survivors += 1;
            }
        }
    }
    println!(
        "   every new request succeeds again {:.2} s after the kill ({failures} failed before that)",
        recovered.as_secs_f64()
    );
    println!(
        "   watch streams broken on the surviving masters: {broken_survivors} (on master-2 itself: {broken_dead})"
    );
}

fn main() {
    let started = Instant::now();
    println!(
        "apilb demo: a client, an LB node running apilb, three TLS apiservers, all in network namespaces\n"
    );
    let t = Topology::new("apilb-demo");
    let dir = std::env::temp_dir().join(format!("apilb-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let pki = Pki::generate(&dir, &master_names(), &[VIP_ADDR.parse().expect("vip")]);
    let mut masters: Vec<Option<_>> = (0..3)
        .map(|i| Some(stub_apiserver(&t, &pki, &dir, MASTERS[i])))
        .collect();
    let pins = PinDir::new("demo");
    let config = write_config(&dir, &pins, &pki);
    let apilb = Apilb::start(t.lb(), &config, &dir.join("apilb.log"));
    assert!(
        apilb.wait_log("XDP attached", Duration::from_secs(15)),
        "apilb did not start:\n{}",
        apilb.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while https_via_vip(&t.client, &pki.ca_pem, "/version").is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    println!(
        "\n1. New connections through the VIP https://{VIP} spread over the masters (Maglev):"
    );
    let (mut total, mut failed_total) = (BTreeMap::new(), 0);
    for round in 1..=3 {
        let (by, failed) = spread(&t.client, &pki.ca_pem, 30);
        for (m, n) in by {
            *total.entry(m).or_insert(0) += n;
        }
        failed_total += failed;
        show(
            &format!("after {} requests:", round * 30),
            &total,
            failed_total,
        );
    }

    println!("\n2. {STREAMS} long-lived watch streams (like kubelets) open through the VIP.");
    let mut watches: Vec<Watch> = (0..STREAMS)
        .map(|i| {
            Watch::open(
                &t.client,
                &pki.ca_pem,
                dir.join(format!("watch-{i}.headers")),
            )
        })
        .collect();
    thread::sleep(Duration::from_millis(800));
    let mut per_master = BTreeMap::new();
    for w in &watches {
        *per_master
            .entry(w.master().unwrap_or_else(|| "?".into()))
            .or_insert(0) += 1;
    }
    println!("   streams per master: {per_master:?}");

    println!("\n3. master-2 is killed (SIGKILL). New requests keep coming, 5 every 100 ms:");
    drop(masters[1].take());
    failover(&t.client, &pki.ca_pem, &mut watches);
    let (by, failed) = spread(&t.client, &pki.ca_pem, 30);
    show("30 new requests now:", &by, failed);

    println!("\n4. master-2 comes back; after its readiness probes pass (rise 2) it rejoins:");
    masters[1] = Some(stub_apiserver(&t, &pki, &dir, MASTERS[1]));
    let back_at = Instant::now();
    let mut by = BTreeMap::new();
    while back_at.elapsed() < Duration::from_secs(10) {
        let (b, _) = spread(&t.client, &pki.ca_pem, 15);
        if b.contains_key("master-2") {
            by = b;
            break;
        }
    }
    println!(
        "   master-2 serving again {:.2} s after it restarted",
        back_at.elapsed().as_secs_f64()
    );
    show("15 new requests:", &by, 0);

    drop(watches);
    drop(apilb);
    drop(pins);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\ndone in {:.0} s; namespaces, pins and processes removed.",
        started.elapsed().as_secs_f64()
    );
    let _ = std::io::stdout().flush();
}
