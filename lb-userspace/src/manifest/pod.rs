//! The pod forms: one pod spec, run as a static pod or by a `DaemonSet`.
//!
//! What the spec holds, and why:
//! - `hostNetwork`: apilb attaches XDP to the node's interfaces and holds the VIP
//!   on them; a pod network would give it neither.
//! - `capabilities`: `drop: [ALL]` and `add:` [`crate::privilege::CAPABILITIES`],
//!   never `privileged`. `seccompProfile: Unconfined`: the runtimes' default
//!   profiles allow `bpf(2)` only with `CAP_SYS_ADMIN` (podman's refused every map
//!   apilb creates, `tests/tests/manifest.rs`), a far wider grant than a filter
//!   that lets the kernel check `CAP_BPF` itself.
//! - hostPath mounts, read-only, at the same path: the config file and every file
//!   it names. No `ConfigMap`, `Secret` or `ServiceAccount`: a static pod cannot refer to
//!   API objects, and apilb is what makes the API reachable, so neither form may
//!   need the API to start (kube-vip's static pod broke on exactly that: README).
//! - `/sys/fs/bpf`, read-write: the pins that keep the datapath balancing while
//!   apilb restarts or upgrades. apilb cannot mount bpffs without `CAP_SYS_ADMIN`,
//!   so the node must have it mounted (systemd does at boot); `HostToContainer`
//!   propagation shows the pod a bpffs mounted after it started.
//! - the cgroup-v2 directory node-local mode attaches to, read-only (attaching only
//!   opens it). It replaces the runtime's own `/sys/fs/cgroup`, which shows only the
//!   container's cgroup: attached there, the socket hooks would see only apilb.
//! - liveness on the admin endpoint's `/healthz`, which answers while apilb's run
//!   loop turns, whatever the masters' health: no master answering (the kubeadm
//!   bootstrap) never gets apilb killed. A startup probe gives the first load a minute.
//! - `system-node-critical`, `dnsPolicy: Default` (no cluster DNS at bootstrap), no
//!   service-account token and no service links: apilb reads none of them.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Capabilities, Container, HTTPGetAction, HostPathVolumeSource, Pod, PodSpec,
            PodTemplateSpec, Probe, SeccompProfile, SecurityContext, Toleration, Volume,
            VolumeMount,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::LabelSelector, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
};

use super::{HostFile, admin_probe_host};
use crate::{config::Config, privilege::CAPABILITIES};

/// Where the pods live, beside the control plane's own static pods.
pub const NAMESPACE: &str = "kube-system";
/// The container's name in either form.
pub const CONTAINER: &str = "apilb";
/// Where apilb is in its image: `cargo xtask image` puts it there
/// (`xtask::image::BINARY`; `tests/tests/image.rs` holds the two equal).
pub const IMAGE_BINARY: &str = "/apilb";
/// bpffs, where apilb pins (`crate::loader::BPFFS`).
pub const BPFFS: &str = crate::loader::BPFFS;
/// The cgroup-v2 root node-local mode attaches to when `local.cgroup` is unset: the
/// unified hierarchy's mount point on systemd nodes (a hybrid node's
/// `/sys/fs/cgroup/unified` comes along, the hostPath being bound recursively).
pub const CGROUP_DEFAULT: &str = "/sys/fs/cgroup";
/// The admin endpoint's liveness route (`crate::admin::server`).
pub const ADMIN_HEALTH_PATH: &str = "/healthz";
/// The `DaemonSet`'s service account with in-cluster discovery, in [`NAMESPACE`]:
/// the README's RBAC binds its Role to it.
pub const SERVICE_ACCOUNT: &str = "apilb";

const NAME: &str = "apilb";

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_owned(), NAME.to_owned())])
}

