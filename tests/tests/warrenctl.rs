//! `warrenctl`, the real binary, against in-process brokers: declare, list (table and
//! JSON), purge, delete, add-user, set-permissions, set-topic-permissions, set-policy,
//! clear-policy, status, and definitions exported from
//! one broker and imported into another.
//!
//! The binary lives in another package (crates/warrenctl), so `CARGO_BIN_EXE_warrenctl` is
//! not defined here: the test builds it with the cargo that runs the test (a no-op when it
//! is fresh) into the same target dir and profile, and runs it from there.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;

/// target/<profile>/warrenctl, built once per test process.
fn warrenctl() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/warrenctl-<hash>
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile dir name")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "warrenctl", "--target-dir"])
            .arg(&target_dir);
        // The dev profile's directory is called `debug`.
        if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        let status = cmd.status().expect("run cargo build -p warrenctl");
        assert!(status.success(), "cargo build -p warrenctl failed");
        let bin = profile_dir.join("warrenctl");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs warrenctl against `b`'s HTTP listener as guest (unless `args` say otherwise).
async fn ctl(b: &common::TestBroker, args: &[&str]) -> Out {
    let bin = warrenctl().clone();
    let out = tokio::process::Command::new(bin)
        .arg("--url")
        .arg(format!("http://{}", b.http_addr))
        .args(args)
        .env_remove("WARREN_URL")
        .env_remove("WARREN_USER")
        .env_remove("WARREN_PASSWORD")
        .output()
        .await
        .expect("run warrenctl");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(b: &common::TestBroker, args: &[&str]) -> Out {
    let o = ctl(b, args).await;
    assert!(
        o.ok,
        "warrenctl {args:?} failed:\n{}\n{}",
        o.stdout, o.stderr
    );
    o
}

fn find<'a>(rows: &'a Value, name: &str) -> Option<&'a Value> {
    rows.as_array()?.iter().find(|r| r["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_list_purge_delete() {
    let b = common::start().await;
    ok(&b, &["declare", "queue", "ctl-q", "--durable"]).await;
    ok(&b, &["declare", "exchange", "ctl-x", "--type", "fanout"]).await;

    let queues = ok(&b, &["list", "queues", "--format", "json"]).await.json();
    let q = find(&queues, "ctl-q").expect("ctl-q listed");
    assert_eq!(q["durable"], true);
    assert_eq!(q["vhost"], "/");
    let xs = ok(
        &b,
        &["list", "exchanges", "--vhost", "/", "--format", "json"],
    )
    .await
    .json();
    assert_eq!(find(&xs, "ctl-x").expect("ctl-x listed")["type"], "fanout");
    assert_eq!(find(&xs, "ctl-x").expect("ctl-x listed")["durable"], false);

    // Three messages over AMQP; the table shows them, purge removes them.
    let (_c, ch) = b.channel().await;
    for body in [&b"1"[..], b"2", b"3"] {
        common::publish(&ch, "", "ctl-q", body).await;
    }
    let table = ok(&b, &["list", "queues"]).await.stdout;
    let header = table.lines().next().expect("header row");
    assert!(
        header.starts_with("vhost") && header.contains("messages"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("ctl-q"))
        .unwrap_or_else(|| panic!("no ctl-q row:\n{table}"));
    assert_eq!(row.split_whitespace().nth(2), Some("3"), "{table}");

    ok(&b, &["purge", "queue", "ctl-q"]).await;
    let queues = ok(&b, &["list", "queues", "--format", "json"]).await.json();
    assert_eq!(find(&queues, "ctl-q").expect("ctl-q")["messages"], 0);

    // Bindings: the default exchange's implicit binding to the queue is listed.
    let bindings = ok(&b, &["list", "bindings", "--format", "json"])
        .await
        .json();
    assert!(
        bindings
            .as_array()
            .expect("list")
            .iter()
            .any(|x| x["destination"] == "ctl-q"),
        "{bindings}"
    );
    // Connections: the lapin one above.
    let conns = ok(&b, &["list", "connections", "--format", "json"])
        .await
        .json();
    assert_eq!(conns.as_array().expect("list").len(), 1, "{conns}");

    ok(&b, &["delete", "queue", "ctl-q"]).await;
    ok(&b, &["delete", "exchange", "ctl-x"]).await;
    let queues = ok(&b, &["list", "queues", "--format", "json"]).await.json();
    assert!(find(&queues, "ctl-q").is_none());

    // A missing queue: exit code 1 and the API's reason.
    let missing = ctl(&b, &["delete", "queue", "ctl-q"]).await;
    assert!(!missing.ok);
    assert!(missing.stderr.contains("404"), "{}", missing.stderr);
    // Bad credentials: exit code 1, 401.
    let bad = ctl(&b, &["--password", "nope", "list", "queues"]).await;
    assert!(!bad.ok);
    assert!(bad.stderr.contains("401"), "{}", bad.stderr);

    let status = ok(&b, &["status"]).await.stdout;
    assert!(status.contains("rabbit@"), "{status}");
    assert!(
        status.contains("alarms") && status.contains("ok"),
        "{status}"
    );
    let status = ok(&b, &["status", "--format", "json"]).await.json();
    assert_eq!(status["overview"]["product_name"], "Warren");
    assert_eq!(status["alarms"]["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_permissions_export_import() {
    let b = common::start().await;
    ok(
        &b,
        &[
            "add-user",
            "alice",
            "s3cret",
            "--tags",
            "management,monitoring",
        ],
    )
    .await;
    ok(
        &b,
        &[
            "set-permissions",
            "alice",
            "--vhost",
            "/",
            "^alice-.*",
            ".*",
            ".*",
        ],
    )
    .await;
    let users = ok(&b, &["list", "users"]).await.stdout;
    let alice = users
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_else(|| panic!("no alice:\n{users}"));
    assert!(alice.contains("management,monitoring"), "{users}");
    ok(
        &b,
        &[
            "set-topic-permissions",
            "alice",
            "amq.topic",
            "^alice\\.",
            ".*",
        ],
    )
    .await;
    let topics = ok(&b, &["list-topic-permissions", "--vhost", "/"])
        .await
        .stdout;
    assert!(
        topics
            .lines()
            .any(|l| l.contains("alice") && l.contains("amq.topic") && l.contains("^alice\\.")),
        "{topics}"
    );
    let topics = ok(&b, &["list", "topic-permissions", "--format", "json"])
        .await
        .json();
    assert_eq!(topics[0]["write"], "^alice\\.", "{topics}");
    // Policies, as rabbitmqctl set_policy / clear_policy.
    ok(
        &b,
        &[
            "set-policy",
            "cap",
            "^capped",
            r#"{"max-length": 10}"#,
            "--priority",
            "2",
            "--apply-to",
            "queues",
        ],
    )
    .await;
    let policies = ok(&b, &["list", "policies", "--format", "json"])
        .await
        .json();
    assert_eq!(policies[0]["definition"]["max-length"], 10, "{policies}");
    assert_eq!(policies[0]["apply-to"], "queues", "{policies}");
    let table = ok(&b, &["list", "policies"]).await.stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains("cap") && l.contains("^capped")),
        "{table}"
    );
    let bad = ctl(&b, &["set-policy", "bad", ".*", r#"{"nonsense": 1}"#]).await;
    assert!(
        !bad.ok && bad.stderr.contains("not recognised"),
        "{}",
        bad.stderr
    );
    ok(&b, &["clear-policy", "cap"]).await;
    let policies = ok(&b, &["list", "policies", "--format", "json"])
        .await
        .json();
    assert_eq!(policies, serde_json::json!([]));
    // Limits, as rabbitmqctl set_vhost_limits / set_user_limits and their clear_.
    ok(
        &b,
        &[
            "set-vhost-limits",
            r#"{"max-connections": 50, "max-queues": 7}"#,
        ],
    )
    .await;
    ok(&b, &["set-user-limits", "alice", r#"{"max-channels": 3}"#]).await;
    let vl = ok(&b, &["list", "vhost-limits", "--format", "json"])
        .await
        .json();
    assert_eq!(
        vl,
        serde_json::json!([{"vhost": "/", "value": {"max-connections": 50, "max-queues": 7}}])
    );
    let table = ok(&b, &["list", "user-limits"]).await.stdout;
    assert!(
        table
            .lines()
            .any(|l| l.contains("alice") && l.contains("max-channels")),
        "{table}"
    );
    let bad = ctl(&b, &["set-user-limits", "alice", r#"{"max-queues": 1}"#]).await;
    assert!(!bad.ok, "max-queues is no user limit");
    ok(&b, &["clear-vhost-limits"]).await;
    ok(&b, &["clear-user-limits", "alice"]).await;
    let vl = ok(&b, &["list", "vhost-limits", "--format", "json"])
        .await
        .json();
    assert_eq!(vl, serde_json::json!([]));
    let ul = ok(&b, &["list", "user-limits", "--format", "json"])
        .await
        .json();
    assert_eq!(ul, serde_json::json!([]));
    // The global --user/--password are alice's now, not the positional arguments above.
    let vhosts = ok(
        &b,
        &[
            "--user",
            "alice",
            "--password",
            "s3cret",
            "list",
            "vhosts",
            "--format",
            "json",
        ],
    )
    .await
    .json();
    assert!(find(&vhosts, "/").is_some(), "{vhosts}");

    // Something to export: a durable queue declared over AMQP, a durable topic exchange.
    let (_c, ch) = b.channel().await;
    ch.queue_declare(
        "keep-q".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare keep-q");
    ok(
        &b,
        &[
            "declare",
            "exchange",
            "keep-x",
            "--type",
            "topic",
            "--durable",
        ],
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("defs.json");
    let file_s = file.to_str().expect("utf-8 path");
    ok(&b, &["export", file_s]).await;
    let defs: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read export")).expect("JSON");
    assert!(find(&defs["queues"], "keep-q").is_some(), "{defs}");
    assert!(find(&defs["exchanges"], "keep-x").is_some(), "{defs}");
    assert!(find(&defs["users"], "alice").is_some(), "{defs}");
    // `export -` writes the same document to stdout.
    let stdout = ok(&b, &["export", "-"]).await.json();
    assert_eq!(stdout["queues"], defs["queues"]);

    // Into a fresh broker: the same queue, exchange, user (with her password) and grant.
    let b2 = common::start().await;
    ok(&b2, &["import", file_s]).await;
    let queues = ok(&b2, &["list", "queues", "--format", "json"])
        .await
        .json();
    assert_eq!(
        find(&queues, "keep-q").expect("keep-q imported")["durable"],
        true
    );
    let xs = ok(&b2, &["list", "exchanges", "--format", "json"])
        .await
        .json();
    assert_eq!(
        find(&xs, "keep-x").expect("keep-x imported")["type"],
        "topic"
    );
    let users = ok(&b2, &["list", "users", "--format", "json"]).await.json();
    assert!(find(&users, "alice").is_some(), "{users}");
    // Her password hash came along: she logs in with the same password.
    ok(
        &b2,
        &["--user", "alice", "--password", "s3cret", "list", "vhosts"],
    )
    .await;

    // A file that is not JSON is refused before anything is sent.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{ not json").expect("write");
    let o = ctl(&b2, &["import", bad.to_str().expect("utf-8 path")]).await;
    assert!(!o.ok);
    assert!(o.stderr.contains("not JSON"), "{}", o.stderr);
}
