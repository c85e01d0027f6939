//! `[definitions] file`: a RabbitMQ definitions file imported at start (RabbitMQ's
//! `load_definitions`), and a bad one stopping start-up with a clear error.

mod common;

use serde_json::json;
use warren_core::Access;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_with_definitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("defs.json");
    let defs = json!({
        "rabbit_version": "3.12.0",
        // Password "test12" (RabbitMQ's documented example hash).
        "users": [{"name": "app", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["management"]}],
        "vhosts": [{"name": "/"}, {"name": "prod"}],
        "permissions": [{"user": "app", "vhost": "prod", "configure": "", "write": ".*", "read": ".*"}],
        "topic_permissions": [{"user": "app", "vhost": "prod", "exchange": "amq.topic", "write": "^app\\.", "read": ".*"}],
        "exchanges": [{"name": "events", "vhost": "prod", "type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
        "queues": [{"name": "jobs", "vhost": "prod", "durable": true, "auto_delete": false, "arguments": {"x-max-length": 10}}],
        "bindings": [{"source": "events", "vhost": "prod", "destination": "jobs", "destination_type": "queue", "routing_key": "job.#", "arguments": {}}]
    });
    std::fs::write(&file, defs.to_string()).expect("write defs");
    let data = dir.path().join("data");
    let mut cfg = common::config(&data);
    cfg.definitions.file = file.display().to_string();
    let server = warren::Server::start(&cfg).await.expect("start");
    let b = server.broker.clone();
    let user = b.user("app").expect("user app");
    assert_eq!(user.tags, vec!["management".to_owned()]);
    assert!(b
        .authenticate("app", "test12", "127.0.0.1".parse().unwrap())
        .is_ok());
    let vh = b.vhost("prod").expect("vhost prod");
    assert!(vh.queue("jobs").is_ok());
    assert!(vh
        .bindings()
        .iter()
        .any(|(src, bd)| src.as_str() == "events" && bd.routing_key.as_str() == "job.#"));
    assert!(b.permission("prod", "app").is_some());
    let tp = b.topic_permissions_of("prod", "app").expect("topic rules");
    assert!(!tp.allows("amq.topic", Access::Write, "other.x"));
    // Loading again at the next start is harmless (import is idempotent). The store's
    // lock goes with the last broker handle.
    drop((b, vh, tp));
    server.shutdown().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let server = warren::Server::start(&cfg).await.expect("restart");
    assert!(server
        .broker
        .vhost("prod")
        .expect("prod")
        .queue("jobs")
        .is_ok());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_stops_start_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.json");
    std::fs::write(&file, "{\"queues\": [{\"name\": \"q\"}]}").expect("write");
    let mut cfg = common::config(&dir.path().join("data"));
    cfg.definitions.file = file.display().to_string();
    let err = match warren::Server::start(&cfg).await {
        Ok(_) => panic!("started with a bad definitions file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot load definitions from"), "{err}");
    assert!(err.contains("vhost"), "{err}");
    let mut cfg = common::config(&dir.path().join("data2"));
    cfg.definitions.file = dir.path().join("missing.json").display().to_string();
    assert!(warren::Server::start(&cfg).await.is_err());
}
