//! TCP state of a flow under NAT, and when its NAT port may be given to another.
//!
//! The datapath follows each flow's TCP handshake and close as the kernel's
//! conntrack does (`nf_conntrack_proto_tcp.c`), in a coarser machine that only
//! answers what a NAT port's lease needs: is the flow proven (both directions
//! seen), and once it ends, does the master hold `TIME_WAIT` on the 4-tuple?
//! Both functions are pure, so host tests hold every transition; the XDP program
//! calls them on the segments that can change a state (SYN, FIN, RST, and the ACK
//! that completes a handshake or a close), never on a plain established segment.
//!
//! A port comes back as soon as reuse is safe (see [`reusable`]):
//! - a half-open flow after `timeouts_ms[CT_SYN_SENT | CT_SYN_RECV]` without a packet;
//! - after a RST or a client-first close, the master holds no `TIME_WAIT`: after
//!   `timeouts_ms[CT_CLOSE]`, a grace for segments still in flight;
//! - after a master-first close the master holds `TIME_WAIT` (60 s on Linux). A new
//!   SYN with timestamps passes it (RFC 6191; Linux `tcp_timewait_state_process`)
//!   because the datapath keeps each port's timestamps monotonic (`FlowState::
//!   ts_off`), so such a port too comes back after `timeouts_ms[CT_CLOSE]`; for a
//!   SYN without timestamps, or a flow that had none, it is held for
//!   `timeouts_ms[CT_TIME_WAIT]`.
//!
//! A RST ends a flow only if it could be real. Anyone can send one with a flow's
//! 4-tuple, and a forged RST that moved an idle watch to `CT_CLOSE` would give its
//! port to a new flow two seconds later while both ends still use it. So a RST
//! from either side must carry a sequence number [`near`] the one the other side
//! expects, as the flow last recorded it (`FlowState::seq`, `ack`: refreshed with
//! its last-seen time); one that is not goes on to the endpoint, which judges it
//! exactly (RFC 5961), and the flow keeps its state. A refusal of an unanswered
//! SYN must match that SYN exactly ([`refuses_syn`]). A FIN is held to the same
//! standard ([`fin_proven`]): one forged from the client's 4-tuple would otherwise
//! move a watch to `CT_FIN_WAIT`, whose shorter timeout frees its port while the
//! watch is idle, and two (one each way) and an ACK would free it at once.
//!
//! So that a real RST or FIN passes, the record follows its flow closely: it is
//! refreshed at least every `FLOW_SEEN_GRANULARITY_NS`, and whenever the client's
//! sequence or acknowledgement number has moved [`RECORD_STRIDE`] past it.

/// `FlowState::state`: no segment tracked yet (never stored).
pub const CT_NONE: u8 = 0;
/// The client's SYN went to the backend.
pub const CT_SYN_SENT: u8 = 1;
/// The backend answered with a SYN-ACK.
pub const CT_SYN_RECV: u8 = 2;
/// The client acknowledged the SYN-ACK: both directions are proven.
pub const CT_ESTABLISHED: u8 = 3;
/// One side sent a FIN (`FLOW_F_BACKEND_FIRST` says which).
pub const CT_FIN_WAIT: u8 = 4;
/// Both sides sent a FIN; the first closer has not acknowledged the second yet.
pub const CT_LAST_ACK: u8 = 5;
/// The first closer acknowledged the second FIN: the connection is over.
pub const CT_TIME_WAIT: u8 = 6;
/// A RST from either side.
pub const CT_CLOSE: u8 = 7;
/// Entries of `DatapathConfig::timeouts_ms`, one per state.
pub const CT_STATES: usize = 8;

/// Which side sent a segment.
pub const FROM_CLIENT: u8 = 0;
pub const FROM_BACKEND: u8 = 1;

/// `FlowState::flags`: the backend sent the first FIN (a master-first close, after
/// which the master holds `TIME_WAIT`).
pub const FLOW_F_BACKEND_FIRST: u32 = 8;
/// `FlowState::flags`: the client's SYN and the backend's SYN-ACK both carried
/// timestamps, so the connection uses them and the datapath rewrites them.
pub const FLOW_F_TS: u32 = 16;
/// `FlowState::flags`: the flow's VIP syncs (`VIP_F_SYNC`): its establishment and
/// end are exported to `SYNC_EVENTS`.
pub const FLOW_F_SYNC: u32 = 32;
/// `FlowState::flags`: a peer synced the flow here (`sync::install`); its record of
/// the client's sequence numbers may be far behind, so the first plain segment
/// here adopts them outright (`flow::record`), and the flag goes.
pub const FLOW_F_FROM_PEER: u32 = 64;

