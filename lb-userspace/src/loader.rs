//! Bringing the datapath up and down: loading, attaching, pinning, adopting and
//! detaching the programs, bpffs, and the node sysctls the datapath needs.
//!
//! [`start`] is `apilb run`'s bring-up. [`Programs::load`] splits the loaded object
//! in two: the programs, kept here, and the maps, handed to [`Datapath`], the map
//! reader and writer, which is all the rest of apilb needs.
//!
//! A restarted or upgraded `apilb` must not drop a packet. So maps and links are
//! pinned in bpffs, under `/sys/fs/bpf/apilb/<instance>/`:
//!
//! - `maps-v<LAYOUT_VERSION>/<MAP>`: every map. A new process reuses them, flows and
//!   all. An apilb whose shared types differ (another layout version) creates fresh
//!   maps beside them instead of reading old ones with new types.
//! - `link-<interface>`: the XDP link of each interface. A new process swaps its
//!   program into the existing link atomically (`bpf_link_update`), so the interface
//!   is never without a program, and the link stays attached when the process exits.
//! - `sock-<program>`: the socket programs' links (`crate::socklb`).
//! - `node-<setting>`: the node settings the datapath changed, to restore on
//!   detach (`node_state`).
//!
//! `detach` restores those settings and removes the links (which detaches the
//! program) and the pins. Directories apilb creates in bpffs are 0700, and the
//! kernel creates pins 0600 (less the umask): only apilb's user reaches them.

mod node_state;
mod xdp_mode;

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{
        CgroupSockAddr, ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    IFACE_F_PARTIAL, IFACE_F_SKB, IfaceMode, LAYOUT_VERSION, MAP_FLOWS, PROG_SOCK, PROG_XDP,
    maps::{MAPS, MapSpec, Sizing},
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    datapath::{Datapath, DatapathError},
    privilege::{self, CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN},
};

/// The XDP mode an attach ended up in (what [`Programs::attach`] returns).
pub use aya::programs::XdpMode as AttachedMode;

/// The compiled lb-ebpf object, embedded at build time.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Where bpffs is mounted on every Linux system that has it.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An error of a link or pin call, whichever library it comes from.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object into the kernel failed{}", privilege::denied(.0, &[CAP_BPF, CAP_NET_ADMIN]))]
    Load(#[source] aya::EbpfError),
    /// A load failure on a kernel older than apilb needs ([`crate::kernel`]).
    #[error("{explanation}")]
    Kernel {
        explanation: String,
        #[source]
        source: Box<LoaderError>,
    },
    #[error("the eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    #[error("program {program}{}", privilege::denied(.source, &[CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON]))]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("mounting bpffs at {path}{}", privilege::denied(.source, &[CAP_SYS_ADMIN]))]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the pin directory {path}{}", privilege::not_writable(.source, path))]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} has type/key/value/entries {found:?} but this apilb expects \
         {expected:?}; the layout changed without a LAYOUT_VERSION bump{resized}: run \
         `apilb detach` to start afresh"
    )]
    Layout {
        path: PathBuf,
        found: Shape,
        expected: Shape,
        /// ", or <key> changed" for a map the config sizes, else empty.
        resized: &'static str,
    },
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("attaching XDP to {interface} in {mode:?} mode{}", privilege::denied(.source, &[CAP_NET_ADMIN]))]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("adopting the pinned link {path}{}", privilege::not_writable(&**.source, path))]
    Adopt {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error(
        "pinning the XDP link of {interface} at {path} (kernels before 5.9 cannot pin XDP links){}",
        privilege::not_writable(&**.source, path)
    )]
    PinLink {
        interface: String,
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error("writing the sysctl {path}{}", privilege::denied(.source, &[CAP_NET_ADMIN]))]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}{}", privilege::not_writable(.source, path))]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

type Result<T, E = LoaderError> = std::result::Result<T, E>;

