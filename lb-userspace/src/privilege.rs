//! The Linux capabilities `apilb run` needs, each with the operations that need
//! it. One list, read by `apilb manifest` (pod specs, the systemd unit), the
//! container image's tests and the least-privilege tests, so that what apilb is
//! granted and what it is shown to need cannot drift apart.
//!
//! `apilb run` checks its effective set against the list before it touches
//! anything ([`check_effective`]), and an operation the kernel refuses later (a
//! capability held only in a user namespace, an LSM, a pin directory another user
//! owns) says which capability or permission it needed ([`denied`]).
//!
//! The list was found by running apilb on Linux 6.18 with each capability
//! dropped in turn (`tests/tests/least_privilege.rs`), and matches the kernel's
//! checks: `bpf(BPF_MAP_CREATE)` wants `CAP_BPF`, and `CAP_NET_ADMIN` for a device
//! map; `bpf(BPF_PROG_LOAD)` wants `CAP_BPF`, and `CAP_NET_ADMIN` for XDP and cgroup
//! socket programs; the verifier wants `CAP_PERFMON` for the XDP program's
//! pointer arithmetic (`bpf_allow_ptr_leaks`); a net sysctl is
//! writable by its owner, root, or by a `CAP_NET_ADMIN` holder
//! (`net_ctl_permissions`); raw and packet sockets want `CAP_NET_RAW`. Pins need only
//! write access to their bpffs directory, and since Linux 5.11 BPF memory is
//! charged to the cgroup, not to `RLIMIT_MEMLOCK`, so neither `CAP_DAC_OVERRIDE` nor
//! `CAP_SYS_RESOURCE` is needed.

use std::{collections::HashSet, io, str::FromStr as _};

/// A capability `apilb run` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// The kernel's name, as systemd and `setpriv` spell it: `CAP_BPF`.
    pub name: &'static str,
    /// What apilb does with it.
    pub needed_for: &'static str,
}

impl Capability {
    /// The name as a pod's `securityContext.capabilities.add` spells it: `BPF`.
    #[must_use]
    pub fn k8s_name(&self) -> &'static str {
        self.name.trim_start_matches("CAP_")
    }

    /// The name as `setpriv --inh-caps` and `capsh` spell it: `bpf`.
    #[must_use]
    pub fn setpriv_name(&self) -> String {
        self.k8s_name().to_ascii_lowercase()
    }
}

/// The capability names, for the kernel checks that name one.
pub const CAP_BPF: &str = "CAP_BPF";
pub const CAP_PERFMON: &str = "CAP_PERFMON";
pub const CAP_NET_ADMIN: &str = "CAP_NET_ADMIN";
pub const CAP_NET_RAW: &str = "CAP_NET_RAW";
pub const CAP_SYS_ADMIN: &str = "CAP_SYS_ADMIN";

/// Every capability `apilb run` needs, and nothing more.
pub const CAPABILITIES: &[Capability] = &[
    Capability {
        name: CAP_BPF,
        needed_for: "bpf(2): creating the maps, loading BTF and the programs",
    },
    Capability {
        name: CAP_PERFMON,
        needed_for: "the verifier's pointer arithmetic (bpf_allow_ptr_leaks): without it \
                     the kernel refuses the XDP program (\"pointer arithmetic with it \
                     prohibited for !root\")",
    },
    Capability {
        name: CAP_NET_ADMIN,
        needed_for: "loading XDP and cgroup socket programs and the device map they \
                     redirect through, adding and removing VIP addresses (netlink), and \
                     writing the net sysctls accept_local and ip_local_reserved_ports",
    },
    Capability {
        name: CAP_NET_RAW,
        needed_for: "elected VIPs only (vrrp, etcd): VRRP's raw IP socket, gratuitous \
                     ARP (packet socket) and unsolicited neighbour adverts (raw ICMPv6 \
                     socket)",
    },
];

/// Capabilities needed only on a node that lacks something apilb would then set
/// up itself; not granted by the manifests, which mount it instead.
pub const ONLY_IF_ABSENT: &[Capability] = &[Capability {
    name: CAP_SYS_ADMIN,
    needed_for: "mounting bpffs at /sys/fs/bpf, or cgroup2 for node-local mode, when \
                 the node has none mounted (mount them beforehand instead)",
}];

/// The shell commands, run as root before a non-root `apilb run` (systemd's
/// `ExecStartPre=+`, a pod's init container), that let `owner` (`user:group` or
/// `uid:gid`) pin: search permission on bpffs (pins stay 0600, unreadable to
/// others), and `apilb/` its own, where it creates and removes its instances'
/// directories.
#[must_use]
pub fn pin_dir_commands(owner: &str) -> [String; 2] {
    let apilb = std::path::Path::new(crate::loader::BPFFS).join("apilb");
    let (user, group) = owner.split_once(':').unwrap_or((owner, owner));
    [
        format!("chmod o+x {}", crate::loader::BPFFS),
        format!(
            "install -d -o {user} -g {group} -m 0700 {}",
            apilb.display()
        ),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("reading this process's effective capabilities")]
    Read(#[source] caps::errors::CapsError),
    #[error(
        "apilb run lacks {}; grant exactly {} (systemd AmbientCapabilities=, a pod's \
         securityContext.capabilities.add, setpriv --ambient-caps) or run it as root",
        list(.missing),
        .needed.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
    )]
    Missing {
        missing: Vec<Capability>,
        /// All this config needs ([`needed_by`]).
        needed: Vec<Capability>,
    },
}

