//! `warren-bench`: load for Warren or any other broker over AMQP 0-9-1 (lapin), MQTT
//! (rumqttc) and STOMP (a client on Warren's codec), one JSON line per run.
//!
//! Scenarios: `transient`, `confirms`, `fanout`, `topic`, `fill` (AMQP; `fill` leaves
//! persistent messages in durable queues for start-up measurements); `mqtt-qos0`, `mqtt-qos1`,
//! `mqtt-qos2`, `mqtt-fanin` (MQTT); `stomp-queue`, `stomp-topic` (STOMP); `tcp` (a plain
//! TCP relay started with `--relay`, the machine's ceiling). AMQP publishes and consumes
//! with lapin or, with `--client raw`, a minimal batching client (amqp_raw.rs). Load modes: as
//! fast as possible (default), closed loop (`--inflight N`) and fixed rate (`--rate R`,
//! latency measured from the schedule, so stalls are not hidden). Every message carries its
//! id and send time: lost and duplicated deliveries are counted and fail the run, latency
//! goes into an HDR histogram (p50/p99/p999/max). With `--broker-pid` the broker's CPU time
//! and RSS come from /proc: CPU-seconds per million messages is the stable figure on a
//! small machine where client and broker share the cores.

mod amqp;
mod amqp_raw;
mod mqtt;
mod mqtt_raw;
mod relay;
mod report;
mod stomp;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use report::{cpu_seconds, rss_kib, Pace, Tracker};

#[derive(Debug, Clone, Parser)]
#[command(about = "Load generator for Warren and other AMQP / MQTT / STOMP brokers")]
pub struct Args {
    /// AMQP URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Host of the MQTT and STOMP scenarios.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MQTT port.
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    /// Port of the `tcp` scenario's relay.
    #[arg(long, default_value_t = 5700)]
    relay_port: u16,
    /// Run a plain TCP relay on this address instead of a scenario (the machine's
    /// ceiling, measured by the `tcp` scenario).
    #[arg(long)]
    relay: Option<String>,
    /// STOMP port.
    #[arg(long, default_value_t = 61613)]
    stomp_port: u16,
    /// transient | confirms | fanout | topic | fill | mqtt-qos0 | mqtt-qos1 | mqtt-qos2 |
    /// mqtt-fanin | stomp-queue | stomp-topic | tcp (through `--relay`)
    #[arg(long, default_value = "transient")]
    scenario: String,
    /// Messages to publish.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Body size in bytes (at least 16: id and timestamp).
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Unconfirmed publishes in flight (AMQP confirms; MQTT QoS ≥ 1 in-flight window).
    #[arg(long, default_value_t = 500)]
    window: usize,
    /// Closed loop: at most this many messages published and not yet delivered.
    #[arg(long)]
    inflight: Option<u64>,
    /// Fixed rate in messages per second (for latency without coordinated omission).
    #[arg(long)]
    rate: Option<f64>,
    /// Queues of the fanout scenario.
    #[arg(long, default_value_t = 10)]
    queues: usize,
    /// Bindings of the topic scenario.
    #[arg(long, default_value_t = 100_000)]
    bindings: usize,
    /// Device connections of mqtt-fanin (each publishes once a second).
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Seconds of publishing in mqtt-fanin.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Client of the publishing and consuming path: `lapin` / rumqttc, or `raw` (AMQP: a
    /// minimal client on Warren's codec that batches writes, amqp_raw.rs, setup with lapin;
    /// MQTT QoS 0/1 and fan-in: a minimal 3.1.1 client, mqtt_raw.rs).
    #[arg(long, default_value = "lapin")]
    client: String,
    /// Consumer prefetch (AMQP).
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// The broker's pid, for its CPU time and RSS.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// A label for the JSON line (e.g. the broker's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Also write every delivery's `id sent_ns received_ns` to this file, to see whether
    /// the slow messages come alone or in bursts (`scripts/latency_bursts.py`).
    #[arg(long)]
    latency_log: Option<std::path::PathBuf>,
}

impl Args {
    fn pace(&self) -> Pace {
        match (self.rate, self.inflight) {
            (Some(r), _) if r > 0.0 => Pace::Rate(r),
            (_, Some(n)) if n > 0 => Pace::Closed(n),
            _ => Pace::Max,
        }
    }

    fn mode(&self) -> String {
        if self.scenario == "mqtt-fanin" {
            // Each device publishes once a second.
            return format!("rate-{}", self.devices.max(1));
        }
        match self.pace() {
            Pace::Max => "max".into(),
            Pace::Closed(n) => format!("closed-{n}"),
            Pace::Rate(r) => format!("rate-{r}"),
        }
    }

