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

/// The prefix of the series only an apilb with `[discovery]` serves.
pub const DISCOVERY: &str = "apilb_discovery_";

/// The series the rules name that `metrics` (Prometheus text) has no sample of,
/// but for discovery's ([`missing_discovery_from`]).
#[must_use]
pub fn missing_from(metrics: &str) -> Vec<String> {
    missing(metrics, |name| !name.starts_with(DISCOVERY))
}

/// [`missing_from`] for discovery's series, which an apilb with `[discovery]`
/// serves.
#[must_use]
pub fn missing_discovery_from(metrics: &str) -> Vec<String> {
    missing(metrics, |name| name.starts_with(DISCOVERY))
}

fn missing(metrics: &str, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    series_named()
        .into_iter()
        .filter(|name| wanted(name))
        .filter(|name| {
            !metrics.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
        })
        .collect()
}
