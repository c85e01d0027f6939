//! Runs the real `warren` binary, `kill -9`s it while a publisher streams persistent
//! messages with confirms, restarts it, and checks every confirmed message is there.

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(data: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--data-dir")
        .arg(data)
        .args(["--amqp-listen", &format!("127.0.0.1:{port}")])
        .args([
            "--mqtt-listen",
            "off",
            "--stomp-listen",
            "off",
            "--http-listen",
            "off",
            "--prometheus-listen",
            "off",
        ])
        .args(["--web-stomp-listen", "off", "--web-mqtt-listen", "off"])
        .env("WARREN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn warren")
}

async fn connect(port: u16) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Connection::connect(
            &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("warren did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_persistent_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn(dir.path(), port);
    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "crash".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let confirmed = std::sync::Arc::new(std::sync::Mutex::new(HashSet::new()));
    let publisher = {
        let confirmed = confirmed.clone();
        tokio::spawn(async move {
            let mut window = std::collections::VecDeque::new();
            for i in 0u64.. {
                let Ok(p) = ch
                    .basic_publish(
                        "".into(),
                        "crash".into(),
                        BasicPublishOptions::default(),
                        &i.to_be_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                else {
                    break;
                };
                window.push_back((i, p));
                if window.len() >= 100 {
                    let (id, p) = window.pop_front().unwrap();
                    match p.await {
                        Ok(c) if c.is_ack() => {
                            confirmed.lock().unwrap().insert(id);
                        }
                        _ => break,
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().expect("kill -9"); // SIGKILL
    child.wait().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), publisher).await;
    let confirmed: HashSet<u64> = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() > 100,
        "publisher got {} confirms before the kill",
        confirmed.len()
    );

    let mut child = spawn(dir.path(), port);
    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    let mut seen = HashSet::new();
    while let Some(m) = ch
        .basic_get("crash".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let id = u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap());
        seen.insert(id);
    }
    let missing: Vec<_> = confirmed.difference(&seen).take(10).collect();
    assert!(
        missing.is_empty(),
        "confirmed but lost after kill -9: {missing:?} (of {} confirmed)",
        confirmed.len()
    );
    eprintln!(
        "confirmed {} messages, recovered {}",
        confirmed.len(),
        seen.len()
    );
    unsafe { libc_kill(child.id() as i32, 15) };
    let _ = child.wait();
}

/// SIGTERM without a libc dependency.
unsafe fn libc_kill(pid: i32, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, sig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully_and_help_lists_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--data-dir",
        "--amqp-listen",
        "--mqtt-listen",
        "--stomp-listen",
        "--http-listen",
        "--prometheus-listen",
        "--web-stomp-listen",
        "--web-mqtt-listen",
        "--log-format",
        "WARREN_DATA_DIR",
        "WARREN_AMQP_LISTEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn(dir.path(), port);
    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "kept".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    unsafe { libc_kill(child.id() as i32, 15) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "warren did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    let mut child = spawn(dir.path(), port);
    let conn = connect(port).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "kept".into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    unsafe { libc_kill(child.id() as i32, 15) };
    let _ = child.wait();
}
