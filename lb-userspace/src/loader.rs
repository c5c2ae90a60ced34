//! Loading, attaching, pinning, adopting and detaching the datapath.
//!
//! A restarted or upgraded `apilb` must not drop a packet. So maps and XDP links are
//! pinned in bpffs, under `/sys/fs/bpf/apilb/<instance>/`:
//!
//! - `maps-v<LAYOUT_VERSION>/<MAP>`: every map. A new process reuses them, flows and
//!   all. An apilb whose shared types differ (another layout version) creates fresh
//!   maps beside them instead of reading old ones with new types.
//! - `link-<interface>`: the XDP link of each interface. A new process swaps its
//!   program into the existing link atomically (`bpf_link_update`), so the interface
//!   is never without a program, and the link stays attached when the process exits.
//!
//! `detach` removes the links (which detaches the program) and the pins.

use std::{
    ffi::CString,
    io,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::Map,
    programs::{
        CgroupSockAddr, ProgramError, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    ALL_MAPS, Backend, DatapathConfig, FlowKey, FlowState, LAYOUT_VERSION, MAP_BACKEND_STATS,
    MAP_BACKENDS, MAP_CONFIG, MAP_COUNTERS, MAP_FLOWS, MAP_MAGLEV, MAP_PORT_CURSOR, MAP_REPLIES,
    MAP_VIP_STATS, MAP_VIPS, PROG_SOCK, PROG_XDP, ReplyState, TrafficStats, VipInfo, VipKey,
};

use crate::datapath::{Datapath, DatapathError, OBJECT};

/// The XDP mode an attach ended up in (what `Datapath::attach` returns).
pub use aya::programs::XdpMode as AttachedMode;

/// Where bpffs is mounted on every Linux system that has it.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("mounting bpffs at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} has key/value/entries {found:?} but this apilb expects {expected:?}; \
         the layout changed without a LAYOUT_VERSION bump, or flow_table_size changed: \
         run `apilb detach` to start afresh"
    )]
    Layout {
        path: PathBuf,
        found: (u32, u32, u32),
        expected: (u32, u32, u32),
    },
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("attaching XDP to {interface} in {mode:?} mode")]
    Attach {
        interface: String,
        mode: XdpMode,
        #[source]
        source: ProgramError,
    },
    #[error("adopting the pinned link {path}")]
    Adopt {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "pinning the XDP link of {interface} at {path} (kernels before 5.9 cannot pin XDP links)"
    )]
    PinLink {
        interface: String,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("writing the sysctl {path}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

type Result<T, E = LoaderError> = std::result::Result<T, E>;

/// How to attach XDP (`datapath.xdp_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native, falling back to generic where the driver has no XDP support.
    Auto,
    Native,
    Generic,
}

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries in each LRU flow table (`FLOWS` and `REPLIES`).
    pub flow_table_size: u32,
    /// Pin maps and links here (`pin_dir(instance)`); `None` keeps everything private
    /// to this process, detached when it ends (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_table_size: lb_common::FLOW_TABLE_SIZE,
            pin_dir: None,
        }
    }
}

/// The pin directory of an instance.
#[must_use]
pub fn pin_dir(instance: &str) -> PathBuf {
    Path::new(BPFFS).join("apilb").join(instance)
}

fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// Mount bpffs at `path` unless it is already mounted there (as Cilium does).
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
    // SAFETY: every pointer is a valid NUL-terminated string or null (no data).
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(true)
}

/// A load failure, explained by what the running kernel lacks if it is older than
/// apilb needs.
fn too_old(e: DatapathError) -> DatapathError {
    match crate::kernel::explain(&crate::kernel::release(), false) {
        Some(explanation) => DatapathError::Kernel {
            explanation,
            source: Box::new(e),
        },
        None => e,
    }
}

