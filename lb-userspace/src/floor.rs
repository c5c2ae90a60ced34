//! The benchmark floor, for `cargo xtask bench xdp` only: an XDP program that just
//! drops, run through the same `BPF_PROG_TEST_RUN` path as the balancer, so that the
//! balancer's cost per packet can be read against the cheapest possible program.
//!
//! It is lb-ebpf's `floor` binary, an object apart from the datapath, and this
//! module exists only with the `bench` feature (which the tests crate enables):
//! `apilb` neither embeds nor loads it.

use aya::{
    Ebpf,
    programs::{ProgramError, Xdp},
};
use lb_common::PROG_XDP_DROP;

/// The floor's object, built by `build.rs` beside the datapath's.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("loading the floor object into the kernel failed")]
    Load(#[source] aya::EbpfError),
    #[error("the floor object has no XDP program named {PROG_XDP_DROP}")]
    Missing,
    #[error("loading the floor program {PROG_XDP_DROP}")]
    Program(#[source] ProgramError),
}

/// The floor program, loaded into the kernel (not attached anywhere).
pub struct Floor(Ebpf);

impl Floor {
    pub fn load() -> Result<Self, FloorError> {
        let mut floor = Self(Ebpf::load(OBJECT).map_err(FloorError::Load)?);
        floor.program()?.load().map_err(FloorError::Program)?;
        Ok(floor)
    }

    /// The loaded program, to run through `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> Result<&mut Xdp, FloorError> {
        self.0
            .program_mut(PROG_XDP_DROP)
            .and_then(|p| p.try_into().ok())
            .ok_or(FloorError::Missing)
    }
}
