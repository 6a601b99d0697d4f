//! `forkvm serve`: build the template if missing, verify it, start the jailed workers that
//! run its sandboxes, and serve the HTTP API; `forkvm keys add`: create an API key.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use forkvm_protocol::exec::ExecLimits;
use forkvm_server::auth::{KeyStore, add_key};
use forkvm_server::connections::ConnectionLimits;
use forkvm_server::fairness::FairnessConfig;
use forkvm_server::templates::{Served, Templates};
use forkvm_server::wire::TemplateInfo;
use forkvm_server::{AppState, PauseConfig, ServerConfig};
use forkvm_template::cpu::CpuFeatures;
use forkvm_template::paused::PausedStore;
use forkvm_vmm::PoolConfig;
use forkvm_worker::{Workers, cgroup};

/// What `forkvm serve` was asked.
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub keys: Option<PathBuf>,
    pub no_auth: bool,
    /// Templates served, the first the default.
    pub templates: Vec<String>,
    pub pool: PoolConfig,
    pub workers: Option<usize>,
    pub worker_memory_mb: Option<u64>,
    pub worker_cpus: Option<f64>,
    pub key_memory_mb: u64,
    pub exec_slots: Option<usize>,
    pub exec_slots_per_key: Option<usize>,
    pub fairness: FairnessConfig,
    pub max_body_mb: usize,
    pub default_ttl: Duration,
    pub pause_idle_after: Option<Duration>,
    pub key_storage_mb: u64,
    pub checkpoint_every: Option<Duration>,
    pub connections: ConnectionLimits,
    pub max_response_bytes: u64,
    pub results_memory_bytes: u64,
    pub bodies_memory_bytes: u64,
}

/// The keys file used when none is given.
pub fn default_keys_file() -> PathBuf {
    forkvm_template::rootfs::default_cache_dir().join("api_keys.json")
}

/// The key store to use, creating a first key in the default file on first start.
fn load_keys(options: &ServeOptions) -> Result<Option<KeyStore>> {
    if options.no_auth {
        tracing::warn!(
            "AUTHENTICATION IS OFF (--no-auth): anyone who can reach {} can run code",
            options.listen
        );
        eprintln!(
            "forkvm: WARNING: authentication is off; anyone who can reach {} can run code",
            options.listen
        );
        return Ok(None);
    }
    let path = match &options.keys {
        Some(path) => path.clone(),
        None => {
            let path = default_keys_file();
            if !path.exists() {
                std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/")))?;
                let key = add_key(&path, "default", false)?;
                eprintln!(
                    "forkvm: created API key \"default\" (stored hashed in {}); it is shown only now:\n\n    {key}\n",
                    path.display()
                );
            }
            path
        }
    };
    let keys = KeyStore::load(&path)
        .with_context(|| format!("loading API keys from {}", path.display()))?;
    eprintln!(
        "forkvm: {} API key(s) loaded from {}",
        keys.len(),
        path.display()
    );
    Ok(Some(keys))
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
    eprintln!("forkvm: shutting down, finishing in-flight requests");
}

