//! forkvm's HTTP API (axum on tokio).
//!
//! Sandboxes run in jailed worker processes (`forkvm_worker`), never here: a handler
//! calls a worker from one of tokio's blocking threads (`spawn_blocking`), a bounded number
//! at a time, so the async runtime never waits on a worker. Authentication and the
//! per-key rate limit run as middleware before any handler; every error is a JSON body with
//! a stable kind (see `error`).

pub mod api;
pub mod auth;
pub mod builds;
pub mod connections;
pub mod error;
pub mod fairness;
pub mod metrics;
pub mod openapi;
pub mod pausing;
pub mod result_json;
pub mod results;
pub mod sessions;
pub mod slots;
pub mod templates;
pub mod validate;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use forkvm_protocol::exec::ExecLimits;
use templates::Templates;

use crate::auth::KeyStore;
use crate::connections::{ConnectionLimits, ConnectionMetrics};
use crate::fairness::{Fairness, FairnessConfig};
use crate::metrics::Metrics;
use crate::results::ResultBudget;
use crate::sessions::SessionStore;
use crate::slots::Slots;

/// Every route the server serves, as (method, path). The OpenAPI document must describe
/// exactly these (a test checks).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/exec"),
    ("post", "/v1/exec/batch"),
    ("get", "/v1/health"),
    ("get", "/v1/metrics"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/templates"),
    ("post", "/v1/templates"),
    ("get", "/v1/templates/builds/{id}"),
    ("post", "/v1/sandboxes"),
    ("get", "/v1/sandboxes"),
    ("get", "/v1/sandboxes/{id}"),
    ("delete", "/v1/sandboxes/{id}"),
    ("post", "/v1/sandboxes/{id}/exec"),
    ("post", "/v1/sandboxes/{id}/commands"),
    ("post", "/v1/sandboxes/{id}/fork"),
    ("post", "/v1/sandboxes/{id}/pause"),
    ("post", "/v1/sandboxes/{id}/resume"),
    ("put", "/v1/sandboxes/{id}/files/{path}"),
    ("get", "/v1/sandboxes/{id}/files/{path}"),
    ("post", "/mcp"),
];

/// How the server is configured.
#[derive(Clone)]
pub struct ServerConfig {
    /// `None`: authentication is off (only when explicitly asked for).
    pub keys: Option<KeyStore>,
    pub fairness: FairnessConfig,
    /// Largest request body (JSON or a file upload).
    pub max_body_bytes: usize,
    /// Largest file a session download may return.
    pub max_file_bytes: u64,
    /// Executions running at once; more wait for a slot (see `slots`).
    pub exec_slots: usize,
    /// Executions one key may run at once (`None`: half the slots, so one key alone
    /// never holds them all).
    pub exec_slots_per_key: Option<usize>,
    /// The largest limits a request may ask for (the workers enforce the same).
    pub maxima: ExecLimits,
    /// Host memory one key's sessions may hold before its sessions may not grow (new
    /// sessions, forks, requests and uploads answer 429); `None`: no limit.
    pub key_memory_bytes: Option<u64>,
    /// Executions one batch may hold.
    pub max_batch: usize,
    /// Wall-clock limit of an execution that does not ask for one.
    pub default_timeout: Duration,
    /// Idle TTL of a session that does not ask for one, and the largest allowed.
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    /// Output one response may carry, all its streams and batch members together.
    pub max_response_bytes: u64,
    /// Output the server holds for all responses in flight (see `results`).
    pub results_budget_bytes: u64,
    /// Request bodies the server holds at once. Separate from the results budget: a
    /// request holds its body while it waits for its result's share, and one budget for
    /// both would let bodies alone exhaust it, every holder waiting for the rest.
    pub bodies_budget_bytes: u64,
    /// Connection caps and the timeouts on a request's bytes.
    pub connections: ConnectionLimits,
    /// Where paused sessions are stored; `None`: sessions cannot be paused, and are lost
    /// when the server stops.
    pub paused: Option<PauseConfig>,
}

