//! The node settings the datapath changes, recorded beside its pins so that
//! `apilb detach` can put them back: `net.ipv4.conf.<interface>.accept_local`, set
//! to 1, and the NAT ports added to `net.ipv4.ip_local_reserved_ports`.
//!
//! A record lives exactly as long as the pins whose datapath needs the setting,
//! and in the same place: bpffs, which holds pins, directories and symlinks but no
//! files. So each record is a symlink in the pin directory, `node-<setting>`,
//! whose target is `<network namespace>|<value before apilb>`. Net sysctls belong
//! to a network namespace: a record is restored only in the one it was made in
//! (an `apilb detach` elsewhere leaves that setting alone and says so).
//!
//! A setting is recorded the first time apilb changes it; a restarted apilb finds
//! the record and keeps it, so what is restored is the node's own value, never
//! apilb's.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{LoaderError, Result};

/// The prefix of a record's name in the pin directory.
pub(super) const RECORD_PREFIX: &str = "node-";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const RESERVED_PORTS_RECORD: &str = "node-ip_local_reserved_ports";

fn sysctl_err(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Sysctl {
        path: path.to_owned(),
        source,
    }
}

fn accept_local_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/accept_local"))
}

/// This thread's network namespace, as `/proc` names it: `net:[4026531840]`.
fn netns() -> io::Result<String> {
    Ok(std::fs::read_link("/proc/thread-self/ns/net")?
        .to_string_lossy()
        .into_owned())
}

/// The record named `name` in `pin_dir`: (namespace, value).
fn read_record(pin_dir: &Path, name: &str) -> Option<(String, String)> {
    let target = std::fs::read_link(pin_dir.join(name)).ok()?;
    let (ns, value) = target.to_str()?.split_once('|')?;
    Some((ns.to_owned(), value.to_owned()))
}

/// Record `value` as `name`, replacing an earlier record.
fn write_record(pin_dir: &Path, name: &str, value: &str) -> Result<()> {
    let path = pin_dir.join(name);
    let err = |source| LoaderError::PinDir {
        path: path.clone(),
        source,
    };
    let ns = netns().map_err(err)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    std::os::unix::fs::symlink(format!("{ns}|{value}"), &path).map_err(err)
}

/// Set `accept_local` on `interface` (see `Programs::attach`), recording its
/// earlier value in `pin_dir` the first time. A value of 1 already (the node's own
/// sysctl config, or an earlier run) is left as it is, unwritten: a container's
/// read-only `/proc/sys` is then no obstacle, and there is nothing to put back.
pub(super) fn set_accept_local(pin_dir: Option<&Path>, interface: &str) -> Result<()> {
    let path = accept_local_path(interface);
    let before = std::fs::read_to_string(&path).map_err(sysctl_err(&path))?;
    if before.trim() == "1" {
        return Ok(());
    }
    if let Some(dir) = pin_dir {
        let name = format!("{RECORD_PREFIX}accept_local-{interface}");
        if read_record(dir, &name).is_none() {
            write_record(dir, &name, before.trim())?;
        }
    }
    std::fs::write(&path, "1").map_err(sysctl_err(&path))
}

/// Add `lo..=hi` to `net.ipv4.ip_local_reserved_ports`, keeping what is there, and
/// record in `pin_dir` the ports apilb added (those not reserved already). Returns
/// whether it changed anything.
pub(super) fn reserve_ports(pin_dir: &Path, lo: u16, hi: u16) -> Result<bool> {
    let path = Path::new(RESERVED_PORTS);
    let current = std::fs::read_to_string(path).map_err(sysctl_err(path))?;
    let mut reserved = PortSet::parse(&current).map_err(sysctl_err(path))?;
    let mut added = match read_record(pin_dir, RESERVED_PORTS_RECORD) {
        Some((_, ports)) => PortSet::parse(&ports).map_err(sysctl_err(path))?,
        None => PortSet::default(),
    };
    let mut changed = false;
    for port in lo..=hi {
        if !reserved.contains(port) {
            reserved.insert(port);
            added.insert(port);
            changed = true;
        }
    }
    if changed {
        // Recorded first: a crash between the two leaves a record of ports not
        // reserved, which a detach removes harmlessly, rather than the reverse.
        write_record(pin_dir, RESERVED_PORTS_RECORD, &added.to_string())?;
        std::fs::write(path, reserved.to_string()).map_err(sysctl_err(path))?;
    }
    Ok(changed)
}

