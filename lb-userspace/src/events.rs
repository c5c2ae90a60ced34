//! Datapath events rare enough to log each second they occur. They are counted in
//! the kernel, where logging them would cost every packet; the controller reads the
//! counters once a second and logs what moved, so even a storm of them is one line
//! per second per counter.

use lb_common::{
    COUNTER_NAMES, DROP_FLOW_INSERT, DROP_NO_BACKEND, DROP_NO_NAT_PORT, DROP_NO_SNAT_ADDR,
    DROP_UNPROVEN_REFUSAL, FIN_UNPROVEN, HALF_OPEN_LOST, REPLY_RESTORED, RST_UNPROVEN,
};
use tracing::{info, warn};

/// How loud a logged event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// Worth a line, and no connection lost: an evicted reply entry put back.
    Info,
    /// A new flow was lost.
    Warn,
}

/// The logged counters, with their level and what a line about them says.
const LOGGED: [(u32, Level, &str); 9] = [
    (
        DROP_NO_BACKEND,
        Level::Warn,
        "new flows dropped by the datapath",
    ),
    (
        DROP_NO_NAT_PORT,
        Level::Warn,
        "new flows dropped by the datapath",
    ),
    (
        DROP_NO_SNAT_ADDR,
        Level::Warn,
        "new flows dropped by the datapath",
    ),
    (
        DROP_FLOW_INSERT,
        Level::Warn,
        "new flows dropped by the datapath",
    ),
    (
        HALF_OPEN_LOST,
        Level::Warn,
        "handshakes lost: their half-open flows were evicted (a SYN flood, or half_open_table_size too small)",
    ),
    (
        REPLY_RESTORED,
        Level::Info,
        "established flows' reply entries were evicted and put back (flow_table_size too small?)",
    ),
    (
        RST_UNPROVEN,
        Level::Info,
        "RSTs far from where their flow is passed on without ending it (forged, or a fast flow's)",
    ),
    (
        FIN_UNPROVEN,
        Level::Info,
        "FINs far from where their flow's client is passed on without closing it (forged)",
    ),
    (
        DROP_UNPROVEN_REFUSAL,
        Level::Info,
        "refusals that do not match the SYN they claim to refuse dropped (forged or stale)",
    ),
];

/// The counters at the last reading.
#[derive(Debug, Default)]
pub struct EventLog {
    seen: Vec<u64>,
}

impl EventLog {
    /// Log the events counted since the last call (none on the first).
    pub fn log(&mut self, counters: &[u64]) {
        for (event, level, message, count) in moved(&self.seen, counters) {
            match level {
                Level::Info => info!(event, count, "{message}"),
                Level::Warn => warn!(event, count, "{message}"),
            }
        }
        self.seen = counters.to_vec();
    }
}

/// The logged events that moved between two counter readings, and by how much.
fn moved(before: &[u64], now: &[u64]) -> Vec<(&'static str, Level, &'static str, u64)> {
    LOGGED
        .iter()
        .filter_map(|&(i, level, message)| {
            let i = i as usize;
            let delta = now.get(i)?.saturating_sub(*before.get(i)?);
            (delta > 0).then_some((COUNTER_NAMES[i], level, message, delta))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_logged_events_that_moved_are_reported_with_their_delta() {
        let mut before = vec![0u64; lb_common::COUNTER_COUNT as usize];
        before[DROP_NO_NAT_PORT as usize] = 5;
        let mut now = before.clone();
        now[DROP_NO_NAT_PORT as usize] = 12;
        now[lb_common::REDIRECT as usize] = 1_000; // not a logged event
        now[REPLY_RESTORED as usize] = 3;
        let moved_now: Vec<(&str, Level, u64)> = moved(&before, &now)
            .into_iter()
            .map(|(e, l, _, n)| (e, l, n))
            .collect();
        assert_eq!(
            moved_now,
            vec![
                ("drop_no_nat_port", Level::Warn, 7),
                ("reply_restored", Level::Info, 3)
            ]
        );
        assert!(moved(&now, &now).is_empty());
        // The first reading (nothing seen yet) logs nothing.
        assert!(moved(&[], &now).is_empty());
    }
}