impl Datapath {
    /// Load the embedded programs, creating their maps or, with a pin directory,
    /// reusing the ones pinned there (see the module docs). Not attached anywhere yet.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_FLOWS, opts.flow_table_size)
            .map_max_entries(MAP_REPLIES, opts.flow_table_size);
        let pins: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
            Some(dir) => {
                let maps = maps_dir(dir);
                std::fs::create_dir_all(&maps).map_err(|source| LoaderError::PinDir {
                    path: maps.clone(),
                    source,
                })?;
                ALL_MAPS
                    .iter()
                    .map(|&name| (name, maps.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path);
        }
        let ebpf = loader
            .load(OBJECT)
            .map_err(|e| too_old(DatapathError::Load(e)))?;
        let mut dp = Self {
            ebpf,
            pinned_links: Vec::new(),
        };
        // Map names are shared constants; check the object against every one, so a
        // renamed static in lb-ebpf fails here rather than at first use.
        for name in ALL_MAPS {
            dp.map(name)?;
        }
        for (name, path) in &pins {
            check_layout(dp.map(name)?, name, path, opts.flow_table_size)?;
        }
        dp.xdp(PROG_XDP)?.load().map_err(|source| {
            too_old(DatapathError::Program {
                program: PROG_XDP,
                source,
            })
        })?;
        // The socket programs of node-local mode, attached only when it is on
        // (`crate::socklb`).
        for name in PROG_SOCK {
            let prog: &mut CgroupSockAddr = dp
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or(DatapathError::MissingProgram(name))?;
            prog.load().map_err(|source| {
                too_old(DatapathError::Program {
                    program: name,
                    source,
                })
            })?;
        }
        Ok(dp)
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
    /// martian, and with it the chance to resolve the neighbour. And it adds the
    /// interface to the redirect targets from this same thread, so that the index is
    /// resolved in the namespace the program is attached in (see
    /// [`Datapath::add_tx_port`]).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
        pin_dir: Option<&Path>,
    ) -> Result<XdpMode> {
        let c_name =
            CString::new(interface).map_err(|_| LoaderError::NoInterface(interface.to_owned()))?;
        // SAFETY: `c_name` is a valid NUL-terminated string for the call's duration.
        let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if ifindex == 0 {
            return Err(LoaderError::NoInterface(interface.to_owned()));
        }
        let sysctl = PathBuf::from(format!("/proc/sys/net/ipv4/conf/{interface}/accept_local"));
        std::fs::write(&sysctl, "1").map_err(|source| LoaderError::Sysctl {
            path: sysctl,
            source,
        })?;
        let link_pin = pin_dir.map(|d| d.join(format!("link-{interface}")));
        let adopted = match &link_pin {
            Some(path) if path.exists() => match self.adopt(path) {
                Ok(m) => Some(m),
                // A link whose interface went away and came back is defunct: drop
                // its pin and attach afresh rather than refuse to start.
                Err(e) => {
                    tracing::warn!(interface, pin = %path.display(), "cannot adopt the pinned link, attaching afresh: {e}");
                    std::fs::remove_file(path).map_err(|source| LoaderError::Remove {
                        path: path.clone(),
                        source,
                    })?;
                    None
                }
            },
            _ => None,
        };
        let used = match adopted {
            Some(m) => m,
            None => self.attach_new(interface, ifindex, mode, link_pin.as_deref())?,
        };
        self.add_tx_port(ifindex)?;
        Ok(used)
    }

    /// Swap this program into the pinned link at `path`.
    fn adopt(&mut self, path: &Path) -> Result<XdpMode> {
        let adopt_err = |e: Box<dyn std::error::Error + Send + Sync>| LoaderError::Adopt {
            path: path.to_owned(),
            source: e,
        };
        let pinned = PinnedLink::from_pin(path).map_err(|e| adopt_err(Box::new(e)))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| adopt_err(Box::new(e)))?;
        self.xdp(PROG_XDP)?
            .attach_to_link(link)
            .map_err(|e| adopt_err(Box::new(e)))?;
        // The mode is the link's, fixed when it was created; bpf_link_update keeps it.
        Ok(XdpMode::Default)
    }

    fn attach_new(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: AttachMode,
        pin: Option<&Path>,
    ) -> Result<XdpMode> {
        let tries: &[XdpMode] = match mode {
            AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            AttachMode::Native => &[XdpMode::Driver],
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
            let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| LoaderError::PinLink {
                interface: interface.to_owned(),
                path: path.to_owned(),
                source: e,
            };
            let link = prog.take_link(id).map_err(|e| pin_err(Box::new(e)))?;
            let fd = FdLink::try_from(link).map_err(|e| pin_err(Box::new(e)))?;
            self.pinned_links
                .push(fd.pin(path).map_err(|e| pin_err(Box::new(e)))?);
        }
        Ok(used)
    }
}