/// How to attach XDP: `datapath.xdp_mode`, read straight into this type.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic where the driver lacks it;
    /// generic on a veth, whose native mode needs XDP on the peer too.
    #[default]
    Auto,
    Native,
    Generic,
}

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries in each LRU table of established flows (`FLOWS` and `REPLIES`).
    pub flow_table_size: u32,
    /// Entries in each LRU table of half-open flows (`HALF_FLOWS` and
    /// `HALF_REPLIES`).
    pub half_open_table_size: u32,
    /// Pin maps and links here (`pin_dir(instance)`); `None` keeps everything private
    /// to this process, detached when it ends (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_table_size: lb_common::FLOW_TABLE_SIZE,
            half_open_table_size: lb_common::HALF_OPEN_TABLE_SIZE,
            pin_dir: None,
        }
    }
}

impl LoadOptions {
    /// The entries map `spec` is created with (`MapSpec::sized_by`).
    #[must_use]
    pub fn entries(&self, spec: &MapSpec) -> u32 {
        match spec.sized_by {
            Sizing::Fixed => spec.max_entries,
            Sizing::FlowTable => self.flow_table_size,
            Sizing::HalfOpenTable => self.half_open_table_size,
        }
    }
}

/// The pin directory of an instance.
#[must_use]
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPFFS).join("apilb").join(instance)
}

/// Where an instance pinned under `pin_dir` keeps its maps, for this layout.
#[must_use]
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// `apilb run`'s bring-up: mount bpffs if needed, warn if the node does not
/// forward, reserve the NAT ports, load (or adopt) the datapath, attach it to each
/// configured interface and remove the pins the configuration no longer uses.
pub fn start(config: &Config) -> Result<(Programs, Datapath)> {
    if ensure_bpffs(Path::new(BPFFS))? {
        info!(path = BPFFS, "bpffs was not mounted; mounted it");
    }
    // Without forwarding the FIB refuses every rewritten packet and so does the
    // stack: the VIP would be dead. Nodes running Kubernetes have it on; say so
    // loudly rather than change how the node routes.
    for (family, path, needed) in [
        (
            "IPv4",
            "/proc/sys/net/ipv4/ip_forward",
            !config.vips.iter().all(|v| v.addr.is_ipv6()),
        ),
        (
            "IPv6",
            "/proc/sys/net/ipv6/conf/all/forwarding",
            config.vips.iter().any(|v| v.addr.is_ipv6()),
        ),
    ] {
        if needed && std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0") {
            error!(
                path,
                "{family} forwarding is off: the datapath cannot forward to the masters until it is on"
            );
        }
    }
    let pin = pin_dir(&config.instance);
    create_pin_dir(&pin)?;
    let ports = &config.datapath.nat_ports;
    if node_state::reserve_ports(&pin, *ports.start(), *ports.end())? {
        info!(ports = ?ports, "reserved the NAT ports from the node's own sockets (net.ipv4.ip_local_reserved_ports)");
    }
    let adopting = pinned_maps_exist(&pin);
    let (mut programs, dp) = Programs::load(&LoadOptions {
        flow_table_size: config.datapath.flow_table_size,
        half_open_table_size: config.datapath.half_open_table_size,
        pin_dir: Some(pin.clone()),
    })?;
    for iface in &config.datapath.interfaces {
        let mode = programs.attach(iface, config.datapath.xdp_mode, Some(&pin))?;
        if adopting {
            info!(interface = %iface, ?mode, pins = %pin.display(), "adopted the pinned datapath: maps and flows kept, program swapped in place");
        } else {
            info!(interface = %iface, ?mode, pins = %pin.display(), "XDP attached");
        }
    }
    for stale in remove_stale_pins(&pin, &config.datapath.interfaces)? {
        info!(pin = %stale.display(), "removed a pin the configuration no longer uses");
    }
    Ok((programs, dp))
}

/// Create `dir` and its missing parents, each 0700 (less the umask).
fn create_pin_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LoaderError::PinDir {
            path: dir.to_owned(),
            source,
        })
}

