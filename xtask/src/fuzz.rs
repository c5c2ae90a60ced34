//! `cargo xtask fuzz [--frames N] [--seed S]`: the XDP program through
//! `BPF_PROG_TEST_RUN` against its reference model (`tests/src/model/`), 10^6
//! frames by default. Release-built, as the benchmarks are: the model and the
//! generator must not dominate the kernel's time per frame.

use crate::{exec, step, tests_bin};

/// Build the fuzzer (release) and run it.
pub fn run(frames: u64, seed: Option<u64>) -> anyhow::Result<()> {
    step(&format!(
        "building the fuzzer (release), then fuzzing the XDP program with {frames} frames"
    ));
    let frames = frames.to_string();
    let mut cmd = tests_bin("fuzz");
    cmd.args(["--", "--frames", &frames]);
    if let Some(seed) = seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    exec(&mut cmd)
}
