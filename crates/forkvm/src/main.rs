//! The `forkvm` command: run programs in kernel-less KVM sandboxes.

mod bench;
mod builder;
mod exec;
mod jailed;
mod limits;
mod mcp;
mod run;
mod serve;
mod sessions;
mod template;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "forkvm",
    version,
    about = "Hardware-isolated sandboxes for untrusted code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// The key's sessions: id, state (running or paused), template, memory, stored bytes.
    List,
    /// Stores the session's state on disk and frees its VM.
    Pause { id: String },
    /// Brings a paused session back (any request to it would).
    Resume { id: String },
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks; each prints JSON on stdout and a table on stderr.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// An MCP server on stdio (JSON-RPC, protocol 2025-06-18) whose tools run code in a
    /// running `forkvm serve`: for agents' hosts (Claude, Cursor, …).
    Mcp {
        /// The server's URL.
        #[arg(long, env = "FORKVM_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The API key.
        #[arg(long, env = "FORKVM_API_KEY", hide_env_values = true)]
        key: Option<String>,
    },
    /// A running server's sessions: list them, pause one to disk, resume one.
    Sessions {
        /// The server's URL.
        #[arg(long, env = "FORKVM_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The API key.
        #[arg(long, env = "FORKVM_API_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(subcommand)]
        action: SessionsCommand,
    },
    /// A jailed worker process (started by `forkvm serve`, never by hand).
    #[command(hide = true)]
    Worker,
    /// Run code in a fresh fork of a template; its output passes through and its exit code
    /// becomes forkvm's.
    Exec {
        /// Template to fork.
        #[arg(long, default_value = "python")]
        template: String,
        /// Language of the code: python in Python templates, javascript (or node) and
        /// typescript in Node.js ones, bash and sh in both [default: the template's own].
        #[arg(long, default_value = "")]
        language: String,
        /// Wall-clock limit in seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// CPU-time limit in seconds.
        #[arg(long)]
        cpu_time: Option<f64>,
        /// MiB the code may allocate beyond the template.
        #[arg(long)]
        memory: Option<u64>,
        /// A file whose bytes the code reads on stdin.
        #[arg(long)]
        stdin: Option<PathBuf>,
        /// Environment variables (KEY=VALUE), repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Print the whole result as JSON instead of passing output through.
        #[arg(long)]
        json: bool,
        /// Code to run, or `-` to read it from stdin.
        code: String,
    },
    /// Serve the HTTP API (builds the built-in templates it serves on first start). Prints
    /// `forkvm: listening on http://ADDR` once ready.
    Serve {
        /// Address to listen on (loopback by default; port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// API keys file (default: $FORKVM_CACHE_DIR/api_keys.json, created with one key on
        /// first start).
        #[arg(long, env = "FORKVM_API_KEYS_FILE")]
        keys: Option<PathBuf>,
        /// Turn authentication off (local experiments only; logged loudly).
        #[arg(long)]
        no_auth: bool,
        /// Templates to serve, each with its own workers, the first the default (repeat the
        /// flag or separate names with commas): `--template python,node`. A request names
        /// its template, or runs in the first that runs its language.
        #[arg(long, value_delimiter = ',', default_value = "python")]
        template: Vec<String>,
        /// Warm VMs kept ready for each template, shared out among its workers.
        #[arg(long, default_value_t = 32)]
        pool_size: usize,
        /// Threads refilling the pool, in each worker.
        #[arg(long, default_value_t = 1)]
        refill_threads: usize,
        /// Jailed worker processes running the sandboxes (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Host memory each worker may use, in MiB (its cgroup's limit; default: three
        /// quarters of the host's memory shared out among the workers).
        #[arg(long)]
        worker_memory_mb: Option<u64>,
        /// CPU time each worker may use, in cores (its cgroup's limit; default: unlimited).
        #[arg(long)]
        worker_cpus: Option<f64>,
        /// Host memory one key's sessions may hold, in MiB; past it they may not grow
        /// (0: no limit).
        #[arg(long, default_value_t = 4096)]
        key_memory_mb: u64,
        /// Executions running at once (default: twice the cores).
        #[arg(long)]
        exec_slots: Option<usize>,
        /// Executions one key may run at once (default: half the slots). Freed slots go
        /// to the waiting key with the fewest running.
        #[arg(long)]
        exec_slots_per_key: Option<usize>,
        /// Requests per second per key (sustained).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Requests per key in a burst.
        #[arg(long, default_value_t = 200.0)]
        burst: f64,
        /// Sandboxes per key at once (sessions plus running executions).
        #[arg(long, default_value_t = 64)]
        max_sandboxes: usize,
        /// Largest request body in MiB.
        #[arg(long, default_value_t = 16)]
        max_body_mb: usize,
        /// Idle TTL of sessions that do not ask for one, in seconds: past it a session,
        /// running or paused, is deleted.
        #[arg(long, default_value_t = 300)]
        session_ttl: u64,
        /// Seconds a session may be idle before it is paused: its state stored on disk,
        /// its VM freed; any request resumes it (0: only when asked).
        #[arg(long, default_value_t = 60)]
        pause_idle_after: u64,
        /// Disk one key's paused sessions may take, in MiB (0: no limit).
        #[arg(long, default_value_t = 16384)]
        key_storage_mb: u64,
        /// Seconds between checkpoints of running sessions used since their last one, so
        /// a crash loses at most that much of their work (0: off; a crash loses running
        /// sessions).
        #[arg(long, default_value_t = 0)]
        checkpoint_every: u64,
        /// Client connections open at once, counted before authentication (more are
        /// answered 503 and closed; the descriptor limit is raised to fit).
        #[arg(long, default_value_t = 8192)]
        max_connections: usize,
        /// Client connections open at once from one address (IPv6: one /64).
        #[arg(long, default_value_t = 512)]
        max_connections_per_address: usize,
        /// Seconds a connection has to send a request's headers; also how long an idle
        /// keep-alive connection is kept.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
        header_timeout: u64,
        /// Seconds a request has to send its whole body.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        body_timeout: u64,
        /// Seconds a client may take none of a response being sent before it is
        /// disconnected.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        send_timeout: u64,
        /// Output one response may carry in MiB, its streams and batch members together
        /// (their output limits are cut to fit).
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
        max_response_mb: u64,
        /// Output the server holds for all responses in flight, in MiB; requests wait
        /// for their share.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
        results_memory_mb: u64,
        /// Request bodies the server holds at once, in MiB; requests wait for room.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
        bodies_memory_mb: u64,
    },
    /// API keys for `forkvm serve`.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Templates: programs snapshotted at their first request, which sandboxes fork from.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Root filesystem images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Run PROGRAM (a path inside the image) in a fresh sandbox; its output passes through and
    /// its exit status becomes forkvm's (124 on timeout, 125 when output hit its cap,
    /// 128+N when it crashed with signal N).
    Run {
        /// Root filesystem image (default: the Debian image, built on first use).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Wall-clock limit in seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// CPU-time limit in seconds.
        #[arg(long)]
        cpu_time: Option<f64>,
        /// Guest memory in MiB (a multiple of 2).
        #[arg(long, default_value_t = 1024)]
        memory: u64,
        /// Bytes each of stdout and stderr may carry before the program is stopped.
        #[arg(long, default_value_t = 64 << 20)]
        output_limit: u64,
        /// Bytes of file data the program may write into its filesystem overlay.
        #[arg(long, default_value_t = 256 << 20)]
        overlay_limit: u64,
        /// Extra environment variables (KEY=VALUE), repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory inside the sandbox.
        #[arg(long, default_value = "/root")]
        cwd: String,
        /// Print every syscall with its arguments and result to stderr.
        #[arg(long)]
        strace: bool,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key named NAME; prints it once (only its hash is stored).
    Add {
        name: String,
        /// Keys file (default: $FORKVM_CACHE_DIR/api_keys.json).
        #[arg(long, env = "FORKVM_API_KEYS_FILE")]
        file: Option<PathBuf>,
        /// An operator's key: it may also build templates (`POST /v1/templates`).
        #[arg(long)]
        operator: bool,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Build (or rebuild) a template: run its entry program until it first reads its
    /// control channel, then snapshot it.
    Build {
        /// Template name.
        name: String,
        /// The agent's runtime: `python`, or `node` (JavaScript and TypeScript).
        #[arg(long, default_value = "python")]
        runtime: forkvm_template::Runtime,
        /// Python modules to install (as Debian python3-<name> packages) and import; for
        /// the node runtime, modules to `require` (numpy is the Python default).
        #[arg(long, value_delimiter = ',')]
        packages: Option<Vec<String>>,
        /// A custom entry program and arguments (it must read descriptor 3).
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        entry: Option<Vec<String>>,
        /// Guest memory in MiB for the template and its forks [default: 1024].
        #[arg(long)]
        memory: Option<u64>,
        /// A template spec (TOML): runtime, Debian, PyPI and npm packages, files,
        /// environment and warm-up code (docs/API.md).
        #[arg(long, conflicts_with_all = ["runtime", "packages", "entry"])]
        spec: Option<PathBuf>,
        /// With --spec: a lock file. Written after the build when it does not exist; when it
        /// does, the build installs exactly the packages it pins and must give the same
        /// content digest, or it stops saying what differs.
        #[arg(long, requires = "spec")]
        lock: Option<PathBuf>,
    },
    /// List templates.
    List,
    /// Show a template's metadata.
    Show { name: String },
    /// Print a template's lock (what `build --lock` reads): its content digest and the
    /// packages it installed, pinned.
    Lock { name: String },
    /// Delete a template.
    Rm { name: String },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// What the jailed-worker boundary costs: the same requests through one worker and by
    /// the engine in this process (the floor), alternating.
    Jail {
        #[arg(long, default_value = "python")]
        template: String,
        /// Timed requests per workload and side.
        #[arg(long, default_value_t = 400)]
        samples: usize,
    },
    /// Forks of a template: latency from the warm pool, fork + a trivial exec, memory per
    /// live sandbox, many live sandboxes, refill rate; beside KVM, host-fork and bwrap
    /// floors.
    Fork {
        /// Template to fork (build it first with `forkvm template build python`).
        #[arg(long, default_value = "python")]
        template: String,
        /// Timed forks (and fork+execs).
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        /// Sandboxes kept alive at once for the wall-time measurement.
        #[arg(long, default_value_t = 1000)]
        live: usize,
        /// Processes the live sandboxes are spread over: every KVM VM of a process is called
        /// on each copy-on-write fault and each page-aging check of the process (the host's
        /// DAMON reclaim makes those), so VMs in one process slow each other.
        #[arg(long, default_value_t = 128)]
        live_workers: usize,
        /// Live sandboxes the memory measurement averages over.
        #[arg(long, default_value_t = 200)]
        memory_sandboxes: usize,
        /// Prepared VMs the pool keeps.
        #[arg(long, default_value_t = 32)]
        pool_size: usize,
        /// Threads refilling the pool.
        #[arg(long, default_value_t = 1)]
        refill_threads: usize,
        /// Pool VMs cold (no warm-up request before use).
        #[arg(long)]
        cold: bool,
    },
    /// Cross-tenant load: `print(1+1)` through a server this command starts, from many
    /// keys in turn (no key's sandbox is warm for its next request), beside one key.
    Keys {
        /// Keys the requests go round.
        #[arg(long, default_value_t = 64)]
        keys: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 20)]
        duration: u64,
    },
    /// Where a fresh VM's time goes: making it, restoring the process, its first and second
    /// requests, and a warmed pool's fork + request, each with KVM's exit and shadow-fault
    /// counts and the host's page faults, beside one exit's round trip.
    Breakdown {
        /// Template to fork.
        #[arg(long, default_value = "python")]
        template: String,
        /// VMs measured per step.
        #[arg(long, default_value_t = 50)]
        samples: usize,
    },
    /// Fork + exec of typical small requests (print, json, a numpy matmul), each beside a
    /// host `os.fork()` of a warm numpy Python running the same code.
    Exec {
        /// Template to fork.
        #[arg(long, default_value = "python")]
        template: String,
        /// Timed runs per workload and side.
        #[arg(long, default_value_t = 300)]
        samples: usize,
    },
    /// Pausing a session to disk and resuming it (p50/p99), beside a new session and a
    /// session fork in the same run: a small session and one holding a 64 MiB array.
    Pause {
        /// Template the sessions are made of.
        #[arg(long, default_value = "python")]
        template: String,
    },
    /// Compute in a fork beside the same Python programs on the host: a pure-Python loop,
    /// json, regex, numpy matmul and SVD, a pandas group-by, a scikit-learn fit, and first
    /// touch of 100 MiB and 1 GiB. Each row is the ratio of the medians.
    Compute {
        /// Template to fork (the default one is built on first use, with pandas and
        /// scikit-learn, and 4 GiB of RAM for the 1 GiB row).
        #[arg(long, default_value = bench::compute::TEMPLATE)]
        template: String,
    },
    /// A real server under a mixed, partly hostile load from many keys (executions,
    /// numpy, sessions with files and forks, streams, batches, busy loops, output and
    /// memory bombs): every answer checked; throughput, latency by kind, server memory.
    Load {
        /// Drive this server instead of starting one (needs `--key`).
        #[arg(long)]
        url: Option<String>,
        /// API keys for `--url` (repeat the flag for several).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// Keys to create for the server this command starts.
        #[arg(long, default_value_t = 4)]
        key_count: usize,
        /// Concurrent clients (each on one key, in turn).
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Seconds of load after the warm-up.
        #[arg(long, default_value_t = 60)]
        duration: u64,
    },
    /// (internal) One worker process of `bench fork`'s live-sandbox measurement.
    #[command(hide = true)]
    LiveWorker {
        #[arg(long)]
        template: String,
        #[arg(long)]
        count: usize,
        #[arg(long, value_enum, default_value = "exec")]
        work: bench::live::Work,
    },
    /// Cold sandbox start of python3 (bare, and importing numpy) and one syscall round trip,
    /// each beside the same work run natively.
    Startup {
        /// Root filesystem image (default: the Debian image).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Timed runs per workload and side.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build (if needed) the default Debian image and print its path.
    Default,
    /// Pack a directory tree into an image file.
    Build {
        /// Directory to pack.
        source: PathBuf,
        /// Image file to write.
        output: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FORKVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match execute(Cli::parse()) {
        Ok(status) => std::process::exit(status),
        Err(e) => {
            eprintln!("forkvm: {e:#}");
            std::process::exit(run::EXIT_INTERNAL);
        }
    }
}

/// The default Debian root filesystem image, built on first use.
fn default_image() -> Result<PathBuf> {
    let spec = forkvm_template::rootfs::RootfsSpec::default();
    let cache = forkvm_template::rootfs::default_cache_dir();
    let path = forkvm_template::rootfs::ensure_rootfs(&spec, &cache, &mut |step| {
        eprintln!("forkvm: {step}");
    })?;
    Ok(path)
}

fn execute(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Worker => Ok(forkvm_worker::service::run(
            forkvm_worker::spawn::inherited_socket()?,
            run::run_jailed,
        )),
        Command::Bench(BenchCommand::Startup { image, runs }) => {
            let image = match image {
                Some(path) => path,
                None => default_image()?,
            };
            let report = bench::startup::run(&image, runs.max(1))?;
            eprint!("{}", bench::startup::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Exec {
            template,
            language,
            timeout,
            cpu_time,
            memory,
            stdin,
            env,
            json,
            code,
        } => exec::exec(exec::ExecOptions {
            template,
            code,
            language,
            timeout: Duration::from_secs_f64(timeout),
            cpu_time: cpu_time.map(Duration::from_secs_f64),
            memory_mib: memory,
            stdin,
            env,
            json,
        }),
        Command::Template(TemplateCommand::Build {
            name,
            memory,
            spec: Some(path),
            lock,
            ..
        }) => {
            let (mut spec, _) = forkvm_template::spec::SpecFile::load(&path, &name)?;
            if let Some(mib) = memory {
                spec.memory_mib = mib;
            }
            template::build_locked(spec, lock.as_deref())?;
            Ok(0)
        }
        Command::Template(TemplateCommand::Build {
            name,
            runtime,
            packages,
            entry,
            memory,
            spec: None,
            lock: _,
        }) => {
            let mut spec = match runtime {
                forkvm_template::Runtime::Python => {
                    let mut spec = forkvm_template::TemplateSpec::python(&name);
                    if let Some(packages) = packages {
                        spec.extra_packages = packages
                            .iter()
                            .filter(|p| p.as_str() != "numpy")
                            .map(|p| format!("python3-{}", p.to_lowercase()))
                            .collect();
                        spec.modules = packages;
                    }
                    spec
                }
                forkvm_template::Runtime::Node => {
                    let mut spec = forkvm_template::TemplateSpec::node(&name);
                    spec.modules = packages.unwrap_or_default();
                    spec
                }
            };
            spec.entry = entry;
            if let Some(mib) = memory {
                spec.memory_mib = mib;
            }
            template::build(&spec)?;
            Ok(0)
        }
        Command::Serve {
            listen,
            keys,
            no_auth,
            template,
            pool_size,
            refill_threads,
            workers,
            worker_memory_mb,
            worker_cpus,
            key_memory_mb,
            exec_slots,
            exec_slots_per_key,
            rate,
            burst,
            max_sandboxes,
            max_body_mb,
            session_ttl,
            pause_idle_after,
            key_storage_mb,
            checkpoint_every,
            max_connections,
            max_connections_per_address,
            header_timeout,
            body_timeout,
            send_timeout,
            max_response_mb,
            results_memory_mb,
            bodies_memory_mb,
        } => serve::serve(serve::ServeOptions {
            listen,
            keys,
            no_auth,
            templates: template,
            pool: forkvm_vmm::PoolConfig {
                size: pool_size,
                refill_threads,
            },
            workers,
            worker_memory_mb,
            worker_cpus,
            key_memory_mb,
            exec_slots,
            exec_slots_per_key,
            fairness: forkvm_server::fairness::FairnessConfig {
                rate_per_sec: rate,
                burst,
                max_sandboxes,
            },
            max_body_mb,
            default_ttl: Duration::from_secs(session_ttl),
            pause_idle_after: (pause_idle_after > 0).then(|| Duration::from_secs(pause_idle_after)),
            key_storage_mb,
            checkpoint_every: (checkpoint_every > 0).then(|| Duration::from_secs(checkpoint_every)),
            connections: forkvm_server::connections::ConnectionLimits {
                max_open: max_connections.max(1),
                max_per_address: max_connections_per_address.max(1),
                header_timeout: Duration::from_secs(header_timeout),
                body_timeout: Duration::from_secs(body_timeout),
                send_timeout: Duration::from_secs(send_timeout),
            },
            max_response_bytes: max_response_mb << 20,
            results_memory_bytes: results_memory_mb << 20,
            bodies_memory_bytes: bodies_memory_mb << 20,
        }),
        Command::Keys(KeysCommand::Add {
            name,
            file,
            operator,
        }) => serve::add(&name, file, operator),
        Command::Mcp { url, key } => mcp::serve_stdio(&url, key),
        Command::Sessions { url, key, action } => {
            let action = match action {
                SessionsCommand::List => sessions::Action::List,
                SessionsCommand::Pause { id } => sessions::Action::Pause(id),
                SessionsCommand::Resume { id } => sessions::Action::Resume(id),
            };
            sessions::run(&url, key.as_deref(), action)
        }
        Command::Template(TemplateCommand::List) => template::list().map(|()| 0),
        Command::Template(TemplateCommand::Show { name }) => template::show(&name).map(|()| 0),
        Command::Template(TemplateCommand::Lock { name }) => template::lock(&name).map(|()| 0),
        Command::Template(TemplateCommand::Rm { name }) => template::remove(&name).map(|()| 0),
        Command::Bench(BenchCommand::Fork {
            template,
            samples,
            live,
            live_workers,
            memory_sandboxes,
            pool_size,
            refill_threads,
            cold,
        }) => {
            let report = bench::fork::run(&bench::fork::ForkOptions {
                template,
                samples: samples.max(1),
                live: live.max(1),
                live_workers: live_workers.max(1),
                memory_sandboxes: memory_sandboxes.max(1),
                pool: forkvm_vmm::PoolConfig {
                    size: pool_size,
                    refill_threads,
                },
                warm: !cold,
            })?;
            eprint!("{}", bench::fork::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Jail { template, samples }) => {
            let report = bench::jail::run(&template, samples.max(1))?;
            eprint!("{}", bench::jail::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Keys {
            keys,
            clients,
            duration,
        }) => {
            let report =
                bench::keys::run(keys, clients.max(1), Duration::from_secs(duration.max(1)))?;
            eprint!("{}", bench::keys::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Breakdown { template, samples }) => {
            let report = bench::breakdown::run(&template, samples.max(1))?;
            eprint!("{}", bench::breakdown::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Exec { template, samples }) => {
            let report = bench::exec::run(&template, samples.max(1))?;
            eprint!("{}", bench::exec::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Pause { template }) => {
            let report = bench::pause::run(&template)?;
            eprint!("{}", bench::pause::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Compute { template }) => {
            let report = bench::compute::run(&template)?;
            eprint!("{}", bench::compute::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(0)
        }
        Command::Bench(BenchCommand::Load {
            url,
            keys,
            key_count,
            clients,
            duration,
        }) => {
            let report = bench::load::run(&bench::load::LoadOptions {
                url,
                keys,
                key_count,
                clients,
                duration: Duration::from_secs(duration.max(1)),
            })?;
            eprint!("{}", bench::load::table(&report));
            println!("{}", serde_json::to_string_pretty(&report)?);
            let clean = report.wrong_answers == 0 && report.server_errors == 0;
            Ok(if clean { 0 } else { 1 })
        }
        Command::Bench(BenchCommand::LiveWorker {
            template,
            count,
            work,
        }) => bench::live::worker(&template, count, work).map(|()| 0),
        Command::Image(ImageCommand::Default) => {
            println!("{}", default_image()?.display());
            Ok(0)
        }
        Command::Image(ImageCommand::Build { source, output }) => {
            let stats = forkvm_image::build_image(&source, &output)?;
            println!(
                "{}: {} files, {} directories, {} symlinks, {} bytes",
                output.display(),
                stats.files,
                stats.dirs,
                stats.symlinks,
                stats.image_len
            );
            Ok(0)
        }
        Command::Run {
            image,
            timeout,
            cpu_time,
            memory,
            output_limit,
            overlay_limit,
            env,
            cwd,
            strace,
            command,
        } => {
            let image = match image {
                Some(path) => path,
                None => default_image()?,
            };
            let mut command = command.into_iter();
            let program = command.next().expect("clap requires a program");
            run::run(forkvm_protocol::worker::RunProgram {
                image: image.to_string_lossy().into_owned(),
                program,
                args: command.collect(),
                env,
                cwd,
                timeout: timeout.map(Duration::from_secs_f64),
                cpu_time: cpu_time.map(Duration::from_secs_f64),
                memory_mib: memory,
                output_limit,
                overlay_limit,
                strace,
            })
        }
    }
}