/// Refuse a pinned map whose sizes differ from what this apilb expects.
fn check_layout(map: &Map, name: &'static str, path: &Path, flow_table_size: u32) -> Result<()> {
    let expected = match name {
        MAP_VIPS => (
            size_of::<VipKey>(),
            size_of::<VipInfo>(),
            lb_common::MAX_VIPS,
        ),
        MAP_BACKENDS => (4, size_of::<Backend>(), lb_common::MAX_BACKENDS),
        MAP_MAGLEV => (4, 4, lb_common::MAGLEV_ENTRIES),
        MAP_FLOWS => (
            size_of::<FlowKey>(),
            size_of::<FlowState>(),
            flow_table_size,
        ),
        MAP_REPLIES => (
            size_of::<FlowKey>(),
            size_of::<ReplyState>(),
            flow_table_size,
        ),
        MAP_CONFIG => (4, size_of::<DatapathConfig>(), 1),
        MAP_COUNTERS => (4, 8, lb_common::COUNTER_COUNT),
        MAP_VIP_STATS => (4, size_of::<TrafficStats>(), lb_common::MAX_VIPS),
        MAP_BACKEND_STATS => (4, size_of::<TrafficStats>(), lb_common::MAX_BACKENDS),
        MAP_PORT_CURSOR => (4, 4, 1),
        // The devmap's value size and the kernel-private scratch slot are not part of
        // the shared layout.
        _ => return Ok(()),
    };
    let expected = (
        u32::try_from(expected.0).unwrap_or(u32::MAX),
        u32::try_from(expected.1).unwrap_or(u32::MAX),
        expected.2,
    );
    let data = crate::datapath::map_data(map);
    let info = data
        .info()
        .map_err(|source| DatapathError::Map { map: name, source })?;
    let found = (info.key_size(), info.value_size(), info.max_entries());
    if found == expected {
        Ok(())
    } else {
        Err(LoaderError::Layout {
            path: path.to_owned(),
            found,
            expected,
        })
    }
}

/// Keep the node's own sockets (health probes among them) off the NAT source
/// ports: a local connection that picked one of them would share its 4-tuple with
/// a flow under NAT. Adds the range to `net.ipv4.ip_local_reserved_ports`, keeping
/// what is there; returns whether it changed anything.
pub fn reserve_ports(lo: u16, hi: u16) -> Result<bool> {
    let path = PathBuf::from("/proc/sys/net/ipv4/ip_local_reserved_ports");
    let current = std::fs::read_to_string(&path).map_err(|source| LoaderError::Sysctl {
        path: path.clone(),
        source,
    })?;
    let current = current.trim();
    let entry = format!("{lo}-{hi}");
    if current.split(',').any(|r| r == entry) {
        return Ok(false);
    }
    let value = if current.is_empty() {
        entry
    } else {
        format!("{current},{entry}")
    };
    std::fs::write(&path, value).map_err(|source| LoaderError::Sysctl { path, source })?;
    Ok(true)
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

/// Detach the datapath of the instance pinned at `pin_dir` and remove its pins.
/// Returns what it removed, for the caller to report.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rm_err = |source| LoaderError::Remove {
            path: path.clone(),
            source,
        };
        if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(rm_err)?;
        } else {
            // A link's last reference is its pin: removing it detaches the program.
            std::fs::remove_file(&path).map_err(rm_err)?;
        }
        removed.push(path);
    }
    std::fs::remove_dir(pin_dir).map_err(|source| LoaderError::Remove {
        path: pin_dir.to_owned(),
        source,
    })?;
    Ok(removed)
}
