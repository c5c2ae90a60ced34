//! TCP timestamps under NAT: each port's TSvals kept monotonic for its master.
//!
//! A master that closed a connection first holds `TIME_WAIT` for its 4-tuple, and
//! accepts a new SYN on it only if the SYN's TSval is later than the last one it
//! saw there (RFC 6191; Linux `tcp_timewait_state_process`). Under NAT the next
//! flow on a port is another client, whose clock has nothing to do with the last
//! one's. So the datapath shifts every TSval a client sends by a per-flow offset
//! (`FlowState::ts_off`, chosen at the SYN by `ct::ts_offset`) and every TSecr the
//! backend sends back by the same offset the other way: the backend sees one clock
//! per port that only moves forward, the client sees its own values echoed.
#![cfg(target_arch = "bpf")]

use aya_ebpf::programs::XdpContext;
use lb_common::csum::Delta;

use crate::packet::{Parsed, read_u32, tsval_at, write_u32};

/// The TSval of a segment (a SYN), host order, if it carries timestamps.
#[inline(always)]
pub fn syn_tsval(ctx: &XdpContext, p: &Parsed) -> Option<u32> {
    let at = tsval_at(ctx, p)?;
    Some(u32::from_be(read_u32(ctx, at)?))
}

/// Add `off` to a client's TSval, returning the checksum change and the TSval as
/// sent (host order); nothing if the segment has no timestamps.
#[inline(always)]
pub fn shift_tsval(ctx: &XdpContext, p: &Parsed, off: u32) -> Option<(Delta, u32)> {
    let at = tsval_at(ctx, p)?;
    let old = read_u32(ctx, at)?;
    let sent = u32::from_be(old).wrapping_add(off);
    let new = sent.to_be();
    write_u32(ctx, at, new)?;
    Some((Delta::default().word32(old, new), sent))
}

/// Take `off` from a backend's TSecr, returning the checksum change; nothing if
/// the segment has no timestamps.
#[inline(always)]
pub fn shift_tsecr(ctx: &XdpContext, p: &Parsed, off: u32) -> Option<Delta> {
    let at = tsval_at(ctx, p)? + 4;
    let old = read_u32(ctx, at)?;
    let new = u32::from_be(old).wrapping_sub(off).to_be();
    write_u32(ctx, at, new)?;
    Some(Delta::default().word32(old, new))
}
