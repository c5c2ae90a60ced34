//! The systemd unit: apilb beside the kubelet, with exactly its capabilities and
//! every sandboxing directive that leaves it working. Each directive carries the
//! reason it is there, printed as a comment above it.
//!
//! What apilb writes decides the sandbox: pins under `/sys/fs/bpf`, and the net
//! sysctls `accept_local` and `ip_local_reserved_ports` under `/proc/sys/net`.
//! The unit makes `/sys`, `/proc/sys` and the other kernel knobs read-only and
//! gives exactly those two trees back with `ReadWritePaths=`. It does so with
//! `ReadOnlyPaths=`, not `ProtectKernelTunables=yes`: under that (systemd 252),
//! `/sys/fs/bpf`, a mount of its own below `/sys`, stays read-only whatever
//! `ReadWritePaths=` or `BindPaths=` say (found by `tests/tests/manifest.rs`).

use std::{fmt::Write as _, path::Path};

use super::{HostFile, ManifestError};
use crate::privilege::CAPABILITIES;

/// The trees apilb writes; everything else is read-only to it.
pub const WRITES: &[&str] = &[crate::loader::BPFFS, "/proc/sys/net"];
/// What `ProtectKernelTunables=yes` would make read-only (`-`: if it exists).
const KERNEL_TUNABLES: &[&str] = &[
    "/sys",
    "/proc/sys",
    "-/proc/sysrq-trigger",
    "-/proc/irq",
    "-/proc/fs",
    "-/proc/acpi",
    "-/proc/latency_stats",
    "-/proc/timer_stats",
];

struct Directive {
    key: &'static str,
    value: String,
    why: &'static str,
}

fn d(key: &'static str, value: impl Into<String>, why: &'static str) -> Directive {
    Directive {
        key,
        value: value.into(),
        why,
    }
}

/// `[Unit]`: fixed.
const UNIT: &[(&str, &str, &str)] = &[
    (
        "Description",
        "apilb: kernel (XDP) load balancer for the Kubernetes API server",
        "",
    ),
    ("Documentation", "man:apilb(1)", ""),
    (
        "Wants",
        "network-online.target",
        "The configured interfaces must exist when apilb starts.",
    ),
    ("After", "network-online.target", ""),
    (
        "Before",
        "kubelet.service",
        "The kubelet may reach the apiserver through the VIP.",
    ),
    (
        "StartLimitIntervalSec",
        "0",
        "Never give up restarting the apiserver's load balancer.",
    ),
];

/// The sandbox's directives that do not depend on the config.
const SANDBOX: &[(&str, &str, &str)] = &[
    ("RestrictNamespaces", "yes", ""),
    ("RestrictRealtime", "yes", ""),
    ("RestrictSUIDSGID", "yes", ""),
    ("LockPersonality", "yes", ""),
    (
        "MemoryDenyWriteExecute",
        "yes",
        "The BPF JIT runs in the kernel; apilb itself maps nothing executable.",
    ),
    ("SystemCallArchitectures", "native", ""),
    (
        "UMask",
        "0077",
        "Pins and anything else it creates: owner only.",
    ),
];

