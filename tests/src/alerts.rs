//! The Prometheus alerting rules apilb ships (`docs/apilb-alerts.yaml`), as the
//! tests hold them: the apilb series their expressions name, which a real apilb's
//! `/metrics` must serve, or the alert could never fire.

use std::{collections::BTreeSet, path::PathBuf};

/// The rules file.
#[must_use]
pub fn rules_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/apilb-alerts.yaml")
}

/// Every `apilb_*` series name in the rules' expressions.
#[must_use]
pub fn series_named() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(rules_path()).expect("read the alerting rules");
    let mut names = BTreeSet::new();
    for expr in rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")) {
        let mut rest = expr;
        while let Some(at) = rest.find("apilb_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// The series the rules name that `metrics` (Prometheus text) has no sample of.
#[must_use]
pub fn missing_from(metrics: &str) -> Vec<String> {
    series_named()
        .into_iter()
        .filter(|name| {
            !metrics.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
        })
        .collect()
}
