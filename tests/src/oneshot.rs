//! One HTTP/1.1 request per TCP connection, with the side that closes first
//! chosen: the load that a NAT port's lifecycle depends on, which wrk can only half
//! produce (its `Connection: close` makes the server close first).
//!
//! Which side closes first decides who holds `TIME_WAIT`, and so how long a
//! balancer that SNATs must keep the flow's port from the next flow: the master
//! after a server-first close, nobody after a client-first close or a RST. An
//! exchange checks the whole answer (status 200, `Content-Length` bytes of body, no
//! more, and after a server-first close the server's FIN), so that a connection
//! that only seemed to work counts as failed. [`closed_loop`] runs `n` connections
//! back to back for a while on one task each, as wrk does, for the benchmarks;
//! [`open_loop`] starts them at a fixed rate, for a benchmark that needs a given
//! number of new flows a second; the soak paces its own.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::SocketAddr,
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Which side closes the connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Closer {
    /// The client reads the whole answer, whose length it knows, then closes (FIN):
    /// the client holds `TIME_WAIT`.
    Client,
    /// The request says `Connection: close`; the server closes after its answer
    /// and the client reads to that EOF: the server holds `TIME_WAIT`.
    Server,
    /// The client reads the whole answer, then aborts with a RST (`SO_LINGER` 0):
    /// nobody holds `TIME_WAIT`.
    Reset,
}

impl Closer {
    pub const ALL: [Closer; 3] = [Closer::Client, Closer::Server, Closer::Reset];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Closer::Client => "client closes first",
            Closer::Server => "server closes first",
            Closer::Reset => "client aborts (RST)",
        }
    }
}

/// Why an exchange failed; each is a connection a user would have seen fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// `connect()` failed (refused, unreachable, no local port, ...).
    Connect(ErrorKind),
    /// A RST the client did not ask for.
    Reset,
    /// EOF before the whole answer.
    Short,
    /// Not the answer expected: status, headers, extra bytes, the body.
    Wrong(String),
    /// Another I/O error on the connection.
    Io(ErrorKind),
    /// No complete answer within the exchange's time limit, stuck at a
    /// [`Stage`].
    Timeout(Stage),
}

/// How far an exchange got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    Connecting,
    Answering,
    Closing,
}

impl Stage {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Stage::Connecting,
            1 => Stage::Answering,
            _ => Stage::Closing,
        }
    }
}

impl Failure {
    /// A short name to count failures by.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect",
            Failure::Reset => "reset",
            Failure::Short => "short",
            Failure::Wrong(_) => "wrong",
            Failure::Io(_) => "io",
            Failure::Timeout(Stage::Connecting) => "timeout connecting",
            Failure::Timeout(Stage::Answering) => "timeout answering",
            Failure::Timeout(Stage::Closing) => "timeout closing",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(k) => write!(f, "connect: {k}"),
            Failure::Reset => f.write_str("reset by peer"),
            Failure::Short => f.write_str("EOF before the whole answer"),
            Failure::Wrong(why) => write!(f, "wrong answer: {why}"),
            Failure::Io(k) => write!(f, "i/o: {k}"),
            Failure::Timeout(Stage::Connecting) => f.write_str("timed out connecting"),
            Failure::Timeout(Stage::Answering) => f.write_str("timed out awaiting the answer"),
            Failure::Timeout(Stage::Closing) => f.write_str("timed out awaiting the server's FIN"),
        }
    }
}

fn io_failure(e: &std::io::Error) -> Failure {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Failure::Reset,
        ErrorKind::UnexpectedEof => Failure::Short,
        k => Failure::Io(k),
    }
}

/// What to ask and what to accept.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    pub host: String,
    /// A body that does not contain this is wrong (empty: any body).
    pub body_contains: String,
}

impl Request {
    /// The request's bytes for `closer`.
    #[must_use]
    pub fn bytes(&self, closer: Closer) -> Vec<u8> {
        let close = if closer == Closer::Server {
            "Connection: close\r\n"
        } else {
            ""
        };
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: apilb-oneshot\r\n{close}\r\n",
            self.path, self.host
        )
        .into_bytes()
    }
}

/// A good exchange: the `x-apiserver` header if the answer had one.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub server: Option<String>,
}

/// Connect to `to`, send `request` (from [`Request::bytes`] for `closer`), read
/// and check the whole answer, and close as `closer` says; all within `limit`.
pub async fn exchange(
    to: SocketAddr,
    closer: Closer,
    request: &[u8],
    expect: &Request,
    limit: Duration,
) -> Result<Answer, Failure> {
    let stage = AtomicU8::new(Stage::Connecting as u8);
    tokio::time::timeout(
        limit,
        exchange_unbounded(to, closer, request, expect, &stage),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Failure::Timeout(Stage::from_u8(
            stage.load(Ordering::Relaxed),
        )))
    })
}

