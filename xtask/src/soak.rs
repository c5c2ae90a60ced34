//! `cargo xtask soak [--minutes N]`: apilb under a bounded load of new
//! connections (5,000 a second, three ways of closing, IPv4 and IPv6), long
//! watch streams and a flapping master, asserted at the end. The scenario is
//! `tests/src/bin/soak.rs`, release-built like the benchmarks, since the load
//! needs an optimised client to reach its rate on two vCPUs.

use crate::{build_with_apilb, exec, step, tests_bin};

/// Build apilb, the stub apiserver and the soak (release), then run the soak for
/// `minutes`.
pub fn run(minutes: u32) -> anyhow::Result<()> {
    step("building apilb, the stub apiserver and the soak (release)");
    build_with_apilb("soak")?;
    step(&format!("running the soak for {minutes} min"));
    let minutes = minutes.to_string();
    exec(tests_bin("soak").args(["--", "--minutes", &minutes]))
}
