//! What every scenario measures the same way: message ids and send times in the body,
//! loss and duplicate counts, an end-to-end latency histogram, the broker's CPU and RSS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use std::sync::Mutex;

/// Bytes every body starts with: message id, then the intended send time in ns since the
/// run's epoch (fixed-rate runs use the schedule, so a stall shows up as latency instead
/// of being hidden: no coordinated omission).
pub const HEADER: usize = 16;

pub fn stamp(body: &mut [u8], id: u64, sent_ns: u64) {
    body[..8].copy_from_slice(&id.to_be_bytes());
    body[8..16].copy_from_slice(&sent_ns.to_be_bytes());
}

pub fn read_stamp(body: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let t = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((id, t))
}

/// Set by `--latency-log`: trackers made after it keep every delivery's times.
static KEEP_SAMPLES: AtomicBool = AtomicBool::new(false);

/// Makes every tracker created from now on keep each delivery's (id, sent, received) for
/// [`Tracker::write_samples`]: the histogram says how long the tail is, the samples say
/// whether its messages came alone or in bursts (docs/PERFORMANCE.md, "A pacer that
/// yields to the broker").
pub fn keep_samples() {
    KEEP_SAMPLES.store(true, Ordering::Relaxed);
}

/// Shared by the publisher (for closed-loop pacing) and the consumers.
pub struct Tracker {
    pub epoch: Instant,
    expected_per_consumer: u64,
    seen: Vec<Mutex<Vec<u64>>>,
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    /// (id, intended send, receipt) in ns since the epoch, with `--latency-log`.
    samples: Option<Mutex<Vec<(u64, u64, u64)>>>,
    last: Mutex<Instant>,
    /// Wakes a closed-loop publisher waiting for deliveries.
    progress: tokio::sync::Notify,
}

