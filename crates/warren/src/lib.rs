//! Wiring of the Warren binary: configuration, the store, the core and the listeners.
//! Tests start a whole broker in-process through [`Server::start`].

pub mod cert;
pub mod config;
pub mod resources;
pub mod tls;
pub mod web;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_core::{Broker, BrokerConfig};
use warren_store::{Store, StoreOptions};

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        dir: String,
        source: warren_store::StoreError,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("recovery failed: {0}")]
    Recovery(#[from] warren_core::CoreError),
    #[error("cannot load definitions from {path}: {reason}")]
    Definitions { path: String, reason: String },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

/// Binds a listener unless its address is `off`.
async fn listen(what: &'static str, addr: &str) -> Result<Option<TcpListener>, ServerError> {
    if is_off(addr) {
        return Ok(None);
    }
    let listener = bind(addr).await.map_err(|source| ServerError::Listen {
        what,
        addr: addr.to_owned(),
        source,
    })?;
    tracing::info!(addr = ?listener.local_addr().ok(), "{what} listener started");
    Ok(Some(listener))
}

/// Binds `addr`. The unspecified IPv6 address (the defaults' `[::]`) takes IPv4 clients
/// too, on one dual-stack socket whatever `net.ipv6.bindv6only` says, as RabbitMQ's
/// listeners do (a client resolving `localhost` to `::1` finds the broker); on a host
/// without IPv6 it falls back to `0.0.0.0`.
async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    match addr.parse::<SocketAddr>() {
        Ok(SocketAddr::V6(a)) if a.ip().is_unspecified() => match dual_stack(a) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
            {
                TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, a.port())).await
            }
            bound => bound,
        },
        _ => TcpListener::bind(addr).await,
    }
}

fn dual_stack(a: std::net::SocketAddrV6) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    s.set_only_v6(false)?;
    // As tokio's own bind: a restart does not wait for TIME_WAIT sockets.
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::V6(a).into())?;
    s.listen(warren_core::shutdown::LISTEN_BACKLOG as i32)?;
    TcpListener::from_std(s.into())
}

/// Binds a TLS listener unless TLS is not configured or its address is `off`.
async fn listen_tls(
    what: &'static str,
    addr: &str,
    acceptor: Option<&tokio_rustls::TlsAcceptor>,
) -> Result<Option<tls::TlsListener>, ServerError> {
    let Some(acceptor) = acceptor else {
        return Ok(None);
    };
    let Some(listener) = listen(what, addr).await? else {
        return Ok(None);
    };
    let listener = tls::TlsListener::new(listener, acceptor.clone()).map_err(|source| {
        ServerError::Listen {
            what,
            addr: addr.to_owned(),
            source,
        }
    })?;
    Ok(Some(listener))
}

/// Addresses of the TLS listeners.
#[derive(Debug, Clone, Default)]
pub struct TlsAddrs {
    pub amqps: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub stomps: Option<SocketAddr>,
    /// Management API over TLS.
    pub https: Option<SocketAddr>,
    /// Web-STOMP over TLS (path `/ws`).
    pub web_stomp: Option<SocketAddr>,
    /// Web-MQTT over TLS (path `/ws`).
    pub web_mqtt: Option<SocketAddr>,
}

/// A running broker.
pub struct Server {
    /// The bound AMQP address (useful with port 0), if the listener is on.
    pub amqp_addr: Option<SocketAddr>,
    /// The bound MQTT address, if the listener is on.
    pub mqtt_addr: Option<SocketAddr>,
    /// The bound STOMP address, if the listener is on.
    pub stomp_addr: Option<SocketAddr>,
    /// The bound Web-STOMP address (path `/ws`), if the listener is on.
    pub web_stomp_addr: Option<SocketAddr>,
    /// The bound Web-MQTT address (path `/ws`), if the listener is on.
    pub web_mqtt_addr: Option<SocketAddr>,
    /// The bound TLS listeners, if `[tls]` is configured.
    pub tls_addrs: TlsAddrs,
    /// The bound management HTTP address, if the listener is on.
    pub http_addr: Option<SocketAddr>,
    /// The bound Prometheus metrics address, if the listener is on.
    pub prometheus_addr: Option<SocketAddr>,
    pub broker: Arc<Broker>,
    /// Alarm thresholds, adjustable while running.
    pub limits: Arc<resources::ResourceLimits>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn stomp_config(config: &Config) -> warren_stomp::StompConfig {
    warren_stomp::StompConfig {
        default_user: config.auth.default_user.clone(),
        default_pass: config.auth.default_pass.clone(),
        limits: warren_stomp::codec::Limits {
            max_frame: config.limits.max_message_size as usize + 64 * 1024,
            max_headers: config.stomp.max_headers,
            max_header_len: config.stomp.max_header_length,
        },
        incomplete_frame_timeout: std::time::Duration::from_millis(
            config.stomp.incomplete_frame_timeout_ms,
        ),
        ..Default::default()
    }
}

/// Imports `[definitions] file` (RabbitMQ's `load_definitions`) before any listener
/// starts, so clients never see a half-loaded broker; any failure stops start-up.
async fn load_definitions(broker: &Broker, file: &str) -> Result<(), ServerError> {
    if file.trim().is_empty() {
        return Ok(());
    }
    let fail = |reason: String| ServerError::Definitions {
        path: file.to_owned(),
        reason,
    };
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let defs: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("not JSON: {e}")))?;
    if !defs.is_object() {
        return Err(fail("not a JSON object".into()));
    }
    warren_core::definitions::import(broker, &defs, None)
        .await
        .map_err(|e| fail(e.to_string()))?;
    tracing::info!(file, "definitions loaded");
    Ok(())
}

