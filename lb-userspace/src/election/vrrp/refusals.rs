//! The log of refused adverts: each line names the sender, the VRID and the
//! reason, so a peer with the wrong password, VRID or TTL can be found. Adverts
//! are easy to forge and may come fast, so the lines are rate-limited: at most
//! one per sender and reason every [`EVERY`], saying how many were left out
//! since the last; beyond [`SENDERS`] senders at once, new senders share one line.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::warn;

use super::packet::Reject;

/// How long a sender's refusals of one reason stay quiet after a line.
pub const EVERY: Duration = Duration::from_secs(10);
/// Senders remembered at once; the rest share one line per reason.
pub const SENDERS: usize = 64;

/// One sender and reason: quiet until `until`, with the refusals not logged.
#[derive(Debug)]
struct Quiet {
    until: Instant,
    suppressed: u64,
}

/// Refusals by sender (`None`: the senders beyond [`SENDERS`]) and reason.
#[derive(Debug, Default)]
pub struct Refusals {
    quiet: HashMap<(Option<IpAddr>, &'static str), Quiet>,
}

/// One line to log.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// `None`: one of many senders.
    pub src: Option<IpAddr>,
    pub vrid: Option<u8>,
    pub reason: Reject,
    /// Refusals of this sender and reason left out since the last line.
    pub suppressed: u64,
}

impl Refusals {
    /// An advert from `src` for `vrid` (if it was long enough to carry one) was
    /// refused for `reason`: log it, unless this sender's refusals of that reason
    /// were logged less than [`EVERY`] ago.
    pub fn refused(&mut self, now: Instant, src: IpAddr, vrid: Option<u8>, reason: Reject) {
        let Some(line) = self.decide(now, src, vrid, reason) else {
            return;
        };
        let sender = line.src.map_or_else(
            || format!("one of more than {SENDERS} senders"),
            |a| a.to_string(),
        );
        let vrid = line.vrid.map_or_else(|| "?".to_owned(), |v| v.to_string());
        warn!(
            src = %sender,
            vrid = %vrid,
            reason = line.reason.reason(),
            suppressed = line.suppressed,
            "VRRP adverts refused: {} (at most one line per sender and reason every {}s; \
             suppressed: how many since the last)",
            line.reason,
            EVERY.as_secs()
        );
    }

    /// The line to log for this refusal, if any.
    fn decide(
        &mut self,
        now: Instant,
        src: IpAddr,
        vrid: Option<u8>,
        reason: Reject,
    ) -> Option<Line> {
        let label = reason.reason();
        if self.quiet.len() >= SENDERS && !self.quiet.contains_key(&(Some(src), label)) {
            self.quiet.retain(|_, q| q.until > now);
        }
        let known = self.quiet.contains_key(&(Some(src), label));
        let key = if known || self.quiet.len() < SENDERS {
            (Some(src), label)
        } else {
            (None, label)
        };
        let suppressed = match self.quiet.get_mut(&key) {
            Some(q) if q.until > now => {
                q.suppressed += 1;
                return None;
            }
            Some(q) => q.suppressed,
            None => 0,
        };
        self.quiet.insert(
            key,
            Quiet {
                until: now + EVERY,
                suppressed: 0,
            },
        );
        Some(Line {
            src: key.0,
            vrid,
            reason,
            suppressed,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn addr(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 1, i))
    }

    #[test]
    fn a_flood_is_one_line_per_sender_and_reason_every_ten_seconds_with_its_count() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let mut lines = Vec::new();
        // 1000 bad-password adverts and 1000 of another VRID from one sender, one
        // every 10 ms for 10 s, then one more of each.
        for i in 0..1000u32 {
            let t = t0 + Duration::from_millis(u64::from(i) * 10);
            lines.extend(r.decide(t, addr(2), Some(51), Reject::Auth));
            lines.extend(r.decide(t, addr(2), Some(52), Reject::Vrid));
        }
        let t = t0 + EVERY;
        lines.extend(r.decide(t, addr(2), Some(51), Reject::Auth));
        lines.extend(r.decide(t, addr(2), Some(52), Reject::Vrid));
        eprintln!("{lines:?}");
        assert_eq!(
            lines,
            [
                Line {
                    src: Some(addr(2)),
                    vrid: Some(51),
                    reason: Reject::Auth,
                    suppressed: 0
                },
                Line {
                    src: Some(addr(2)),
                    vrid: Some(52),
                    reason: Reject::Vrid,
                    suppressed: 0
                },
                Line {
                    src: Some(addr(2)),
                    vrid: Some(51),
                    reason: Reject::Auth,
                    suppressed: 999
                },
                Line {
                    src: Some(addr(2)),
                    vrid: Some(52),
                    reason: Reject::Vrid,
                    suppressed: 999
                },
            ]
        );
    }

    #[test]
    fn forged_senders_beyond_the_limit_share_one_line_and_the_map_stays_bounded() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let logged = (0..=255u8)
            .filter_map(|i| r.decide(t0, addr(i), Some(7), Reject::Ttl))
            .collect::<Vec<_>>();
        assert_eq!(logged.len(), SENDERS + 1, "64 senders and one shared line");
        assert_eq!(logged[SENDERS].src, None);
        assert_eq!(r.quiet.len(), SENDERS + 1);
        // Once the window is over, new senders get their own lines again.
        let later = t0 + EVERY;
        let line = r.decide(later, addr(200), Some(7), Reject::Ttl);
        assert_eq!(line.map(|l| l.src), Some(Some(addr(200))));
        assert!(r.quiet.len() <= SENDERS + 1);
    }
}
