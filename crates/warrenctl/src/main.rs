//! `warrenctl`: Warren's command-line tool. It talks only to the management HTTP API (basic
//! auth), never to the data dir or a private port, so it works against a remote node, over
//! the same port operators already open, and against RabbitMQ itself — the API is the
//! compatibility surface, so the tool exercises exactly what scripts rely on.
//!
//! Output is a plain aligned table for people or the API's own JSON for scripts
//! (`--format json`). Errors go to stderr with the API's `reason` and exit code 1.

mod http;
mod table;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use http::{enc, Client, CtlError};

/// Manage a Warren (or RabbitMQ) node through its management HTTP API.
#[derive(Parser, Debug)]
#[command(name = "warrenctl", version, about)]
struct Cli {
    /// Base URL of the management API.
    #[arg(
        long,
        env = "WARREN_URL",
        default_value = "http://127.0.0.1:15672",
        global = true
    )]
    url: String,
    /// User for basic auth.
    #[arg(long, env = "WARREN_USER", default_value = "guest", global = true)]
    user: String,
    /// Password for basic auth.
    #[arg(
        long,
        env = "WARREN_PASSWORD",
        default_value = "guest",
        hide_env_values = true,
        hide_default_value = true,
        global = true
    )]
    password: String,
    /// Output: an aligned table, or the API's JSON.
    #[arg(long, value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
    /// Vhost: for `list`, only this one (default: all); elsewhere the one to act on
    /// (default `/`).
    #[arg(long, global = true)]
    vhost: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ListKind {
    Queues,
    Exchanges,
    Bindings,
    Connections,
    Users,
    Vhosts,
    TopicPermissions,
    Policies,
    VhostLimits,
    UserLimits,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Resource {
    Queue,
    Exchange,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum QueueOnly {
    Queue,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List queues, exchanges, bindings, connections, users, vhosts, topic permissions,
    /// policies, vhost limits or user limits.
    List { what: ListKind },
    /// Remove every ready message from a queue.
    Purge { what: QueueOnly, name: String },
    /// Delete a queue or an exchange.
    Delete { what: Resource, name: String },
    /// Declare a queue or an exchange (idempotent when the properties match).
    Declare {
        what: Resource,
        name: String,
        /// Survives a restart.
        #[arg(long)]
        durable: bool,
        /// Deleted when its last consumer (queue) or binding (exchange) goes.
        #[arg(long)]
        auto_delete: bool,
        /// Exchange type (direct, fanout, topic, headers; default direct), or for a queue
        /// its `x-queue-type` (classic, quorum).
        #[arg(long = "type")]
        kind: Option<String>,
    },
    /// Create a user, or change its password and tags.
    AddUser {
        name: String,
        // Own ids: positionals named like the global --user/--password would share their
        // clap ids and overwrite the credentials.
        #[arg(id = "new_password", value_name = "PASSWORD")]
        password: String,
        /// Comma-separated tags: administrator, management, monitoring, policymaker.
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// Grant a user configure / write / read permissions (regexes) on a vhost.
    SetPermissions {
        #[arg(id = "grantee", value_name = "USER")]
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    /// Set a user's topic permissions (write / read regexes on routing keys) for one
    /// topic exchange in a vhost, as `rabbitmqctl set_topic_permissions`.
    SetTopicPermissions {
        #[arg(id = "grantee", value_name = "USER")]
        user: String,
        exchange: String,
        write: String,
        read: String,
    },
    /// Set a policy in a vhost, as `rabbitmqctl set_policy NAME PATTERN DEFINITION`:
    /// DEFINITION is JSON, e.g. '{"max-length": 1000}'.
    SetPolicy {
        #[arg(id = "policy_name", value_name = "NAME")]
        name: String,
        pattern: String,
        definition: String,
        /// Higher wins when several policies match.
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// all, queues, exchanges, classic_queues, quorum_queues or streams.
        #[arg(long, default_value = "all")]
        apply_to: String,
    },
    /// Set limits of a vhost (--vhost), as `rabbitmqctl set_vhost_limits`: DEFINITION is
    /// JSON, e.g. '{"max-connections": 100, "max-queues": 1000}' (negative: no limit).
    SetVhostLimits { definition: String },
    /// Remove all limits of a vhost (--vhost), as `rabbitmqctl clear_vhost_limits`.
    ClearVhostLimits,
    /// Set limits of a user, as `rabbitmqctl set_user_limits`: DEFINITION is JSON, e.g.
    /// '{"max-connections": 10, "max-channels": 100}'.
    SetUserLimits {
        #[arg(id = "limited_user", value_name = "USER")]
        user: String,
        definition: String,
    },
    /// Remove all limits of a user, as `rabbitmqctl clear_user_limits USER all`.
    ClearUserLimits {
        #[arg(id = "limited_user", value_name = "USER")]
        user: String,
    },
    /// Remove a policy from a vhost, as `rabbitmqctl clear_policy`.
    ClearPolicy {
        #[arg(id = "policy_name", value_name = "NAME")]
        name: String,
    },
    /// List topic permissions (all, or with --vhost one vhost's), as
    /// `rabbitmqctl list_topic_permissions`; the same as `list topic-permissions`.
    ListTopicPermissions,
    /// Export definitions (users, vhosts, permissions, queues, exchanges, bindings) in
    /// RabbitMQ's JSON format; `-` writes to stdout.
    Export { file: String },
    /// Import a definitions file (RabbitMQ's JSON format); `-` reads stdin.
    Import { file: String },
    /// Node, versions, totals, listeners and alarms.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match Client::new(&cli.url, &cli.user, &cli.password) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut out = std::io::stdout().lock();
    match run(&cli, &client, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &CtlError) -> ExitCode {
    eprintln!("warrenctl: {e}");
    ExitCode::FAILURE
}

fn run(cli: &Cli, c: &Client, out: &mut dyn Write) -> Result<(), CtlError> {
    let vhost = cli.vhost.as_deref().unwrap_or("/");
    match &cli.cmd {
        Cmd::List { what } => print_list(cli, c, out, *what),
        Cmd::Purge { name, .. } => {
            c.delete(&format!(
                "/api/queues/{}/{}/contents",
                enc(vhost),
                enc(name)
            ))?;
            done(
                cli,
                out,
                &format!("purged queue '{name}' in vhost '{vhost}'"),
            )
        }
        Cmd::Delete { what, name } => {
            let kind = resource_path(*what);
            c.delete(&format!("/api/{kind}/{}/{}", enc(vhost), enc(name)))?;
            done(
                cli,
                out,
                &format!("deleted {} '{name}'", resource_name(*what)),
            )
        }
        Cmd::Declare {
            what,
            name,
            durable,
            auto_delete,
            kind,
        } => {
            let body = match what {
                Resource::Exchange => json!({
                    "type": kind.as_deref().unwrap_or("direct"),
                    "durable": durable,
                    "auto_delete": auto_delete,
                    "internal": false,
                    "arguments": {},
                }),
                Resource::Queue => {
                    let mut args = serde_json::Map::new();
                    if let Some(t) = kind {
                        args.insert("x-queue-type".into(), Value::String(t.clone()));
                    }
                    json!({"durable": durable, "auto_delete": auto_delete, "arguments": args})
                }
            };
            let path = format!("/api/{}/{}/{}", resource_path(*what), enc(vhost), enc(name));
            c.put(&path, &body)?;
            done(
                cli,
                out,
                &format!(
                    "declared {} '{name}' in vhost '{vhost}'",
                    resource_name(*what)
                ),
            )
        }
        Cmd::AddUser {
            name,
            password,
            tags,
        } => {
            c.put(
                &format!("/api/users/{}", enc(name)),
                &json!({"password": password, "tags": tags}),
            )?;
            done(cli, out, &format!("user '{name}' saved"))
        }
        Cmd::SetPermissions {
            user,
            configure,
            write,
            read,
        } => {
            c.put(
                &format!("/api/permissions/{}/{}", enc(vhost), enc(user)),
                &json!({"configure": configure, "write": write, "read": read}),
            )?;
            done(
                cli,
                out,
                &format!("permissions of '{user}' on vhost '{vhost}' set"),
            )
        }
        Cmd::SetTopicPermissions {
            user,
            exchange,
            write,
            read,
        } => {
            c.put(
                &format!("/api/topic-permissions/{}/{}", enc(vhost), enc(user)),
                &json!({"exchange": exchange, "write": write, "read": read}),
            )?;
            done(
                cli,
                out,
                &format!(
                    "topic permissions of '{user}' on exchange '{exchange}' in vhost '{vhost}' set"
                ),
            )
        }
        Cmd::ListTopicPermissions => print_list(cli, c, out, ListKind::TopicPermissions),
        Cmd::SetPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
        } => {
            // Parse first: a broken definition is reported here, not as the server's 400.
            let definition: Value = serde_json::from_str(definition)
                .map_err(|e| CtlError::Io(format!("definition is not JSON: {e}")))?;
            c.put(
                &format!("/api/policies/{}/{}", enc(vhost), enc(name)),
                &json!({"pattern": pattern, "definition": definition,
                        "priority": priority, "apply-to": apply_to}),
            )?;
            done(cli, out, &format!("policy '{name}' set in vhost '{vhost}'"))
        }
        Cmd::SetVhostLimits { definition } => {
            set_limits(c, &format!("/api/vhost-limits/{}", enc(vhost)), definition)?;
            done(cli, out, &format!("limits of vhost '{vhost}' set"))
        }
        Cmd::ClearVhostLimits => {
            clear_limits(c, &format!("/api/vhost-limits/{}", enc(vhost)))?;
            done(cli, out, &format!("limits of vhost '{vhost}' cleared"))
        }
        Cmd::SetUserLimits { user, definition } => {
            set_limits(c, &format!("/api/user-limits/{}", enc(user)), definition)?;
            done(cli, out, &format!("limits of user '{user}' set"))
        }
        Cmd::ClearUserLimits { user } => {
            clear_limits(c, &format!("/api/user-limits/{}", enc(user)))?;
            done(cli, out, &format!("limits of user '{user}' cleared"))
        }
        Cmd::ClearPolicy { name } => {
            c.delete(&format!("/api/policies/{}/{}", enc(vhost), enc(name)))?;
            done(
                cli,
                out,
                &format!("policy '{name}' cleared in vhost '{vhost}'"),
            )
        }
        Cmd::Export { file } => {
            let defs = c.get("/api/definitions")?;
            let text = serde_json::to_string_pretty(&defs).map_err(CtlError::json)? + "\n";
            if file == "-" {
                return write_out(out, &text);
            }
            std::fs::write(file, text).map_err(|e| CtlError::Io(format!("{file}: {e}")))?;
            done(cli, out, &format!("definitions exported to {file}"))
        }
        Cmd::Import { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(file)
            }
            .map_err(|e| CtlError::Io(format!("{file}: {e}")))?;
            // Parse first: a broken file is reported here, not as the server's 400.
            let defs: Value = serde_json::from_str(&text)
                .map_err(|e| CtlError::Io(format!("{file}: not JSON: {e}")))?;
            c.post("/api/definitions", &defs)?;
            done(cli, out, &format!("definitions imported from {file}"))
        }
        Cmd::Status => status(cli, c, out),
    }
}

/// PUTs each limit of a JSON object (`{"max-connections": 10}`) under `base`.
fn set_limits(c: &Client, base: &str, definition: &str) -> Result<(), CtlError> {
    let def: Value = serde_json::from_str(definition)
        .map_err(|e| CtlError::Io(format!("definition is not JSON: {e}")))?;
    let Value::Object(m) = def else {
        return Err(CtlError::Io(
            "definition must be a JSON object of limits".into(),
        ));
    };
    for (name, value) in m {
        c.put(
            &format!("{base}/{}", enc(&name)),
            &json!({ "value": value }),
        )?;
    }
    Ok(())
}

/// DELETEs every limit listed at `base` (`[{"value": {name: n}}]`).
fn clear_limits(c: &Client, base: &str) -> Result<(), CtlError> {
    let listed = c.get(base)?;
    let names: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("value").and_then(Value::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect();
    for name in names {
        c.delete(&format!("{base}/{}", enc(&name)))?;
    }
    Ok(())
}

/// `list <what>`: a table, or the API's JSON.
fn print_list(cli: &Cli, c: &Client, out: &mut dyn Write, what: ListKind) -> Result<(), CtlError> {
    let rows = list(c, what, cli.vhost.as_deref())?;
    match cli.format {
        Format::Json => print_json(out, &Value::Array(rows)),
        Format::Table => write_out(out, &table::render(table::columns(table_kind(what)), &rows)),
    }
}

/// Every item of a listing. Queues and exchanges are fetched page by page (RabbitMQ's
/// maximum page size, 500) so a node with 100k queues is never asked for one huge body.
fn list(c: &Client, what: ListKind, vhost: Option<&str>) -> Result<Vec<Value>, CtlError> {
    let base = match what {
        ListKind::Queues => "/api/queues",
        ListKind::Exchanges => "/api/exchanges",
        ListKind::Bindings => "/api/bindings",
        ListKind::Connections => "/api/connections",
        ListKind::Users => "/api/users",
        ListKind::Vhosts => "/api/vhosts",
        ListKind::TopicPermissions => "/api/topic-permissions",
        ListKind::Policies => "/api/policies",
        ListKind::VhostLimits => "/api/vhost-limits",
        ListKind::UserLimits => "/api/user-limits",
    };
    let scoped = matches!(
        what,
        ListKind::Queues
            | ListKind::Exchanges
            | ListKind::Bindings
            | ListKind::Policies
            | ListKind::VhostLimits
    );
    let path = match vhost {
        Some(v) if scoped => format!("{base}/{}", enc(v)),
        _ => base.to_owned(),
    };
    let mut rows = if matches!(what, ListKind::Queues | ListKind::Exchanges) {
        let mut rows = Vec::new();
        let mut page = 1u64;
        loop {
            let v = c.get(&format!("{path}?page={page}&page_size=500"))?;
            let items = v
                .get("items")
                .and_then(Value::as_array)
                .ok_or_else(|| CtlError::Protocol(format!("{path}: no `items` in a page")))?;
            rows.extend(items.iter().cloned());
            let pages = v.get("page_count").and_then(Value::as_u64).unwrap_or(1);
            if page >= pages {
                break rows;
            }
            page += 1;
        }
    } else {
        match c.get(&path)? {
            Value::Array(a) => a,
            other => {
                return Err(CtlError::Protocol(format!(
                    "{path}: expected a list, got {}",
                    short(&other)
                )))
            }
        }
    };
    // Connections and users are not scoped by path in the API; filter here.
    if let Some(v) = vhost {
        if matches!(what, ListKind::Connections | ListKind::TopicPermissions) {
            rows.retain(|r| r.get("vhost").and_then(Value::as_str) == Some(v));
        }
    }
    Ok(rows)
}

fn table_kind(what: ListKind) -> &'static str {
    match what {
        ListKind::Queues => "queues",
        ListKind::Exchanges => "exchanges",
        ListKind::Bindings => "bindings",
        ListKind::Connections => "connections",
        ListKind::Users => "users",
        ListKind::Vhosts => "vhosts",
        ListKind::TopicPermissions => "topic-permissions",
        ListKind::Policies => "policies",
        ListKind::VhostLimits => "vhost-limits",
        ListKind::UserLimits => "user-limits",
    }
}

/// `status`: one look at the node, as `rabbitmqctl status` gives.
fn status(cli: &Cli, c: &Client, out: &mut dyn Write) -> Result<(), CtlError> {
    let overview = c.get("/api/overview")?;
    // The alarms check answers 503 with the alarms when one is in effect: that is a
    // status to report, not a failure of the command.
    let alarms = match c.get("/api/health/checks/alarms") {
        Ok(v) => v,
        Err(CtlError::Http {
            status: 503, body, ..
        }) => body,
        Err(e) => return Err(e),
    };
    let nodes = c.get("/api/nodes").unwrap_or(Value::Null);
    let node = nodes.get(0).cloned().unwrap_or(Value::Null);
    if cli.format == Format::Json {
        return print_json(
            out,
            &json!({"overview": overview, "node": node, "alarms": alarms}),
        );
    }
    let s = |v: &Value, k: &str| table::cell(v.get(k).unwrap_or(&Value::Null));
    let t = overview.get("object_totals").cloned().unwrap_or_default();
    let q = overview.get("queue_totals").cloned().unwrap_or_default();
    let mut lines = vec![
        ("node", s(&overview, "node")),
        (
            "product",
            format!(
                "{} {}",
                s(&overview, "product_name"),
                s(&overview, "product_version")
            ),
        ),
        ("rabbitmq api", s(&overview, "management_version")),
        ("alarms", s(&alarms, "status")),
    ];
    if !node.is_null() {
        lines.push((
            "memory",
            format!(
                "{} used / {} limit",
                s(&node, "mem_used"),
                s(&node, "mem_limit")
            ),
        ));
        lines.push((
            "disk free",
            format!(
                "{} / {} limit",
                s(&node, "disk_free"),
                s(&node, "disk_free_limit")
            ),
        ));
    }
    for k in [
        "connections",
        "channels",
        "queues",
        "consumers",
        "exchanges",
    ] {
        lines.push((k, s(&t, k)));
    }
    for k in ["messages", "messages_ready", "messages_unacknowledged"] {
        lines.push((k, s(&q, k)));
    }
    let listeners: Vec<String> = overview
        .get("listeners")
        .and_then(Value::as_array)
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    format!(
                        "{} {}:{}",
                        s(l, "protocol"),
                        s(l, "ip_address"),
                        s(l, "port")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut text = String::new();
    for (k, v) in lines {
        text.push_str(&format!("{k:<24}{v}\n"));
    }
    for l in listeners {
        text.push_str(&format!("{:<24}{l}\n", "listener"));
    }
    write_out(out, &text)
}

fn resource_path(r: Resource) -> &'static str {
    match r {
        Resource::Queue => "queues",
        Resource::Exchange => "exchanges",
    }
}

fn resource_name(r: Resource) -> &'static str {
    match r {
        Resource::Queue => "queue",
        Resource::Exchange => "exchange",
    }
}

/// The result of a command that changes something: a line for people, `{"ok": true}` for
/// scripts (the API itself answers these with an empty 201/204).
fn done(cli: &Cli, out: &mut dyn Write, msg: &str) -> Result<(), CtlError> {
    match cli.format {
        Format::Json => print_json(out, &json!({"ok": true, "message": msg})),
        Format::Table => write_out(out, &format!("{msg}\n")),
    }
}

fn print_json(out: &mut dyn Write, v: &Value) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(v).map_err(CtlError::json)?;
    write_out(out, &(text + "\n"))
}

fn write_out(out: &mut dyn Write, text: &str) -> Result<(), CtlError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| CtlError::Io(format!("stdout: {e}")))
}

/// A value cut short for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}