/// Mount bpffs at `path` unless it is already mounted there (as Cilium does),
/// with mode 0700 rather than bpffs's default 1777: only root may pin at its top.
/// Returns whether it mounted it, for the caller to log.
pub fn ensure_bpffs(path: &Path) -> Result<bool> {
    let mount_err = |source| LoaderError::Mount {
        path: path.to_owned(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| mount_err(io::Error::other(e)))?;
    // SAFETY: `st` is plain old data that statfs fills in; `c_path` is NUL-terminated.
    let magic = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c_path.as_ptr(), &raw mut st) != 0 {
            return Err(mount_err(io::Error::last_os_error()));
        }
        st.f_type
    };
    // `f_type` is an i64 in glibc and a u64 in musl; the magic fits either.
    #[allow(
        clippy::useless_conversion,
        reason = "the conversion is needed on musl"
    )]
    if i64::try_from(magic).ok() == Some(BPF_FS_MAGIC) {
        return Ok(false);
    }
    let fstype = c"bpf";
    let options = c"mode=0700";
    // SAFETY: every pointer is a valid NUL-terminated string for the call's
    // duration; bpffs reads its data as such a string of options.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_path.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(true)
}

/// A load failure, explained by what the running kernel lacks if it is older than
/// apilb needs.
fn too_old(e: LoaderError) -> LoaderError {
    match crate::kernel::explain(&crate::kernel::release(), false) {
        Some(explanation) => LoaderError::Kernel {
            explanation,
            source: Box::new(e),
        },
        None => e,
    }
}

/// The datapath's programs, loaded into the kernel, and the links this process
/// pinned for them.
pub struct Programs {
    ebpf: Ebpf,
    /// Links pinned in bpffs: kept open while this value lives, and left attached
    /// when it is dropped.
    pinned_links: Vec<PinnedLink>,
    /// The interfaces whose packets may carry partial checksums, and whether the
    /// program runs there in generic mode (`NodeConfig::ifaces`).
    ifaces: Vec<IfaceMode>,
}

