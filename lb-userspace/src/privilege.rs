//! The Linux capabilities `apilb run` needs, each with the operations that need
//! it. One list, read by `apilb manifest` (pod specs, the systemd unit), the
//! container image's tests and the least-privilege tests, so that what apilb is
//! granted and what it is shown to need cannot drift apart.

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
}

/// Every capability `apilb run` needs, and nothing more.
pub const CAPABILITIES: &[Capability] = &[
    Capability {
        name: "CAP_BPF",
        needed_for: "bpf(2): creating and pinning maps, loading the XDP and socket programs",
    },
    Capability {
        name: "CAP_PERFMON",
        needed_for: "the verifier's full pointer arithmetic for the XDP program (without it the kernel refuses it)",
    },
    Capability {
        name: "CAP_NET_ADMIN",
        needed_for: "attaching XDP and the cgroup socket hooks, adding and removing VIP addresses \
                     (netlink), and the net sysctls accept_local and ip_local_reserved_ports",
    },
    Capability {
        name: "CAP_NET_RAW",
        needed_for: "VRRP's raw IP sockets, gratuitous ARP and unsolicited neighbour adverts \
                     (packet sockets)",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kernels_and_the_pod_spec_drops_the_prefix() {
        for cap in CAPABILITIES {
            assert!(cap.name.starts_with("CAP_"), "{}", cap.name);
            assert!(!cap.k8s_name().starts_with("CAP_"));
        }
        assert_eq!(CAPABILITIES[0].k8s_name(), "BPF");
    }
}