/// Put back every setting recorded in `pin_dir`, in this network namespace.
/// Returns what it did and what it left, one line each, for `apilb detach` to
/// print. A failure to write changes nothing further: the records stay for a
/// retry.
pub(super) fn restore(pin_dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (mut restored, mut left) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok((restored, left));
    };
    let here = netns().ok();
    let mut records: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(RECORD_PREFIX))
        .collect();
    records.sort();
    for name in records {
        let Some((ns, value)) = read_record(pin_dir, &name) else {
            continue;
        };
        if here.as_deref() != Some(ns.as_str()) {
            left.push(format!(
                "{name}: recorded in network namespace {ns}, not this one; left as it is"
            ));
            continue;
        }
        if name == RESERVED_PORTS_RECORD {
            let path = Path::new(RESERVED_PORTS);
            let current = std::fs::read_to_string(path).map_err(sysctl_err(path))?;
            let mut reserved = PortSet::parse(&current).map_err(sysctl_err(path))?;
            let added = PortSet::parse(&value).map_err(sysctl_err(path))?;
            reserved.remove_all(&added);
            let now = reserved.to_string();
            // The kernel reads an empty write as "no change": a lone newline clears.
            std::fs::write(path, format!("{now}\n")).map_err(sysctl_err(path))?;
            restored.push(format!(
                "net.ipv4.ip_local_reserved_ports: removed {added} (now {now:?})"
            ));
        } else if let Some(interface) = name
            .strip_prefix(RECORD_PREFIX)
            .and_then(|n| n.strip_prefix("accept_local-"))
        {
            let path = accept_local_path(interface);
            if !path.exists() {
                left.push(format!(
                    "net.ipv4.conf.{interface}.accept_local: the interface is gone"
                ));
                continue;
            }
            let now = std::fs::read_to_string(&path).map_err(sysctl_err(&path))?;
            if now.trim() != value {
                std::fs::write(&path, &value).map_err(sysctl_err(&path))?;
            }
            restored.push(format!("net.ipv4.conf.{interface}.accept_local = {value}"));
        }
    }
    Ok((restored, left))
}

/// A set of ports, read and written as `ip_local_reserved_ports` spells it:
/// `40000-40999,50000`.
#[derive(Default)]
struct PortSet(Vec<bool>);

impl PortSet {
    fn parse(text: &str) -> io::Result<Self> {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a port list: {:?}", text.trim()),
            )
        };
        let mut set = Self::default();
        for range in text.trim().split(',').filter(|r| !r.is_empty()) {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
            let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
            for port in lo..=hi {
                set.insert(port);
            }
        }
        Ok(set)
    }

    fn contains(&self, port: u16) -> bool {
        self.0.get(usize::from(port)).copied().unwrap_or(false)
    }

    fn insert(&mut self, port: u16) {
        if self.0.is_empty() {
            self.0 = vec![false; usize::from(u16::MAX) + 1];
        }
        self.0[usize::from(port)] = true;
    }

    fn remove_all(&mut self, other: &Self) {
        for (port, taken) in self.0.iter_mut().enumerate() {
            if other.0.get(port).copied().unwrap_or(false) {
                *taken = false;
            }
        }
    }
}

impl std::fmt::Display for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ranges = Vec::new();
        let mut start = None;
        for (port, &taken) in self.0.iter().chain([&false]).enumerate() {
            match (taken, start) {
                (true, None) => start = Some(port),
                (false, Some(lo)) => {
                    let hi = port - 1;
                    ranges.push(if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo}-{hi}")
                    });
                    start = None;
                }
                _ => {}
            }
        }
        f.write_str(&ranges.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_round_trip_and_removal_keeps_the_ports_of_others() {
        let mut set = PortSet::parse("30000-30002,40000,65535\n").unwrap();
        assert_eq!(set.to_string(), "30000-30002,40000,65535");
        // The kernel merges adjacent ranges: apilb's and another's read back as one.
        let ours = PortSet::parse("30003-30010").unwrap();
        for port in 30_003..=30_010 {
            set.insert(port);
        }
        assert_eq!(set.to_string(), "30000-30010,40000,65535");
        set.remove_all(&ours);
        assert_eq!(set.to_string(), "30000-30002,40000,65535");
        assert_eq!(PortSet::parse("").unwrap().to_string(), "");
        assert!(PortSet::parse("1-x").is_err());
    }
}
