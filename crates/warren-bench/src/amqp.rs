//! AMQP 0-9-1 scenarios with lapin: `transient` (1→1, auto-ack), `confirms` (persistent,
//! durable queue, publisher confirms with a window, manual acks), `fanout` (1 → N queues)
//! and `topic` (a topic exchange carrying `--bindings` bindings; each message matches one).

use std::collections::VecDeque;

use anyhow::{bail, Context};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::amqp_raw::{RawConn, RawPublisher};
use crate::report::{stamp, Pacer, Tracker};
use crate::{begin, Args, Run};

pub async fn run(args: &Args) -> anyhow::Result<Run> {
    let id = args.run_id();
    let pub_conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("connect")?;
    let con_conn = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("connect")?;
    let pch = pub_conn.create_channel().await?;
    let (durable, persistent, confirms, queues) = match args.scenario.as_str() {
        "transient" | "topic" => (false, false, false, 1),
        "confirms" => (true, true, true, 1),
        "fill" => (true, true, true, args.queues),
        _ => (false, false, false, args.queues),
    };
    let topic = args.scenario == "topic";
    let raw = args.client == "raw";
    // `fill`: persistent messages spread over durable queues `fill-<i>` that nobody
    // consumes (for start-up and backlog measurements); they are left in place.
    let fill = args.scenario == "fill";
    let exchange = if (queues > 1 || topic) && !fill {
        let kind = if topic {
            ExchangeKind::Topic
        } else {
            ExchangeKind::Fanout
        };
        pch.exchange_declare(
            id.as_str().into(),
            kind,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        id.clone()
    } else {
        String::new()
    };
    let tracker = Tracker::new(args.messages, queues);
    let mut names = Vec::new();
    let mut keep = Vec::new();
    for i in 0..queues {
        let q = if fill {
            format!("fill-{i}")
        } else {
            format!("{id}-{i}")
        };
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
        if fill {
            names.push(q.clone());
            keep.push(cch);
            continue;
        }
        if queues > 1 {
            bind(&cch, &q, &exchange, "").await?;
        }
        if topic {
            bind_many(&cch, &q, &exchange, args.bindings).await?;
        }
        if raw {
            let mut c = RawConn::open(&args.url).await?;
            c.subscribe(&q, args.prefetch, !confirms).await?;
            let t = tracker.clone();
            tokio::spawn(async move {
                if let Err(e) = c.deliveries(!confirms, |body| t.record(i, body)).await {
                    eprintln!("consumer {i}: {e}");
                }
            });
            names.push(q.clone());
            keep.push(cch);
            continue;
        }
        cch.basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = cch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: !confirms,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let t = tracker.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Some(Ok(d)) = consumer.next().await {
                t.record(i, &d.data);
                n += 1;
                // Batched acks; the unacked tail goes with the queue at cleanup.
                if confirms && n.is_multiple_of(100) {
                    let _ = d.ack(BasicAckOptions { multiple: true }).await;
                }
            }
        });
        names.push(q.clone());
        keep.push(cch);
    }
    if confirms {
        pch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let props = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    let per_msg = queues as u64;
    let started = begin(args);
    let mut pace = Pacer::start(args.pace(), &tracker);
    let mut body = vec![0u8; args.size];
    let mut window = VecDeque::new();
    let mut raw_pub = match raw {
        true => Some(
            RawConn::open(&args.url)
                .await?
                .into_publisher(confirms)
                .await?,
        ),
        false => None,
    };
    let amqp_props = RawPublisher::properties(&match persistent {
        true => warren_amqp_codec::BasicProperties::default().with_delivery_mode(2),
        false => warren_amqp_codec::BasicProperties::default(),
    });
    for i in 0..args.messages {
        if let Some(p) = raw_pub.as_mut() {
            if pace.would_wait(i, &tracker, per_msg) {
                p.flush().await?;
            }
        }
        let sent = pace.before(i, &tracker, per_msg).await;
        stamp(&mut body, i, sent);
        let key = if fill {
            names[(i % queues as u64) as usize].clone()
        } else if topic {
            format!("dev.{}.temp", i % args.bindings as u64)
        } else if queues > 1 {
            String::new()
        } else {
            names[0].clone()
        };
        if let Some(p) = raw_pub.as_mut() {
            p.publish(&exchange, &key, &body, &amqp_props).await?;
            if confirms {
                p.wait_confirms(args.window as u64).await?;
            }
            continue;
        }
        let c = pch
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
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
    if let Some(p) = raw_pub.as_mut() {
        p.flush().await?;
        if confirms {
            p.wait_confirms(0).await?;
        }
    }
    for c in window {
        if !c.await?.is_ack() {
            bail!("publish nacked");
        }
    }
    let publish_done = std::time::Instant::now();
    let expected = if fill {
        0
    } else {
        args.messages * queues as u64
    };
    let cleanup = Box::pin(async move {
        // The publishing connection stays open until every delivery is counted: a broker
        // may drop what it has not routed yet when a publisher's socket closes (RabbitMQ
        // does, for transient messages).
        drop(raw_pub);
        for q in names.iter().filter(|_| !fill) {
            let _ = pch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        drop(keep);
        let _ = pub_conn.close(200, "bye".into()).await;
        let _ = con_conn.close(200, "bye".into()).await;
    });
    Ok(Run {
        started,
        tracker,
        published: args.messages,
        expected,
        publish_done,
        cleanup: Some(cleanup),
    })
}

async fn bind(ch: &Channel, q: &str, x: &str, key: &str) -> anyhow::Result<()> {
    ch.queue_bind(
        q.into(),
        x.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// `n` bindings `dev.<i>.*`, pipelined in batches (a round trip each would take minutes).
async fn bind_many(ch: &Channel, q: &str, x: &str, n: usize) -> anyhow::Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let futs: Vec<_> = chunk
            .iter()
            .map(|i| {
                let key = format!("dev.{i}.*");
                let ch = ch.clone();
                let (q, x) = (q.to_owned(), x.to_owned());
                async move { bind(&ch, &q, &x, &key).await }
            })
            .collect();
        for r in futures_util::future::join_all(futs).await {
            r?;
        }
    }
    Ok(())
}