impl Programs {
    /// Load the embedded programs, creating their maps or, with a pin directory,
    /// reusing the ones pinned there (see the module docs). Not attached anywhere
    /// yet. The maps go to the returned [`Datapath`].
    pub fn load(opts: &LoadOptions) -> Result<(Self, Datapath)> {
        let mut loader = EbpfLoader::new();
        for spec in MAPS.iter().filter(|m| m.sized_by != Sizing::Fixed) {
            loader.map_max_entries(spec.name, opts.entries(spec));
        }
        let pins: Vec<(&'static MapSpec, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                let maps = maps_dir(dir);
                create_pin_dir(&maps)?;
                MAPS.iter().map(|m| (m, maps.join(m.name))).collect()
            }
            None => Vec::new(),
        };
        for (spec, path) in &pins {
            loader.map_pin_path(spec.name, path);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| too_old(LoaderError::Load(e)))?;
        let dp = Datapath::take_maps(&mut ebpf)?;
        for (spec, path) in &pins {
            check_layout(dp.map(spec.name)?, spec, path, opts)?;
        }
        let mut programs = Self {
            ebpf,
            pinned_links: Vec::new(),
            ifaces: Vec::new(),
        };
        programs.xdp(PROG_XDP)?.load().map_err(|source| {
            too_old(LoaderError::Program {
                program: PROG_XDP,
                source,
            })
        })?;
        // The socket programs of node-local mode, attached only when it is on
        // (`crate::socklb`).
        for name in PROG_SOCK {
            programs.sock(name)?.load().map_err(|source| {
                too_old(LoaderError::Program {
                    program: name,
                    source,
                })
            })?;
        }
        Ok((programs, dp))
    }

    /// One of the datapath's XDP programs, by its `lb_common::PROG_*` name.
    pub fn xdp(&mut self, name: &'static str) -> Result<&mut Xdp> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoaderError::MissingProgram(name))
    }

    /// One of the node-local socket programs (`lb_common::PROG_SOCK`), by name.
    pub fn sock(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr> {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoaderError::MissingProgram(name))
    }

    /// Pin `link` at `path` and keep it open while this value lives. A link an
    /// earlier process pinned there stays attached through its handle until the
    /// new one is pinned in its place, and is released then.
    pub fn pin_link(&mut self, link: FdLink, path: &Path) -> Result<(), BoxError> {
        let old = match PinnedLink::from_pin(path) {
            Ok(old) => {
                std::fs::remove_file(path)?;
                Some(old)
            }
            Err(_) => None,
        };
        self.pinned_links.push(link.pin(path)?);
        drop(old);
        Ok(())
    }

    /// Attach the balancer to `interface` (in the calling thread's namespace) and
    /// return the mode it runs in.
    ///
    /// With a pin directory, a link already pinned for the interface is adopted: this
    /// program replaces the old one in it atomically. Otherwise the new link is
    /// pinned, and stays attached after this process exits.
    ///
    /// It sets `net.ipv4.conf.<interface>.accept_local`: packets the datapath hands to
    /// the stack after rewriting (a FIB or neighbour miss, a VLAN tag) carry the
    /// node's own SNAT address as their source, which the stack otherwise drops as
    /// martian, and with it the chance to resolve the neighbour. The interface
    /// becomes a redirect target when the controller next applies the config that
    /// names it (`TX_PORTS`, see `crate::controller`).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
        pin_dir: Option<&Path>,
    ) -> Result<XdpMode> {
        let ifindex =
            ifindex(interface).ok_or_else(|| LoaderError::NoInterface(interface.to_owned()))?;
        node_state::set_accept_local(pin_dir, interface)?;
        let link_pin = pin_dir.map(|d| d.join(format!("link-{interface}")));
        let adopted = match &link_pin {
            Some(path) if path.exists() => match self.adopt(path, ifindex) {
                Ok(m) => Some(m),
                // A link whose interface went away and came back is defunct: drop
                // its pin and attach afresh rather than refuse to start.
                Err(e) => {
                    warn!(interface, pin = %path.display(), "cannot adopt the pinned link, attaching afresh: {e}");
                    std::fs::remove_file(path).map_err(|source| LoaderError::Remove {
                        path: path.clone(),
                        source,
                    })?;
                    None
                }
            },
            _ => None,
        };
        let mode = match adopted {
            Some(m) => m,
            None => self.attach_new(interface, ifindex, mode, link_pin.as_deref())?,
        };
        self.ifaces.retain(|i| i.ifindex != ifindex);
        let skb = if mode == XdpMode::Skb { IFACE_F_SKB } else { 0 };
        let offloads = xdp_mode::may_send_partial(ifindex).unwrap_or_else(|e| {
            warn!(
                interface,
                "cannot read the interface's kind, taking it for a veth: {e}"
            );
            true
        });
        if skb != 0 || offloads {
            self.ifaces.push(IfaceMode {
                ifindex,
                flags: IFACE_F_PARTIAL | skb,
            });
        }
        Ok(mode)
    }

    /// The interfaces attached so far whose packets may carry partial checksums
    /// (a veth, a tun device, any interface in generic mode), for
    /// [`crate::controller::Reconciler::set_ifaces`].
    #[must_use]
    pub fn ifaces(&self) -> Vec<IfaceMode> {
        self.ifaces.clone()
    }

    /// Swap this program into the pinned link at `path`, attached to `ifindex`, and
    /// return the link's mode, fixed when it was created (`bpf_link_update` keeps it).
    fn adopt(&mut self, path: &Path, ifindex: u32) -> Result<XdpMode> {
        let adopt_err = |e: BoxError| LoaderError::Adopt {
            path: path.to_owned(),
            source: e,
        };
        let pinned = PinnedLink::from_pin(path).map_err(|e| adopt_err(Box::new(e)))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| adopt_err(Box::new(e)))?;
        self.xdp(PROG_XDP)?
            .attach_to_link(link)
            .map_err(|e| adopt_err(Box::new(e)))?;
        // Asked of the interface, which the link does not record. Should netlink not
        // answer, `Default` says "the link's own mode, unknown" as it did before.
        Ok(match xdp_mode::attached(ifindex) {
            Ok(Some(mode)) => mode,
            Ok(None) => XdpMode::Default,
            Err(e) => {
                warn!(ifindex, "cannot read the adopted link's XDP mode: {e}");
                XdpMode::Default
            }
        })
    }

    fn attach_new(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
        pin: Option<&Path>,
    ) -> Result<XdpMode> {
        // On a veth, native mode works only if the peer runs XDP too, which apilb
        // cannot see (`xdp_mode::is_veth`): `auto` takes generic mode there, and
        // an explicit `native` is warned about.
        let veth = xdp_mode::is_veth(ifindex).unwrap_or_else(|e| {
            warn!(
                interface,
                "cannot tell whether the interface is a veth: {e}"
            );
            false
        });
        let tries: &[XdpMode] = match mode {
            AttachMode::Auto if veth => {
                info!(
                    interface,
                    "a veth: generic XDP mode, since a veth delivers what native XDP \
                     sends back only to a peer running an XDP program of its own \
                     (xdp_mode = \"native\" if the peer does)"
                );
                &[XdpMode::Skb]
            }
            AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            AttachMode::Native => {
                if veth {
                    warn!(
                        interface,
                        "native XDP on a veth: the frames apilb sends back are dropped \
                         unless the peer runs an XDP program of its own; \
                         xdp_mode = \"auto\" takes generic mode here"
                    );
                }
                &[XdpMode::Driver]
            }
            AttachMode::Generic => &[XdpMode::Skb],
        };
        let prog = self.xdp(PROG_XDP)?;
        let mut attached = None;
        let mut last_err = None;
        for &m in tries {
            match prog.attach_to_if_index(ifindex, m) {
                Ok(id) => {
                    attached = Some((id, m));
                    break;
                }
                Err(source) => last_err = Some((m, source)),
            }
        }
        let (id, used) = match (attached, last_err) {
            (Some(a), _) => a,
            (None, Some((m, source))) => {
                return Err(LoaderError::Attach {
                    interface: interface.to_owned(),
                    mode: m,
                    source,
                });
            }
            (None, None) => unreachable!("at least one mode is tried"),
        };
        if let Some(path) = pin {
            let pin_err = |e: BoxError| LoaderError::PinLink {
                interface: interface.to_owned(),
                path: path.to_owned(),
                source: e,
            };
            let link = prog.take_link(id).map_err(|e| pin_err(Box::new(e)))?;
            let fd = FdLink::try_from(link).map_err(|e| pin_err(Box::new(e)))?;
            self.pin_link(fd, path).map_err(pin_err)?;
        }
        Ok(used)
    }
}

