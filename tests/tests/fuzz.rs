//! The XDP datapath fuzzed against its reference model (`tests::model`): 50,000
//! random and mutated frames, seeded from the fixtures' frames, through
//! `BPF_PROG_TEST_RUN`, each held against the model (verdict, output bytes,
//! checksums, counters, and the flow tables entry by entry). `cargo xtask fuzz`
//! runs the long version (10^6 frames). `APILB_FUZZ_SEED` replays a run;
//! `APILB_FUZZ_FRAMES` changes its length. Needs root and BPF.

use tests::model::run::{Settings, run};

#[test]
fn the_datapath_answers_every_fuzzed_frame_as_the_model_does() {
    let frames = std::env::var("APILB_FUZZ_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let settings = Settings::new(frames, "apilb-fz-t");
    eprintln!(
        "fuzz: seed {} (APILB_FUZZ_SEED), {frames} frames",
        settings.seed
    );
    let summary = run(&settings).unwrap_or_else(|m| panic!("{m}"));
    eprintln!("{summary}");
    assert!(
        summary.findings.is_empty(),
        "the kernel's flow tables broke a first-principles check:\n{}",
        summary.findings.join("\n")
    );
}
