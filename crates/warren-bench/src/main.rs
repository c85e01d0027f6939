//! `warren-bench`: AMQP 0-9-1 load against any broker, one JSON line per run.
//!
//! Scenarios (this first cut; MQTT and STOMP scenarios, latency histograms and fixed-rate
//! mode are issue 6):
//! * `transient`: 1 publisher → 1 queue → 1 consumer (auto-ack), non-persistent bodies;
//! * `confirms`: persistent messages to a durable queue with publisher confirms, at most
//!   `--window` unconfirmed (closed loop), 1 consumer with manual acks;
//! * `fanout`: 1 publisher → fanout exchange → `--queues` queues, a consumer each.
//!
//! Every published message is counted at the consumers: lost or duplicated deliveries make
//! the run fail instead of being hidden.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

#[derive(Debug, Parser)]
#[command(about = "AMQP load generator for Warren and other brokers")]
struct Args {
    /// Broker URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// transient | confirms | fanout
    #[arg(long, default_value = "transient")]
    scenario: String,
    /// Messages to publish.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Unconfirmed publishes allowed in flight (confirms scenario).
    #[arg(long, default_value_t = 500)]
    window: usize,
    /// Queues of the fanout scenario.
    #[arg(long, default_value_t = 10)]
    queues: usize,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// The broker's pid: its CPU time over the run is read from /proc and reported as
    /// broker CPU-seconds per million messages (the stable figure on a small box).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// A label for the JSON line (e.g. the broker's name).
    #[arg(long, default_value = "")]
    label: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = format!("bench-{}-{}", args.scenario, std::process::id());
    let pub_conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("connect")?;
    let con_conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("connect")?;
    let pch = pub_conn.create_channel().await?;
    let (durable, persistent, confirms, queues) = match args.scenario.as_str() {
        "transient" => (false, false, false, 1),
        "confirms" => (true, true, true, 1),
        "fanout" => (false, false, false, args.queues),
        other => bail!("unknown scenario {other}"),
    };
    let exchange = if queues > 1 {
        pch.exchange_declare(
            run.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        run.clone()
    } else {
        String::new()
    };
    let mut consumers = Vec::new();
    let mut names = Vec::new();
    for i in 0..queues {
        let q = format!("{run}-{i}");
        let cch = con_conn.create_channel().await?;
        cch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable,
                auto_delete: !durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        if queues > 1 {
            cch.queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        cch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let manual_ack = confirms;
        let consumer = cch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: !manual_ack,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        names.push(q.clone());
        consumers.push((cch, consumer, q, manual_ack));
    }
    let expected = args.messages;
    let cpu_before = args.broker_pid.and_then(cpu_seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (cch, mut consumer, _, manual_ack) in consumers {
        tasks.push(tokio::spawn(async move {
            let mut seen = vec![false; expected as usize];
            let mut n = 0u64;
            let mut dups = 0u64;
            while n < expected {
                let Ok(Some(d)) =
                    tokio::time::timeout(Duration::from_secs(30), consumer.next()).await
                else {
                    break;
                };
                let d = d?;
                let id = u64::from_be_bytes(d.data[..8].try_into().unwrap_or([0; 8])) as usize;
                if id < seen.len() && !seen[id] {
                    seen[id] = true;
                    n += 1;
                } else {
                    dups += 1;
                }
                if manual_ack && (n.is_multiple_of(100) || n == expected) {
                    d.ack(BasicAckOptions { multiple: true }).await?;
                }
            }
            drop(cch);
            anyhow::Ok((n, dups, Instant::now()))
        }));
    }
    if confirms {
        pch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let props = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    let routing = if queues > 1 {
        String::new()
    } else {
        format!("{run}-0")
    };
    let mut body = vec![0u8; args.size.max(8)];
    let mut window = std::collections::VecDeque::new();
    for i in 0..expected {
        body[..8].copy_from_slice(&i.to_be_bytes());
        let c = pch
            .basic_publish(
                exchange.as_str().into(),
                routing.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await?;
        if confirms {
            window.push_back(c);
            if window.len() >= args.window {
                if let Some(c) = window.pop_front() {
                    if !c.await?.is_ack() {
                        bail!("publish nacked");
                    }
                }
            }
        }
    }
    for c in window {
        if !c.await?.is_ack() {
            bail!("publish nacked");
        }
    }
    let published_in = start.elapsed();
    let mut delivered = 0u64;
    let mut dups = 0u64;
    let mut end = start;
    for t in tasks {
        let (n, d, e) = t.await??;
        delivered += n;
        dups += d;
        end = end.max(e);
    }
    let secs = (end - start).as_secs_f64();
    let cpu = match (cpu_before, args.broker_pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some((b - a) / (expected as f64 / 1e6)),
        _ => None,
    };
    let lost = expected * queues as u64 - delivered;
    for q in &names {
        let _ = pch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    println!(
        "{}",
        serde_json::json!({
            "label": args.label, "scenario": args.scenario, "messages": expected, "size": args.size,
            "queues": queues, "publish_secs": published_in.as_secs_f64(), "total_secs": secs,
            "msgs_per_sec": (expected as f64 / secs).round(),
            "deliveries_per_sec": (delivered as f64 / secs).round(),
            "lost": lost, "duplicates": dups, "broker_cpu_secs_per_million": cpu,
        })
    );
    if lost > 0 {
        bail!("{lost} messages lost");
    }
    Ok(())
}

/// utime + stime of `pid` in seconds, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