impl Tracker {
    pub fn new(expected_per_consumer: u64, consumers: usize) -> Arc<Tracker> {
        let words = expected_per_consumer.div_ceil(64) as usize;
        let epoch = Instant::now();
        Arc::new(Tracker {
            epoch,
            expected_per_consumer,
            seen: (0..consumers)
                .map(|_| Mutex::new(vec![0u64; words]))
                .collect(),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            // 1 µs .. 60 s, 3 significant digits.
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds")),
            samples: KEEP_SAMPLES.load(Ordering::Relaxed).then(|| {
                Mutex::new(Vec::with_capacity(
                    (expected_per_consumer as usize).saturating_mul(consumers),
                ))
            }),
            last: Mutex::new(epoch),
            progress: tokio::sync::Notify::new(),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Records one delivery to consumer `c`.
    pub fn record(&self, c: usize, body: &[u8]) {
        let Some((id, sent)) = read_stamp(body) else {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let fresh = {
            let Ok(mut seen) = self.seen[c].lock() else {
                return;
            };
            let (w, bit) = ((id / 64) as usize, 1u64 << (id % 64));
            match seen.get_mut(w) {
                Some(word) if id < self.expected_per_consumer && *word & bit == 0 => {
                    *word |= bit;
                    true
                }
                _ => false,
            }
        };
        if !fresh {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = self.now_ns();
        if let Some(Ok(mut v)) = self.samples.as_ref().map(|s| s.lock()) {
            v.push((id, sent, now));
        }
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record((now.saturating_sub(sent) / 1000).max(1));
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.last.lock() {
            *l = Instant::now();
        }
        self.progress.notify_waiters();
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Waits until `total` deliveries arrived, or nothing arrived for `idle`.
    pub async fn wait(&self, total: u64, idle: Duration) -> Instant {
        let mut last_count = 0;
        let mut since = Instant::now();
        loop {
            let n = self.delivered();
            if n >= total {
                break;
            }
            if n != last_count {
                last_count = n;
                since = Instant::now();
            } else if since.elapsed() > idle {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.last
            .lock()
            .map(|l| *l)
            .unwrap_or_else(|_| Instant::now())
    }

    /// Writes the kept samples, one `id sent_ns received_ns` line per delivery in id order
    /// (`scripts/latency_bursts.py` reads them).
    pub fn write_samples(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        if let Some(Ok(mut v)) = self.samples.as_ref().map(|s| s.lock()) {
            v.sort_unstable();
            for (id, sent, received) in v.iter() {
                writeln!(out, "{id} {sent} {received}")?;
            }
        }
        out.flush()
    }

    pub fn latency_json(&self) -> serde_json::Value {
        let Ok(h) = self.latency.lock() else {
            return serde_json::Value::Null;
        };
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        serde_json::json!({
            "p50_ms": ms(h.value_at_quantile(0.5)), "p99_ms": ms(h.value_at_quantile(0.99)),
            "p999_ms": ms(h.value_at_quantile(0.999)), "max_ms": ms(h.max()),
        })
    }
}

/// How the publisher paces itself.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as possible.
    Max,
    /// At most this many published and not yet delivered.
    Closed(u64),
    /// A fixed number of messages per second.
    Rate(f64),
}

/// Decides when each message goes.
pub struct Pacer {
    pace: Pace,
    origin: u64,
    /// Closed loop: messages given up on after a stall (counted as lost at the end).
    written_off: u64,
}

impl Pacer {
    /// Starts pacing now (`t`'s clock).
    pub fn start(pace: Pace, t: &Tracker) -> Pacer {
        Pacer {
            pace,
            origin: t.now_ns(),
            written_off: 0,
        }
    }

    pub fn is_max(&self) -> bool {
        matches!(self.pace, Pace::Max)
    }

    /// Whether [`Pacer::before`] would wait for deliveries now (a batching publisher must
    /// write what it holds first, or nothing would be delivered).
    pub fn would_wait(&self, i: u64, t: &Tracker, deliveries_per_msg: u64) -> bool {
        match self.pace {
            Pace::Closed(n) => {
                i * deliveries_per_msg >= t.delivered() + self.written_off + n * deliveries_per_msg
            }
            Pace::Rate(_) => true,
            Pace::Max => false,
        }
    }

    /// Waits until message `i` may go; returns its intended send time (ns since the
    /// tracker's epoch): the schedule's slot for fixed-rate runs, so a stall anywhere shows
    /// up as latency instead of being hidden (no coordinated omission).
    pub async fn before(&mut self, i: u64, t: &Tracker, deliveries_per_msg: u64) -> u64 {
        match self.pace {
            Pace::Max => t.now_ns(),
            Pace::Closed(n) => {
                // Woken by the deliveries themselves: a timer (1 ms ticks) would idle the
                // publisher for longer than a whole window takes to drain. Once the window
                // is full, it resumes when an eighth of it is free, so a batching client
                // writes batches instead of one message per freed slot.
                let d = deliveries_per_msg;
                if i * d >= t.delivered() + self.written_off + n * d {
                    let resume = (i * d + d * (n / 8).max(1)).saturating_sub(n * d);
                    // A broker that drops messages would hold the window forever: after
                    // 10 s without a delivery, what is in flight is written off and the
                    // run goes on (the loss is reported at the end, not hidden).
                    let (mut seen, mut since) = (t.delivered(), Instant::now());
                    loop {
                        let progress = t.progress.notified();
                        tokio::pin!(progress);
                        progress.as_mut().enable();
                        let now = t.delivered() + self.written_off;
                        if now >= resume {
                            break;
                        }
                        if now != seen {
                            (seen, since) = (now, Instant::now());
                        } else if since.elapsed() > Duration::from_secs(10) {
                            self.written_off = (i * d).saturating_sub(t.delivered());
                            break;
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(1), progress).await;
                    }
                }
                t.now_ns()
            }
            Pace::Rate(r) => {
                let due = self.origin + (i as f64 / r * 1e9) as u64;
                // tokio's timer wheel ticks in milliseconds: sleep to just before the slot,
                // then spin until it, so sends leave on time, not in bursts; a timer thread
                // measured worse on 2 cores (its wake-ups were late by 0.6–3 ms at p99
                // while broker and client ran: [`Ticker`]).
                // The spin calls sched_yield: spinning in user space only (tokio's
                // `yield_now`) never enters the kernel, so on a kernel without forced
                // preemption (this VM's is PREEMPT_NONE with HZ=250) a
                // broker thread woken onto this CPU waited for the next tick, up to 4 ms,
                // while the other CPU idled. That put 1.9–2.9 ms on Warren's MQTT QoS 1
                // p99 at 10k msg/s against 0.15–1.1 ms with sched_yield
                // (docs/PERFORMANCE.md, "A pacer that yields to the broker").
                loop {
                    let now = t.now_ns();
                    if now >= due {
                        break;
                    }
                    let left = due - now;
                    if left > 1_500_000 {
                        tokio::time::sleep(Duration::from_nanos(left - 1_000_000)).await;
                    } else {
                        std::thread::yield_now();
                        tokio::task::yield_now().await;
                    }
                }
                due
            }
        }
    }
}

/// A thread that reaches each slot of a fixed-rate schedule with `nanosleep` (timer slack
/// lowered to 1 µs) and sends that slot's message itself: for thousands of device
/// connections, where a tokio sleep per device would add up to a millisecond (the timer
/// wheel's tick) to every latency.
pub struct Ticker {
    epoch: Instant,
    origin: u64,
    messages: u64,
    rate: f64,
}

impl Ticker {
    pub fn new(t: &Tracker, messages: u64, rate: f64) -> Ticker {
        Ticker {
            epoch: t.epoch,
            origin: t.now_ns(),
            messages,
            rate,
        }
    }

    /// Calls `send(i, due)` at each slot on the ticker thread until it returns false.
    pub fn run(self, mut send: impl FnMut(u64, u64) -> bool + Send + 'static) {
        std::thread::spawn(move || {
            // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
            }
            for i in 0..self.messages {
                let due = self.origin + (i as f64 / self.rate * 1e9) as u64;
                loop {
                    let now = self.epoch.elapsed().as_nanos() as u64;
                    if now >= due {
                        break;
                    }
                    std::thread::sleep(Duration::from_nanos(due - now));
                }
                if !send(i, due) {
                    break;
                }
            }
        });
    }
}

/// The broker process's CPU seconds (utime + stime) from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The broker process's resident set size in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