/// TCP flag bits as in byte 13 of the header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Default `DatapathConfig::timeouts_ms`, by state; README "NAT flow lifecycle" says
/// why each is what it is.
pub const TIMEOUTS_DEFAULT_MS: [u32; CT_STATES] = [
    0,         // CT_NONE: never stored
    5_000,     // CT_SYN_SENT
    5_000,     // CT_SYN_RECV
    3_600_000, // CT_ESTABLISHED
    60_000,    // CT_FIN_WAIT
    10_000,    // CT_LAST_ACK
    65_000,    // CT_TIME_WAIT: the master's 60 s, and a margin
    2_000,     // CT_CLOSE
];

/// Whether a state is one of the handshake's: the flow is not proven yet.
#[inline(always)]
#[must_use]
pub const fn half_open(state: u8) -> bool {
    state == CT_SYN_SENT || state == CT_SYN_RECV
}

/// The state (and `FLOW_F_*` flags) after a segment with `tcp` flags from `from`.
///
/// A SYN on a flow that is over opens it again (the client reusing its 4-tuple;
/// the XDP program balances such a SYN as a new flow instead, but the machine
/// stays total); a SYN on a live flow changes nothing and goes to the backend,
/// whose answer (a challenge ACK, RFC 5961) is the endpoints' business. A RST
/// closes any flow.
#[inline(always)]
#[must_use]
pub const fn next(state: u8, flags: u32, from: u8, tcp: u8) -> (u8, u32) {
    if tcp & TCP_RST != 0 {
        return (CT_CLOSE, flags);
    }
    let syn = tcp & TCP_SYN != 0;
    let ack = tcp & TCP_ACK != 0;
    if syn {
        return if from == FROM_CLIENT && !ack {
            if state == CT_NONE || state == CT_TIME_WAIT || state == CT_CLOSE {
                // Timestamps stay on: the client's clock carries on from the
                // old connection's, and so must the offset (a SYN-ACK without
                // them turns them off).
                (CT_SYN_SENT, flags & !FLOW_F_BACKEND_FIRST)
            } else {
                (state, flags)
            }
        } else if from == FROM_BACKEND && ack && half_open(state) {
            (CT_SYN_RECV, flags)
        } else {
            (state, flags)
        };
    }
    if tcp & TCP_FIN != 0 {
        return match state {
            CT_SYN_RECV | CT_ESTABLISHED => {
                let first = if from == FROM_BACKEND {
                    FLOW_F_BACKEND_FIRST
                } else {
                    0
                };
                (CT_FIN_WAIT, flags | first)
            }
            CT_FIN_WAIT => {
                // A FIN from the side that did not close first is the second.
                let backend_first = flags & FLOW_F_BACKEND_FIRST != 0;
                if backend_first == (from == FROM_CLIENT) {
                    (CT_LAST_ACK, flags)
                } else {
                    (state, flags)
                }
            }
            _ => (state, flags),
        };
    }
    if ack {
        if state == CT_SYN_RECV && from == FROM_CLIENT {
            return (CT_ESTABLISHED, flags);
        }
        // The last ACK comes from the first closer, acknowledging the second FIN.
        let backend_first = flags & FLOW_F_BACKEND_FIRST != 0;
        if state == CT_LAST_ACK && backend_first == (from == FROM_BACKEND) {
            return (CT_TIME_WAIT, flags);
        }
    }
    (state, flags)
}

/// The state a flow recorded as `state` is in, given whether each side's FIN was
/// seen (`FlowState::client_fin`, `backend_fin`). The two directions of a flow
/// run on different CPUs, and each moves the state by reading and writing it:
/// the two FINs of a simultaneous close, passing at once, can each move
/// `CT_ESTABLISHED` to `CT_FIN_WAIT` and lose the other's move, which would hold
/// the port for `CT_FIN_WAIT`'s timeout. Each side also records its FIN in a byte
/// of its own, which no race loses; a flow in `CT_FIN_WAIT` with both is in
/// `CT_LAST_ACK`.
#[inline(always)]
#[must_use]
pub const fn settled(state: u8, client_fin: u8, backend_fin: u8) -> u8 {
    if state == CT_FIN_WAIT && client_fin != 0 && backend_fin != 0 {
        CT_LAST_ACK
    } else {
        state
    }
}

