//! The management HTTP API over real HTTP/1.1 (a raw socket client: no extra crates),
//! against an in-process broker, endpoint by endpoint, with RabbitMQ's status codes and
//! field names. Permission enforcement is checked over AMQP with lapin.

mod common;

use std::time::Duration;

use base64::Engine;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body {:?}: {e}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Api {
    addr: std::net::SocketAddr,
    auth: Option<(String, String)>,
}

impl Api {
    fn new(b: &common::TestBroker) -> Self {
        Api {
            addr: b.http_addr,
            auth: Some(("guest".into(), "guest".into())),
        }
    }

    fn as_user(&self, u: &str, p: &str) -> Self {
        Api {
            addr: self.addr,
            auth: Some((u.into(), p.into())),
        }
    }

    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let mut s = TcpStream::connect(self.addr).await.expect("connect http");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some((u, p)) = &self.auth {
            let cred = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Authorization: Basic {cred}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("response within 10 s")
            .expect("read");
        parse(&raw)
    }

    async fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None).await
    }
    async fn put(&self, path: &str, body: Value) -> Resp {
        self.req("PUT", path, Some(body)).await
    }
    async fn post(&self, path: &str, body: Value) -> Resp {
        self.req("POST", path, Some(body)).await
    }
    async fn delete(&self, path: &str) -> Resp {
        self.req("DELETE", path, None).await
    }
}

/// Parses an HTTP/1.1 response (Content-Length or chunked).
fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("0")
                    .trim(),
                16,
            )
            .unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// A page's script (`X-Requested-With: XMLHttpRequest`, as the dashboard sends) gets the
