//! MQTT scenarios with rumqttc: 1→1 at QoS 0, 1 or 2 (`mqtt-qos<n>`), and fan-in
//! (`mqtt-fanin`): `--devices` connections each publishing once a second for `--duration`
//! seconds, one wildcard subscriber counting them all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::Semaphore;

use crate::report::{stamp, Pacer, Ticker, Tracker};
use crate::{begin, Args, Run};

/// How long a publisher or its acks may stall before the run gives up on the rest: a
/// broker that stops answering (Mosquitto at QoS 2 under a window of 500) would otherwise
/// hold the run forever; what was not delivered is reported as lost.
const STALL: Duration = Duration::from_secs(10);

fn qos_of(scenario: &str) -> QoS {
    match scenario {
        "mqtt-qos0" => QoS::AtMostOnce,
        "mqtt-qos1" => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn options(args: &Args, id: String) -> MqttOptions {
    let mut o = MqttOptions::new(id, args.host.clone(), args.mqtt_port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_inflight(args.window.clamp(1, 65_535) as u16);
    o.set_max_packet_size(args.size + 1024, args.size + 1024);
    o
}

/// Connects and waits for CONNACK; the event loop is returned for the caller to drive.
async fn connect(o: MqttOptions, cap: usize) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (c, mut el) = AsyncClient::new(o, cap);
    loop {
        match tokio::time::timeout(STALL, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((c, el)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("mqtt connect: {e}"),
            Err(_) => bail!("mqtt connect: no CONNACK in 10 s"),
        }
    }
}

/// A subscriber on `filter` that records every PUBLISH.
async fn subscriber(
    args: &Args,
    filter: &str,
    qos: QoS,
    t: Arc<Tracker>,
) -> anyhow::Result<AsyncClient> {
    let (c, mut el) = connect(options(args, format!("{}-sub", args.run_id())), 1000).await?;
    c.subscribe(filter, qos).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await? {
            break;
        }
    }
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                t.record(0, &p.payload);
            }
        }
    });
    Ok(c)
}

pub async fn one_to_one(args: &Args) -> anyhow::Result<Run> {
    let qos = qos_of(&args.scenario);
    let topic = format!("bench/{}", args.run_id());
    let tracker = Tracker::new(args.messages, 1);
    let sub = subscriber(args, &topic, qos, tracker.clone()).await?;
    let (publisher, mut el) =
        connect(options(args, format!("{}-pub", args.run_id())), 1000).await?;
    // Drive the publisher's event loop; it finishes when the last ack is in.
    let acks_needed = if qos == QoS::AtMostOnce {
        0
    } else {
        args.messages
    };
    let driver = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < acks_needed {
            match tokio::time::timeout(STALL, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    eprintln!("mqtt: no ack for {STALL:?}, {acked} of {acks_needed} acked");
                    break;
                }
            }
        }
        // QoS 0: keep flushing until the channel is drained and the client disconnects.
        if acks_needed == 0 {
            while el.poll().await.is_ok() {}
        }
        Instant::now()
    });
    let started = begin(args);
    let mut pace = Pacer::start(args.pace(), &tracker);
    let mut body = vec![0u8; args.size];
    for i in 0..args.messages {
        let sent = pace.before(i, &tracker, 1).await;
        stamp(&mut body, i, sent);
        // A publish that cannot even be queued is a stalled broker (or a dead event
        // loop): stop here and let the tracker report the rest as lost.
        match tokio::time::timeout(
            STALL,
            publisher.publish(topic.as_str(), qos, false, body.clone()),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("mqtt: publish {i} failed ({e}); the rest count as lost");
                break;
            }
            Err(_) => {
                eprintln!("mqtt: publish {i} stalled for {STALL:?}; the rest count as lost");
                break;
            }
        }
    }
    let publish_done = if qos == QoS::AtMostOnce {
        Instant::now()
    } else {
        driver.await.unwrap_or_else(|_| Instant::now())
    };
    let cleanup = async move {
        let _ = publisher.disconnect().await;
        let _ = sub.disconnect().await;
    };
    Ok(Run::each_once(
        started,
        tracker,
        args.messages,
        publish_done,
        cleanup,
    ))
}

/// The shape of a fan-in run, for both clients: `devices` each publishing once a second
/// for `per_device` seconds to their own topic under one wildcard.
pub struct FanIn {
    pub devices: usize,
    pub per_device: u64,
    pub total: u64,
    base: String,
}

impl FanIn {
    pub fn new(args: &Args) -> FanIn {
        let devices = args.devices.max(1);
        let per_device = args.duration.max(1);
        FanIn {
            devices,
            per_device,
            total: devices as u64 * per_device,
            base: format!("fanin/{}", args.run_id()),
        }
    }

    /// The subscriber's filter.
    pub fn filter(&self) -> String {
        format!("{}/+/t", self.base)
    }

    pub fn topics(&self) -> Vec<String> {
        (0..self.devices)
            .map(|d| format!("{}/{d}/t", self.base))
            .collect()
    }

    /// The ticker walks the devices in turn, spread evenly over each second (a steady
    /// load): slot `i`'s device and the message id it stamps.
    pub fn slot(&self, i: u64) -> (usize, u64) {
        let n = self.devices as u64;
        let (d, k) = (i % n, i / n);
        (d as usize, d * self.per_device + k)
    }

    /// The ticker's rate: every device once a second.
    pub fn rate(&self) -> f64 {
        self.devices as f64
    }
}

pub async fn fan_in(args: &Args) -> anyhow::Result<Run> {
    let plan = FanIn::new(args);
    let (devices, total) = (plan.devices, plan.total);
    let tracker = Tracker::new(total, 1);
    let sub = subscriber(args, &plan.filter(), QoS::AtLeastOnce, tracker.clone()).await?;
    // Connect every device first (200 at a time), then start the clock.
    let gate = Arc::new(Semaphore::new(200));
    let mut connecting = Vec::with_capacity(devices);
    for d in 0..devices {
        let o = options(args, format!("{}-dev-{d}", args.run_id()));
        let gate = gate.clone();
        connecting.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            connect(o, 4).await
        }));
    }
    let mut clients = Vec::with_capacity(devices);
    for c in connecting {
        let (client, mut el) = c.await??;
        tokio::spawn(async move { while el.poll().await.is_ok() {} });
        clients.push(client);
    }
    let started = begin(args);
    // One ticker hands each message to its device's connection at its slot.
    let topics = plan.topics();
    let senders = clients.clone();
    let size = args.size;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    Ticker::new(&tracker, total, plan.rate()).run(move |i, due| {
        let (d, id) = plan.slot(i);
        let mut body = vec![0u8; size];
        stamp(&mut body, id, due);
        // A full request channel is a device the client cannot keep up with: counted
        // as lost by the tracker, never hidden.
        let _ = senders[d].try_publish(topics[d].as_str(), QoS::AtMostOnce, false, body);
        if i + 1 == total {
            if let Some(tx) = done_tx.take() {
                let _ = tx.send(());
            }
        }
        true
    });
    let _ = done_rx.await;
    let publish_done = Instant::now();
    let cleanup = async move {
        for c in clients {
            let _ = c.try_disconnect();
        }
        let _ = sub.disconnect().await;
    };
    Ok(Run::each_once(
        started,
        tracker,
        total,
        publish_done,
        cleanup,
    ))
}