/// The index of `interface` in the calling thread's network namespace, if it
/// exists there.
pub(crate) fn ifindex(interface: &str) -> Option<u32> {
    let c_name = CString::new(interface).ok()?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the call's duration.
    let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (ifindex != 0).then_some(ifindex)
}

/// A map's shape as `bpf_map_info` reports it: (`BPF_MAP_TYPE_*`, key size,
/// value size, entries).
type Shape = (u32, u32, u32, u32);

/// Refuse a pinned map whose shape differs from its entry in the table of maps
/// (`lb_common::maps::MAPS`): its type, key size, value size and entries, the flow
/// tables' entries being the configured sizes (`LoadOptions::entries`). Every map
/// is checked, and all of that but one value size: `SCRATCH`'s, which the table
/// leaves out (`MapSpec::value_size` is `None`) because it is private to the kernel
/// object; a pin too small for it fails the verifier at load instead.
fn check_layout(map: &Map, spec: &MapSpec, path: &Path, opts: &LoadOptions) -> Result<()> {
    let map_err = |source| DatapathError::Map {
        map: spec.name,
        source,
    };
    let info = crate::datapath::map_data(map).info().map_err(map_err)?;
    // aya's `MapType` carries the kernel's numbers, as the table's does.
    let found: Shape = (
        info.map_type().map_err(map_err)? as u32,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    );
    let expected: Shape = (
        spec.map_type as u32,
        spec.key_size,
        spec.value_size.unwrap_or(found.2),
        opts.entries(spec),
    );
    if found == expected {
        Ok(())
    } else {
        Err(LoaderError::Layout {
            path: path.to_owned(),
            found,
            expected,
            resized: match spec.sized_by {
                Sizing::Fixed => "",
                Sizing::FlowTable => ", or flow_table_size changed",
                Sizing::HalfOpenTable => ", or half_open_table_size changed",
            },
        })
    }
}

