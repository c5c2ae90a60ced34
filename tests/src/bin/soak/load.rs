//! The connection load: new connections paced from the start (open loop),
//! alternating the VIPs and cycling the closers, each on its own task, and what
//! they saw.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tests::oneshot::{Answer, Closer, EXCHANGE_LIMIT, Failure, Request, Tally, exchange};

/// Connections in flight at most; more would mean the LB is losing them, and
/// the load counts them as failed instead of piling up sockets.
pub const MAX_IN_FLIGHT: u64 = 40_000;

/// What the connection load saw.
#[derive(Clone, Default)]
pub struct Load {
    /// Connections started.
    pub started: u64,
    /// Scheduled in all: the rate x the run's seconds.
    pub scheduled: u64,
    /// Connections not started because [`MAX_IN_FLIGHT`] were in flight.
    pub skipped: u64,
    /// Most connections the pacer was behind its schedule at one time.
    pub max_behind: u64,
    pub in_flight: Arc<AtomicU64>,
    /// By VIP (0: IPv4, 1: IPv6), then closer (`Closer::ALL`'s order).
    pub tally: [[Tally; 3]; 2],
    /// Good answers that took over a second (a SYN sent again, typically).
    pub slow: u64,
    /// New connections each master answered, second by second.
    pub per_second: Vec<[u32; 3]>,
    /// From the first start to the last end.
    pub took: Duration,
}

impl Load {
    pub fn totals(&self) -> (u64, u64) {
        let all = self.tally.iter().flatten();
        all.fold((0, self.skipped), |(ok, failed), t| {
            (ok + t.ok, failed + t.failures())
        })
    }

    pub fn record(
        &mut self,
        vip: usize,
        closer: usize,
        start_s: u64,
        result: &Result<Answer, Failure>,
        took: Duration,
    ) {
        self.tally[vip][closer].record(result, took);
        if let Ok(a) = result {
            if took > Duration::from_secs(1) {
                self.slow += 1;
            }
            let master = a
                .server
                .as_deref()
                .and_then(|s| s.strip_prefix("master-"))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=3).contains(n));
            if let Some(m) = master {
                let s = usize::try_from(start_s).expect("seconds");
                if self.per_second.len() <= s {
                    self.per_second.resize(s + 1, [0; 3]);
                }
                self.per_second[s][m - 1] += 1;
            }
        }
    }
}

/// Start `rate` exchanges a second from `started` for `run_for`, alternating
/// the VIPs and cycling the closers, each on its own task; wait for them all, and
/// return when they ended, since `started`.
pub async fn paced(
    vips: [SocketAddr; 2],
    rate: u32,
    run_for: Duration,
    load: Arc<Mutex<Load>>,
    started: Instant,
) -> Duration {
    let expect = Request {
        path: "/version".into(),
        host: "kubernetes".into(),
        body_contains: "\"gitVersion\":\"v1.30.0-apilb-stub\"".into(),
    };
    let requests: Vec<Vec<u8>> = Closer::ALL.iter().map(|c| expect.bytes(*c)).collect();
    let requests = Arc::new(requests);
    let expect = Arc::new(expect);
    let total = u64::from(rate) * run_for.as_secs();
    let in_flight = Arc::clone(&load.lock().expect("lock").in_flight);
    load.lock().expect("lock").scheduled = total;
    let mut n: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while n < total {
        tick.tick().await;
        let elapsed = started.elapsed().min(run_for);
        let due = u64::try_from(elapsed.as_nanos() * u128::from(rate) / 1_000_000_000)
            .expect("count")
            .min(total);
        let mut l = load.lock().expect("lock");
        l.max_behind = l.max_behind.max(due.saturating_sub(n));
        while n < due {
            // Alternate the VIPs, and cycle the closers over pairs, so that each
            // VIP gets each closer in equal shares.
            let vip = usize::try_from(n % 2).expect("index");
            let closer = usize::try_from((n / 2) % 3).expect("index");
            n += 1;
            l.started += 1;
            if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                l.skipped += 1;
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (load, requests, expect, in_flight) = (
                Arc::clone(&load),
                Arc::clone(&requests),
                Arc::clone(&expect),
                Arc::clone(&in_flight),
            );
            tokio::spawn(async move {
                let t0 = Instant::now();
                let start_s = t0.duration_since(started).as_secs();
                let result = exchange(
                    vips[vip],
                    Closer::ALL[closer],
                    &requests[closer],
                    &expect,
                    EXCHANGE_LIMIT,
                )
                .await;
                let took = t0.elapsed();
                load.lock()
                    .expect("lock")
                    .record(vip, closer, start_s, &result, took);
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
    // Every exchange ends within its limit.
    let deadline = Instant::now() + EXCHANGE_LIMIT + Duration::from_secs(2);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}