/// How far, either way, a RST's (or FIN's) sequence number may be from the one
/// recorded for its flow. The record trails the client by at most
/// [`RECORD_STRIDE`] and a segment; a window of 64 KiB covers that with room to
/// spare and gives a blind forger one chance in 32,768 per segment. A real RST
/// outside it (the backend's, with more than the window in flight towards the
/// client) only keeps its port held until the flow's idle timeout, or until the
/// controller removes the flows of its master.
pub const RST_SEQ_WINDOW: u32 = 65_536;

/// Whether sequence number `seq` is within [`RST_SEQ_WINDOW`] of `recorded`, in
/// sequence space (both host order).
#[inline(always)]
#[must_use]
pub const fn near(seq: u32, recorded: u32) -> bool {
    seq.wrapping_sub(recorded).wrapping_add(RST_SEQ_WINDOW) <= 2 * RST_SEQ_WINDOW
}

/// How far a client's sequence or acknowledgement number may run ahead of its
/// flow's record before a segment refreshes it: 16 KiB, a few segments. The
/// record then stays within this plus one segment of where the client is, well
/// inside [`RST_SEQ_WINDOW`], however fast the flow moves; a bulk flow writes its
/// entry once every dozen or so full-sized segments.
pub const RECORD_STRIDE: u32 = 16 * 1024;

/// Whether a client segment's sequence or acknowledgement number (`seq`, `ack`)
/// would move the record (`recorded_seq`, `recorded_ack`) forward by at least
/// [`RECORD_STRIDE`] (and so by less than [`SEQ_ADVANCE_MAX`]). A segment behind
/// the record, or one `advance` would not follow, is not: a record that cannot
/// move must not cost a write per packet.
#[inline(always)]
#[must_use]
pub const fn record_stale(seq: u32, ack: u32, recorded_seq: u32, recorded_ack: u32) -> bool {
    let (ds, da) = (
        seq.wrapping_sub(recorded_seq),
        ack.wrapping_sub(recorded_ack),
    );
    (ds >= RECORD_STRIDE && ds < SEQ_ADVANCE_MAX) || (da >= RECORD_STRIDE && da < SEQ_ADVANCE_MAX)
}

/// Whether a FIN from `from`, with TCP flags `tcp` and sequence and
/// acknowledgement numbers `seq`, `ack`, could be real, given the client's
/// sequence number as its flow last recorded it (`recorded_seq`). The client's
/// FIN must carry a sequence number [`near`] it; the backend's must acknowledge
/// near it, since the backend acknowledges what the client sent (its own
/// sequence number is known here only through the client's acknowledgements,
/// which lag it by whatever is in flight). A forged FIN moves nothing and goes
/// on to the endpoint, which judges it against its window.
#[inline(always)]
#[must_use]
pub const fn fin_proven(from: u8, tcp: u8, seq: u32, ack: u32, recorded_seq: u32) -> bool {
    if from == FROM_CLIENT {
        near(seq, recorded_seq)
    } else {
        tcp & TCP_ACK != 0 && near(ack, recorded_seq)
    }
}

/// How far forward a client segment may move its flow's recorded sequence or
/// acknowledgement number in one step (`advance`): 1 GiB, far more than a flow
/// moves between two records, so that a real flow's record follows it, while a
/// forged segment behind the record moves nothing.
pub const SEQ_ADVANCE_MAX: u32 = 1 << 30;

/// The record `recorded` after a segment carrying `seen`: `seen` if it is ahead
/// by less than [`SEQ_ADVANCE_MAX`], else unchanged.
#[inline(always)]
#[must_use]
pub const fn advance(recorded: u32, seen: u32) -> u32 {
    if seen.wrapping_sub(recorded) < SEQ_ADVANCE_MAX {
        seen
    } else {
        recorded
    }
}