/// `CAP_A (for ...), CAP_B (for ...)`.
fn list(caps: &[Capability]) -> String {
    caps.iter()
        .map(|c| format!("{}, needed for {}", c.name, c.needed_for))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Those of [`CAPABILITIES`] that `config` needs: all of them, but `CAP_NET_RAW`
/// only for elected VIPs (VRRP adverts, and the announcements of a VIP taken
/// over), as apilb leaves a static VIP's address to the operator.
#[must_use]
pub fn needed_by(config: &crate::config::Config) -> Vec<Capability> {
    let elected = config
        .vips
        .iter()
        .any(|v| v.election != crate::config::Election::Static);
    CAPABILITIES
        .iter()
        .filter(|c| elected || c.name != CAP_NET_RAW)
        .copied()
        .collect()
}

/// Refuse to start unless every capability of `needed` ([`needed_by`]) that this
/// kernel knows is in the effective set.
pub fn check_effective(needed: &[Capability]) -> Result<(), PrivilegeError> {
    let missing = missing(needed.iter().copied()).map_err(PrivilegeError::Read)?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing,
            needed: needed.to_vec(),
        })
    }
}

/// Those of `wanted` this kernel knows and the effective set lacks.
fn missing(
    wanted: impl Iterator<Item = Capability>,
) -> Result<Vec<Capability>, caps::errors::CapsError> {
    let effective = caps::read(None, caps::CapSet::Effective)?;
    // A kernel older than a capability (CAP_BPF is 5.8) checks another instead;
    // `crate::kernel` refuses such kernels with its own explanation.
    let known: HashSet<caps::Capability> =
        caps::runtime::procfs_all_supported(None).unwrap_or_else(|_| caps::all());
    Ok(wanted
        .filter(|c| {
            caps::Capability::from_str(c.name)
                .is_ok_and(|cap| known.contains(&cap) && !effective.contains(&cap))
        })
        .collect())
}

/// Why the kernel refused an operation that needs `needs`, if `source` (or an
/// error it wraps) is EPERM or EACCES; else empty. Appended to the operation's
/// error message: `; denied: apilb lacks CAP_NET_ADMIN, needed for ...`.
#[must_use]
pub fn denied(source: &(dyn std::error::Error + 'static), needs: &[&str]) -> String {
    if !is_denied(source) {
        return String::new();
    }
    let all = CAPABILITIES.iter().chain(ONLY_IF_ABSENT);
    let wanted = all.filter(|c| needs.contains(&c.name)).copied();
    match missing(wanted) {
        Ok(lacking) if !lacking.is_empty() => format!("; denied: apilb lacks {}", list(&lacking)),
        _ => format!(
            "; denied although apilb holds {}: capabilities held in a user namespace do \
             not count for BPF, or an LSM refused it",
            needs.join(", ")
        ),
    }
}

/// [`denied`] for an operation on `path` that needs only file permissions, such
/// as pinning into bpffs.
#[must_use]
pub fn not_writable(source: &(dyn std::error::Error + 'static), path: &std::path::Path) -> String {
    if !is_denied(source) {
        return String::new();
    }
    format!(
        "; denied: {} must be writable by apilb's user (uid {}); as non-root, create \
         the instance's pin directory beforehand, owned by that user \
         (README: Least privilege)",
        path.display(),
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    )
}

/// Whether `source` or an error it wraps is EPERM or EACCES.
fn is_denied(source: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(source);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels_and_the_pod_spec_drops_the_prefix() {
        for cap in CAPABILITIES.iter().chain(ONLY_IF_ABSENT) {
            assert!(cap.name.starts_with("CAP_"), "{}", cap.name);
            assert!(!cap.k8s_name().starts_with("CAP_"));
            assert!(caps::Capability::from_str(cap.name).is_ok(), "{}", cap.name);
        }
        assert_eq!(CAPABILITIES[0].k8s_name(), "BPF");
        assert_eq!(CAPABILITIES[0].setpriv_name(), "bpf");
    }

    #[test]
    fn only_a_permission_error_gets_a_hint_and_it_is_found_through_wrappers() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper")]
        struct Wrapper(#[source] io::Error);
        let eperm = Wrapper(io::Error::from_raw_os_error(libc::EPERM));
        let hint = denied(&eperm, &[CAP_NET_RAW]);
        assert!(hint.starts_with("; denied"), "{hint}");
        assert!(hint.contains(CAP_NET_RAW), "{hint}");
        let other = Wrapper(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(denied(&other, &[CAP_NET_RAW]), "");
        let path = std::path::Path::new("/sys/fs/bpf/apilb/x");
        assert!(not_writable(&eperm, path).contains("/sys/fs/bpf/apilb/x"));
        assert_eq!(not_writable(&other, path), "");
    }
}
