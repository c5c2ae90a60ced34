//! Network namespaces for tests: created with a unique name, entered per thread,
//! and always deleted, on drop and therefore on panic too.
//!
//! Namespaces get only the routes of their own subnets, never a default route, so a
//! mistake cannot send traffic off the machine. Names are `<prefix>-<pid>-<n>`, so
//! parallel tests and parallel test binaries never collide; namespaces left behind by
//! a process that was killed are swept the next time the same prefix is used.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by a test.
pub struct Netns {
    name: String,
}

/// Run a command; panic with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `name` is `<prefix>-<pid>[-...]` for a process that no longer exists:
/// something a killed test run left behind.
#[must_use]
pub fn left_by_dead_process(name: &str, prefix: &str) -> bool {
    let pid = name
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<u32>().ok());
    pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
}

/// Delete namespaces with this prefix whose creating process is gone.
fn sweep(prefix: &str) {
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if left_by_dead_process(name, prefix) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

impl Netns {
    /// Create `<prefix>-<pid>-<n>` with its loopback up.
    pub fn new(prefix: &str) -> Self {
        Self::with_role(prefix, "")
    }

    /// Create `<prefix>-<pid>-<n><role>` with its loopback up. Every namespace of
    /// one prefix, whatever its role, is swept together once its process is gone.
    pub fn with_role(prefix: &str, role: &str) -> Self {
        sweep(prefix);
        let name = format!(
            "{prefix}-{}-{}{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Run a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Interface index of `dev` inside the namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let out = self.ip(&["-o", "link", "show", "dev", dev]);
        out.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
    }

    /// Move the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Entered {
        enter(&self.name)
    }
}

/// Move the calling thread into namespace `name` until the guard drops (for threads
/// that work inside a namespace another owner created and will delete).
pub fn enter(name: &str) -> Entered {
    let home = File::open("/proc/thread-self/ns/net").expect("open own netns");
    let target = File::open(format!("/run/netns/{name}")).expect("open test netns");
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {name}: {}",
        std::io::Error::last_os_error()
    );
    Entered { home }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The calling thread is inside a test namespace; dropping returns it home.
pub struct Entered {
    home: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; `home` is the thread's original namespace.
        let rc = unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        assert!(
            rc == 0 || std::thread::panicking(),
            "setns back home: {}",
            std::io::Error::last_os_error()
        );
    }
}