/// Whether a backend's RST (TCP flags `tcp`, acknowledgement number `ack`) refuses
/// the SYN whose sequence number was `isn`: it must acknowledge exactly that SYN,
/// as the client's stack itself requires (RFC 9293 3.10.7.3). An ICMP error about
/// the SYN must quote `isn` itself.
#[inline(always)]
#[must_use]
pub const fn refuses_syn(tcp: u8, ack: u32, isn: u32) -> bool {
    tcp & TCP_ACK != 0 && ack == isn.wrapping_add(1)
}

/// Whether a flow in `state` with `flags`, `idle_ms` after its last packet, may
/// give its NAT port to a new flow whose SYN carries timestamps (`claimant_ts`).
#[inline(always)]
#[must_use]
pub const fn reusable(
    state: u8,
    flags: u32,
    idle_ms: u64,
    timeouts_ms: &[u32; CT_STATES],
    claimant_ts: bool,
) -> bool {
    let s = if state as usize >= CT_STATES {
        CT_CLOSE
    } else {
        state
    };
    let timeout = if s == CT_TIME_WAIT
        && (flags & FLOW_F_BACKEND_FIRST == 0 || (flags & FLOW_F_TS != 0 && claimant_ts))
    {
        timeouts_ms[CT_CLOSE as usize]
    } else {
        timeouts_ms[s as usize]
    };
    idle_ms >= timeout as u64
}

/// The timestamp clock a port's TSvals are kept on: milliseconds of the
/// datapath's coarse monotonic clock (RFC 7323 asks for 1 ms to 1 s a tick).
#[inline(always)]
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    reason = "TCP timestamps are 32 bits and wrap"
)]
pub const fn ts_clock(now_ns: u64) -> u32 {
    (now_ns / 1_000_000) as u32
}