/// Whether maps of this apilb's layout are pinned under `pin_dir`, i.e. whether a
/// load there reuses them.
#[must_use]
pub fn pinned_maps_exist(pin_dir: &Path) -> bool {
    maps_dir(pin_dir).join(MAP_FLOWS).exists()
}

/// Remove the pinned links of interfaces not in `keep` (detaching the program from
/// them), and maps of other layout versions. Returns what it removed.
pub fn remove_stale_pins(pin_dir: &Path, keep: &[String]) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(removed);
    };
    let current_maps = maps_dir(pin_dir);
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = match name.strip_prefix("link-") {
            Some(iface) => !keep.iter().any(|k| k == iface),
            None => name.starts_with("maps-v") && path != current_maps,
        };
        if stale {
            let rm = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            rm.map_err(|source| LoaderError::Remove {
                path: path.clone(),
                source,
            })?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// What [`detach`] did, for the caller to report.
#[derive(Debug, Default)]
pub struct Detached {
    /// Pins and directories removed.
    pub removed: Vec<PathBuf>,
    /// Node settings put back, one line each.
    pub restored: Vec<String>,
    /// Node settings recorded but left alone, and why.
    pub left: Vec<String>,
}

/// Detach the datapath of the instance pinned at `pin_dir`: restore the node
/// settings it recorded, then remove its pins, its directory, and `apilb/` above
/// it once no other instance is left there. A setting that cannot be restored
/// stops it before anything is removed.
///
/// The bpffs mount stays, even if apilb mounted it: other software pins there
/// (systemd mounts it at boot on most distributions), and unmounting would free
/// every pin in it.
pub fn detach(pin_dir: &Path) -> Result<Detached> {
    let mut done = Detached::default();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(done);
    };
    (done.restored, done.left) = node_state::restore(pin_dir)?;
    for entry in entries.flatten() {
        let path = entry.path();
        let rm_err = |source| LoaderError::Remove {
            path: path.clone(),
            source,
        };
        // `file_type` does not follow symlinks: a record is removed as itself.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path).map_err(rm_err)?;
        } else {
            // A link's last reference is its pin: removing it detaches the program.
            std::fs::remove_file(&path).map_err(rm_err)?;
        }
        done.removed.push(path);
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => done.removed.push(pin_dir.to_owned()),
        // A non-root apilb's directory, made by root beforehand (README: Least
        // privilege): empty now, and root's to remove.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => done.left.push(format!(
            "{}: empty, but its parent is not writable by this user",
            pin_dir.display()
        )),
        Err(source) => {
            return Err(LoaderError::Remove {
                path: pin_dir.to_owned(),
                source,
            });
        }
    }
    // `apilb/` only if empty: another instance's pins keep it.
    if let Some(parent) = pin_dir.parent()
        && parent.file_name().is_some_and(|n| n == "apilb")
        && std::fs::remove_dir(parent).is_ok()
    {
        done.removed.push(parent.to_owned());
    }
    Ok(done)
}
