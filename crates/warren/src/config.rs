//! The configuration file (config/warren.toml) and its command-line/env overrides.

use std::path::PathBuf;

use serde::Deserialize;

/// Everything in config/warren.toml. Every field has a default, so an empty file (or none)
/// gives RabbitMQ's standard setup.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listeners: Listeners,
    pub storage: Storage,
    pub amqp: Amqp,
    pub auth: Auth,
    pub limits: Limits,
    pub stomp: Stomp,
    pub mqtt: Mqtt,
    pub tls: Tls,
    pub log: Log,
    pub definitions: Definitions,
}

/// A definitions file (RabbitMQ's JSON export) imported at every start, after the store
/// opens (RabbitMQ's `load_definitions`). Empty: none.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Definitions {
    pub file: String,
}

/// TLS: PEM files; the TLS listeners start only when `cert_file` and `key_file` are set.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    pub cert_file: String,
    pub key_file: String,
    /// CA bundle for client certificates; when set, TLS clients must present one.
    pub ca_file: String,
    /// Log in as the client certificate's subject CN: AMQP offers SASL EXTERNAL, MQTT and
    /// STOMP connections without credentials use it (RabbitMQ's ssl_cert_login with
    /// `ssl_cert_login_from = common_name`). Needs `ca_file`.
    pub ssl_cert_login: bool,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        !self.cert_file.trim().is_empty() && !self.key_file.trim().is_empty()
    }
}

/// STOMP front-end limits; each breach is answered with an ERROR frame, then close.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stomp {
    pub max_headers: usize,
    /// Longest header line in bytes.
    pub max_header_length: usize,
    /// A frame started but not finished within this time ends the connection (a peer
    /// that sends half a frame and goes silent holds no buffer for ever).
    pub incomplete_frame_timeout_ms: u64,
}

impl Default for Stomp {
    fn default() -> Self {
        Self {
            max_headers: 1000,
            max_header_length: 65536,
            incomplete_frame_timeout_ms: 10_000,
        }
    }
}

/// MQTT front-end settings (RabbitMQ's `mqtt.*` keys where they correspond).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mqtt {
    /// A CONNECT without username logs in as `default_user` (RabbitMQ's
    /// `mqtt.allow_anonymous`); false refuses it (CONNACK 0x05 / 0x87).
    pub allow_anonymous: bool,
    pub default_user: String,
    pub default_pass: String,
    /// Vhost of usernames without a `vhost:` prefix (RabbitMQ's `mqtt.vhost`).
    pub vhost: String,
    /// Largest packet accepted, bytes (advertised as Maximum Packet Size in 5.0).
    pub max_packet_size: usize,
    /// Unreleased inbound QoS 2 publishes per 5.0 session (advertised as Receive Maximum).
    pub receive_maximum: u16,
    /// QoS ≥ 1 deliveries in flight per session (at most the client's Receive Maximum).
    pub max_inflight: u16,
    /// Send topic aliases to 5.0 clients that allow them (see `MqttConfig`).
    pub outbound_topic_aliases: bool,
}

impl Default for Mqtt {
    fn default() -> Self {
        Self {
            allow_anonymous: true,
            default_user: "guest".into(),
            default_pass: "guest".into(),
            vhost: "/".into(),
            max_packet_size: 16 * 1024 * 1024,
            receive_maximum: 20,
            max_inflight: 100,
            outbound_topic_aliases: false,
        }
    }
}