/// The offset a new flow adds to its client's TSvals (and takes from the
/// backend's TSecrs): its SYN then leaves at `max(clock, floor)`, where `floor`
/// is one past the last TSval the port's previous flow sent (0: none known). Every
/// TSval the backend sees on a port is thereby later than the last one, as
/// `TIME_WAIT` demands of a new SYN, so long as a client's clock ticks no faster
/// than the datapath's.
#[inline(always)]
#[must_use]
pub const fn ts_offset(client_tsval: u32, clock: u32, floor: u32) -> u32 {
    // Serial-number comparison (RFC 1982): `floor` is later if the difference,
    // read as signed, is positive.
    #[expect(clippy::cast_possible_wrap, reason = "serial-number arithmetic")]
    let base = if (floor.wrapping_sub(clock) as i32) > 0 {
        floor
    } else {
        clock
    };
    base.wrapping_sub(client_tsval)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: [u32; CT_STATES] = TIMEOUTS_DEFAULT_MS;

    fn run(segments: &[(u8, u8)]) -> (u8, u32) {
        let (mut s, mut f) = (CT_NONE, 0);
        for &(from, tcp) in segments {
            (s, f) = next(s, f, from, tcp);
        }
        (s, f)
    }

    const SYN: (u8, u8) = (FROM_CLIENT, TCP_SYN);
    const SYN_ACK: (u8, u8) = (FROM_BACKEND, TCP_SYN | TCP_ACK);
    const ACK: (u8, u8) = (FROM_CLIENT, TCP_ACK);
    const B_ACK: (u8, u8) = (FROM_BACKEND, TCP_ACK);
    const C_FIN: (u8, u8) = (FROM_CLIENT, TCP_FIN | TCP_ACK);
    const B_FIN: (u8, u8) = (FROM_BACKEND, TCP_FIN | TCP_ACK);

    #[test]
    fn handshake_is_proven_only_by_the_clients_ack() {
        assert_eq!(run(&[SYN]).0, CT_SYN_SENT);
        assert_eq!(run(&[SYN, SYN]).0, CT_SYN_SENT);
        assert_eq!(run(&[SYN, SYN_ACK]).0, CT_SYN_RECV);
        assert_eq!(run(&[SYN, SYN_ACK, ACK]).0, CT_ESTABLISHED);
        // A client's ACK before any SYN-ACK proves nothing.
        assert_eq!(run(&[SYN, ACK]).0, CT_SYN_SENT);
        // Nor does the backend's own ACK.
        assert_eq!(run(&[SYN, SYN_ACK, B_ACK]).0, CT_SYN_RECV);
    }

    #[test]
    fn client_first_close_ends_without_the_masters_time_wait() {
        let (s, f) = run(&[SYN, SYN_ACK, ACK, C_FIN, B_ACK, B_FIN, ACK]);
        assert_eq!((s, f & FLOW_F_BACKEND_FIRST), (CT_TIME_WAIT, 0));
        assert!(!reusable(s, f, 1_999, &T, false));
        assert!(reusable(s, f, 2_000, &T, false));
    }

    #[test]
    fn master_first_close_holds_the_port_unless_timestamps_carry_it() {
        let (s, f) = run(&[SYN, SYN_ACK, ACK, B_FIN, ACK, C_FIN, B_ACK]);
        assert_eq!(s, CT_TIME_WAIT);
        assert_eq!(f & FLOW_F_BACKEND_FIRST, FLOW_F_BACKEND_FIRST);
        assert!(!reusable(s, f, 64_999, &T, false));
        assert!(reusable(s, f, 65_000, &T, false));
        // Timestamps on both: the old flow's and the claimant's.
        assert!(!reusable(s, f | FLOW_F_TS, 10_000, &T, false));
        assert!(!reusable(s, f, 10_000, &T, true));
        assert!(reusable(s, f | FLOW_F_TS, 2_000, &T, true));
    }

    #[test]
    fn the_last_ack_must_come_from_the_first_closer() {
        // Client closed first; the backend's ACK of its own FIN is not the last.
        assert_eq!(
            run(&[SYN, SYN_ACK, ACK, C_FIN, B_FIN, B_ACK]).0,
            CT_LAST_ACK
        );
        assert_eq!(run(&[SYN, SYN_ACK, ACK, B_FIN, C_FIN, ACK]).0, CT_LAST_ACK);
        // A FIN sent again by the same side is not the second FIN.
        assert_eq!(run(&[SYN, SYN_ACK, ACK, C_FIN, C_FIN]).0, CT_FIN_WAIT);
    }

    #[test]
    fn rst_closes_and_a_syn_reopens_only_a_finished_flow() {
        let (s, f) = run(&[SYN, SYN_ACK, ACK, (FROM_BACKEND, TCP_RST)]);
        assert_eq!(s, CT_CLOSE);
        assert!(reusable(s, f, 2_000, &T, false));
        assert_eq!(
            run(&[SYN, SYN_ACK, ACK, (FROM_CLIENT, TCP_RST), SYN]).0,
            CT_SYN_SENT
        );
        // A SYN on a live flow goes to the backend and changes nothing here.
        assert_eq!(run(&[SYN, SYN_ACK, ACK, SYN]).0, CT_ESTABLISHED);
        let reopened = run(&[SYN, SYN_ACK, ACK, B_FIN, ACK, C_FIN, B_ACK, SYN]);
        assert_eq!(reopened, (CT_SYN_SENT, 0));
        let (s, f) = run(&[SYN, SYN_ACK, ACK, B_FIN, ACK, C_FIN, B_ACK]);
        assert_eq!(
            next(s, f | FLOW_F_TS, FROM_CLIENT, TCP_SYN).1,
            FLOW_F_TS,
            "keeps timestamps"
        );
    }

    #[test]
    fn each_state_holds_its_port_for_its_timeout() {
        for (state, timeout) in T.iter().enumerate().skip(1) {
            // (`TIME_WAIT` holds its own timeout only after a master-first close.)
            let (s, f) = (u8::try_from(state).unwrap(), FLOW_F_BACKEND_FIRST);
            assert!(!reusable(s, f, u64::from(*timeout) - 1, &T, false), "{s}");
            assert!(reusable(s, f, u64::from(*timeout), &T, false), "{s}");
        }
        assert!(reusable(CT_SYN_SENT, 0, 5_000, &T, true));
        assert!(!reusable(CT_ESTABLISHED, FLOW_F_TS, 5_000, &T, true));
    }

    #[test]
    fn a_ports_timestamps_only_move_forward() {
        // No floor: the SYN leaves at the clock.
        let off = ts_offset(123_456, 1_000, 0);
        assert_eq!(123_456u32.wrapping_add(off), 1_000);
        // The previous flow's clock ran ahead of ours: start past it.
        let off = ts_offset(5, 1_000, 9_000);
        assert_eq!(5u32.wrapping_add(off), 9_000);
        // Across the 32-bit wrap, "later" is serial-number order.
        let off = ts_offset(7, 10, u32::MAX - 3);
        assert_eq!(7u32.wrapping_add(off), 10);
        assert_eq!(ts_clock(2_500_000_000), 2_500);
    }

    #[test]
    fn a_rst_must_be_near_the_recorded_sequence_number() {
        for recorded in [0, 1000, u32::MAX - 10] {
            for delta in [0_u32, 1, 1460, RST_SEQ_WINDOW] {
                assert!(near(recorded.wrapping_add(delta), recorded), "+{delta}");
                assert!(near(recorded.wrapping_sub(delta), recorded), "-{delta}");
            }
            for delta in [RST_SEQ_WINDOW + 1, 1 << 20, 1 << 31] {
                assert!(!near(recorded.wrapping_add(delta), recorded), "+{delta}");
                assert!(!near(recorded.wrapping_sub(delta), recorded), "-{delta}");
            }
        }
        // A blind forger's odds: the window over the sequence space.
        let hits = (0..1_u64 << 16)
            .filter(|i| near((i * 65_537) as u32, 12_345))
            .count();
        assert!(hits <= 4, "{hits} of 65,536 spread guesses landed");
    }

    #[test]
    fn only_a_rst_acknowledging_the_syn_refuses_it() {
        assert!(refuses_syn(TCP_RST | TCP_ACK, 101, 100));
        assert!(refuses_syn(TCP_RST | TCP_ACK, 0, u32::MAX), "wraps");
        assert!(!refuses_syn(TCP_RST, 101, 100), "no ACK");
        assert!(!refuses_syn(TCP_RST | TCP_ACK, 100, 100));
        assert!(!refuses_syn(TCP_RST | TCP_ACK, 7, 100));
    }

    #[test]
    fn both_fins_seen_settle_a_raced_close() {
        // Both FINs moved ESTABLISHED at once; one move was lost.
        let (s, f) = run(&[SYN, SYN_ACK, ACK, C_FIN]);
        assert_eq!(settled(s, 1, 1), CT_LAST_ACK);
        assert!(reusable(settled(s, 1, 1), f, 10_000, &T, false));
        assert_eq!(settled(s, 1, 0), CT_FIN_WAIT);
        assert_eq!(settled(CT_TIME_WAIT, 1, 1), CT_TIME_WAIT);
    }

    #[test]
    fn a_fin_must_be_near_the_clients_recorded_sequence_number() {
        let rec = 5_000;
        assert!(fin_proven(
            FROM_CLIENT,
            TCP_FIN | TCP_ACK,
            rec + 300,
            0,
            rec
        ));
        assert!(!fin_proven(
            FROM_CLIENT,
            TCP_FIN | TCP_ACK,
            rec + (1 << 20),
            0,
            rec
        ));
        // The backend's FIN is judged by what it acknowledges.
        assert!(fin_proven(FROM_BACKEND, TCP_FIN | TCP_ACK, 7, rec + 1, rec));
        assert!(!fin_proven(
            FROM_BACKEND,
            TCP_FIN | TCP_ACK,
            7,
            rec ^ (1 << 30),
            rec
        ));
        assert!(
            !fin_proven(FROM_BACKEND, TCP_FIN, 7, rec + 1, rec),
            "no ACK"
        );
    }

    #[test]
    fn the_record_is_refreshed_every_stride() {
        assert!(!record_stale(100 + RECORD_STRIDE - 1, 50, 100, 50));
        assert!(record_stale(100 + RECORD_STRIDE, 50, 100, 50));
        assert!(record_stale(100, 50 + RECORD_STRIDE, 100, 50));
        assert!(!record_stale(50, 50, 100, 50), "behind");
        assert!(
            !record_stale(100 + SEQ_ADVANCE_MAX, 50, 100, 50),
            "too far to follow"
        );
        assert!(
            RECORD_STRIDE + 9_000 < RST_SEQ_WINDOW,
            "a jumbo segment past the stride"
        );
    }

    #[test]
    fn the_record_only_moves_forward_and_not_too_far() {
        assert_eq!(advance(100, 1_000), 1_000);
        assert_eq!(advance(u32::MAX - 5, 10), 10, "wraps");
        assert_eq!(advance(1_000, 100), 1_000, "behind");
        assert_eq!(advance(0, SEQ_ADVANCE_MAX), 0, "too far");
    }
}