async fn exchange_unbounded(
    to: SocketAddr,
    closer: Closer,
    request: &[u8],
    expect: &Request,
    stage: &AtomicU8,
) -> Result<Answer, Failure> {
    let mut conn = TcpStream::connect(to)
        .await
        .map_err(|e| Failure::Connect(e.kind()))?;
    stage.store(Stage::Answering as u8, Ordering::Relaxed);
    let _ = conn.set_nodelay(true);
    if closer == Closer::Reset {
        conn.set_zero_linger().map_err(|e| Failure::Io(e.kind()))?;
    }
    conn.write_all(request).await.map_err(|e| io_failure(&e))?;
    let mut buf = Vec::with_capacity(1024);
    let (head_len, body_len, server) = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let (len, server) = parse_head(&buf[..end])?;
            break (end + 4, len, server);
        }
        if buf.len() > 16 * 1024 {
            return Err(Failure::Wrong("a head over 16 KiB".into()));
        }
        read_more(&mut conn, &mut buf).await?;
    };
    while buf.len() < head_len + body_len {
        read_more(&mut conn, &mut buf).await?;
    }
    if buf.len() > head_len + body_len {
        return Err(Failure::Wrong(format!(
            "{} bytes after the body",
            buf.len() - head_len - body_len
        )));
    }
    let body = &buf[head_len..];
    if !expect.body_contains.is_empty() && find(body, expect.body_contains.as_bytes()).is_none() {
        return Err(Failure::Wrong(format!(
            "body {:?}",
            String::from_utf8_lossy(body)
        )));
    }
    if closer == Closer::Server {
        stage.store(Stage::Closing as u8, Ordering::Relaxed);
        let mut rest = [0u8; 64];
        match conn.read(&mut rest).await {
            Ok(0) => {}
            Ok(n) => return Err(Failure::Wrong(format!("{n} bytes after the body"))),
            Err(e) => return Err(io_failure(&e)),
        }
    }
    // Dropping closes: a FIN, or with zero linger a RST.
    drop(conn);
    Ok(Answer { server })
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Failure> {
    let mut chunk = [0u8; 4096];
    match conn.read(&mut chunk).await {
        Ok(0) => Err(Failure::Short),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(io_failure(&e)),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The head's status (200 or wrong), `Content-Length` (required) and
/// `x-apiserver`.
fn parse_head(head: &[u8]) -> Result<(usize, Option<String>), Failure> {
    let head = std::str::from_utf8(head).map_err(|_| Failure::Wrong("a head not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(Failure::Wrong(format!("status {status:?}")));
    }
    let (mut len, mut server) = (None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            len = value.trim().parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("x-apiserver") {
            server = Some(value.trim().to_owned());
        }
    }
    let len = len.ok_or_else(|| Failure::Wrong("no Content-Length".into()))?;
    Ok((len, server))
}

/// How a set of exchanges went.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub ok: u64,
    /// Failures by [`Failure::kind`].
    pub failed: BTreeMap<&'static str, u64>,
    /// The first few failures, for messages.
    pub samples: Vec<String>,
    /// Each good exchange's time, connect to the answer's last byte, in µs.
    pub latency_us: Vec<u32>,
}

impl Tally {
    pub fn record(&mut self, result: &Result<Answer, Failure>, took: Duration) {
        match result {
            Ok(_) => {
                self.ok += 1;
                self.latency_us
                    .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            }
            Err(f) => {
                *self.failed.entry(f.kind()).or_insert(0) += 1;
                if self.samples.len() < 5 {
                    self.samples.push(f.to_string());
                }
            }
        }
    }

    pub fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (k, n) in other.failed {
            *self.failed.entry(k).or_insert(0) += n;
        }
        for s in other.samples {
            if self.samples.len() < 5 {
                self.samples.push(s);
            }
        }
        self.latency_us.extend(other.latency_us);
    }

    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    /// The `q` quantile (0-1) of the good exchanges' times, in ms.
    #[must_use]
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latency_us.is_empty() {
            return f64::NAN;
        }
        self.latency_us.sort_unstable();
        let last = self.latency_us.len() - 1;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "an index within the vector, from a fraction of its length"
        )]
        let i = ((last as f64) * q).round() as usize;
        f64::from(self.latency_us[i.min(last)]) / 1000.0
    }
}