/// Listen addresses; `"off"` disables a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listeners {
    pub amqp: String,
    pub mqtt: String,
    pub stomp: String,
    pub http: String,
    /// Prometheus metrics alone (RabbitMQ's rabbitmq_prometheus port). A failure to bind
    /// it is logged, not fatal: messaging does not depend on a metrics port.
    pub prometheus: String,
    pub web_stomp: String,
    pub web_mqtt: String,
    /// TLS listeners (only with `[tls]` certificates).
    pub amqps: String,
    pub mqtts: String,
    pub stomps: String,
    /// Management API over TLS (RabbitMQ's management.ssl port).
    pub https: String,
    /// Web-STOMP and Web-MQTT over TLS (RabbitMQ's web_stomp.ssl / web_mqtt.ssl ports).
    pub web_stomp_tls: String,
    pub web_mqtt_tls: String,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            amqp: "[::]:5672".into(),
            mqtt: "[::]:1883".into(),
            stomp: "[::]:61613".into(),
            http: "[::]:15672".into(),
            prometheus: "[::]:15692".into(),
            web_stomp: "[::]:15674".into(),
            web_mqtt: "[::]:15675".into(),
            amqps: "[::]:5671".into(),
            mqtts: "[::]:8883".into(),
            stomps: "[::]:61614".into(),
            https: "[::]:15671".into(),
            web_stomp_tls: "[::]:15673".into(),
            web_mqtt_tls: "[::]:15676".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Storage {
    pub data_dir: PathBuf,
    /// fsync every group commit before confirming (never turn off in production).
    pub sync_commits: bool,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            sync_commits: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Amqp {
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub max_connections: usize,
    /// A delivery left unacknowledged this long closes its channel with 406 (RabbitMQ's
    /// `consumer_timeout`, 30 minutes); 0 disables it.
    pub consumer_timeout_ms: u64,
}

impl Default for Amqp {
    fn default() -> Self {
        Self {
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            max_connections: 0,
            consumer_timeout_ms: 1_800_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    pub default_user: String,
    pub default_pass: String,
    pub loopback_users: Vec<String>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            default_user: "guest".into(),
            default_pass: "guest".into(),
            loopback_users: vec!["guest".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_message_size: u64,
    /// Memory alarm threshold as a fraction of total RAM (RabbitMQ's
    /// `vm_memory_high_watermark.relative`).
    pub memory_high_watermark: f64,
    /// Absolute memory alarm threshold in bytes; overrides the relative one when > 0.
    pub memory_high_watermark_bytes: u64,
    /// Disk alarm threshold: free bytes on the data dir's filesystem.
    pub disk_free_limit: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 134_217_728,
            memory_high_watermark: 0.4,
            memory_high_watermark_bytes: 0,
            disk_free_limit: 50_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `human` or `json`.
    pub format: String,
    /// A tracing-subscriber filter, e.g. `info` or `warren_amqp=debug,info`.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: "human".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_matches_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/warren.toml");
        let c = Config::load(std::path::Path::new(path)).expect("config/warren.toml parses");
        let d = Config::default();
        assert_eq!(c.listeners.amqp, d.listeners.amqp);
        assert_eq!(c.listeners.web_mqtt, d.listeners.web_mqtt);
        assert_eq!(c.listeners.prometheus, d.listeners.prometheus);
        assert_eq!(c.listeners.https, d.listeners.https);
        assert_eq!(c.listeners.web_stomp_tls, d.listeners.web_stomp_tls);
        assert_eq!(c.listeners.web_mqtt_tls, d.listeners.web_mqtt_tls);
        assert_eq!(c.tls.ssl_cert_login, d.tls.ssl_cert_login);
        assert_eq!(c.storage.data_dir, d.storage.data_dir);
        assert_eq!(c.amqp.frame_max, d.amqp.frame_max);
        assert_eq!(c.auth.loopback_users, d.auth.loopback_users);
        assert_eq!(c.limits.max_message_size, d.limits.max_message_size);
        assert_eq!(c.mqtt.allow_anonymous, d.mqtt.allow_anonymous);
        assert_eq!(c.mqtt.receive_maximum, d.mqtt.receive_maximum);
        assert_eq!(c.mqtt.max_inflight, d.mqtt.max_inflight);
        assert_eq!(c.mqtt.outbound_topic_aliases, d.mqtt.outbound_topic_aliases);
        assert_eq!(c.mqtt.max_packet_size, d.mqtt.max_packet_size);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::parse("[amqp]\nframe_maxx = 1\n").is_err());
        assert!(Config::parse("").is_ok());
        let c = Config::parse("[definitions]\nfile = \"defs.json\"\n").expect("parses");
        assert_eq!(c.definitions.file, "defs.json");
    }
}