/// 401 without a `WWW-Authenticate` challenge, so browsers leave the login to the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_requests_get_no_auth_challenge() {
    let b = common::start().await;
    let cred = base64::engine::general_purpose::STANDARD.encode("guest:wrong");
    let mut s = TcpStream::connect(b.http_addr).await.expect("connect http");
    let req = format!(
        "GET /api/whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Requested-With: XMLHttpRequest\r\nAuthorization: Basic {cred}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read");
    let r = parse(&raw);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), None);
    assert_eq!(r.json()["error"], "not_authorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_overview_whoami_nodes() {
    let b = common::start().await;
    let api = Api::new(&b);
    let anon = Api {
        addr: b.http_addr,
        auth: None,
    };
    let r = anon.get("/api/overview").await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Basic")));
    assert_eq!(
        api.as_user("guest", "wrong")
            .get("/api/overview")
            .await
            .status,
        401
    );

    let o = api.get("/api/overview").await.json();
    assert_eq!(o["product_name"], "Warren");
    for k in [
        "management_version",
        "rabbitmq_version",
        "node",
        "object_totals",
        "queue_totals",
        "message_stats",
        "listeners",
    ] {
        assert!(o.get(k).is_some(), "overview lacks {k}: {o}");
    }
    assert_eq!(o["object_totals"]["exchanges"], 7);
    let listeners = o["listeners"].as_array().expect("listeners");
    assert!(listeners
        .iter()
        .any(|l| l["protocol"] == "amqp" && l["port"] == b.addr.port()));
    let amqp = listeners.iter().find(|l| l["protocol"] == "amqp").unwrap();
    assert_eq!(
        amqp["socket_opts"],
        json!({"backlog": 1024, "nodelay": true})
    );
    assert_eq!(o["sample_retention_policies"]["global"], json!([3600]));

    assert_eq!(
        api.get("/api/whoami").await.json(),
        json!({"name": "guest", "tags": ["administrator"]})
    );
    let nodes = api.get("/api/nodes").await.json();
    assert_eq!(nodes[0]["running"], true);
    assert_eq!(nodes[0]["mem_alarm"], false);
    assert!(nodes[0]["mem_used"].as_u64().unwrap_or(0) > 0);
    let n = &nodes[0];
    assert!(n["fd_used"].as_u64().is_some_and(|f| f > 0), "{n}");
    assert!(n["fd_total"].as_u64() >= n["fd_used"].as_u64(), "{n}");
    assert!(n["proc_used"].as_u64().is_some_and(|t| t > 0), "{n}");
    // check_rabbitmq_server divides proc_used by proc_total, and asks for the node as
    // RabbitMQ names it by default.
    assert!(n["proc_total"].as_u64() > n["proc_used"].as_u64(), "{n}");
    assert!(n["run_queue"].is_u64(), "{n}");
    assert!(n["name"].as_str().is_some_and(|s| s.starts_with("rabbit@")));
    for k in [
        "mem_used",
        "fd_used",
        "sockets_used",
        "proc_used",
        "disk_free",
    ] {
        assert!(n[format!("{k}_details")]["rate"].is_number(), "{k}: {n}");
    }
    assert!(n["connection_created"].is_u64(), "{n}");
    assert!(n["queue_deleted_details"]["rate"].is_number(), "{n}");
    let plugins = n["enabled_plugins"].as_array().expect("enabled_plugins");
    for p in ["rabbitmq_management", "rabbitmq_mqtt", "rabbitmq_stomp"] {
        assert!(plugins.contains(&json!(p)), "{p} in {plugins:?}");
    }
    assert_eq!(n["exchange_types"].as_array().map(Vec::len), Some(4));

    let r = api.get("/api/nosuch").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json(),
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );

    // A user without a management tag cannot log in to the API.
    assert_eq!(
        api.put("/api/users/plain", json!({"password": "p", "tags": ""}))
            .await
            .status,
        201
    );
    assert_eq!(
        api.as_user("plain", "p").get("/api/overview").await.status,
        401
    );
    // A monitoring user may read but not administer.
    api.put(
        "/api/users/mon",
        json!({"password": "m", "tags": "monitoring"}),
    )
    .await;
    let mon = api.as_user("mon", "m");
    assert_eq!(mon.get("/api/overview").await.status, 200);
    assert_eq!(mon.get("/api/users").await.status, 401);
    assert_eq!(
        mon.put("/api/vhosts/x", json!({})).await.json()["error"],
        "not_authorised"
    );
    // It lists every vhost but sees objects only where it has access (RabbitMQ 3.10).
    // The vhost's creator already has full permissions there (204: updated).
    assert_eq!(api.put("/api/vhosts/hidden", json!({})).await.status, 201);
    assert_eq!(
        api.put(
            "/api/permissions/hidden/guest",
            json!({"configure": ".*", "write": ".*", "read": ".*"})
        )
        .await
        .status,
        204
    );
    assert_eq!(
        api.put("/api/queues/hidden/secret", json!({})).await.status,
        201
    );
    let vhosts = mon.get("/api/vhosts").await.json();
    assert!(vhosts
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "hidden"));
    assert_eq!(mon.get("/api/queues/hidden").await.status, 401);
    let queues = mon.get("/api/queues").await.json();
    assert!(
        !queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "secret"),
        "{queues}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_users_permissions() {
    let b = common::start().await;
    let api = Api::new(&b);
    assert_eq!(api.put("/api/vhosts/dev", json!({})).await.status, 201);
    assert_eq!(api.put("/api/vhosts/dev", json!({})).await.status, 204);
    let v = api.get("/api/vhosts/dev").await.json();
    assert_eq!(v["name"], "dev");
    let names: Vec<Value> = api
        .get("/api/vhosts")
        .await
        .json()
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("/"), json!("dev")]);
    // The creator got full permissions on the new vhost, as in RabbitMQ.
    assert_eq!(
        api.get("/api/permissions/dev/guest").await.json()["configure"],
        ".*"
    );

    assert_eq!(
        api.put(
            "/api/users/alice",
            json!({"password": "secret", "tags": "management"})
        )
        .await
        .status,
        201
    );
    let u = api.get("/api/users/alice").await.json();
    assert_eq!(u["tags"], json!(["management"]));
    assert_eq!(u["hashing_algorithm"], "rabbit_password_hashing_sha256");
    // Tags-only update keeps the password.
    assert_eq!(
        api.put(
            "/api/users/alice",
            json!({"tags": ["management", "monitoring"]})
        )
        .await
        .status,
        204
    );
    assert_eq!(
        api.as_user("alice", "secret")
            .get("/api/whoami")
            .await
            .json()["tags"],
        json!(["management", "monitoring"])
    );
    // password_hash in RabbitMQ's format: "test12" from RabbitMQ's docs.
    assert_eq!(
        api.put(
            "/api/users/bob",
            json!({"password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR", "tags": "administrator"})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        api.as_user("bob", "test12").get("/api/whoami").await.status,
        200
    );

    let r = api
        .put("/api/permissions/dev/alice", json!({"configure": "^a"}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        api.put(
            "/api/permissions/dev/alice",
            json!({"configure": "(", "write": "", "read": ""})
        )
        .await
        .status,
        400
    );
    assert_eq!(
        api.put(
            "/api/permissions/dev/alice",
            json!({"configure": "^a", "write": ".*", "read": ".*"})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        api.put(
            "/api/permissions/dev/alice",
            json!({"configure": "^al", "write": ".*", "read": ".*"})
        )
        .await
        .status,
        204
    );
    let p = api.get("/api/permissions/dev/alice").await.json();
    assert_eq!(
        p,
        json!({"user": "alice", "vhost": "dev", "configure": "^al", "write": ".*", "read": ".*"})
    );
    let all = api.get("/api/permissions").await.json();
    assert!(all.as_array().expect("list").len() >= 3);
    assert_eq!(
        api.get("/api/users/alice/permissions")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        api.get("/api/vhosts/dev/permissions")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // A management user sees only vhosts it has permissions on.
    let alice = api.as_user("alice", "secret");
    api.put(
        "/api/users/carol",
        json!({"password": "c", "tags": "management"}),
    )
    .await;
    let carol = api.as_user("carol", "c");
    assert_eq!(carol.get("/api/vhosts").await.json(), json!([]));
    assert_eq!(
        alice
            .get("/api/vhosts")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    let lonely: Vec<Value> = api
        .get("/api/users/without-permissions")
        .await
        .json()
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(lonely, vec![json!("bob"), json!("carol")]);
    // In order, stopping at the first unknown name (400), as RabbitMQ.
    assert_eq!(
        api.post(
            "/api/users/bulk-delete",
            json!({"users": ["bob", "nobody", "carol"]})
        )
        .await
        .status,
        400
    );
    assert_eq!(api.get("/api/users/bob").await.status, 404);
    assert_eq!(api.get("/api/users/carol").await.status, 200);
    assert_eq!(
        api.post("/api/users/bulk-delete", json!({"users": ["carol"]}))
            .await
            .status,
        204
    );
    assert_eq!(api.get("/api/users/carol").await.status, 404);
    assert_eq!(
        api.post("/api/users/bulk-delete", json!({"names": []}))
            .await
            .status,
        400
    );

    assert_eq!(api.delete("/api/permissions/dev/alice").await.status, 204);
    assert_eq!(api.delete("/api/permissions/dev/alice").await.status, 404);
    assert_eq!(api.delete("/api/users/alice").await.status, 204);
    assert_eq!(api.get("/api/users/alice").await.status, 404);
    assert_eq!(api.delete("/api/vhosts/dev").await.status, 204);
    assert_eq!(api.get("/api/vhosts/dev").await.status, 404);
    assert_eq!(api.delete("/api/vhosts/dev").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_exchanges_bindings_publish_get() {
    let b = common::start().await;
    let api = Api::new(&b);
    assert_eq!(
        api.put(
            "/api/queues/%2F/orders",
            json!({"durable": true, "arguments": {"x-max-length": 10}})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        api.put(
            "/api/queues/%2F/orders",
            json!({"durable": true, "arguments": {"x-max-length": 10}})
        )
        .await
        .status,
        204
    );
    // Inequivalent re-declare.
    let r = api
        .put("/api/queues/%2F/orders", json!({"durable": false}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request");
    let q = api.get("/api/queues/%2F/orders").await.json();
    assert_eq!(q["arguments"], json!({"x-max-length": 10}));
    assert_eq!(q["state"], "running");
    assert_eq!(q["type"], "classic");
    assert_eq!(q["messages"], 0);
    assert_eq!(q["consumer_details"], json!([]));
    assert_eq!(
        api.put(
            "/api/queues/%2F/qq",
            json!({"durable": true, "arguments": {"x-queue-type": "quorum"}})
        )
        .await
        .status,
        201
    );
    let q = api.get("/api/queues/%2F/qq").await.json();
    assert_eq!(q["type"], "quorum");
    assert_eq!(q["leader"], q["node"]);
    assert_eq!(q["members"], json!([q["node"]]));
    assert_eq!(api.get("/api/queues/%2F/nope").await.status, 404);
    assert_eq!(api.get("/api/queues/nohost").await.status, 404);

    assert_eq!(
        api.put(
            "/api/exchanges/%2F/shop",
            json!({"type": "topic", "durable": true})
        )
        .await
        .status,
        201
    );
    // No type: a direct exchange; no durable: transient (RabbitMQ 3.10's defaults).
    assert_eq!(
        api.put("/api/exchanges/%2F/plain", json!({})).await.status,
        201
    );
    let plain = api.get("/api/exchanges/%2F/plain").await.json();
    assert_eq!(
        (&plain["type"], &plain["durable"]),
        (&json!("direct"), &json!(false))
    );
    let x = api.get("/api/exchanges/%2F/shop").await.json();
    assert_eq!(x["type"], "topic");
    assert_eq!(
        api.get("/api/exchanges/%2F/amq.default").await.json()["name"],
        ""
    );
    assert_eq!(
        api.get("/api/exchanges/%2F")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(9)
    );

    let r = api
        .post(
            "/api/bindings/%2F/e/shop/q/orders",
            json!({"routing_key": "order.*", "arguments": {}}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), Some("orders/order.%252A"));
    let list = api.get("/api/bindings/%2F/e/shop/q/orders").await.json();
    assert_eq!(list[0]["routing_key"], "order.*");
    // The properties key is URL-encoded in paths, like any path segment.
    let props = percent_encode(list[0]["properties_key"].as_str().expect("props"));
    let one = api
        .get(&format!("/api/bindings/%2F/e/shop/q/orders/{props}"))
        .await;
    assert_eq!(one.status, 200, "{}", one.text());
    let qb = api.get("/api/queues/%2F/orders/bindings").await.json();
    assert_eq!(qb.as_array().map(Vec::len), Some(2), "{qb}");
    assert_eq!(qb[0]["source"], "");
    let src = api
        .get("/api/exchanges/%2F/shop/bindings/source")
        .await
        .json();
    assert_eq!(src.as_array().map(Vec::len), Some(1));
    let all = api.get("/api/bindings/%2F").await.json();
    assert!(all
        .as_array()
        .expect("list")
        .iter()
        .any(|b| b["source"] == "shop"));

    // Exchange-to-exchange.
    api.put("/api/exchanges/%2F/audit", json!({"type": "fanout"}))
        .await;
    assert_eq!(
        api.post(
            "/api/bindings/%2F/e/shop/e/audit",
            json!({"routing_key": "#"})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        api.get("/api/exchanges/%2F/audit/bindings/destination")
            .await
            .json()[0]["source"],
        "shop"
    );

    let r = api
        .post(
            "/api/exchanges/%2F/shop/publish",
            json!({"routing_key": "order.new", "payload": "hello", "payload_encoding": "string", "properties": {"delivery_mode": 2, "headers": {"h": 1}}}),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": true}));
    let r = api
        .post(
            "/api/exchanges/%2F/shop/publish",
            json!({"routing_key": "nothing", "payload": "", "payload_encoding": "string", "properties": {}}),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": false}));
    let r = api
        .post(
            "/api/exchanges/%2F/nope/publish",
            json!({"routing_key": "k", "payload": "", "payload_encoding": "string", "properties": {}}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["reason"],
        "404 NOT_FOUND - no exchange 'nope' in vhost '/'"
    );
    // Two messages in, one routed to one queue: RabbitMQ's publish_in / publish_out.
    let stats = &api.get("/api/exchanges/%2F/shop").await.json()["message_stats"];
    assert_eq!(
        (&stats["publish_in"], &stats["publish_out"]),
        (&json!(2), &json!(1))
    );
    assert!(stats["publish_in_details"]["rate"].is_number(), "{stats}");
    api.post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "orders", "payload": "//4=", "payload_encoding": "base64", "properties": {}}),
    )
    .await;
    assert_eq!(
        api.get("/api/queues/%2F/orders").await.json()["messages"],
        2
    );

    let got = api
        .post(
            "/api/queues/%2F/orders/get",
            json!({"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto"}),
        )
        .await
        .json();
    assert_eq!(got.as_array().map(Vec::len), Some(2));
    assert_eq!(got[0]["payload"], "hello");
    assert_eq!(got[0]["payload_encoding"], "string");
    assert_eq!(got[0]["properties"]["headers"], json!({"h": 1}));
    assert_eq!(got[0]["routing_key"], "order.new");
    assert_eq!(got[1]["payload"], "//4=");
    assert_eq!(got[1]["payload_encoding"], "base64");
    assert_eq!(
        api.get("/api/queues/%2F/orders").await.json()["messages"],
        2
    );
    let got = api
        .post(
            "/api/queues/%2F/orders/get",
            json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "base64"}),
        )
        .await
        .json();
    assert_eq!(got[0]["payload"], "aGVsbG8=");
    assert_eq!(got[0]["redelivered"], true);
    let q = api.get("/api/queues/%2F/orders").await.json();
    assert_eq!(q["messages"], 1);
    assert_eq!(q["message_stats"]["publish"], 2);
    assert!(q["message_stats"]["deliver_get"].as_u64().unwrap_or(0) >= 3);
    assert!(q["message_stats"]["publish_details"]["rate"].is_number());
    assert_eq!(
        api.post("/api/queues/%2F/orders/get", json!({"count": 1}))
            .await
            .status,
        400
    );

    assert_eq!(
        api.delete("/api/queues/%2F/orders/contents").await.status,
        204
    );
    assert_eq!(
        api.get("/api/queues/%2F/orders").await.json()["messages"],
        0
    );

    let r = api
        .delete(&format!("/api/bindings/%2F/e/shop/q/orders/{props}"))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        api.get(&format!("/api/bindings/%2F/e/shop/q/orders/{props}"))
            .await
            .status,
        404
    );
    assert_eq!(
        api.delete("/api/exchanges/%2F/shop?if-unused=true")
            .await
            .status,
        400
    );
    assert_eq!(api.delete("/api/exchanges/%2F/shop").await.status, 204);
    assert_eq!(api.delete("/api/exchanges/%2F/shop").await.status, 404);
    assert_eq!(api.delete("/api/queues/%2F/orders").await.status, 204);
    assert_eq!(api.get("/api/queues/%2F/orders").await.status, 404);
    assert_eq!(
        api.get("/api/aliveness-test/%2F").await.json(),
        json!({"status": "ok"})
    );
    assert_eq!(
        api.get("/api/health/checks/alarms").await.json(),
        json!({"status": "ok"})
    );
    assert_eq!(api.get("/api/health/checks/local-alarms").await.status, 200);
    let port = b.addr.port();
    assert_eq!(
        api.get(&format!("/api/health/checks/port-listener/{port}"))
            .await
            .json(),
        json!({"status": "ok", "port": port})
    );
    let r = api.get("/api/health/checks/port-listener/1").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["missing"], 1);
    assert!(r.json()["ports"]
        .as_array()
        .expect("ports")
        .contains(&json!(port)));
    assert_eq!(
        api.get("/api/health/checks/port-listener/x").await.status,
        400
    );
    assert_eq!(
        api.get("/api/health/checks/protocol-listener/AMQP0-9-1")
            .await
            .json(),
        json!({"status": "ok", "protocol": "amqp"})
    );
    let r = api.get("/api/health/checks/protocol-listener/amqps").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["missing"], "amqp/ssl");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_like_rabbitmq() {
    let b = common::start().await;
    let api = Api::new(&b);
    for i in 0..25 {
        api.put(
            &format!("/api/queues/%2F/p{i:02}"),
            json!({"durable": false}),
        )
        .await;
    }
    api.put("/api/queues/%2F/other", json!({})).await;
    let r = api.get("/api/queues/%2F?page=2&page_size=10").await.json();
    assert_eq!(r["page"], 2);
    assert_eq!(r["page_size"], 10);
    assert_eq!(r["page_count"], 3);
    assert_eq!(r["item_count"], 10);
    assert_eq!(r["filtered_count"], 26);
    assert_eq!(r["total_count"], 26);
    // "other" sorts first.
    assert_eq!(r["items"][0]["name"], "p09");
    let r = api
        .get("/api/queues?page=1&page_size=100&name=%5Ep0&use_regex=true")
        .await
        .json();
    assert_eq!(r["filtered_count"], 10);
    assert_eq!(r["total_count"], 26);
    let r = api.get("/api/queues?page=1&name=OTH").await.json();
    assert_eq!(r["filtered_count"], 1);
    let r = api
        .get("/api/queues?page=1&page_size=2&columns=name,messages")
        .await
        .json();
    assert_eq!(r["items"][0], json!({"name": "other", "messages": 0}));
    assert_eq!(api.get("/api/queues?page=9").await.status, 400);
    assert_eq!(
        api.get("/api/queues?page_size=501&page=1").await.status,
        400
    );
    // Without page: a plain array.
    assert_eq!(
        api.get("/api/queues").await.json().as_array().map(Vec::len),
        Some(26)
    );
}

/// A channel's `message_stats` as RabbitMQ 3.10 counts them (the same steps against
/// RabbitMQ gave these numbers): publishes with confirms, unroutable ones dropped or
/// returned, basic.get with and without ack and on an empty queue, a consumer's
/// deliveries and redeliveries on a second channel; each group only once it moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_message_stats() {
    let b = common::start().await;
    let api = Api::new(&b);
    let (conn, ch) = b.channel().await;
    common::declare(&ch, "stats.q", FieldTable::default()).await;
    common::declare(&ch, "stats.empty", FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |key: &'static str, mandatory: bool| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                "".into(),
                key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                b"x",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    for _ in 0..5 {
        publish("stats.q", false).await;
    }
    publish("nowhere", false).await;
    publish("nowhere", true).await;
    let got = |no_ack: bool, q: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_get(q.into(), BasicGetOptions { no_ack })
                .await
                .unwrap()
        }
    };
    let m = got(false, "stats.q").await.expect("a message");
    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    got(true, "stats.q").await.expect("a message");
    got(false, "stats.q").await.expect("a message");
    assert!(got(false, "stats.empty").await.is_none());

    let ch2 = conn.create_channel().await.unwrap();
    ch2.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch2
        .basic_consume(
            "stats.q".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut last = 0;
    for _ in 0..2 {
        let d = consumer.next().await.expect("delivery").expect("ok");
        last = d.delivery_tag;
    }
    ch2.basic_nack(
        last,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let d = consumer.next().await.expect("redelivery").expect("ok");
        assert!(d.redelivered);
    }

    // Counted before the frames are written: nothing to wait for.
    let chans = api.get("/api/channels").await.json();
    let s1 = &chans[0]["message_stats"];
    for (k, v) in [
        ("publish", 7),
        ("confirm", 7),
        ("drop_unroutable", 1),
        ("return_unroutable", 1),
        ("get", 2),
        ("get_no_ack", 1),
        ("get_empty", 1),
        ("ack", 1),
        ("deliver", 0),
        ("deliver_get", 3),
        ("redeliver", 0),
    ] {
        assert_eq!(s1[k], v, "channel 1 {k}: {s1}");
        assert!(s1[format!("{k}_details")]["rate"].is_number(), "{s1}");
    }
    let s2 = &chans[1]["message_stats"];
    for (k, v) in [
        ("deliver", 4),
        ("redeliver", 2),
        ("deliver_get", 4),
        ("ack", 0),
    ] {
        assert_eq!(s2[k], v, "channel 2 {k}: {s2}");
    }
    assert!(s2.get("publish").is_none(), "{s2}");
    assert_eq!(chans[0]["messages_unconfirmed"], 0);
    // The queues count the same deliveries by kind (rabbitmqadmin's `deliver` and `get`
    // columns), and the vhost and overview add the channels' confirms and unroutables.
    let q = api.get("/api/queues/%2F/stats.q").await.json();
    let qs = &q["message_stats"];
    for (k, v) in [
        ("deliver_get", 7),
        ("deliver", 4),
        ("get", 2),
        ("get_no_ack", 1),
        ("redeliver", 2),
    ] {
        assert_eq!(qs[k], v, "stats.q {k}: {qs}");
        assert!(qs[format!("{k}_details")]["rate"].is_number(), "{qs}");
    }
    // Counters that never moved are left out, as RabbitMQ does; channel counters are not
    // a queue's.
    for k in ["deliver_no_ack", "get_empty", "confirm"] {
        assert!(qs.get(k).is_none(), "{k}: {qs}");
    }
    let e = api.get("/api/queues/%2F/stats.empty").await.json();
    assert_eq!(e["message_stats"]["get_empty"], 1, "{e}");
    // Nothing has gone through a new queue: no message_stats, as in RabbitMQ.
    common::declare(&ch2, "stats.fresh", FieldTable::default()).await;
    let f = api.get("/api/queues/%2F/stats.fresh").await.json();
    assert!(f.get("message_stats").is_none(), "{f}");
    for path in ["/api/overview", "/api/vhosts/%2F"] {
        let o = api.get(path).await.json();
        let m = &o["message_stats"];
        for (k, v) in [
            ("confirm", 7),
            ("return_unroutable", 1),
            ("drop_unroutable", 1),
            ("get", 2),
            ("get_no_ack", 1),
            ("get_empty", 1),
            ("deliver", 4),
        ] {
            assert_eq!(m[k], v, "{path} {k}: {m}");
        }
    }
    let churn = &api.get("/api/overview").await.json()["churn_rates"];
    for (k, at_least) in [
        ("connection_created", 1),
        ("channel_created", 2),
        ("queue_declared", 2),
        ("queue_created", 2),
        ("queue_deleted", 0),
    ] {
        assert!(churn[k].as_u64() >= Some(at_least), "{k}: {churn}");
        assert!(churn[format!("{k}_details")]["rate"].is_number(), "{churn}");
    }
    let v = api.get("/api/vhosts/%2F").await.json();
    assert!(v["recv_oct"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(v["send_oct_details"]["rate"].is_number(), "{v}");

    // A transaction's held publishes and acks; an idle channel has no message_stats.
    let tx = conn.create_channel().await.unwrap();
    tx.tx_select().await.unwrap();
    tx.basic_publish(
        "".into(),
        "stats.q".into(),
        BasicPublishOptions::default(),
        b"t",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    // A round trip on the channel: the publish before it was handled.
    tx.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let chans = api.get("/api/channels").await.json();
    assert_eq!(chans[2]["messages_uncommitted"], 1, "{}", chans[2]);
    assert_eq!(chans[2]["transactional"], true);
    assert!(chans[2].get("message_stats").is_none(), "{}", chans[2]);
    tx.tx_commit().await.unwrap();
    let c = api.get("/api/channels").await.json();
    assert_eq!(c[2]["messages_uncommitted"], 0);
    assert_eq!(c[2]["message_stats"]["publish"], 1);
    assert!(c[2]["message_stats"].get("deliver").is_none());
    // Every body here is one byte: the queue's byte counts equal its message counts.
    let q = api.get("/api/queues/%2F/stats.q").await.json();
    assert!(q["messages_unacknowledged"].as_u64() > Some(0), "{q}");
    assert_eq!(q["message_bytes"], q["messages"], "{q}");
    assert_eq!(q["message_bytes_ready"], q["messages_ready"], "{q}");
    assert_eq!(
        q["message_bytes_unacknowledged"], q["messages_unacknowledged"],
        "{q}"
    );
    // Connections show their byte rates.
    let conns = api.get("/api/connections").await.json();
    assert!(
        conns[0]["recv_oct_details"]["rate"].is_number(),
        "{}",
        conns[0]
    );
    assert!(
        conns[0]["send_oct_details"]["rate"].is_number(),
        "{}",
        conns[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_consumers_and_close() {
    let b = common::start().await;
    let api = Api::new(&b);
    let (conn, ch) = b.channel().await;
    common::declare(&ch, "work", FieldTable::default()).await;
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let _consumer = ch
        .basic_consume(
            "work".into(),
            "ctag-1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let conns = api.get("/api/connections").await.json();
    let c = &conns[0];
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    assert_eq!(c["channels"], 1);
    let name = c["name"].as_str().expect("name").to_owned();
    assert!(name.ends_with(&format!("-> {}", b.addr)), "{name}");
    assert!(c["client_properties"]["product"].is_string(), "{c}");
    assert_eq!(c["ssl"], false);
    assert_eq!(c["auth_mechanism"], "PLAIN");
    // The limits agreed in connection.tune-ok.
    assert!(c["frame_max"].as_u64().is_some_and(|f| f >= 4096), "{c}");
    assert!(c["channel_max"].as_u64().is_some_and(|n| n > 0), "{c}");
    assert!(c["timeout"].is_u64(), "{c}");

    let chans = api.get("/api/channels").await.json();
    assert_eq!(chans[0]["number"], 1);
    assert_eq!(chans[0]["consumer_count"], 1);
    assert_eq!(chans[0]["connection_details"]["name"], name.as_str());
    assert_eq!(chans[0]["prefetch_count"], 5);
    assert_eq!(chans[0]["global_prefetch_count"], 0);
    assert_eq!(chans[0]["confirm"], true);
    assert_eq!(chans[0]["transactional"], false);
    assert!(c["recv_oct"].as_u64().unwrap() > 0, "{c}");
    assert!(c["send_oct"].as_u64().unwrap() > 0, "{c}");
    let cons = api.get("/api/consumers").await.json();
    assert_eq!(cons[0]["consumer_tag"], "ctag-1");
    assert_eq!(cons[0]["queue"], json!({"name": "work", "vhost": "/"}));
    assert_eq!(cons[0]["ack_required"], true);
    assert_eq!(
        api.get("/api/consumers/%2F")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let o = api.get("/api/overview").await.json();
    assert_eq!(o["object_totals"]["connections"], 1);
    assert_eq!(o["object_totals"]["consumers"], 1);
    // One channel by name, with its consumers.
    let chan_name = chans[0]["name"].as_str().expect("channel name").to_owned();
    let one = api
        .get(&format!("/api/channels/{}", percent_encode(&chan_name)))
        .await
        .json();
    assert_eq!(one["number"], 1);
    assert_eq!(one["consumer_details"][0]["consumer_tag"], "ctag-1");
    assert_eq!(one["consumer_details"][0]["queue"]["name"], "work");
    assert_eq!(api.get("/api/channels/nope%20(1)").await.status, 404);
    assert_eq!(
        api.get("/api/queues/%2F/work").await.json()["consumer_details"][0]["consumer_tag"],
        "ctag-1"
    );
    // `columns` applies to single objects too.
    assert_eq!(
        api.get("/api/queues/%2F/work?columns=name,consumers,arguments")
            .await
            .json(),
        json!({"name": "work", "consumers": 1, "arguments": {}})
    );

    ch.queue_declare(
        "mine".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let path = format!("/api/connections/{}", percent_encode(&name));
    assert_eq!(api.get(&path).await.json()["name"], name.as_str());
    assert_eq!(api.delete(&path).await.status, 204);
    // As RabbitMQ: once DELETE answers, the connection's exclusive queue and consumers
    // are gone (a client's recovery test lists them at once).
    assert_eq!(api.get("/api/queues/%2F/mine").await.status, 404);
    assert_eq!(api.get("/api/queues/%2F/work").await.json()["consumers"], 0);
    // The client sees connection.close 320 and the registry empties.
    for _ in 0..50 {
        if !conn.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!conn.status().connected());
    for _ in 0..50 {
        if api.get("/api/connections").await.json() == json!([]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.get("/api/connections").await.json(), json!([]));
    assert_eq!(api.get(&path).await.status, 404);
}

/// As RabbitMQ shows them: the queue's `single_active_consumer_tag` and
/// `exclusive_consumer_tag`, and each consumer's `active` / `activity_status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_and_exclusive_consumers_are_shown() {
    let b = common::start().await;
    let api = Api::new(&b);
    let (_conn, ch) = b.channel().await;
    let mut sac = FieldTable::default();
    sac.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    common::declare(&ch, "sac", sac).await;
    common::declare(&ch, "solo", FieldTable::default()).await;
    let consume = |queue: &'static str, tag: &'static str, exclusive: bool| {
        let ch = ch.clone();
        async move {
            ch.basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions {
                    exclusive,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume")
        }
    };
    let _first = consume("sac", "first", false).await;
    let _second = consume("sac", "second", false).await;
    let _only = consume("solo", "only", true).await;
    let activity = |q: &Value| -> Vec<(String, bool, String)> {
        q["consumer_details"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["consumer_tag"].as_str().unwrap_or_default().to_owned(),
                    c["active"].as_bool().unwrap_or_default(),
                    c["activity_status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let q = api.get("/api/queues/%2F/sac").await.json();
    assert_eq!(q["single_active_consumer_tag"], "first");
    assert_eq!(q["exclusive_consumer_tag"], Value::Null);
    assert_eq!(
        activity(&q),
        [
            ("first".into(), true, "single_active".into()),
            ("second".into(), false, "waiting".into())
        ]
    );
    let q = api.get("/api/queues/%2F/solo").await.json();
    assert_eq!(q["exclusive_consumer_tag"], "only");
    assert_eq!(q["single_active_consumer_tag"], Value::Null);
    assert_eq!(activity(&q), [("only".into(), true, "up".into())]);
    ch.basic_cancel("first".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let q = api.get("/api/queues/%2F/sac").await.json();
    assert_eq!(q["single_active_consumer_tag"], "second");
    assert_eq!(
        activity(&q),
        [("second".into(), true, "single_active".into())]
    );
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_round_trip() {
    let b = common::start().await;
    let api = Api::new(&b);
    let defs = json!({
        "rabbit_version": "3.10.0",
        "users": [{"name": "imported", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": "management", "limits": {}}],
        "vhosts": [{"name": "/"}, {"name": "imp"}],
        "permissions": [{"user": "imported", "vhost": "imp", "configure": ".*", "write": ".*", "read": ".*"}],
        "topic_permissions": [{"user": "imported", "vhost": "imp", "exchange": "amq.topic", "write": "^a", "read": ".*"}],
        "parameters": [], "global_parameters": [], "policies": [],
        "queues": [{"name": "iq", "vhost": "imp", "durable": true, "auto_delete": false, "arguments": {"x-queue-type": "classic"}}],
        "exchanges": [{"name": "ix", "vhost": "imp", "type": "direct", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
        "bindings": [{"source": "ix", "vhost": "imp", "destination": "iq", "destination_type": "queue", "routing_key": "k", "arguments": {}}]
    });
    let r = api.post("/api/definitions", defs.clone()).await;
    assert_eq!(r.status, 204, "{}", r.text());
    // Idempotent.
    assert_eq!(api.post("/api/definitions", defs).await.status, 204);
    assert_eq!(
        api.as_user("imported", "test12")
            .get("/api/whoami")
            .await
            .status,
        200
    );
    let out = api.get("/api/definitions").await.json();
    assert!(out["users"]
        .as_array()
        .expect("users")
        .iter()
        .any(|u| u["name"] == "imported"
            && u["password_hash"] == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"));
    assert!(out["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .any(|q| q["name"] == "iq" && q["vhost"] == "imp"));
    assert!(out["bindings"]
        .as_array()
        .expect("bindings")
        .iter()
        .any(|b| b["source"] == "ix" && b["destination"] == "iq" && b["routing_key"] == "k"));
    assert!(out["permissions"]
        .as_array()
        .expect("permissions")
        .iter()
        .any(|p| p["user"] == "imported" && p["vhost"] == "imp"));
    assert_eq!(
        out["topic_permissions"],
        json!([{"user": "imported", "vhost": "imp", "exchange": "amq.topic", "write": "^a", "read": ".*"}])
    );
    let v = api.get("/api/definitions/imp").await.json();
    assert_eq!(v["queues"][0]["name"], "iq");
    assert!(v["queues"][0].get("vhost").is_none());

    // The export imports into a fresh broker and survives its restart.
    let b2 = common::start().await;
    let api2 = Api::new(&b2);
    assert_eq!(api2.post("/api/definitions", out).await.status, 204);
    let b2 = b2.restart().await;
    let api2 = Api::new(&b2);
    assert_eq!(api2.get("/api/queues/imp/iq").await.status, 200);
    assert_eq!(api2.get("/api/permissions/imp/imported").await.status, 200);
    assert_eq!(
        api2.get("/api/topic-permissions/imp/imported").await.json()[0]["write"],
        "^a"
    );
    assert_eq!(
        api2.get("/api/bindings/imp/e/ix/q/iq").await.json()[0]["routing_key"],
        "k"
    );
}

/// A file exported by a real RabbitMQ 3.10 (tests/fixtures/README.md says what is in it)
/// imports, and what it defines appears, its password hashes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_rabbitmq_export_imports() {
    let b = common::start().await;
    let api = Api::new(&b);
    let raw = include_str!("../fixtures/rabbitmq-3.10-definitions.json");
    let defs: Value = serde_json::from_str(raw).expect("fixture is JSON");
    let r = api.post("/api/definitions", defs).await;
    assert_eq!(r.status, 204, "{}", r.text());
    for (user, pass, tag) in [
        ("orders-svc", "s3cret", "management"),
        ("monitor", "watch", "monitoring"),
    ] {
        let who = api.as_user(user, pass).get("/api/whoami").await;
        assert_eq!(who.status, 200, "{user} logs in with RabbitMQ's hash");
        assert_eq!(who.json()["tags"][0], tag);
    }
    assert_eq!(api.get("/api/vhosts/shop").await.status, 200);
    let q = api.get("/api/queues/shop/orders.created").await.json();
    assert_eq!(q["durable"], true);
    assert_eq!(q["arguments"]["x-dead-letter-exchange"], "orders.dlx");
    assert_eq!(q["arguments"]["x-max-priority"], 5);
    assert_eq!(api.get("/api/queues/shop/orders.dead").await.status, 200);
    assert_eq!(
        api.get("/api/exchanges/shop/orders").await.json()["type"],
        "topic"
    );
    assert_eq!(
        api.get("/api/exchanges/shop/orders.dlx").await.json()["type"],
        "fanout"
    );
    let qb = api
        .get("/api/bindings/shop/e/orders/q/orders.created")
        .await
        .json();
    assert_eq!(qb[0]["routing_key"], "order.created.*");
    let eb = api
        .get("/api/bindings/shop/e/amq.topic/e/orders")
        .await
        .json();
    assert_eq!(eb[0]["routing_key"], "orders.#");
    let p = api.get("/api/permissions/shop/orders-svc").await.json();
    assert_eq!(p["configure"], "^orders\\.");
    assert_eq!(p["write"], "^(orders|amq\\.topic)");
    // The imported password works over AMQP too, in the imported vhost.
    let url = format!("amqp://orders-svc:s3cret@{}/shop", b.addr);
    let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("orders-svc connects to shop");
    let ch = c.create_channel().await.expect("channel");
    ch.queue_declare(
        "orders.created".into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("the imported queue is there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text() {
    let b = common::start().await;
    let api = Api::new(&b);
    api.put("/api/queues/%2F/m1", json!({})).await;
    api.post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "m1", "payload": "x", "payload_encoding": "string", "properties": {}}),
    )
    .await;
    let anon = Api {
        addr: b.http_addr,
        auth: None,
    };
    let r = anon.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    let t = r.text();
    for needle in [
        "rabbitmq_connections 0",
        "rabbitmq_queues 1",
        "rabbitmq_global_messages_received_total 1",
        "rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"m1\"} 1",
        "rabbitmq_queue_messages_unacked{vhost=\"/\",queue=\"m1\"} 0",
        "rabbitmq_alarms_memory_used_watermark 0",
        "# TYPE rabbitmq_global_messages_received_total counter",
    ] {
        assert!(t.contains(needle), "metrics lack {needle}:\n{t}");
    }
    let page = anon.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/api/overview"));
    // rabbitmq_prometheus's own port serves the metrics and nothing else.
    let prom = Api {
        addr: b.prometheus_addr,
        auth: None,
    };
    let p = prom.get("/metrics/per-object").await;
    assert_eq!(p.status, 200);
    assert!(p.text().contains("rabbitmq_queues 1"), "{}", p.text());
    assert_eq!(prom.get("/metrics").await.status, 200);
    assert_eq!(prom.get("/api/overview").await.status, 404);
    assert_eq!(prom.get("/").await.status, 404);
    let listeners = api.get("/api/overview").await.json()["listeners"].clone();
    let port = b.prometheus_addr.port();
    assert!(
        listeners.as_array().is_some_and(|l| l
            .iter()
            .any(|x| x["protocol"] == "http/prometheus" && x["port"] == port)),
        "{listeners}"
    );

    // Closes are counted by protocol and typed reason.
    let c = b.connect().await;
    c.close(200, "bye".into()).await.expect("close");
    let mut s = TcpStream::connect(b.mqtt_addr).await.expect("mqtt");
    // MQTT 3.1.1 CONNECT (client id "m"), then the socket drops without DISCONNECT.
    s.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 1, b'm',
    ])
    .await
    .expect("connect");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("connack");
    // An MQTT connection shows its client id, as RabbitMQ's MQTT plugin does.
    let conns = api.get("/api/connections").await.json();
    let m = conns
        .as_array()
        .and_then(|l| l.iter().find(|c| c["protocol"] == "MQTT 3.1.1"))
        .expect("the MQTT connection is listed");
    assert_eq!(
        m["client_properties"],
        json!({"product": "MQTT client", "client_id": "m"})
    );
    assert_eq!(m["frame_max"], 0);
    drop(s);
    let want = [
        "warren_connections_closed_by_reason_total{protocol=\"amqp\",reason=\"client_closed\"} 1",
        "warren_connections_closed_by_reason_total{protocol=\"mqtt\",reason=\"socket_closed\"} 1",
    ];
    let mut t = String::new();
    for _ in 0..50 {
        t = anon.get("/metrics").await.text();
        if want.iter().all(|w| t.contains(w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in want {
        assert!(t.contains(w), "metrics lack {w}:\n{t}");
    }
}

/// Permissions over AMQP: RabbitMQ's 403 ACCESS_REFUSED texts and 530 for a vhost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_permissions_enforced() {
    let b = common::start().await;
    let api = Api::new(&b);
    api.put("/api/users/limited", json!({"password": "pw", "tags": ""}))
        .await;
    let url = format!("amqp://limited:pw@{}/%2f", b.addr);
    // No permission on "/": 530 at connection.open.
    let e = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect_err("vhost refused");
    assert!(
        format!("{e:?}").contains("access to vhost '/' refused for user 'limited'"),
        "{e:?}"
    );
    api.put(
        "/api/permissions/%2F/limited",
        json!({"configure": "^limited\\.", "write": "^limited\\.", "read": "^limited\\."}),
    )
    .await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "limited.q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("allowed declare");
    let e = ch
        .queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("refused declare");
    assert_eq!(common::reply_code(&e), Some(403));
    assert!(
        format!("{e:?}").contains(
            "ACCESS_REFUSED - access to queue 'other' in vhost '/' refused for user 'limited'"
        ),
        "{e:?}"
    );
    // Publishing to the default exchange needs write on amq.default.
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_publish(
        "".into(),
        "limited.q".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .expect("publish sent");
    let e = ch
        .basic_get("limited.q".into(), BasicGetOptions::default())
        .await
        .expect_err("channel closed by the refused publish");
    // lapin reports the close either on the pending basic.get (with the 403) or, when the
    // channel.close overtook it, as a call on an already closed channel.
    match common::reply_code(&e) {
        Some(code) => {
            assert_eq!(code, 403);
            assert!(
                format!("{e:?}").contains("access to exchange 'amq.default' in vhost '/' refused"),
                "{e:?}"
            );
        }
        None => assert!(format!("{e:?}").contains("InvalidChannelState"), "{e:?}"),
    }
    // Granting write on amq.default takes effect on the open connection.
    api.put(
        "/api/permissions/%2F/limited",
        json!({"configure": "^limited\\.", "write": "^(limited\\.|amq\\.default$)", "read": "^limited\\."}),
    )
    .await;
    let ch = conn.create_channel().await.expect("channel");
    common::publish(&ch, "", "limited.q", b"y").await;
    assert_eq!(
        common::get(&ch, "limited.q").await.as_deref(),
        Some(&b"y"[..])
    );
    let _ = conn.close(200, "bye".into()).await;
}

/// docs/PERFORMANCE.md: listing 100k queues page by page (500 a page, RabbitMQ's maximum).
/// Ignored by default (about a minute); run with
/// `cargo test --release -p warren-tests --test http_api -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn list_100k_queues_page_by_page() {
    let b = common::start().await;
    let api = Api::new(&b);
    let broker = &b.server.as_ref().expect("server").broker;
    let vh = broker.vhost("/").expect("vhost");
    let n = 100_000;
    let t = std::time::Instant::now();
    for i in 0..n {
        vh.declare_queue(
            warren_core::QueueDecl {
                name: format!("perf-{i:06}").as_str().into(),
                passive: false,
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments: Default::default(),
            },
            warren_core::ConnectionId(0),
        )
        .await
        .expect("declare");
    }
    println!("declared {n} queues in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let mut page = 1;
    let mut seen = 0;
    let mut slowest = Duration::ZERO;
    loop {
        let t1 = std::time::Instant::now();
        let r = api
            .get(&format!("/api/queues/%2F?page={page}&page_size=500"))
            .await
            .json();
        slowest = slowest.max(t1.elapsed());
        seen += r["item_count"].as_u64().expect("count");
        if page >= r["page_count"].as_u64().expect("pages") as usize {
            break;
        }
        page += 1;
    }
    let all = t.elapsed();
    assert_eq!(seen, n as u64);
    println!(
        "listed {n} queues in {page} pages of 500: {all:?} total, {:?} per page, slowest page {slowest:?}",
        all / page as u32
    );
    let t = std::time::Instant::now();
    let r = api.get("/api/overview").await;
    assert_eq!(r.status, 200);
    println!("overview with {n} queues: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let r = api.get("/metrics").await;
    println!(
        "/metrics with {n} queues: {:?} ({} bytes)",
        t.elapsed(),
        r.body.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_permissions_endpoints() {
    let b = common::start().await;
    let api = Api::new(&b);
    assert_eq!(api.get("/api/topic-permissions").await.json(), json!([]));
    assert_eq!(
        api.put("/api/users/tp", json!({"password": "pw", "tags": ""}))
            .await
            .status,
        201
    );
    // No rule yet: 404, as RabbitMQ.
    assert_eq!(api.get("/api/topic-permissions/%2F/tp").await.status, 404);
    let put = |x: &str, w: &str| json!({"exchange": x, "write": w, "read": ".*"});
    let r = api
        .put("/api/topic-permissions/%2F/tp", put("amq.topic", "^a"))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = api
        .put("/api/topic-permissions/%2F/tp", put("t2", "^b"))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    // Replacing the rule of one exchange.
    let r = api
        .put("/api/topic-permissions/%2F/tp", put("amq.topic", "^c"))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let listed = api.get("/api/topic-permissions/%2F/tp").await.json();
    assert_eq!(
        listed,
        json!([
            {"user": "tp", "vhost": "/", "exchange": "amq.topic", "write": "^c", "read": ".*"},
            {"user": "tp", "vhost": "/", "exchange": "t2", "write": "^b", "read": ".*"},
        ])
    );
    assert_eq!(api.get("/api/topic-permissions").await.json(), listed);
    assert_eq!(
        api.get("/api/users/tp/topic-permissions").await.json(),
        listed
    );
    assert_eq!(
        api.get("/api/vhosts/%2F/topic-permissions").await.json(),
        listed
    );
    assert_eq!(
        api.get("/api/users/nobody/topic-permissions").await.status,
        404
    );
    // Bad input: a missing key, a regex that does not compile, an unknown user or vhost.
    let r = api
        .put(
            "/api/topic-permissions/%2F/tp",
            json!({"exchange": "x", "write": ".*"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("key_missing"), "{}", r.text());
    let r = api
        .put("/api/topic-permissions/%2F/tp", put("x", "("))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // RabbitMQ's 400 for a user (or vhost) that does not exist.
    let r = api
        .put("/api/topic-permissions/%2F/ghost", put("x", ".*"))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("vhost_or_user_not_found"), "{}", r.text());
    assert_eq!(
        api.put("/api/topic-permissions/nope/tp", put("x", ".*"))
            .await
            .status,
        400
    );
    // Only administrators.
    assert_eq!(
        api.as_user("tp", "pw")
            .get("/api/topic-permissions")
            .await
            .status,
        401
    );
    // Enforced on the API's own publish, as RabbitMQ's management plugin does.
    assert_eq!(
        api.put(
            "/api/topic-permissions/%2F/guest",
            put("amq.topic", "^ok\\.")
        )
        .await
        .status,
        201
    );
    let publish = |rk: &str| json!({"routing_key": rk, "payload": "x", "payload_encoding": "string", "properties": {}});
    assert_eq!(
        api.post("/api/exchanges/%2F/amq.topic/publish", publish("ok.1"))
            .await
            .status,
        200
    );
    let r = api
        .post("/api/exchanges/%2F/amq.topic/publish", publish("no.1"))
        .await;
    assert!(
        r.status == 401 || r.status == 403,
        "{} {}",
        r.status,
        r.text()
    );
    // DELETE removes all of the user's rules in the vhost.
    assert_eq!(
        api.delete("/api/topic-permissions/%2F/tp").await.status,
        204
    );
    assert_eq!(
        api.delete("/api/topic-permissions/%2F/tp").await.status,
        404
    );
    assert_eq!(
        api.get("/api/users/tp/topic-permissions").await.json(),
        json!([])
    );
}

/// Policies as RabbitMQ's: set over the API, applied to existing and new queues and
/// exchanges at once (the smaller length limit, the DLX, the alternate exchange), shown
/// in listings, validated with RabbitMQ's text, exported, kept across a restart, and
/// gone when deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_apply_to_queues_and_exchanges() {
    let b = common::start().await;
    let api = Api::new(&b);
    let (_c, ch) = b.channel().await;
    // An existing queue with five messages is trimmed when a max-length policy appears.
    common::declare(&ch, "pol.old", FieldTable::default()).await;
    for i in 0..5 {
        common::publish(&ch, "", "pol.old", format!("{i}").as_bytes()).await;
    }
    let r = api
        .put(
            "/api/policies/%2F/limits",
            json!({"pattern": "^pol\\.", "definition": {"max-length": 2, "dead-letter-exchange": "pol-dlx"},
                   "apply-to": "queues", "priority": 1}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let q = api.get("/api/queues/%2F/pol.old").await.json();
    assert_eq!(q["policy"], "limits");
    assert_eq!(q["effective_policy_definition"]["max-length"], 2);
    assert_eq!(q["messages"], 2, "trimmed to the policy's max-length");
    assert_eq!(
        common::get(&ch, "pol.old").await.as_deref(),
        Some(&b"3"[..])
    );

    // New queues follow it; the queue argument's smaller limit wins over the policy's.
    common::declare(&ch, "pol.dlq", FieldTable::default()).await;
    ch.exchange_declare(
        "pol-dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "dead".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dead".into(),
        "pol-dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    common::declare(&ch, "pol.one", args).await;
    for i in 0..3 {
        common::publish(&ch, "", "pol.one", format!("{i}").as_bytes()).await;
    }
    common::wait_ready(&ch, "pol.one", 1).await;
    common::wait_ready(&ch, "dead", 2).await;
    let q = api.get("/api/queues/%2F/pol.one").await.json();
    assert_eq!(q["messages"], 1, "x-max-length 1 beats the policy's 2");
    // The dropped heads went to the policy's dead-letter exchange (through the
    // `dead` queue, which the policy does not cover).
    let dead = api.get("/api/queues/%2F/dead").await.json();
    assert_eq!(dead["policy"], Value::Null);
    assert!(
        dead["messages"].as_u64() >= Some(2),
        "dead-lettered by policy: {dead}"
    );

    // An exchange policy gives an alternate exchange.
    ch.exchange_declare(
        "pol-x".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let r = api
        .put(
            "/api/policies/%2F/ae",
            json!({"pattern": "^pol-x$", "definition": {"alternate-exchange": "pol-dlx"}, "apply-to": "exchanges"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        api.get("/api/exchanges/%2F/pol-x").await.json()["policy"],
        "ae"
    );
    let before = api.get("/api/queues/%2F/dead").await.json()["messages"].clone();
    common::publish(&ch, "pol-x", "nowhere", b"unroutable").await;
    common::wait_ready(&ch, "dead", before.as_u64().unwrap_or(0) as u32 + 1).await;
    let after = api.get("/api/queues/%2F/dead").await.json()["messages"].clone();
    assert_eq!(
        after.as_u64(),
        before.as_u64().map(|n| n + 1),
        "routed to the AE"
    );

    // An `expires` policy counts from when it is applied, not from the queue's last use.
    common::declare(&ch, "exp.idle", FieldTable::default()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = api
        .put(
            "/api/policies/%2F/exp",
            json!({"pattern": "^exp\\.", "definition": {"expires": 300}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(api.get("/api/queues/%2F/exp.idle").await.status, 200);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        api.get("/api/queues/%2F/exp.idle").await.status,
        404,
        "expired"
    );
    assert_eq!(api.delete("/api/policies/%2F/exp").await.status, 204);

    // Validation: RabbitMQ's text; unknown vhost 404.
    let r = api
        .put(
            "/api/policies/%2F/bad",
            json!({"pattern": ".*", "definition": {"nonsense": 1}}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["reason"]
            .as_str()
            .unwrap_or("")
            .contains("are not recognised policy settings"),
        "{}",
        r.text()
    );
    assert_eq!(
        api.put(
            "/api/policies/%2F/bad",
            json!({"pattern": ".*", "definition": {"max-length": -1}})
        )
        .await
        .status,
        400
    );
    assert_eq!(
        api.put(
            "/api/policies/nope/p",
            json!({"pattern": ".*", "definition": {"max-length": 1}})
        )
        .await
        .status,
        404
    );
    // Updating answers 204; listings and the export carry the policies.
    let r = api
        .put(
            "/api/policies/%2F/limits",
            json!({"pattern": "^pol\\.", "definition": {"max-length": 3}, "apply-to": "queues", "priority": 1}),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let all = api.get("/api/policies").await.json();
    assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
    assert_eq!(
        api.get("/api/policies/%2F/limits").await.json(),
        json!({"vhost": "/", "name": "limits", "pattern": "^pol\\.", "apply-to": "queues",
               "definition": {"max-length": 3}, "priority": 1})
    );
    let defs = api.get("/api/definitions").await.json();
    assert_eq!(defs["policies"].as_array().map(Vec::len), Some(2));
    // A user without policymaker is refused.
    api.put(
        "/api/users/plain",
        json!({"password": "p", "tags": "management"}),
    )
    .await;
    assert_eq!(
        api.as_user("plain", "p").get("/api/policies").await.status,
        401
    );

    // Kept across a restart, and applied to the recovered queue.
    common::declare_durable(&ch, "pol.durable").await;
    drop(ch);
    drop(_c);
    let b = b.restart().await;
    let api = Api::new(&b);
    assert_eq!(api.get("/api/policies/%2F/limits").await.status, 200);
    let q = api.get("/api/queues/%2F/pol.durable").await.json();
    assert_eq!(q["policy"], "limits");

    // Deleted: the queue is unlimited again.
    assert_eq!(api.delete("/api/policies/%2F/limits").await.status, 204);
    assert_eq!(api.delete("/api/policies/%2F/limits").await.status, 404);
    let q = api.get("/api/queues/%2F/pol.durable").await.json();
    assert_eq!(q["policy"], Value::Null);
    let (_c, ch) = b.channel().await;
    for i in 0..5 {
        common::publish(&ch, "", "pol.durable", format!("{i}").as_bytes()).await;
    }
    common::wait_ready(&ch, "pol.durable", 5).await;
    assert_eq!(
        api.get("/api/queues/%2F/pol.durable").await.json()["messages"],
        5
    );
}

/// RabbitMQ's vhost and user limits: set over the API, enforced on AMQP (530 on
/// connection.open and channel.open, 406 on queue.declare) and MQTT (CONNACK 5), listed,
/// exported and kept across a restart; cleared, they no longer apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_and_user_limits() {
    let b = common::start().await;
    let api = Api::new(&b);
    let (_c, ch) = b.channel().await;
    common::declare(&ch, "lim-1", FieldTable::default()).await;
    let put = |path: &'static str, v: Value| {
        let api = Api::new(&b);
        async move { api.put(path, json!({ "value": v })).await.status }
    };
    assert_eq!(put("/api/vhost-limits/%2F/max-queues", json!(1)).await, 204);
    let err = ch
        .queue_declare(
            "lim-2".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("over the queue limit");
    assert_eq!(common::reply_code(&err), Some(406));
    assert!(
        err.to_string()
            .contains("cannot declare queue 'lim-2': queue limit in vhost '/' (1) is reached"),
        "{err}"
    );
    assert_eq!(
        api.get("/api/vhost-limits").await.json(),
        json!([{"vhost": "/", "value": {"max-queues": 1}}])
    );
    // Connections: one is open (ours); the vhost allows one.
    assert_eq!(
        put("/api/vhost-limits/%2F/max-connections", json!(1)).await,
        204
    );
    let err = lapin::Connection::connect(&b.url, ConnectionProperties::default())
        .await
        .expect_err("over the vhost connection limit");
    assert!(
        err.to_string().contains("connection limit (1) is reached"),
        "{err}"
    );
    let mut s = TcpStream::connect(b.mqtt_addr).await.unwrap();
    // 3.1.1 CONNECT, clean session, guest/guest.
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xC2, 0x00, 0x3C];
    for f in ["lim-dev", "guest", "guest"] {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend(body);
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x05], "MQTT refused too");
    assert_eq!(
        api.delete("/api/vhost-limits/%2F/max-connections")
            .await
            .status,
        204
    );
    assert_eq!(
        api.delete("/api/vhost-limits/%2F/max-connections")
            .await
            .status,
        404
    );

    // User limits: channels over all of guest's connections (`ch` was closed by the
    // 406 above, so guest has none open now).
    assert_eq!(
        put("/api/user-limits/guest/max-channels", json!(2)).await,
        204
    );
    let (_c1, _first) = b.channel().await;
    let c2 = b.connect().await;
    let _second = c2.create_channel().await.expect("second channel of guest");
    assert!(
        c2.create_channel().await.is_err(),
        "a third channel of guest is refused"
    );
    assert_eq!(
        api.get("/api/user-limits/guest").await.json(),
        json!([{"user": "guest", "value": {"max-channels": 2}}])
    );
    // Validation: RabbitMQ's names only; unknown owners 404.
    let r = api
        .put("/api/user-limits/guest/max-queues", json!({"value": 1}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        api.put("/api/vhost-limits/nope/max-queues", json!({"value": 1}))
            .await
            .status,
        404
    );
    let defs = api.get("/api/definitions").await.json();
    let guest = defs["users"]
        .as_array()
        .and_then(|u| u.iter().find(|u| u["name"] == "guest"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(guest["limits"], json!({"max-channels": 2}));
    // RabbitMQ 3.10 exports vhost limits as a runtime parameter.
    assert_eq!(
        defs["parameters"],
        json!([{"vhost": "/", "component": "vhost-limits", "name": "limits",
                "value": {"max-queues": 1}}])
    );

    // Kept across a restart.
    drop((c2, _c1, _first, ch, _c));
    let b = b.restart().await;
    let api = Api::new(&b);
    assert_eq!(
        api.get("/api/vhost-limits/%2F").await.json(),
        json!([{"vhost": "/", "value": {"max-queues": 1}}])
    );
    let (_c, ch) = b.channel().await;
    // The transient lim-1 is gone: one queue fits, a second does not.
    common::declare(&ch, "lim-3", FieldTable::default()).await;
    assert!(ch
        .queue_declare(
            "lim-4".into(),
            QueueDeclareOptions::default(),
            FieldTable::default()
        )
        .await
        .is_err());
    assert_eq!(
        api.delete("/api/vhost-limits/%2F/max-queues").await.status,
        204
    );
    assert_eq!(
        api.delete("/api/user-limits/guest/max-channels")
            .await
            .status,
        204
    );
    let (_c, ch) = b.channel().await;
    common::declare(&ch, "lim-4", FieldTable::default()).await;
    assert_eq!(api.get("/api/vhost-limits").await.json(), json!([]));
}

/// Operator policies cap what users set: the smaller max-length wins over a user policy's,
/// they take only limits and TTLs, and they live under `/api/operator-policies`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_policies_cap_queues() {
    let b = common::start().await;
    let api = Api::new(&b);
    let (_c, ch) = b.channel().await;
    let user = json!({"pattern": "^op\\.", "definition": {"max-length": 5}, "apply-to": "queues"});
    assert_eq!(api.put("/api/policies/%2F/user", user).await.status, 201);
    let cap = json!({"pattern": "^op\\.", "definition": {"max-length": 2}, "apply-to": "queues"});
    let r = api.put("/api/operator-policies/%2F/cap", cap).await;
    assert_eq!(r.status, 201, "{}", r.text());
    common::declare(&ch, "op.q", FieldTable::default()).await;
    for i in 0..4 {
        common::publish(&ch, "", "op.q", format!("{i}").as_bytes()).await;
    }
    common::wait_ready(&ch, "op.q", 2).await;
    let q = api.get("/api/queues/%2F/op.q").await.json();
    assert_eq!(q["messages"], 2, "the operator's cap wins: {q}");
    assert_eq!(q["policy"], "user");
    assert_eq!(q["operator_policy"], "cap");
    assert_eq!(q["effective_policy_definition"], json!({"max-length": 2}));
    assert_eq!(
        api.get("/api/operator-policies").await.json()[0]["name"],
        "cap"
    );
    assert_eq!(
        api.get("/api/policies")
            .await
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let r = api
        .put(
            "/api/operator-policies/%2F/bad",
            json!({"pattern": ".*", "definition": {"dead-letter-exchange": "x"}}),
        )
        .await;
    assert_eq!(r.status, 400, "only limits and TTLs: {}", r.text());
    assert_eq!(
        api.delete("/api/operator-policies/%2F/cap").await.status,
        204
    );
    for i in 0..4 {
        common::publish(&ch, "", "op.q", format!("{i}").as_bytes()).await;
    }
    common::wait_ready(&ch, "op.q", 5).await;
    let q = api.get("/api/queues/%2F/op.q").await.json();
    assert_eq!(q["messages"], 5, "the user policy's limit again: {q}");
    assert_eq!(q["operator_policy"], Value::Null);
}

/// What rabbitmqadmin and admin libraries send, answered as RabbitMQ 3.10 does: numbers as
/// strings, trailing slashes, `tags` required on user PUT, `reject_requeue_false`
/// dead-letters, runtime-parameter lists, the cluster name, ties in sorts by name.
/// Global parameters as RabbitMQ keeps them: `cluster_name` and `internal_cluster_id` from
/// the first boot, others set and cleared by an operator, all durable; the cluster name
/// is `cluster_name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_parameters_and_the_cluster_name_survive_a_restart() {
    let b = common::start().await;
    let api = Api::new(&b);
    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let listed = api.get("/api/global-parameters").await.json();
    assert_eq!(
        names(listed.clone()),
        ["cluster_name", "internal_cluster_id"]
    );
    let id = listed[1]["value"].clone();
    assert_eq!(
        api.put("/api/global-parameters/kept", json!({"value": {"a": 1}}))
            .await
            .status,
        201
    );
    assert_eq!(
        api.put("/api/global-parameters/gone", json!({"value": 2}))
            .await
            .status,
        201
    );
    assert_eq!(api.delete("/api/global-parameters/gone").await.status, 204);
    assert_eq!(
        api.put("/api/cluster-name", json!({"name": "blue"}))
            .await
            .status,
        204
    );
    drop(api);
    let b = b.restart().await;
    let api = Api::new(&b);
    let listed = api.get("/api/global-parameters").await.json();
    assert_eq!(
        names(listed),
        ["cluster_name", "internal_cluster_id", "kept"]
    );
    assert_eq!(
        api.get("/api/global-parameters/internal_cluster_id")
            .await
            .json()["value"],
        id
    );
    assert_eq!(
        api.get("/api/global-parameters/kept").await.json(),
        json!({"name": "kept", "value": {"a": 1}})
    );
    assert_eq!(api.get("/api/cluster-name").await.json()["name"], "blue");
    assert_eq!(
        api.get("/api/overview").await.json()["cluster_name"],
        "blue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmqadmin_style_requests() {
    let b = common::start().await;
    let api = Api::new(&b);
    assert_eq!(api.get("/api/overview/").await.status, 200);
    assert_eq!(api.get("/api/queues/%2F/").await.status, 200);
    assert_eq!(
        api.get("/api/cluster-name").await.json()["name"],
        api.get("/api/overview").await.json()["cluster_name"]
    );
    assert_eq!(
        api.get("/api/healthchecks/node").await.json()["status"],
        "ok"
    );
    for path in ["/api/parameters", "/api/parameters/shovel/%2F"] {
        assert_eq!(api.get(path).await.json(), json!([]), "{path}");
    }

    let r = api
        .put("/api/users/rotated", json!({"password": "p"}))
        .await;
    assert_eq!(
        (r.status, &r.json()["reason"]),
        (400, &json!("tags_not_present"))
    );
    assert_eq!(
        api.put(
            "/api/users/rotated",
            json!({"password": "p", "tags": "administrator"})
        )
        .await
        .status,
        201
    );

    assert_eq!(api.put("/api/queues/%2F/dead", json!({})).await.status, 201);
    let dlx =
        json!({"arguments": {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}});
    assert_eq!(api.put("/api/queues/%2F/work", dlx).await.status, 201);
    for i in 0..3 {
        let body = json!({"routing_key": "work", "payload": format!("m{i}"), "payload_encoding": "string", "properties": {}});
        assert_eq!(
            api.post("/api/exchanges/%2F/amq.default/publish", body)
                .await
                .json()["routed"],
            true
        );
    }
    let got = api
        .post("/api/queues/%2F/work/get", json!({"count": "2", "ackmode": "reject_requeue_false", "encoding": "auto", "truncate": "1"}))
        .await
        .json();
    let payloads: Vec<&Value> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["payload"])
        .collect();
    assert_eq!(payloads, [&json!("m"), &json!("m")]);
    let dead = api
        .post(
            "/api/queues/%2F/dead/get",
            json!({"count": 5, "ackmode": "ack_requeue_false", "encoding": "auto"}),
        )
        .await
        .json();
    assert_eq!(dead.as_array().unwrap().len(), 2, "{dead}");

    // Equal sort keys stay in name order (reversed with sort_reverse).
    for q in ["s-b", "s-a", "s-c"] {
        assert_eq!(
            api.put(&format!("/api/queues/%2F/{q}"), json!({}))
                .await
                .status,
            201
        );
    }
    let names = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|q| {
                q["name"]
                    .as_str()
                    .filter(|n| n.starts_with("s-"))
                    .map(str::to_owned)
            })
            .collect()
    };
    assert_eq!(
        names(api.get("/api/queues/%2F?sort=messages").await.json()),
        ["s-a", "s-b", "s-c"]
    );
    assert_eq!(
        names(
            api.get("/api/queues/%2F?sort=messages&sort_reverse=true")
                .await
                .json()
        ),
        ["s-c", "s-b", "s-a"]
    );
    // Without `page`, the page size and name filter are ignored.
    assert_eq!(
        names(
            api.get("/api/queues/%2F?page_size=600&name=s-a")
                .await
                .json()
        )
        .len(),
        3
    );
}

/// RabbitMQ 3.10's definitions keep vhost limits and operator policies as runtime
/// parameters: importing its file sets both, and the export writes them back the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_parameters_round_trip() {
    let b = common::start().await;
    let api = Api::new(&b);
    let parameters = json!([
        {"value": {"max-connections": 100}, "vhost": "/", "component": "vhost-limits", "name": "limits"},
        {"value": {"pattern": "^zz", "definition": {"max-length": 5}, "priority": 1, "apply-to": "queues"},
         "vhost": "/", "component": "operator_policy", "name": "opx"}
    ]);
    let r = api
        .post(
            "/api/definitions",
            json!({"parameters": parameters.clone(), "global_parameters": [
            {"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"}]}),
        )
        .await;
    assert!(r.status < 300, "{}", r.text());
    assert_eq!(
        api.get("/api/vhost-limits/%2F").await.json(),
        json!([{"vhost": "/", "value": {"max-connections": 100}}])
    );
    let op = api.get("/api/operator-policies/%2F/opx").await.json();
    assert_eq!(
        (&op["pattern"], &op["definition"]),
        (&json!("^zz"), &json!({"max-length": 5}))
    );
    let exported = api.get("/api/definitions").await.json();
    let mut got = exported["parameters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut want = parameters.as_array().cloned().unwrap_or_default();
    let key = |v: &Value| v["component"].as_str().unwrap_or("").to_owned();
    got.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(got, want);
}

/// A vhost's description, tags and default queue type are kept (across a restart and in
/// definitions), as RabbitMQ shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_metadata_is_kept() {
    let b = common::start().await;
    let api = Api::new(&b);
    let body = json!({"description": "orders", "tags": "prod,eu", "default_queue_type": "quorum"});
    assert_eq!(api.put("/api/vhosts/meta", body).await.status, 201);
    // A later PUT changes only what it names.
    assert_eq!(
        api.put("/api/vhosts/meta", json!({"description": "orders v2"}))
            .await
            .status,
        204
    );
    let check = |v: &Value| {
        assert_eq!(v["description"], "orders v2", "{v}");
        assert_eq!(v["tags"], json!(["prod", "eu"]), "{v}");
        assert_eq!(v["default_queue_type"], "quorum", "{v}");
    };
    check(&api.get("/api/vhosts/meta").await.json());
    let b = b.restart().await;
    let api = Api::new(&b);
    check(&api.get("/api/vhosts/meta").await.json());
    let defs = api.get("/api/definitions").await.json();
    let v = defs["vhosts"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == "meta"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(v["metadata"]["tags"], json!(["prod", "eu"]), "{v}");
    assert_eq!(v["metadata"]["default_queue_type"], "quorum", "{v}");
    // RabbitMQ 3.10's first-boot vhost, and Erlang's `undefined` for no default type.
    let root = api.get("/api/vhosts/%2F").await.json();
    assert_eq!(root["description"], "Default virtual host", "{root}");
    assert_eq!(root["default_queue_type"], "undefined", "{root}");
    assert!(
        root["metadata"].get("default_queue_type").is_none(),
        "{root}"
    );
}

/// `lengths_age`/`lengths_incr` and `msg_rates_age`/`msg_rates_incr`: `samples` newest
/// first (the newest is the present), `avg` and `avg_rate`, on queues, vhosts and the
/// overview, as monitoring tools read them from RabbitMQ; a bad window is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_over_a_window() {
    let b = common::start().await;
    let api = Api::new(&b);
    let r = api.put("/api/queues/%2F/hist.q", json!({})).await;
    assert_eq!(r.status, 201);
    for _ in 0..3 {
        let r = api
            .post(
                "/api/exchanges/%2F/amq.default/publish",
                json!({"properties": {}, "routing_key": "hist.q", "payload": "x", "payload_encoding": "string"}),
            )
            .await;
        assert_eq!(r.json()["routed"], json!(true));
    }
    let samples = |d: &Value| -> Vec<(u64, u64)> {
        d["samples"]
            .as_array()
            .unwrap_or_else(|| panic!("no samples in {d}"))
            .iter()
            .map(|s| {
                (
                    s["sample"].as_u64().unwrap(),
                    s["timestamp"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let q = api
        .get("/api/queues/%2F/hist.q?lengths_age=60&lengths_incr=5&msg_rates_age=60&msg_rates_incr=30")
        .await
        .json();
    let s = samples(&q["messages_details"]);
    assert_eq!(s.len(), 13, "age / incr + 1");
    assert!(s.iter().all(|(v, _)| *v == 3), "{s:?}");
    assert!(
        s.windows(2).all(|w| w[0].1 == w[1].1 + 5000),
        "newest first: {s:?}"
    );
    assert_eq!(q["messages_details"]["avg"], json!(3.0));
    assert_eq!(q["messages_details"]["avg_rate"], json!(0.0));
    assert!(q["messages_details"]["rate"].is_number());
    assert_eq!(samples(&q["messages_ready_details"])[0].0, 3);
    assert_eq!(samples(&q["messages_unacknowledged_details"])[0].0, 0);
    let p = samples(&q["message_stats"]["publish_details"]);
    assert_eq!((p.len(), p[0].0), (3, 3));
    // Listings too; without a window there are no samples.
    let list = api
        .get("/api/queues/%2F?lengths_age=10&lengths_incr=5")
        .await
        .json();
    assert_eq!(samples(&list[0]["messages_details"]).len(), 3);
    let plain = api.get("/api/queues/%2F/hist.q").await.json();
    assert!(plain["messages_details"].get("samples").is_none());
    // The overview: lengths under queue_totals, rates under message_stats.
    let o = api
        .get("/api/overview?lengths_age=60&lengths_incr=5&msg_rates_age=60&msg_rates_incr=5")
        .await
        .json();
    assert_eq!(samples(&o["queue_totals"]["messages_details"])[0].0, 3);
    assert_eq!(samples(&o["message_stats"]["publish_details"])[0].0, 3);
    let v = api
        .get("/api/vhosts/%2F?lengths_age=60&lengths_incr=5")
        .await
        .json();
    assert_eq!(samples(&v["messages_ready_details"])[0].0, 3);
    assert!(v["message_stats"]["publish_details"]
        .get("samples")
        .is_none());
    // RabbitMQ's refusals: a zero or negative step, more than 500 steps.
    for bad in [
        "lengths_age=60&lengths_incr=0",
        "msg_rates_age=501&msg_rates_incr=1",
    ] {
        let r = api.get(&format!("/api/queues/%2F/hist.q?{bad}")).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(
            r.json()["reason"]
                .as_str()
                .unwrap()
                .starts_with("Invalid range parameters: age "),
            "{bad}"
        );
    }
}

/// A taken metrics port is logged, not fatal: messaging does not depend on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_prometheus_port_does_not_stop_the_broker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = common::config(dir.path());
    c.listeners.prometheus = addr;
    let server = warren::Server::start(&c).await.expect("the broker starts");
    assert!(server.prometheus_addr.is_none());
    assert!(server.amqp_addr.is_some());
    server.shutdown().await;
}
