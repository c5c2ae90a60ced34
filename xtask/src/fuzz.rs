//! `cargo xtask fuzz [--frames N] [--seed S]`: the XDP program through
//! `BPF_PROG_TEST_RUN` against its reference model (`tests/src/model/`), 10^6
//! frames by default. Release-built, as the benchmarks are: the model and the
//! generator must not dominate the kernel's time per frame.

use crate::{cargo, exec, step};

/// Build the fuzzer (release) and run it.
pub fn run(frames: u64, seed: Option<u64>) -> anyhow::Result<()> {
    step("building the fuzzer (release)");
    exec(cargo().args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "tests",
        "--bin",
        "fuzz",
    ]))?;
    step(&format!("fuzzing the XDP program with {frames} frames"));
    let frames = frames.to_string();
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "tests",
        "--bin",
        "fuzz",
        "--",
        "--frames",
        &frames,
    ]);
    if let Some(seed) = seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    exec(&mut cmd)
}