pub fn serve(options: ServeOptions) -> Result<i32> {
    let keys = load_keys(&options)?;
    let mut names: Vec<String> = Vec::new();
    for name in &options.templates {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    if names.is_empty() {
        anyhow::bail!("serve at least one template (--template)");
    }
    let plan = WorkerPlan {
        workers: options.workers,
        worker_memory_mb: options.worker_memory_mb,
        worker_cpus: options.worker_cpus,
        pool: options.pool,
        templates: names.len(),
    };
    let mut served = Vec::new();
    for name in &names {
        served.push(serve_template(name, &plan)?);
    }
    let mut config = ServerConfig {
        keys,
        fairness: options.fairness,
        max_body_bytes: options.max_body_mb << 20,
        default_ttl: options.default_ttl,
        key_memory_bytes: (options.key_memory_mb > 0).then_some(options.key_memory_mb << 20),
        max_response_bytes: options.max_response_bytes,
        results_budget_bytes: options.results_memory_bytes,
        bodies_budget_bytes: options.bodies_memory_bytes,
        ..ServerConfig::default()
    };
    if let Some(slots) = options.exec_slots {
        config.exec_slots = slots;
    }
    config.exec_slots_per_key = options.exec_slots_per_key;
    config.connections = fit_connections(options.connections);
    config.paused = pause_config(&options)?;
    let state = AppState::new(Templates::new(served), config);
    forkvm_server::pausing::recover(&state);
    state
        .builds
        .enable(Arc::new(crate::builder::ChildBuilder::new(plan)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("forkvm-api")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("binding {}", options.listen))?;
        let address = listener.local_addr()?;
        println!("forkvm: listening on http://{address}");
        std::io::stdout().flush()?;
        forkvm_server::serve(listener, state, shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(0)
}

/// Where paused sessions go (the cache's `sessions/`) and when idle ones are paused.
fn pause_config(options: &ServeOptions) -> Result<Option<PauseConfig>> {
    let cache = forkvm_template::rootfs::default_cache_dir();
    let Some(store) =
        PausedStore::open_exclusive(&cache).context("opening the paused-session store")?
    else {
        eprintln!(
            "forkvm: WARNING: another forkvm serve holds {}/sessions: this server cannot pause sessions, and its sessions end with it",
            cache.display()
        );
        return Ok(None);
    };
    let vmm = forkvm_vmm::Vmm::new().context("reading the host's CPU features")?;
    Ok(Some(PauseConfig {
        store: Arc::new(store),
        cpu: CpuFeatures::of(vmm.cpu()),
        idle_after: options.pause_idle_after,
        key_storage_bytes: (options.key_storage_mb > 0).then_some(options.key_storage_mb << 20),
        checkpoint_every: options.checkpoint_every,
    }))
}

/// Descriptors kept for everything but client connections: workers' channels, files,
/// the listener.
const RESERVED_DESCRIPTORS: u64 = 1024;

/// Raises the descriptor limit so `limits.max_open` connections fit; if the system does
/// not allow that many, fewer connections are allowed (and said so).
fn fit_connections(mut limits: ConnectionLimits) -> ConnectionLimits {
    let wanted = limits.max_open as u64 + RESERVED_DESCRIPTORS;
    let have = crate::limits::raise_descriptor_limit(wanted);
    if have < wanted {
        let fit = have.saturating_sub(RESERVED_DESCRIPTORS).max(16) as usize;
        eprintln!(
            "forkvm: the descriptor limit is {have}: serving at most {fit} connections, not {}",
            limits.max_open
        );
        limits.max_open = fit;
    }
    limits
}

/// Host memory in bytes (`MemTotal`).
fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kib| kib << 10)
}

/// How workers are started for a served template.
#[derive(Clone)]
pub struct WorkerPlan {
    pub workers: Option<usize>,
    pub worker_memory_mb: Option<u64>,
    pub worker_cpus: Option<f64>,
    pub pool: PoolConfig,
    /// Templates served at start: each gets its share of host memory.
    pub templates: usize,
}

impl WorkerPlan {
    /// Starts the workers that run `template`'s sandboxes: one per core unless told, each
    /// in a cgroup with its share of three quarters of host memory.
    fn start(&self, template: &str) -> Result<Arc<Workers>> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let count = self.workers.unwrap_or(cores).max(1);
        let memory_bytes = match self.worker_memory_mb {
            Some(mb) => mb << 20,
            None => host_memory() / 4 * 3 / (count * self.templates.max(1)) as u64,
        };
        let limits = cgroup::Limits {
            memory_bytes,
            pids: 4096,
            cpus: self.worker_cpus,
        };
        let workers = crate::jailed::start(
            template,
            count,
            self.pool,
            ExecLimits::maxima(),
            Some(limits),
        )?;
        eprintln!(
            "forkvm: {count} jailed worker(s) serving template {template:?} (pids {:?})",
            workers.pids()
        );
        Ok(workers)
    }
}

/// Verifies template `name` (building it if it is a built-in one that is missing) and
/// starts its workers.
pub fn serve_template(name: &str, plan: &WorkerPlan) -> Result<Served> {
    crate::jailed::prepare(name)?;
    let meta = crate::template::store().show(name)?;
    let languages: Vec<String> = meta
        .runtime
        .languages()
        .iter()
        .map(|l| l.to_string())
        .collect();
    Ok(Served {
        name: name.to_string(),
        info: TemplateInfo {
            name: name.to_string(),
            runtime: meta.runtime.name().to_string(),
            languages: languages.clone(),
            memory_mb: meta.ram_bytes >> 20,
            packages: meta.packages.clone(),
            created_at: meta.created_unix,
            default: false,
        },
        languages,
        workers: plan.start(name)?,
        digest: meta.digest(),
    })
}

/// `forkvm keys add NAME`: prints the new key (once).
pub fn add(name: &str, file: Option<PathBuf>, operator: bool) -> Result<i32> {
    let path = file.unwrap_or_else(default_keys_file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let key = add_key(&path, name, operator)?;
    eprintln!(
        "forkvm: {}key {name:?} added to {} (only its hash is stored)",
        if operator { "operator " } else { "" },
        path.display()
    );
    println!("{key}");
    Ok(0)
}
