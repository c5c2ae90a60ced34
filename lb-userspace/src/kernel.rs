//! What apilb needs of the kernel, so that a kernel too old for it gets an error
//! that names the feature, the release that added it and the commit, rather than a
//! bare `EINVAL` from the verifier or a map type the kernel does not know.
//!
//! The table lists the newest features apilb uses, the ones that set its minimum:
//! Linux 5.11 for the datapath, 5.14 for node-local mode. Older ones (XDP, the FIB
//! lookup helper, LRU maps, cgroup links) come long before these. `cargo xtask
//! vm-test` proves the kernels it boots; `README.md` shows the same table.

/// A kernel feature apilb uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// The first mainline release that has it, (major, minor).
    pub since: (u32, u32),
    /// The mainline commit that added it (12 hex digits).
    pub commit: &'static str,
    /// Only node-local mode needs it.
    pub node_local_only: bool,
}

/// Newest first within each group.
pub const FEATURES: [Feature; 4] = [
    Feature {
        name: "the SO_NETNS_COOKIE socket option (node-local mode's namespace filter)",
        since: (5, 14),
        // "net: retrieve netns cookie via getsocketopt"; also in 5.12.18.
        commit: "e8b9eab99232",
        node_local_only: true,
    },
    Feature {
        name: "the bpf_ktime_get_coarse_ns helper (flow timestamps)",
        since: (5, 11),
        commit: "d05512618056",
        node_local_only: false,
    },
    Feature {
        name: "BPF ring buffers (passive failure events)",
        since: (5, 8),
        commit: "457f44363a88",
        node_local_only: false,
    },
    Feature {
        name: "the cgroup getpeername hooks (node-local mode's socket programs)",
        since: (5, 8),
        commit: "1b66d253610c",
        node_local_only: false,
    },
];

/// The running kernel's release, as `uname -r` prints it.
#[must_use]
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// (major, minor) of a release string such as `6.1.0-56-amd64` or
/// `5.15.0-91-generic`.
#[must_use]
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The features a kernel of `release` lacks, by its version; none if the version
/// cannot be read (a backport may have them anyway, so this only explains a
/// failure, it never refuses to try).
#[must_use]
pub fn lacking(release: &str, node_local: bool) -> Vec<&'static Feature> {
    let Some(have) = version(release) else {
        return Vec::new();
    };
    FEATURES
        .iter()
        .filter(|f| (node_local || !f.node_local_only) && have < f.since)
        .collect()
}

/// One line naming what `release` lacks, for an error message; `None` if nothing.
#[must_use]
pub fn explain(release: &str, node_local: bool) -> Option<String> {
    let lacking = lacking(release, node_local);
    if lacking.is_empty() {
        return None;
    }
    let list: Vec<String> = lacking
        .iter()
        .map(|f| {
            format!(
                "{} (Linux {}.{}, commit {})",
                f.name, f.since.0, f.since.1, f.commit
            )
        })
        .collect();
    Some(format!(
        "kernel {release} is older than apilb needs; it lacks {}",
        list.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_names_the_commit_that_added_it() {
        for f in &FEATURES {
            assert!(
                f.commit.len() == 12 && f.commit.bytes().all(|b| b.is_ascii_hexdigit()),
                "{}: {:?}",
                f.name,
                f.commit
            );
        }
    }

    #[test]
    fn reads_the_version_of_distribution_releases() {
        assert_eq!(version("6.1.0-56-amd64"), Some((6, 1)));
        assert_eq!(version("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(version("4.18.0-553.el8_10.x86_64"), Some((4, 18)));
        assert_eq!(version("garbage"), None);
    }

    #[test]
    fn names_what_an_older_kernel_lacks() {
        for release in [
            "6.1.0-56-amd64",
            "6.12.117+deb12-amd64",
            "5.15.0-91-generic",
        ] {
            assert_eq!(explain(release, true), None, "{release}");
        }
        // 5.11 to 5.13 run the datapath, but not node-local mode.
        assert_eq!(explain("5.11.0-49-generic", false), None);
        let names: Vec<_> = lacking("5.11.0-49-generic", true)
            .iter()
            .map(|f| f.since)
            .collect();
        assert_eq!(names, [(5, 14)]);
        let text = explain("5.11.0-49-generic", true).expect("5.11 lacks one");
        assert!(
            text.contains("SO_NETNS_COOKIE") && text.contains("e8b9eab99232"),
            "{text}"
        );
        // Ubuntu 20.04's 5.4 lacks all of the datapath's.
        let text = explain("5.4.0-150-generic", false).expect("5.4 is too old");
        assert!(
            text.starts_with("kernel 5.4.0-150-generic is older than apilb needs"),
            "{text}"
        );
        for commit in ["d05512618056", "457f44363a88", "1b66d253610c"] {
            assert!(text.contains(commit), "{text}");
        }
        assert!(!text.contains("SO_NETNS_COOKIE"), "{text}");
        // An unreadable release explains nothing rather than guessing.
        assert_eq!(explain("", true), None);
    }
}
