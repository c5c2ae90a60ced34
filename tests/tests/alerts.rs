//! The alerting rules apilb ships (`docs/apilb-alerts.yaml`, explained in
//! `docs/operations.md`) load in Prometheus's own checker, and each alert fires
//! when, and only when, `tests/promtool/apilb-alerts.test.yaml` says: a healthy
//! pair of LB nodes fires none. `promtool` comes from Debian's `prometheus`
//! package (`cargo xtask setup`). That the series they name exist in a real
//! apilb's `/metrics` is checked where two apilb nodes run VRRP and flow sync
//! (`lb_failover.rs`), and the discovery ones where apilb runs discovery
//! (`discovery.rs`).

use std::{path::PathBuf, process::Command};

fn promtool(args: &[&str]) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("promtool");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("run promtool (cargo xtask setup installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_rules_load_and_name_eighteen_alerts() {
    let rules = tests::alerts::rules_path();
    let text = promtool(&["check", "rules", rules.to_str().expect("utf-8 path")]);
    assert!(text.contains("SUCCESS: 18 rules found"), "{text}");
}

#[test]
fn each_alert_fires_exactly_when_its_unit_test_says() {
    let text = promtool(&["test", "rules", "apilb-alerts.test.yaml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_rules_name_only_apilb_series_the_operations_page_explains() {
    let page = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .expect("read docs/operations.md");
    let unexplained: Vec<String> = tests::alerts::series_named()
        .into_iter()
        .filter(|name| !page.contains(name.as_str()))
        .collect();
    assert_eq!(unexplained, Vec::<String>::new());
}
