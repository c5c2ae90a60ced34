//! Node-local mode: the socket programs that balance the node's own `connect()`
//! calls to a VIP (`lb-ebpf/src/sock.rs`), attached to a cgroup-v2 directory, by
//! default the root of the hierarchy, so that every process on the node is covered.
//!
//! The cgroup-v2 hierarchy is wherever `/proc/self/mountinfo` lists a `cgroup2`
//! mount (on systemd machines `/sys/fs/cgroup`; `findmnt -t cgroup2` shows it). A
//! node without one gets it mounted at [`MOUNT_FALLBACK`].
//!
//! Each program's link is pinned as `sock-<program>` in the instance's pin
//! directory, so the programs stay attached while apilb restarts. A new process
//! attaches its own links first and only then releases the pinned ones: for a
//! moment both run, which is harmless, as the second sees an address already
//! rewritten to a master's and leaves it alone.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, links::FdLink};
use lb_common::PROG_SOCK;
use tracing::info;

use crate::{
    config::Config,
    controller::Reconciler,
    loader::{self, LoaderError, Programs},
    privilege,
};

/// Where the cgroup-v2 hierarchy is mounted when the node has no such mount.
pub const MOUNT_FALLBACK: &str = "/run/apilb/cgroup2";

#[derive(Debug, thiserror::Error)]
pub enum SockLbError {
    #[error("reading /proc/self/mountinfo")]
    Mountinfo(#[source] io::Error),
    #[error("mounting cgroup2 at {path}{}", privilege::denied(.source, &[privilege::CAP_SYS_ADMIN]))]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("attaching {program} to cgroup {cgroup}{}", privilege::denied(&**.source, &[privilege::CAP_NET_ADMIN]))]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pinning or releasing the link at {path}{}", privilege::not_writable(&**.source, path))]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE)")]
    NetnsCookie(#[source] io::Error),
    /// Node-local mode on a kernel older than it needs ([`crate::kernel`]).
    #[error("{0}")]
    Kernel(String, #[source] io::Error),
}

type Result<T> = std::result::Result<T, SockLbError>;

/// The cgroup-v2 root: the first `cgroup2` mount in this process's mount table,
/// or a new one at [`MOUNT_FALLBACK`].
pub fn cgroup_root() -> Result<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(SockLbError::Mountinfo)?;
    if let Some(path) = cgroup2_mount(&table) {
        return Ok(path);
    }
    let path = PathBuf::from(MOUNT_FALLBACK);
    let mount_err = |source| SockLbError::Mount {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&path).map_err(mount_err)?;
    let c_path = std::ffi::CString::new(MOUNT_FALLBACK).expect("no NUL in a constant");
    // SAFETY: every pointer is a valid NUL-terminated string for the call's
    // duration; no mount data is passed.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            c_path.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(path)
}

/// The mount point of the first `cgroup2` line of a mountinfo table. A line is
/// `id parent major:minor root mountpoint options [optional...] - fstype source ...`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(c) = code {
            out.push(char::from(c));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// The cookie of this process's network namespace, which the socket programs
/// compare with their socket's: only the node's own sockets are balanced.
pub fn netns_cookie() -> Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(SockLbError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits");
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, and the
    // socket is open for the call's duration.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(
            match crate::kernel::explain(&crate::kernel::release(), true) {
                Some(explanation) => SockLbError::Kernel(explanation, e),
                None => SockLbError::NetnsCookie(e),
            },
        );
    }
    Ok(cookie)
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join(format!("sock-{program}"))
}

/// `apilb run`'s node-local bring-up: attach the socket programs if node-local
/// mode is on, and have the controller balance this namespace's sockets; or
/// release those an earlier run left attached if it is off.
pub fn start(config: &Config, programs: &mut Programs, reconciler: &mut Reconciler) -> Result<()> {
    let pin = loader::pin_dir(&config.instance);
    if !config.local.enabled {
        for stale in detach(&pin)? {
            info!(pin = %stale.display(), "node-local mode is off: released its socket programs");
        }
        return Ok(());
    }
    let cgroup = match &config.local.cgroup {
        Some(c) => c.clone(),
        None => cgroup_root()?,
    };
    attach(programs, &cgroup, &pin)?;
    reconciler.set_netns_cookie(netns_cookie()?);
    info!(cgroup = %cgroup.display(), "node-local mode: this node's connects to the VIPs are balanced");
    Ok(())
}

/// Attach the socket programs to `cgroup`, pin their links under `pin_dir` and
/// release the links an earlier process pinned there.
pub fn attach(programs: &mut Programs, cgroup: &Path, pin_dir: &Path) -> Result<()> {
    let dir = File::open(cgroup).map_err(|source| SockLbError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    for program in PROG_SOCK {
        let path = link_pin(pin_dir, program);
        let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| SockLbError::Pin {
            path: path.clone(),
            source: e,
        };
        let prog = programs.sock(program)?;
        // A link (the kernel makes one from 5.7) always lets other programs run
        // beside it, and the kernel refuses any flag with it: hence `Single`, which
        // is no flag.
        let id = prog
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|e| SockLbError::Attach {
                program,
                cgroup: cgroup.to_owned(),
                source: Box::new(e),
            })?;
        let link = prog.take_link(id).map_err(|e| pin_err(Box::new(e)))?;
        let link = FdLink::try_from(link).map_err(|e| pin_err(Box::new(e)))?;
        programs.pin_link(link, &path).map_err(pin_err)?;
    }
    Ok(())
}

/// Release the pinned socket links under `pin_dir` (node-local mode turned off).
/// Returns what it removed.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for program in PROG_SOCK {
        let path = link_pin(pin_dir, program);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| SockLbError::Pin {
                path: path.clone(),
                source: Box::new(e),
            })?;
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_and_unescapes_it() {
        let table = "\
22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 22 0:30 / /sys/fs/cgroup/with\\040space rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
36 22 0:31 / /other rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(table),
            Some(PathBuf::from("/sys/fs/cgroup/with space"))
        );
        assert_eq!(
            cgroup2_mount("22 1 0:21 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
