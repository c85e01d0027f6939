//! CI smoke: warren-bench runs short AMQP, MQTT and STOMP scenarios against an in-process
//! broker and reports no loss (benchmarks themselves are not timed tests).

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_scenarios_complete_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = warren::Config::default();
    c.storage.data_dir = dir.path().to_path_buf();
    c.listeners.amqp = "127.0.0.1:0".into();
    c.listeners.mqtt = "127.0.0.1:0".into();
    c.listeners.stomp = "127.0.0.1:0".into();
    for l in [
        &mut c.listeners.http,
        &mut c.listeners.prometheus,
        &mut c.listeners.web_stomp,
        &mut c.listeners.web_mqtt,
    ] {
        *l = "off".into();
    }
    let server = warren::Server::start(&c).await.unwrap();
    let amqp = server.amqp_addr.unwrap();
    let mqtt = server.mqtt_addr.unwrap();
    let stomp = server.stomp_addr.unwrap();
    let log = dir.path().join("latency.log");
    let log_arg = log.display().to_string();
    for scenario in [
        vec!["transient", "--messages", "20000"],
        vec!["confirms", "--messages", "2000"],
        vec!["fanout", "--messages", "2000", "--queues", "3"],
        vec!["topic", "--messages", "2000", "--bindings", "1000"],
        vec!["mqtt-qos1", "--messages", "5000"],
        vec!["mqtt-qos1", "--messages", "5000", "--client", "raw"],
        vec![
            "mqtt-qos0",
            "--messages",
            "2000",
            "--client",
            "raw",
            "--rate",
            "2000",
        ],
        vec!["mqtt-qos2", "--messages", "2000"],
        vec!["mqtt-fanin", "--devices", "50", "--duration", "2"],
        vec![
            "mqtt-fanin",
            "--devices",
            "50",
            "--duration",
            "2",
            "--client",
            "raw",
        ],
        vec!["stomp-queue", "--messages", "5000"],
        vec![
            "transient",
            "--messages",
            "2000",
            "--rate",
            "2000",
            "--latency-log",
            &log_arg,
        ],
    ] {
        let out = tokio::task::spawn_blocking({
            let scenario: Vec<String> = scenario.iter().map(|a| a.to_string()).collect();
            move || {
                Command::new(env!("CARGO_BIN_EXE_warren-bench"))
                    .arg("--url")
                    .arg(format!("amqp://guest:guest@{amqp}/%2f"))
                    .args(["--mqtt-port", &mqtt.port().to_string()])
                    .args(["--stomp-port", &stomp.port().to_string()])
                    .arg("--scenario")
                    .args(&scenario)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{scenario:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(line["lost"], 0, "{scenario:?}");
        assert_eq!(line["duplicates"], 0, "{scenario:?}");
        assert!(line["latency"]["p99_ms"].as_f64().is_some());
    }
    // One `id sent_ns received_ns` line per delivery of the last run, in id order.
    let lines: Vec<Vec<u64>> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(|n| n.parse().unwrap()).collect())
        .collect();
    assert_eq!(lines.len(), 2000);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!((l.len(), l[0]), (3, i as u64), "{l:?}");
        assert!(l[2] >= l[1], "received before sent: {l:?}");
    }
    server.shutdown().await;
}
