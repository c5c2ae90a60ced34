//! Running `apilb` as deployed with least privilege: as a non-root user holding
//! exactly `lb_userspace::privilege::CAPABILITIES`, pinning into an instance
//! directory that the documented root pre-step (`privilege::pin_dir_commands`)
//! gave it. [`crate::live::Apilb`] starts apilb so when [`enabled`]: set by
//! [`enable`] (`tests/least_privilege.rs`), or by `APILB_TEST_LEAST_PRIVILEGE=1`
//! to run any suite of scenarios non-root.

use std::{
    collections::BTreeSet,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use lb_userspace::privilege::Capability;

/// The user and group apilb runs as: a number with no passwd entry, so that there
/// is nothing to create or remove.
pub const UID: u32 = 61_723;

static ON: AtomicBool = AtomicBool::new(false);

/// Field `key` (`CapEff:`, `Uid:`) of a process's `/proc/<pid>/status`, trimmed.
#[must_use]
pub fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in:\n{status}"))
        .trim()
        .to_owned()
}

/// The capabilities in a status mask (`000000c000003000`), as `capsh --decode`
/// names them: `cap_bpf`, ...
#[must_use]
pub fn decode_caps(mask: &str) -> BTreeSet<String> {
    let out = crate::netns::run("capsh", &[&format!("--decode={mask}")]);
    out.trim()
        .split_once('=')
        .map_or("", |(_, names)| names)
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Start every later `Apilb` of this process with least privilege.
pub fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Whether `Apilb` starts apilb with least privilege.
#[must_use]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
        || std::env::var("APILB_TEST_LEAST_PRIVILEGE").is_ok_and(|v| v == "1")
}

/// `setpriv` and its arguments, up to the command: run it as [`UID`] holding
/// `caps` and nothing else, in every set (so neither it nor a child can gain
/// another).
#[must_use]
pub fn setpriv(caps: &[Capability]) -> Vec<String> {
    let list: String = caps
        .iter()
        .flat_map(|c| [",+".to_owned(), c.setpriv_name()])
        .collect();
    vec![
        "setpriv".to_owned(),
        format!("--reuid={UID}"),
        format!("--regid={UID}"),
        "--clear-groups".to_owned(),
        format!("--inh-caps=-all{list}"),
        format!("--ambient-caps=-all{list}"),
        format!("--bounding-set=-all{list}"),
        // The kernel clears the parent-death signal when the user changes.
        "--pdeathsig=keep".to_owned(),
        "--".to_owned(),
    ]
}

/// The documented root pre-step, and the instance directory of the config at
/// `config` made [`UID`]'s should a root apilb have left it (a test switching).
pub fn prepare(config: &Path) {
    let owner = format!("{UID}:{UID}");
    for cmd in lb_userspace::privilege::pin_dir_commands(&owner) {
        crate::netns::run("sh", &["-c", &cmd]);
    }
    let (c, _) = lb_userspace::config::Config::load_offline(config)
        .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    let dir = lb_userspace::loader::pin_dir(&c.instance);
    if dir.exists() {
        crate::netns::run("chown", &["-R", &owner, dir.to_str().expect("utf-8")]);
    }
}