/// Pausing sessions: where they are stored and when idle ones are paused.
#[derive(Clone)]
pub struct PauseConfig {
    pub store: Arc<forkvm_template::paused::PausedStore>,
    /// The CPU features this host's KVM offers (recorded with each pause, checked at
    /// resume).
    pub cpu: forkvm_template::cpu::CpuFeatures,
    /// Sessions idle this long are paused (`None`: only when asked).
    pub idle_after: Option<Duration>,
    /// Bytes one key's paused sessions may hold on disk (`None`: no limit).
    pub key_storage_bytes: Option<u64>,
    /// Running sessions used since their last checkpoint are checkpointed this often, so a
    /// crash loses at most this much of their work (`None`: off; a crash loses them).
    pub checkpoint_every: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            keys: None,
            fairness: FairnessConfig::default(),
            max_body_bytes: 16 << 20,
            max_file_bytes: 64 << 20,
            exec_slots: 2 * std::thread::available_parallelism().map_or(2, |n| n.get()),
            exec_slots_per_key: None,
            maxima: ExecLimits::maxima(),
            key_memory_bytes: Some(4 << 30),
            max_batch: 64,
            default_timeout: Duration::from_secs(30),
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(24 * 3600),
            max_response_bytes: 128 << 20,
            results_budget_bytes: 1 << 30,
            bodies_budget_bytes: 512 << 20,
            connections: ConnectionLimits::default(),
            paused: None,
        }
    }
}

impl ServerConfig {
    /// Executions one key may run at once.
    pub fn slots_per_key(&self) -> usize {
        self.exec_slots_per_key
            .unwrap_or(self.exec_slots / 2)
            .clamp(1, self.exec_slots.max(1))
    }
}

/// What every handler shares.
pub struct AppState {
    pub templates: Templates,
    /// Templates built through the API.
    pub builds: builds::Builds,
    pub config: ServerConfig,
    pub sessions: SessionStore,
    pub fairness: Fairness,
    pub metrics: Metrics,
    pub slots: Arc<Slots>,
    pub results: ResultBudget,
    /// Request bodies being held (`bodies_budget_bytes`).
    pub bodies: ResultBudget,
    /// The router itself, for calls the server makes to its own routes (`/mcp`).
    pub router: std::sync::OnceLock<Router>,
}

impl AppState {
    pub fn new(templates: Templates, config: ServerConfig) -> Arc<AppState> {
        Arc::new(AppState {
            fairness: Fairness::new(config.fairness),
            slots: Slots::new(config.exec_slots, config.slots_per_key()),
            results: ResultBudget::new(config.results_budget_bytes, config.max_response_bytes),
            bodies: ResultBudget::new(config.bodies_budget_bytes, config.bodies_budget_bytes),
            router: std::sync::OnceLock::new(),
            templates,
            builds: builds::Builds::default(),
            sessions: SessionStore::default(),
            metrics: Metrics::new(),
            config,
        })
    }
}

/// The API's router.
pub fn router(state: Arc<AppState>) -> Router {
    let public = Router::new()
        .route("/v1/health", get(api::system::health))
        .route("/v1/metrics", get(api::system::metrics))
        .route("/v1/openapi.json", get(api::system::openapi));
    let protected = Router::new()
        .route("/v1/exec", post(api::exec::exec))
        .route("/v1/exec/batch", post(api::exec::batch))
        .route(
            "/v1/templates",
            get(api::system::templates).post(api::builds::build),
        )
        .route("/v1/templates/builds/{id}", get(api::builds::show))
        .route(
            "/v1/sandboxes",
            post(api::sessions::create).get(api::sessions::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(api::sessions::show).delete(api::sessions::delete),
        )
        .route("/v1/sandboxes/{id}/exec", post(api::sessions::exec))
        .route("/v1/sandboxes/{id}/commands", post(api::sessions::commands))
        .route("/mcp", post(api::mcp::mcp))
        .route("/v1/sandboxes/{id}/fork", post(api::sessions::fork))
        .route("/v1/sandboxes/{id}/pause", post(api::sessions::pause))
        .route("/v1/sandboxes/{id}/resume", post(api::sessions::resume))
        .route(
            "/v1/sandboxes/{id}/files/{*path}",
            get(api::sessions::get_file).put(api::sessions::put_file),
        )
        // Layers run outside in: authentication first, then the body is read.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::middleware::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::middleware::authenticate,
        ));
    let app = public
        .merge(protected)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn(api::middleware::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::middleware::observe,
        ))
        .with_state(state.clone());
    // The state then holds the router that holds the state: both live as long as the
    // server does.
    let _ = state.router.set(app.clone());
    app
}

/// Serves on `listener` until `shutdown` resolves, then finishes in-flight requests.
/// Expired sessions are reaped every second.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let reaper = tokio::spawn(api::sessions::reap_expired(state.clone()));
    let metrics = ConnectionMetrics {
        open: state.metrics.connections_open.clone(),
        refused: state.metrics.connections_refused.clone(),
    };
    let result = connections::serve_connections(
        listener,
        router(state.clone()),
        state.config.connections,
        metrics,
        shutdown,
    )
    .await;
    reaper.abort();
    api::sessions::drop_all(&state).await;
    result
}
