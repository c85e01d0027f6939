//! The `warren` binary.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use warren::Config;

/// Warren: a multi-protocol message broker (AMQP 0-9-1, MQTT, STOMP) compatible with
/// RabbitMQ. Every option can also be set by its environment variable; a listener set to
/// `off` is disabled.
#[derive(Debug, Parser)]
#[command(name = "warren", version, about, long_about = None)]
struct Args {
    /// Configuration file (TOML; see config/warren.toml). Defaults apply without one.
    #[arg(long, env = "WARREN_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the RocksDB store [default: ./data].
    #[arg(long, env = "WARREN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// AMQP 0-9-1 listen address [default: [::]:5672], or `off`.
    #[arg(long, env = "WARREN_AMQP_LISTEN")]
    amqp_listen: Option<String>,
    /// MQTT listen address [default: [::]:1883], or `off`.
    #[arg(long, env = "WARREN_MQTT_LISTEN")]
    mqtt_listen: Option<String>,
    /// STOMP listen address [default: [::]:61613], or `off`.
    #[arg(long, env = "WARREN_STOMP_LISTEN")]
    stomp_listen: Option<String>,
    /// Management HTTP API listen address [default: [::]:15672], or `off`.
    #[arg(long, env = "WARREN_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Prometheus metrics listen address [default: [::]:15692], or `off`.
    #[arg(long, env = "WARREN_PROMETHEUS_LISTEN")]
    prometheus_listen: Option<String>,
    /// STOMP-over-WebSocket listen address (path /ws) [default: [::]:15674], or `off`.
    #[arg(long, env = "WARREN_WEB_STOMP_LISTEN")]
    web_stomp_listen: Option<String>,
    /// MQTT-over-WebSocket listen address (path /ws) [default: [::]:15675], or `off`.
    #[arg(long, env = "WARREN_WEB_MQTT_LISTEN")]
    web_mqtt_listen: Option<String>,
    /// AMQPS (TLS) listen address [default: [::]:5671], or `off`; needs [tls] files.
    #[arg(long, env = "WARREN_AMQPS_LISTEN")]
    amqps_listen: Option<String>,
    /// MQTTS (TLS) listen address [default: [::]:8883], or `off`; needs [tls] files.
    #[arg(long, env = "WARREN_MQTTS_LISTEN")]
    mqtts_listen: Option<String>,
    /// STOMP-over-TLS listen address [default: [::]:61614], or `off`; needs [tls] files.
    #[arg(long, env = "WARREN_STOMPS_LISTEN")]
    stomps_listen: Option<String>,
    /// Definitions file (RabbitMQ's JSON export) to import at start [config:
    /// `[definitions] file`].
    #[arg(long, env = "WARREN_DEFINITIONS")]
    definitions: Option<String>,
    /// Management API over TLS [default: [::]:15671], or `off`; needs [tls] files.
    #[arg(long, env = "WARREN_HTTPS_LISTEN")]
    https_listen: Option<String>,
    /// Web-STOMP over TLS (path /ws) [default: [::]:15673], or `off`; needs [tls] files.
    #[arg(long, env = "WARREN_WEB_STOMP_TLS_LISTEN")]
    web_stomp_tls_listen: Option<String>,
    /// Web-MQTT over TLS (path /ws) [default: [::]:15676], or `off`; needs [tls] files.
    #[arg(long, env = "WARREN_WEB_MQTT_TLS_LISTEN")]
    web_mqtt_tls_listen: Option<String>,
    /// Log format: `human` or `json`.
    #[arg(long, env = "WARREN_LOG_FORMAT")]
    log_format: Option<String>,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or `warren_amqp=debug,info`.
    #[arg(long, env = "WARREN_LOG")]
    log_level: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let l = &mut config.listeners;
    for (slot, arg) in [
        (&mut l.amqp, &args.amqp_listen),
        (&mut l.mqtt, &args.mqtt_listen),
        (&mut l.stomp, &args.stomp_listen),
        (&mut l.http, &args.http_listen),
        (&mut l.prometheus, &args.prometheus_listen),
        (&mut l.web_stomp, &args.web_stomp_listen),
        (&mut l.web_mqtt, &args.web_mqtt_listen),
        (&mut l.amqps, &args.amqps_listen),
        (&mut l.mqtts, &args.mqtts_listen),
        (&mut l.stomps, &args.stomps_listen),
        (&mut l.https, &args.https_listen),
        (&mut l.web_stomp_tls, &args.web_stomp_tls_listen),
        (&mut l.web_mqtt_tls, &args.web_mqtt_tls_listen),
    ] {
        if let Some(v) = arg {
            *slot = v.clone();
        }
    }
    if let Some(d) = &args.data_dir {
        config.storage.data_dir = d.clone();
    }
    if let Some(f) = &args.definitions {
        config.definitions.file = f.clone();
    }
    if let Some(f) = &args.log_format {
        config.log.format = f.clone();
    }
    if let Some(l) = &args.log_level {
        config.log.level = l.clone();
    }
    init_logging(&config.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let server = warren::Server::start(&config).await?;
        tracing::info!(data_dir = %config.storage.data_dir.display(), "warren started");
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(())
    })
}

fn init_logging(log: &warren::config::Log) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .with_context(|| format!("bad log filter {:?}", log.level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log.format.as_str() {
        "json" => builder.json().init(),
        "human" => builder.init(),
        other => anyhow::bail!("unknown log format {other:?} (human or json)"),
    }
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
