//! Backend choice: which backend a new connection to a VIP goes to.
//!
//! Both the XDP balancer (for a new flow) and the socket programs (for a node-local
//! `connect()`) ask here, so that a VIP's traffic is spread alike whichever way it
//! comes in. The VIP's Maglev ring names a backend; one out of rotation
//! (`BACKEND_F_DOWN`: the controller marks it before rewriting the rings) is passed
//! over along the backends' fallback order to the next one in rotation. Every node
//! has the same order, so all LB nodes still agree on where a flow goes.
#![cfg(target_arch = "bpf")]

use lb_common::{
    BACKEND_F_DOWN, BACKEND_NONE, Backend, FALLBACK_HOPS, MAGLEV_SIZE_MAX, VipInfo,
    counters::{DROP_NO_BACKEND, FALLBACK},
};

use crate::maps::{BACKENDS, MAGLEV, count};

/// The backend for a new connection to `vip` whose hash is `hash`: its Maglev
/// slot's, or, if that one is out of rotation or `avoid`, the next one in rotation
/// along the fallback order. `Err` is the drop counter.
#[inline(always)]
pub fn pick(
    vip: &VipInfo,
    hash: u32,
    family: u8,
    avoid: u32,
) -> Result<(u32, &'static Backend), u32> {
    if vip.ring_size == 0 || vip.ring_size > MAGLEV_SIZE_MAX {
        return Err(DROP_NO_BACKEND);
    }
    let slot = vip.vip_id * MAGLEV_SIZE_MAX + hash % vip.ring_size;
    let mut backend_id = *MAGLEV.get(slot).ok_or(DROP_NO_BACKEND)?;
    if backend_id == BACKEND_NONE {
        return Err(DROP_NO_BACKEND);
    }
    let mut backend = BACKENDS.get(backend_id).ok_or(DROP_NO_BACKEND)?;
    if (backend.flags & BACKEND_F_DOWN != 0 || backend_id == avoid)
        && let Some((id, b)) = fallback(backend_id, backend.fallback_id, family, avoid)
    {
        (backend_id, backend) = (id, b);
        count(FALLBACK);
    }
    // An id the controller never set (family 0) or an address of the other family
    // cannot be used for this connection.
    if backend.family != family {
        return Err(DROP_NO_BACKEND);
    }
    Ok((backend_id, backend))
}

/// The first backend in rotation, of `family` and not `avoid`, along the fallback
/// order from `next` (the successor of `from`); `None` if the order comes back to
/// `from` or runs out first.
#[inline(always)]
fn fallback(from: u32, mut next: u32, family: u8, avoid: u32) -> Option<(u32, &'static Backend)> {
    for _ in 0..FALLBACK_HOPS {
        if next == BACKEND_NONE || next == from {
            return None;
        }
        let b = BACKENDS.get(next)?;
        if b.flags & BACKEND_F_DOWN == 0 && next != avoid && b.family == family {
            return Some((next, b));
        }
        next = b.fallback_id;
    }
    None
}
