//! The benchmark floor, for `cargo xtask bench xdp` only: an XDP program that just
//! drops, run through the same `BPF_PROG_TEST_RUN` path as the balancer, so that the
//! balancer's cost per packet can be read against the cheapest possible program.
//!
//! It is lb-ebpf's `floor` binary, an object apart from the datapath, and this
//! module exists only with the `bench` feature (which the tests crate enables):
//! `apilb` neither embeds nor loads it.

use aya::Ebpf;
use lb_common::PROG_XDP_DROP;

use crate::datapath::{Datapath, DatapathError, TestRunOutput};

/// The floor's object, built by `build.rs` beside the datapath's.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));

/// The floor program, loaded into the kernel (not attached anywhere).
pub struct Floor(Datapath);

impl Floor {
    pub fn load() -> Result<Self, DatapathError> {
        let ebpf = Ebpf::load(OBJECT).map_err(DatapathError::Load)?;
        let mut dp = Datapath {
            ebpf,
            pinned_links: Vec::new(),
        };
        dp.xdp(PROG_XDP_DROP)?
            .load()
            .map_err(|source| DatapathError::Program {
                program: PROG_XDP_DROP,
                source,
            })?;
        Ok(Self(dp))
    }

    /// Run the floor once on `packet`, as [`Datapath::test_run`] runs the balancer.
    pub fn test_run(
        &mut self,
        packet: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRunOutput, DatapathError> {
        self.0.test_run(PROG_XDP_DROP, packet, ingress_ifindex)
    }
}
