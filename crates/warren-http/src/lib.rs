//! Warren's management HTTP API, compatible with RabbitMQ's management plugin (the same
//! paths, JSON field names, status codes and basic auth), plus Prometheus metrics at
//! `/metrics` and a small dashboard at `/`.
//!
//! Everything here is a translation of the core's state into RabbitMQ's JSON; no state
//! lives in this crate except sampled message rates. docs/http-api.md lists what is
//! implemented and where Warren differs on purpose.

mod api;
mod auth;
mod convert;
mod definitions;
pub mod error;
mod feature_flags;
mod global_parameters;
mod history;
mod limits;
mod listing;
mod metrics;
mod parameters;
mod policies;
mod stats;
mod topic_permissions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::sync::watch;
use warren_core::Broker;

pub use error::ApiError;

pub use warren_core::RABBITMQ_COMPAT_VERSION;

/// A listener shown in `/api/overview` (RabbitMQ's `listeners`).
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// RabbitMQ's protocol names: `amqp`, `mqtt`, `stomp`, `http`, `http/web-stomp`, …
    pub protocol: String,
    pub addr: SocketAddr,
}

/// Resource readings for `/api/nodes` and the metrics (the binary owns the monitor).
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeResources {
    pub mem_used: u64,
    pub mem_limit: u64,
    pub disk_free: u64,
    pub disk_free_limit: u64,
    /// Open file descriptors and their limit.
    pub fd_used: u64,
    pub fd_total: u64,
    /// OS threads (shown as RabbitMQ's `proc_used`) and the system's limit on them.
    pub threads: u64,
    pub threads_max: u64,
    /// Runnable tasks on the machine (RabbitMQ's `run_queue`).
    pub run_queue: u64,
}

/// Reads the node's resources on demand.
pub type ResourceProbe = Arc<dyn Fn() -> NodeResources + Send + Sync>;

/// Settings of the HTTP listener.
#[derive(Clone)]
pub struct HttpConfig {
    pub listeners: Vec<ListenerInfo>,
    pub resources: Option<ResourceProbe>,
    /// How often message rates are sampled (RabbitMQ: 5 s).
    pub sample_period: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
            resources: None,
            sample_period: Duration::from_secs(5),
        }
    }
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub(crate) sampler: Arc<stats::Sampler>,
    pub(crate) cfg: Arc<HttpConfig>,
    pub(crate) started: Instant,
}

impl AppState {
    pub fn new(broker: Arc<Broker>, cfg: HttpConfig) -> Self {
        let sampler = Arc::new(stats::Sampler::default());
        sampler.sample(&broker);
        Self {
            broker,
            sampler,
            cfg: Arc::new(cfg),
            started: Instant::now(),
        }
    }

    pub(crate) fn resources(&self) -> NodeResources {
        self.cfg.resources.as_ref().map(|f| f()).unwrap_or_default()
    }
}

/// The whole HTTP application (API, metrics, dashboard).
pub fn router(state: AppState) -> Router {
    let app = api::routes()
        .merge(metrics::routes())
        .route("/", axum::routing::get(dashboard))
        .layer(axum::middleware::from_fn(listing::columns_on_objects))
        .with_state(state);
    // RabbitMQ answers `/api/queues/` as `/api/queues` (tools send both, e.g. a policy
    // DELETE with a trailing slash); the path is trimmed before routing.
    Router::new().fallback_service(tower::ServiceExt::map_request(app, trim_trailing_slash))
}

fn trim_trailing_slash(mut req: axum::extract::Request) -> axum::extract::Request {
    let path = req.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let new = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_owned(),
        };
        if let Ok(uri) = new.parse() {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// The embedded dashboard: one page that uses only the API.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

/// What [`start`] gives: the applications and the stats sampler that feeds both.
pub struct Started {
    /// The management API, metrics and dashboard (ports 15672 / 15671).
    pub app: Router,
    /// Metrics alone, as rabbitmq_prometheus serves them on its own port (15692).
    pub prometheus: Router,
    /// Ends at `shutdown`.
    pub sampler: tokio::task::JoinHandle<()>,
}

/// The applications and their running stats sampler, for callers that serve them on
/// listeners of their own (HTTP, HTTPS and the metrics port share one state). Handlers
/// need `ConnectInfo<SocketAddr>` (loopback-only users).
pub fn start(broker: Arc<Broker>, cfg: HttpConfig, shutdown: watch::Receiver<bool>) -> Started {
    let period = cfg.sample_period;
    let state = AppState::new(broker.clone(), cfg);
    let sampler = tokio::spawn(state.sampler.clone().run(broker, period, shutdown));
    Started {
        prometheus: metrics::routes().with_state(state.clone()),
        app: router(state),
        sampler,
    }
}
