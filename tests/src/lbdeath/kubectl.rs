//! kubectl in a loop through the VIP, as an admin runs it while an LB node dies:
//! each run is a new process and a new connection (`kubectl get --raw /version`),
//! so a run fails exactly when the VIP refuses, drops or resets a new connection
//! for longer than kubectl waits.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{cluster::VIP, netns::Netns, plane};

/// At most this many runs, and for at most [`MAX_TIME`], whatever the caller does.
const MAX_RUNS: usize = 2000;
const MAX_TIME: Duration = Duration::from_mins(3);
/// Between two runs.
const PAUSE: Duration = Duration::from_millis(100);

/// One kubectl run: when it started, how long it took, and its error if it failed.
#[derive(Clone, Debug)]
pub struct Run {
    pub at: Instant,
    pub took: Duration,
    pub error: Option<String>,
}

/// kubectl running in a loop until stopped or dropped.
pub struct KubectlLoop {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<Run>>>,
}

impl KubectlLoop {
    /// Start the loop in namespace `client`, with a kubeconfig for the VIP and the
    /// CA `ca` written under `dir`.
    #[must_use]
    pub fn start(client: &Netns, dir: &Path, ca: &Path) -> Self {
        let (home, kubeconfig) = plane::kubeconfig(dir, VIP, ca);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", client.name()])
            .arg(plane::kubectl_bin())
            .args(["get", "--raw", "/version", "--request-timeout=10s"])
            .env("HOME", &home)
            .env("KUBECONFIG", &kubeconfig);
        let stop = Arc::new(AtomicBool::new(false));
        let halt = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut runs = Vec::new();
            while !halt.load(Ordering::Relaxed)
                && runs.len() < MAX_RUNS
                && started.elapsed() < MAX_TIME
            {
                let at = Instant::now();
                let error = match cmd.output() {
                    Ok(out) if out.status.success() => None,
                    Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
                    Err(e) => Some(format!("cannot run kubectl: {e}")),
                };
                runs.push(Run {
                    at,
                    took: at.elapsed(),
                    error,
                });
                thread::sleep(PAUSE);
            }
            runs
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Let the run in progress finish, and return every run.
    #[must_use]
    pub fn stop(mut self) -> Vec<Run> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<Run> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for KubectlLoop {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
