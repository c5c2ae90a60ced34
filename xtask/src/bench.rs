//! `cargo xtask bench <part>`: benchmarks print tables; they never assert targets.
//!
//! Each part is a release binary of the `tests` crate, which holds the harness the
//! measurement needs (namespaces, packet builders, the provisioned datapath).

use clap::Subcommand;

use crate::{cargo, exec, step};

#[derive(Subcommand, Clone, Copy)]
pub enum Part {
    /// ns per packet through `BPF_PROG_TEST_RUN` for four paths, against `XDP_DROP`.
    Xdp,
    /// Maglev table build and delta times for M = 65537 and N = 3, 100, 1000.
    Maglev,
    /// The controller's idle CPU and RSS with three masters probed every 500 ms.
    Controller,
    /// VIP failover time between two LB nodes: apilb VRRP at 100 ms and 1 s
    /// adverts, apilb etcd, and keepalived at its defaults; 10 trials each. Then
    /// (`bench-masters`) what clients see when a master's apiserver is killed or its
    /// host goes silent, behind apilb, haproxy (kubeadm's HA guide config and its
    /// defaults) and iptables DNAT; 3 trials each.
    Failover,
    /// New connections from the LB node itself (connect, first byte, close, 4
    /// workers): node-local mode's socket-LB to the VIP against a direct connect to
    /// one master and kubespray's nginx stream proxy on localhost; connections/s and
    /// p50/p99 connect + first-byte latency, as ratios to direct.
    Local,
}

pub fn run(part: Part) -> anyhow::Result<()> {
    let bins: &[&str] = match part {
        Part::Xdp => &["bench-xdp"],
        Part::Maglev => &["bench-maglev"],
        Part::Controller => {
            build_apilb_and_stub()?;
            &["bench-controller"]
        }
        Part::Failover => {
            build_apilb_and_stub()?;
            &["bench-failover", "bench-masters"]
        }
        Part::Local => {
            build_apilb_and_stub()?;
            &["bench-local"]
        }
    };
    for bin in bins {
        step(&format!("running {bin} (release build)"));
        exec(cargo().args(["run", "--quiet", "--release", "-p", "tests", "--bin", bin]))?;
    }
    Ok(())
}

fn build_apilb_and_stub() -> anyhow::Result<()> {
    step("building apilb and the stub apiserver (release), which the benchmark runs");
    for (package, bin) in [("lb-userspace", "apilb"), ("tests", "stub-apiserver")] {
        exec(cargo().args(["build", "--quiet", "--release", "-p", package, "--bin", bin]))?;
    }
    Ok(())
}