fn metadata() -> ObjectMeta {
    ObjectMeta {
        name: Some(NAME.to_owned()),
        namespace: Some(NAMESPACE.to_owned()),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

/// The static pod for `/etc/kubernetes/manifests/apilb.yaml`.
#[must_use]
pub fn static_pod(config: &Config, files: &[HostFile], image: &str) -> Pod {
    Pod {
        metadata: metadata(),
        spec: Some(pod_spec(config, files, image)),
        status: None,
    }
}

/// The `DaemonSet`: the same pod on every node, control-plane nodes included
/// (`operator: Exists` tolerates every taint, as kube-proxy's does), replaced one
/// node at a time. No surge: two apilb on one node would both bind the admin port.
#[must_use]
pub fn daemon_set(config: &Config, files: &[HostFile], image: &str) -> DaemonSet {
    let mut spec = pod_spec(config, files, image);
    // In-cluster discovery reads the slice with the pod's own token.
    if config
        .discovery
        .as_ref()
        .is_some_and(|d| d.credentials == crate::config::Credentials::InCluster)
    {
        spec.service_account_name = Some(SERVICE_ACCOUNT.to_owned());
        spec.automount_service_account_token = Some(true);
    }
    spec.tolerations = Some(vec![Toleration {
        operator: Some("Exists".to_owned()),
        ..Toleration::default()
    }]);
    DaemonSet {
        metadata: metadata(),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(spec),
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: Some(IntOrString::Int(0)),
                }),
            }),
            ..DaemonSetSpec::default()
        }),
        status: None,
    }
}

/// A hostPath volume and its mount at the same path.
struct Mount {
    name: String,
    path: String,
    kind: &'static str,
    read_only: bool,
    propagation: Option<&'static str>,
}

fn mounts(config: &Config, files: &[HostFile]) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = files
        .iter()
        .map(|f| Mount {
            // `health.ca_file` -> `health-ca-file`: a DNS label, unique per key.
            name: f.key.replace(['.', '_'], "-"),
            path: f.path.display().to_string(),
            kind: "File",
            read_only: true,
            propagation: None,
        })
        .collect();
    mounts.push(Mount {
        name: "bpffs".to_owned(),
        path: BPFFS.to_owned(),
        kind: "Directory",
        read_only: false,
        propagation: Some("HostToContainer"),
    });
    if config.local.enabled {
        let cgroup = config
            .local
            .cgroup
            .as_ref()
            .map_or_else(|| CGROUP_DEFAULT.to_owned(), |p| p.display().to_string());
        mounts.push(Mount {
            name: "cgroup".to_owned(),
            path: cgroup,
            kind: "Directory",
            read_only: true,
            propagation: None,
        });
    }
    mounts
}

fn pod_spec(config: &Config, files: &[HostFile], image: &str) -> PodSpec {
    let mounts = mounts(config, files);
    let health = |failure_threshold, period_seconds| Probe {
        http_get: Some(HTTPGetAction {
            host: Some(admin_probe_host(config).to_string()),
            path: Some(ADMIN_HEALTH_PATH.to_owned()),
            port: IntOrString::Int(i32::from(config.admin_listen.port())),
            scheme: Some("HTTP".to_owned()),
            ..HTTPGetAction::default()
        }),
        failure_threshold: Some(failure_threshold),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let config_file = files
        .iter()
        .find(|f| f.key == "config")
        .map(|f| f.path.display().to_string())
        .unwrap_or_default();
    PodSpec {
        host_network: Some(true),
        dns_policy: Some("Default".to_owned()),
        priority_class_name: Some("system-node-critical".to_owned()),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        containers: vec![Container {
            name: CONTAINER.to_owned(),
            image: Some(image.to_owned()),
            image_pull_policy: Some("IfNotPresent".to_owned()),
            command: Some(vec![IMAGE_BINARY.to_owned()]),
            args: Some(vec!["run".to_owned(), "-c".to_owned(), config_file]),
            security_context: Some(SecurityContext {
                capabilities: Some(Capabilities {
                    add: Some(
                        CAPABILITIES
                            .iter()
                            .map(|c| c.k8s_name().to_owned())
                            .collect(),
                    ),
                    drop: Some(vec!["ALL".to_owned()]),
                }),
                privileged: Some(false),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                seccomp_profile: Some(SeccompProfile {
                    type_: "Unconfined".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(
                mounts
                    .iter()
                    .map(|m| VolumeMount {
                        name: m.name.clone(),
                        mount_path: m.path.clone(),
                        read_only: Some(m.read_only),
                        mount_propagation: m.propagation.map(str::to_owned),
                        ..VolumeMount::default()
                    })
                    .collect(),
            ),
            // 30 x 2 s for the first load; then 3 x 10 s of a stuck run loop.
            startup_probe: Some(health(30, 2)),
            liveness_probe: Some(health(3, 10)),
            ..Container::default()
        }],
        volumes: Some(
            mounts
                .into_iter()
                .map(|m| Volume {
                    name: m.name,
                    host_path: Some(HostPathVolumeSource {
                        path: m.path,
                        type_: Some(m.kind.to_owned()),
                    }),
                    ..Volume::default()
                })
                .collect(),
        ),
        ..PodSpec::default()
    }
}