fn table(rows: &[(&'static str, &'static str, &'static str)]) -> Vec<Directive> {
    rows.iter()
        .map(|&(key, value, why)| d(key, value, why))
        .collect()
}

/// The unit text for `/etc/systemd/system/apilb.service`; `exe` is the binary
/// `ExecStart=` runs.
pub fn unit(files: &[HostFile], exe: &Path) -> Result<String, ManifestError> {
    let caps = CAPABILITIES
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(" ");
    let config_file = files
        .iter()
        .find(|f| f.key == "config")
        .map_or(Path::new(""), |f| f.path.as_path());
    let exec = format!(
        "{} run -c {}",
        exec_word("ExecStart", exe)?,
        exec_word("ExecStart", config_file)?
    );
    let sections = [
        ("Unit", table(UNIT)),
        (
            "Service",
            [
                d(
                    "Type",
                    "exec",
                    "Started once the binary runs (apilb does not sd_notify).",
                ),
                d("ExecStart", exec, ""),
                d(
                    "ExecReload",
                    "/bin/kill -HUP $MAINPID",
                    "SIGHUP reloads the config; a refused one changes nothing.",
                ),
                d(
                    "Restart",
                    "always",
                    "The pinned datapath keeps balancing while apilb is down; \
                     a new apilb adopts it.",
                ),
                d("RestartSec", "1s", ""),
                d(
                    "User",
                    "root",
                    "Root's uid, but only the capabilities below: no CAP_DAC_OVERRIDE, \
                     no CAP_SYS_ADMIN. Running as a user of its own is still to come.",
                ),
                d(
                    "CapabilityBoundingSet",
                    caps.clone(),
                    "Exactly what apilb run needs (apilb's privilege list).",
                ),
                d("AmbientCapabilities", caps, ""),
                d("NoNewPrivileges", "yes", ""),
            ]
            .into_iter()
            .chain(sandbox(files))
            .collect(),
        ),
        ("Install", vec![d("WantedBy", "multi-user.target", "")]),
    ];
    Ok(render(sections))
}

/// The unit as text: each directive under its reason, wrapped as a comment.
fn render<const N: usize>(sections: [(&str, Vec<Directive>); N]) -> String {
    let mut text = String::from(
        "# apilb's systemd unit, from `apilb manifest systemd`.\n\
         # Install: /etc/systemd/system/apilb.service; systemctl enable --now apilb\n",
    );
    for (name, directives) in sections {
        let _ = write!(text, "\n[{name}]\n");
        for directive in directives {
            let mut line = String::new();
            for word in directive.why.split_whitespace() {
                if !line.is_empty() && line.len() + word.len() > 76 {
                    let _ = writeln!(text, "# {line}");
                    line.clear();
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(word);
            }
            if !line.is_empty() {
                let _ = writeln!(text, "# {line}");
            }
            let _ = writeln!(text, "{}={}", directive.key, directive.value);
        }
    }
    text
}

/// The sandbox: read-only but for what apilb writes, and shut off from what it
/// does not use.
fn sandbox(files: &[HostFile]) -> Vec<Directive> {
    // A file apilb reads under /home, /root or /run/user stays readable; one under
    // /tmp or /var/tmp, which PrivateTmp would hide, keeps the node's /tmp.
    let under = |dirs: &[&str]| {
        files
            .iter()
            .any(|f| dirs.iter().any(|d| f.path.starts_with(d)))
    };
    let home = if under(&["/home", "/root", "/run/user"]) {
        "read-only"
    } else {
        "yes"
    };
    let tmp = if under(&["/tmp", "/var/tmp"]) {
        "no"
    } else {
        "yes"
    };
    let mut directives = vec![
        d(
            "ProtectSystem",
            "strict",
            "Read-only everywhere but the trees apilb writes: \
             its pins, and the net sysctls accept_local and ip_local_reserved_ports.",
        ),
        d(
            "ReadOnlyPaths",
            KERNEL_TUNABLES.join(" "),
            "The kernel's knobs, as ProtectKernelTunables=yes would; that \
             would keep /sys/fs/bpf read-only despite ReadWritePaths.",
        ),
        d("ReadWritePaths", WRITES.join(" "), ""),
        d(
            "ProtectControlGroups",
            "yes",
            "Node-local mode attaches to a cgroup by opening it; it writes nothing there.",
        ),
        d(
            "ProtectHome",
            home,
            "read-only if the config is or names a file there.",
        ),
        d(
            "PrivateTmp",
            tmp,
            "no if the config is or names a file under /tmp or /var/tmp.",
        ),
        d("PrivateDevices", "yes", "No device node is used."),
        d("ProtectKernelModules", "yes", ""),
        d("ProtectKernelLogs", "yes", ""),
        d("ProtectClock", "yes", ""),
        d(
            "ProtectHostname",
            "yes",
            "The hostname (etcd's default node name) is only read.",
        ),
        d(
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_NETLINK AF_PACKET AF_UNIX",
            "Probes, admin, sync, VRRP; rtnetlink for VIP addresses; \
             gratuitous ARP; AF_UNIX for the C library's name lookups (etcd by name).",
        ),
    ];
    directives.extend(table(SANDBOX));
    directives
}

/// One word of a command line, as systemd reads it: as is if it is plain, else
/// quoted with `\`, `"`, `%` and `$` escaped. A control character (a newline would
/// end the directive) is refused.
fn exec_word(directive: &'static str, path: &Path) -> Result<String, ManifestError> {
    let text = path.to_str().ok_or_else(|| ManifestError::UnitValue {
        directive,
        value: path.display().to_string(),
        reason: "not UTF-8",
    })?;
    if text.chars().any(char::is_control) {
        return Err(ManifestError::UnitValue {
            directive,
            value: text.to_owned(),
            reason: "has a control character",
        });
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        return Ok(text.to_owned());
    }
    let mut word = String::from("\"");
    for c in text.chars() {
        match c {
            '\\' | '"' => {
                word.push('\\');
                word.push(c);
            }
            '%' => word.push_str("%%"),
            '$' => word.push_str("$$"),
            _ => word.push(c),
        }
    }
    word.push('"');
    Ok(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directive(text: &str, key: &str) -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{key} in {text}"))
            .to_owned()
    }

    #[test]
    fn a_file_under_tmp_or_home_stays_visible() {
        let file = |p: &str| HostFile {
            key: "config",
            path: p.into(),
        };
        let exe = Path::new("/usr/bin/apilb");
        let unit_for = |p| unit(&[file(p)], exe).expect("unit");
        let etc = unit_for("/etc/apilb/apilb.toml");
        assert_eq!(directive(&etc, "PrivateTmp"), "yes");
        assert_eq!(directive(&etc, "ProtectHome"), "yes");
        assert_eq!(
            directive(&etc, "ExecStart"),
            "/usr/bin/apilb run -c /etc/apilb/apilb.toml"
        );
        assert_eq!(directive(&unit_for("/tmp/a.toml"), "PrivateTmp"), "no");
        assert_eq!(
            directive(&unit_for("/root/a.toml"), "ProtectHome"),
            "read-only"
        );
    }

    #[test]
    fn exec_words_are_quoted_and_escaped() {
        assert_eq!(
            exec_word("ExecStart", Path::new("/a b/%i$x\"y")).expect("word"),
            "\"/a b/%%i$$x\\\"y\""
        );
        assert_eq!(
            exec_word("ExecStart", Path::new("/usr/bin/apilb")).expect("word"),
            "/usr/bin/apilb"
        );
        assert!(exec_word("ExecStart", Path::new("/a\nb")).is_err());
    }
}
