//! Flow sync, the datapath's half: a synced flow's establishment and end are
//! written to `SYNC_EVENTS` for the controller to send to its peers, so that a
//! node taking the VIP over already holds the flow.
//!
//! Only three cold points of a flow's life pay for it (the ACK that promotes it,
//! the segment that moves it to `TIME_WAIT` or `CLOSE`), and only on VIPs that
//! sync (`VIP_F_SYNC`, copied into the flow as `FLOW_F_SYNC`): an established
//! flow's packets cost nothing more. Half-open flows are never exported: state is
//! earned, and a SYN flood must not become sync traffic.
//!
//! The other half is the liveness gate ([`alive`]): a node whose controller is
//! gone (SIGKILL, a crash) keeps its pinned program and the VIP's address until
//! another node takes over, but nothing exports its new flows any more, so they
//! would break at the takeover. The kernel knows at once that the process is
//! gone (its sync listener is closed), so such a node refuses new flows of VIPs
//! that sync, and the clients' SYN retransmits find the new owner.
#![cfg(target_arch = "bpf")]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release},
    programs::XdpContext,
};
use lb_common::{
    AF_INET, AF_INET6, FlowKey, FlowState, SyncEvent,
    counters::SYNC_EVENT_LOST,
    ct::{CT_CLOSE, CT_TIME_WAIT, FLOW_F_SYNC},
};

use crate::{
    flow::coarse_now,
    maps::{CONFIG, SYNC_EVENTS, count},
};

/// Whether a flow moving from `before` to `state` with `flags` ends, for its
/// peers: a synced flow reaching `TIME_WAIT` or `CLOSE` from another state.
#[inline(always)]
pub fn ends(before: u8, state: u8, flags: u32) -> bool {
    flags & FLOW_F_SYNC != 0
        && state != before
        && (state == CT_TIME_WAIT || state == CT_CLOSE)
        && before != CT_TIME_WAIT
        && before != CT_CLOSE
}

/// Write event `kind` (`SYNC_EV_*`) about the flow `key` (client to VIP) at
/// `flow` into the ring, in place; a full ring counts `SYNC_EVENT_LOST`. Inlined:
/// as a call of its own it would be a fourth frame under the reply path's
/// `update_flow`, and 6.1's verifier rounds every frame up to 32 bytes, past the
/// 512 it allows the deepest chain.
#[inline(always)]
pub fn emit(kind: u32, key: &FlowKey, flow: *const FlowState) {
    let Some(mut slot) = SYNC_EVENTS.reserve::<SyncEvent>(0) else {
        count(SYNC_EVENT_LOST);
        return;
    };
    let e = slot.as_mut_ptr();
    // SAFETY: `e` is a reserved ring slot of a whole `SyncEvent`, written field by
    // field before it is submitted; `flow` is a valid entry pointer from a flow
    // table, read as it is (a racing update gives a mix of two states of one
    // flow, which the next event or a bulk resync corrects).
    unsafe {
        let f = &*flow;
        #[expect(clippy::cast_possible_truncation, reason = "SYNC_EV_* fit a byte")]
        let kind = kind as u8;
        (*e).kind = kind;
        (*e).state = f.state;
        (*e).snat_index = f.snat_index;
        (*e)._pad0 = 0;
        (*e).flags = f.flags;
        // Field by field, word by word: a struct or array copy is a `memcpy` or
        // `memmove` call, a frame the verifier counts under the caller's.
        words(&mut (*e).key.src_be, &key.src_be);
        words(&mut (*e).key.dst_be, &key.dst_be);
        (*e).key.sport_be = key.sport_be;
        (*e).key.dport_be = key.dport_be;
        (*e).key.proto = key.proto;
        (*e).key.family = key.family;
        (*e).key._pad = 0;
        words(&mut (*e).backend_be, &f.backend_be);
        (*e).backend_port_be = f.backend_port_be;
        (*e).nat_port_be = f.nat_port_be;
        (*e).ts_off = f.ts_off;
        (*e).fin_tsval = f.fin_tsval;
        (*e).seq = f.seq;
        (*e).ack = f.ack;
        (*e)._pad1 = 0;
        (*e).at_ns = coarse_now();
    }
    slot.submit(0);
}

/// Copy an address word by word (see `emit`).
#[inline(always)]
fn words(to: &mut [u32; 4], from: &[u32; 4]) {
    to[0] = from[0];
    to[1] = from[1];
    to[2] = from[2];
    to[3] = from[3];
}

/// Whether this node's controller is alive: the kernel has its sync listener
/// (`DatapathConfig::sync_tuple_be`; no config, no gate). A listener is unhashed as its process
/// exits, SIGKILL included. Without `[sync]` (family 0) there is nothing to ask,
/// and the answer is yes. Inlined, and the tuple is read where it lies in the
/// config map: no stack frame of its own under the reply path.
#[inline(always)]
pub fn alive(ctx: &XdpContext) -> bool {
    // Looked up here rather than passed in: a caller's config pointer kept
    // across its other calls costs a stack slot in the reply path's frame.
    let Some(cfg) = CONFIG.get(0) else {
        return true;
    };
    let len = match cfg.sync_family {
        AF_INET => 12,
        AF_INET6 => 36,
        _ => return true,
    };
    let tuple = (&raw const cfg.sync_tuple_be)
        .cast::<bpf_sock_tuple>()
        .cast_mut();
    #[expect(clippy::cast_sign_loss, reason = "the helper takes -1 as u64")]
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: `tuple` points at 36 bytes of the config map's value, which the
    // helper only reads (`len` of them); a socket it returns is released before
    // this returns, as the verifier demands.
    unsafe {
        let sk = bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, len, netns, 0);
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