    /// The client that ran, for the report: scenarios without a choice use their own
    /// minimal client (STOMP, the TCP relay), which counts as raw.
    fn client_name(&self) -> &'static str {
        let s = self.scenario.as_str();
        if self.client == "raw" || s.starts_with("stomp") || s == "tcp" {
            "raw"
        } else if s.starts_with("mqtt") {
            "rumqttc"
        } else {
            "lapin"
        }
    }

    fn run_id(&self) -> String {
        format!("bench-{}-{}", self.scenario, std::process::id())
    }
}

/// Set by a scenario once its connections, queues and consumers are ready: what the
/// measurement starts from.
pub struct Started {
    pub at: Instant,
    cpu: Option<f64>,
}

pub fn begin(args: &Args) -> Started {
    Started {
        at: Instant::now(),
        cpu: args.broker_pid.and_then(cpu_seconds),
    }
}

/// What a scenario reports back to the common measurement.
pub struct Run {
    pub started: Started,
    pub tracker: Arc<Tracker>,
    /// Messages published and deliveries expected in total.
    pub published: u64,
    pub expected: u64,
    pub publish_done: Instant,
    /// Cleanup to run after the deliveries are counted.
    pub cleanup: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl Run {
    /// A run where every published message is delivered once (no fan-out); `cleanup` runs
    /// after the deliveries are counted.
    pub fn each_once(
        started: Started,
        tracker: Arc<Tracker>,
        messages: u64,
        publish_done: Instant,
        cleanup: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Run {
        Run {
            started,
            tracker,
            published: messages,
            expected: messages,
            publish_done,
            cleanup: Some(Box::pin(cleanup)),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(addr) = &args.relay {
        return relay::serve(addr).await;
    }
    args.size = args.size.max(report::HEADER);
    raise_fd_limit();
    if args.latency_log.is_some() {
        report::keep_samples();
    }
    let rss_before = args.broker_pid.and_then(rss_kib);
    let run = match args.scenario.as_str() {
        "transient" | "confirms" | "fanout" | "topic" | "fill" => amqp::run(&args).await?,
        "mqtt-qos0" | "mqtt-qos1" | "mqtt-qos2" if args.client == "raw" => {
            mqtt_raw::one_to_one(&args).await?
        }
        "mqtt-qos0" | "mqtt-qos1" | "mqtt-qos2" => mqtt::one_to_one(&args).await?,
        "mqtt-fanin" if args.client == "raw" => mqtt_raw::fan_in(&args).await?,
        "mqtt-fanin" => mqtt::fan_in(&args).await?,
        "stomp-queue" | "stomp-topic" => stomp::run(&args).await?,
        "tcp" => relay::run(&args).await?,
        other => bail!("unknown scenario {other}"),
    };
    let end = run
        .tracker
        .wait(run.expected, Duration::from_secs(10))
        .await;
    let rss_after = args.broker_pid.and_then(rss_kib);
    let cpu_after = args.broker_pid.and_then(cpu_seconds);
    if let Some(c) = run.cleanup {
        c.await;
    }
    let secs = (end.max(run.publish_done) - run.started.at).as_secs_f64();
    let delivered = run.tracker.delivered();
    let dups = run
        .tracker
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed);
    let cpu = match (run.started.cpu, cpu_after) {
        (Some(a), Some(b)) => {
            Some(((b - a) / (run.published as f64 / 1e6) * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let lost = run.expected.saturating_sub(delivered);
    println!(
        "{}",
        serde_json::json!({
            "label": args.label, "scenario": args.scenario, "mode": args.mode(),
            "client": args.client_name(),
            "messages": run.published, "size": args.size,
            "publish_secs": (run.publish_done - run.started.at).as_secs_f64(), "total_secs": secs,
            "msgs_per_sec": (run.published as f64 / secs).round(),
            "deliveries_per_sec": (delivered as f64 / secs).round(),
            "delivered": delivered, "lost": lost, "duplicates": dups,
            "latency": run.tracker.latency_json(),
            "broker_cpu_secs_per_million": cpu,
            "broker_rss_kib": rss_after, "broker_rss_growth_kib": rss_after.zip(rss_before).map(|(a, b)| a as i64 - b as i64),
        })
    );
    if let Some(path) = &args.latency_log {
        run.tracker
            .write_samples(path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if lost > 0 || dups > 0 {
        bail!("{lost} messages lost, {dups} duplicated");
    }
    Ok(())
}

/// Thousands of MQTT device connections need more than the usual 1024 descriptors.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