/// `connections` tasks on the current runtime, each running exchanges with `to`
/// back to back until `duration` has passed: every exchange's outcome, and the
/// time taken.
pub async fn closed_loop(
    to: SocketAddr,
    closer: Closer,
    expect: &Request,
    connections: usize,
    duration: Duration,
) -> (Tally, Duration) {
    let started = Instant::now();
    let deadline = started + duration;
    let request = expect.bytes(closer);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (request, expect) = (request.clone(), expect.clone());
        tasks.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                // No exchange outlives the run by more than its own limit.
                let result = exchange(to, closer, &request, &expect, EXCHANGE_LIMIT).await;
                tally.record(&result, t0.elapsed());
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(t) = tasks.join_next().await {
        all.merge(t.expect("load task"));
    }
    (all, started.elapsed())
}

/// Exchanges with `to` started at `rate` a second for `duration`, paced from the
/// start whatever the answers do (open loop: a slow exchange does not hold the
/// next back), each on its own task, at most `max_in_flight` at once (one more
/// is counted as failed, `skipped`): every outcome, and the time from the first
/// start to the last end.
pub async fn open_loop(
    to: SocketAddr,
    closer: Closer,
    expect: &Request,
    (rate, duration): (u32, Duration),
    max_in_flight: usize,
) -> (Tally, Duration) {
    let started = Instant::now();
    let total = u64::from(rate) * duration.as_secs();
    let request = expect.bytes(closer);
    let mut tasks = tokio::task::JoinSet::new();
    let mut all = Tally::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    while n < total {
        tick.tick().await;
        while let Some(done) = tasks.try_join_next() {
            let (result, took) = done.expect("exchange task");
            all.record(&result, took);
        }
        let due = u64::try_from(started.elapsed().as_nanos() * u128::from(rate) / 1_000_000_000)
            .unwrap_or(u64::MAX)
            .min(total);
        for _ in n..due {
            if tasks.len() >= max_in_flight {
                *all.failed.entry("skipped").or_insert(0) += 1;
                continue;
            }
            let (request, expect) = (request.clone(), expect.clone());
            tasks.spawn(async move {
                let t0 = Instant::now();
                let result = exchange(to, closer, &request, &expect, EXCHANGE_LIMIT).await;
                (result, t0.elapsed())
            });
        }
        n = n.max(due);
    }
    // Every exchange ends within its own limit.
    while let Some(done) = tasks.join_next().await {
        let (result, took) = done.expect("exchange task");
        all.record(&result, took);
    }
    (all, started.elapsed())
}

/// Wait (at most 20 s) until a request through each VIP is answered.
pub fn wait_serving(client: &crate::netns::Netns, vips: &[SocketAddr], apilb: &crate::live::Apilb) {
    let _inside = client.enter();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let expect = Request {
        path: "/version".into(),
        host: "kubernetes".into(),
        body_contains: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for &vip in vips {
        loop {
            let r = rt.block_on(exchange(
                vip,
                Closer::Client,
                &expect.bytes(Closer::Client),
                &expect,
                Duration::from_secs(1),
            ));
            if r.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{vip} does not answer: {r:?}; apilb's log:\n{}",
                apilb.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An exchange unanswered this long has failed: long enough for two SYN
/// retransmits (1 s and 3 s after the SYN), as `traffic::ATTEMPT_TIMEOUT`.
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_without_content_length_is_wrong() {
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nx-apiserver: master-1"),
            Err(Failure::Wrong(_))
        ));
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nx-apiserver: master-1"),
            Ok((9, Some("master-1".to_owned())))
        );
        assert!(matches!(
            parse_head(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0"),
            Err(Failure::Wrong(_))
        ));
    }

    #[test]
    fn only_a_server_first_request_asks_to_close() {
        let r = Request {
            path: "/version".into(),
            host: "x".into(),
            body_contains: String::new(),
        };
        let text = |c| String::from_utf8(r.bytes(c)).expect("utf-8");
        assert!(text(Closer::Server).contains("Connection: close\r\n"));
        assert!(!text(Closer::Client).contains("Connection"));
        assert!(!text(Closer::Reset).contains("Connection"));
    }

    #[test]
    fn quantiles_are_measured_values() {
        let mut t = Tally {
            latency_us: (1..=100).map(|i| i * 1000).collect(),
            ..Tally::default()
        };
        assert!((t.quantile_ms(0.99) - 99.0).abs() < 1e-9);
        assert!((t.quantile_ms(0.0) - 1.0).abs() < 1e-9);
    }
}