/// Whether a listener setting means "disabled".
pub fn is_off(addr: &str) -> bool {
    addr.trim().eq_ignore_ascii_case("off") || addr.trim().is_empty()
}

impl Server {
    /// Opens the store, recovers, and starts the listeners of `config`.
    pub async fn start(config: &Config) -> Result<Server, ServerError> {
        let dir = config.storage.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| ServerError::Store {
            dir: dir.display().to_string(),
            source: warren_store::StoreError::Corrupt(e.to_string()),
        })?;
        let store = Store::open(
            &dir,
            StoreOptions {
                sync: config.storage.sync_commits,
            },
        )
        .map_err(|source| ServerError::Store {
            dir: dir.display().to_string(),
            source,
        })?;
        let broker = Broker::open(
            store,
            BrokerConfig {
                default_user: config.auth.default_user.clone(),
                default_pass: config.auth.default_pass.clone(),
                loopback_users: config.auth.loopback_users.clone(),
                ..BrokerConfig::default()
            },
        )?;
        load_definitions(&broker, &config.definitions.file).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let limits = Arc::new(resources::ResourceLimits::new(
            config.limits.memory_high_watermark,
            config.limits.memory_high_watermark_bytes,
            config.limits.disk_free_limit,
        ));
        tasks.push(tokio::spawn(resources::monitor(
            broker.clone(),
            dir.clone(),
            limits.clone(),
            std::time::Duration::from_secs(1),
            shutdown_rx.clone(),
        )));
        let mut amqp_addr = None;
        let l = &config.listeners;
        let amqp = warren_amqp::AmqpFrontend::new(
            broker.clone(),
            warren_amqp::AmqpConfig {
                frame_max: config.amqp.frame_max,
                channel_max: config.amqp.channel_max,
                heartbeat: config.amqp.heartbeat,
                max_connections: config.amqp.max_connections,
                max_message_size: config.limits.max_message_size,
                consumer_timeout: (config.amqp.consumer_timeout_ms > 0)
                    .then(|| std::time::Duration::from_millis(config.amqp.consumer_timeout_ms)),
                ..Default::default()
            },
        );
        if let Some(listener) = listen("AMQP 0-9-1", &l.amqp).await? {
            amqp_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(
                amqp.clone().serve(listener, shutdown_rx.clone()),
            ));
        }
        let mqtt_cfg = warren_mqtt::MqttConfig {
            allow_anonymous: config.mqtt.allow_anonymous,
            default_user: config.mqtt.default_user.clone(),
            default_pass: config.mqtt.default_pass.clone(),
            default_vhost: config.mqtt.vhost.clone(),
            // Below 4 KiB a CONNECT with a will may not fit.
            max_packet_size: config.mqtt.max_packet_size.max(4096),
            receive_maximum: config.mqtt.receive_maximum.max(1),
            max_inflight: config.mqtt.max_inflight.max(1),
            outbound_topic_aliases: config.mqtt.outbound_topic_aliases,
            ..Default::default()
        };
        let mqtt = warren_mqtt::MqttFrontend::new(broker.clone(), mqtt_cfg);
        let mut mqtt_addr = None;
        if let Some(listener) = listen("MQTT 3.1.1/5.0", &l.mqtt).await? {
            mqtt_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(
                mqtt.clone().serve(listener, shutdown_rx.clone()),
            ));
        }
        let fe = mqtt.clone();
        let mqtt_ws: websocket::SessionFn = Arc::new(move |stream, peer, local, shutdown| {
            Box::pin(fe.clone().handle_stream(stream, peer, local, shutdown))
        });
        // MQTT-6.0.0-3: the subprotocol is "mqtt" (mqttv3.1 for old 3.1 clients).
        let serve_mqtt_ws = |what, listener| {
            websocket::serve(
                what,
                listener,
                &["mqtt", "mqttv3.1"],
                websocket::Framing::Binary,
                mqtt_ws.clone(),
                shutdown_rx.clone(),
            )
        };
        let mut web_mqtt_addr = None;
        if let Some(listener) = listen("Web-MQTT (/ws)", &l.web_mqtt).await? {
            web_mqtt_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(serve_mqtt_ws(
                "Web-MQTT",
                web::WebListener::Plain(listener),
            )));
        }
        let stomp = warren_stomp::StompFrontend::new(broker.clone(), stomp_config(config));
        let mut stomp_addr = None;
        if let Some(listener) = listen("STOMP 1.0-1.2", &l.stomp).await? {
            stomp_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(
                stomp.clone().serve(listener, shutdown_rx.clone()),
            ));
        }
        let fe = stomp.clone();
        let stomp_ws: websocket::SessionFn = Arc::new(move |stream, peer, local, shutdown| {
            Box::pin(fe.clone().handle_stream(stream, peer, local, shutdown))
        });
        let serve_stomp_ws = |what, listener| {
            websocket::serve(
                what,
                listener,
                &["v12.stomp", "v11.stomp", "v10.stomp", "stomp"],
                websocket::Framing::TextPreferred,
                stomp_ws.clone(),
                shutdown_rx.clone(),
            )
        };
        let mut web_stomp_addr = None;
        if let Some(listener) = listen("Web-STOMP (/ws)", &l.web_stomp).await? {
            web_stomp_addr = listener.local_addr().ok();
            tasks.push(tokio::spawn(serve_stomp_ws(
                "Web-STOMP",
                web::WebListener::Plain(listener),
            )));
        }
        let mut tls_addrs = TlsAddrs::default();
        let acceptor = if config.tls.enabled() {
            let ca = (!config.tls.ca_file.trim().is_empty())
                .then(|| std::path::PathBuf::from(&config.tls.ca_file));
            Some(tls::acceptor(
                std::path::Path::new(&config.tls.cert_file),
                std::path::Path::new(&config.tls.key_file),
                ca.as_deref(),
            )?)
        } else {
            None
        };
        let acceptor = acceptor.as_ref();
        // ssl_cert_login: the verified client certificate's CN is offered to the
        // front-ends as the user (only with ca_file are certificates asked for at all).
        let cert_login = config.tls.ssl_cert_login;
        if cert_login && acceptor.is_some() && config.tls.ca_file.trim().is_empty() {
            tracing::warn!(
                "[tls] ssl_cert_login needs ca_file: no client certificates are requested"
            );
        }
        let auth = move |s: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>| {
            warren_core::ConnectionAuth {
                cert_user: cert_login.then(|| cert::peer_common_name(s)).flatten(),
                tls: Some(Box::new(tls::details(s))),
            }
        };
        let (a, m, st) = (amqp.clone(), mqtt.clone(), stomp.clone());
        let sessions: [(
            &'static str,
            &String,
            tls::TlsSessionFn,
            &mut Option<SocketAddr>,
        ); 3] = [
            (
                "AMQPS",
                &l.amqps,
                Arc::new(move |s, peer, local, sd| {
                    let auth = auth(&s);
                    Box::pin(a.clone().handle_stream_with(s, peer, local, sd, auth))
                }),
                &mut tls_addrs.amqps,
            ),
            (
                "MQTTS",
                &l.mqtts,
                Arc::new(move |s, peer, local, sd| {
                    let auth = auth(&s);
                    Box::pin(m.clone().handle_stream_with(s, peer, local, sd, auth))
                }),
                &mut tls_addrs.mqtts,
            ),
            (
                "STOMP over TLS",
                &l.stomps,
                Arc::new(move |s, peer, local, sd| {
                    let auth = auth(&s);
                    Box::pin(st.clone().handle_stream_with(s, peer, local, sd, auth))
                }),
                &mut tls_addrs.stomps,
            ),
        ];
        for (what, addr, session, slot) in sessions {
            if let Some(listener) = listen_tls(what, addr, acceptor).await? {
                *slot = Some(listener.local_addr());
                tasks.push(tokio::spawn(tls::serve(
                    listener,
                    session,
                    shutdown_rx.clone(),
                )));
            }
        }
        if let Some(listener) =
            listen_tls("Web-MQTT over TLS (/ws)", &l.web_mqtt_tls, acceptor).await?
        {
            tls_addrs.web_mqtt = Some(listener.local_addr());
            tasks.push(tokio::spawn(serve_mqtt_ws(
                "Web-MQTT over TLS",
                web::WebListener::Tls(listener),
            )));
        }
        if let Some(listener) =
            listen_tls("Web-STOMP over TLS (/ws)", &l.web_stomp_tls, acceptor).await?
        {
            tls_addrs.web_stomp = Some(listener.local_addr());
            tasks.push(tokio::spawn(serve_stomp_ws(
                "Web-STOMP over TLS",
                web::WebListener::Tls(listener),
            )));
        }
        // The management API: one application (one stats sampler) on HTTP and HTTPS.
        let http = listen("management HTTP", &l.http)
            .await?
            .map(web::WebListener::Plain);
        let https = listen_tls("management HTTPS", &l.https, acceptor)
            .await?
            .map(web::WebListener::Tls);
        let prometheus = match listen("Prometheus metrics", &l.prometheus).await {
            Ok(p) => p.map(web::WebListener::Plain),
            Err(e) => {
                tracing::error!(error = %e, "running without the Prometheus metrics port");
                None
            }
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr());
        let prometheus_addr = prometheus.as_ref().and_then(|l| l.local_addr());
        tls_addrs.https = https.as_ref().and_then(|l| l.local_addr());
        if http.is_some() || https.is_some() || prometheus.is_some() {
            let mut listeners = Vec::new();
            // RabbitMQ's protocol names in /api/overview's listeners.
            for (protocol, addr) in [
                ("amqp", amqp_addr),
                ("mqtt", mqtt_addr),
                ("stomp", stomp_addr),
                ("http", http_addr),
                ("http/prometheus", prometheus_addr),
                ("http/web-stomp", web_stomp_addr),
                ("http/web-mqtt", web_mqtt_addr),
                ("amqp/ssl", tls_addrs.amqps),
                ("mqtt/ssl", tls_addrs.mqtts),
                ("stomp/ssl", tls_addrs.stomps),
                ("https", tls_addrs.https),
                ("https/web-stomp", tls_addrs.web_stomp),
                ("https/web-mqtt", tls_addrs.web_mqtt),
            ] {
                if let Some(addr) = addr {
                    listeners.push(warren_http::ListenerInfo {
                        protocol: protocol.into(),
                        addr,
                    });
                }
            }
            let probe_limits = limits.clone();
            let probe_dir = dir.clone();
            let http_cfg = warren_http::HttpConfig {
                listeners,
                resources: Some(Arc::new(move || warren_http::NodeResources {
                    mem_used: resources::rss_bytes().unwrap_or(0),
                    mem_limit: probe_limits
                        .memory_bytes
                        .load(std::sync::atomic::Ordering::Relaxed),
                    disk_free: resources::disk_free(&probe_dir).unwrap_or(0),
                    disk_free_limit: probe_limits
                        .disk_free_bytes
                        .load(std::sync::atomic::Ordering::Relaxed),
                    fd_used: resources::fd_used().unwrap_or(0),
                    fd_total: resources::fd_total().unwrap_or(0),
                    threads: resources::threads().unwrap_or(0),
                    threads_max: resources::threads_max().unwrap_or(0),
                    run_queue: resources::run_queue().unwrap_or(0),
                })),
                ..Default::default()
            };
            let apps = warren_http::start(broker.clone(), http_cfg, shutdown_rx.clone());
            tasks.push(apps.sampler);
            for (what, listener, app) in [
                ("management HTTP", http, &apps.app),
                ("management HTTPS", https, &apps.app),
                ("Prometheus metrics", prometheus, &apps.prometheus),
            ] {
                if let Some(listener) = listener {
                    tasks.push(tokio::spawn(web::serve(
                        what,
                        listener,
                        app.clone(),
                        shutdown_rx.clone(),
                    )));
                }
            }
        }
        Ok(Server {
            amqp_addr,
            mqtt_addr,
            stomp_addr,
            web_stomp_addr,
            web_mqtt_addr,
            http_addr,
            prometheus_addr,
            tls_addrs,
            broker,
            limits,
            shutdown,
            tasks,
        })
    }

    /// Graceful stop: listeners stop accepting, connections get the protocol's close,
    /// then the store is flushed.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let broker = self.broker.clone();
        let _ = tokio::task::spawn_blocking(move || broker.flush()).await;
        tracing::info!("shutdown complete");
    }
}

#[cfg(test)]
mod tests {
    /// The default `[::]` takes IPv4 and (where the host has IPv6) IPv6 clients.
    #[tokio::test]
    async fn the_unspecified_ipv6_address_takes_both_families() {
        let l = super::bind("[::]:0").await.expect("bound");
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            for _ in 0..2 {
                if l.accept().await.is_err() {
                    return;
                }
            }
        });
        tokio::net::TcpStream::connect(("127.0.0.1", addr.port()))
            .await
            .expect("IPv4 client");
        if addr.is_ipv6() {
            tokio::net::TcpStream::connect(("::1", addr.port()))
                .await
                .expect("IPv6 client");
        }
        accept.abort();
    }
}
