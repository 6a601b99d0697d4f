//! `forkvm run`: start a program from the image in a fresh sandbox, pass its output through,
//! and exit with its status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use forkvm_image::{Fs, Image};
use forkvm_kernel::{Console, Input};
use forkvm_protocol::worker::{RunProgram, Start, write_frame};
use forkvm_vmm::{Program, Sandbox, SandboxExit, Vmm};

/// Environment every sandboxed program starts with (plus `--env` additions).
pub const DEFAULT_ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
    // The sandbox has one thread: keep OpenBLAS from trying to start its pool.
    "OPENBLAS_NUM_THREADS=1",
];

// The statuses `forkvm exec` and the API use for the same endings.
pub use forkvm_protocol::exec::{
    EXIT_INTERNAL, EXIT_OUTPUT_LIMIT, EXIT_PROCESS_LIMIT, EXIT_TIMEOUT,
};

/// A program to start in a sandbox, with its standard streams.
pub struct Launch<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    /// Added to (or replacing entries of) `DEFAULT_ENV`.
    pub env: &'a [String],
    pub cwd: &'a str,
    pub memory_mib: u64,
    pub overlay_limit: u64,
    pub console: Console,
}

/// Loads the program into fresh guest RAM and creates its VM, ready to run.
pub fn launch(vmm: &Vmm, image: &Arc<Image>, launch: Launch<'_>) -> Result<Sandbox> {
    let mut env: Vec<Vec<u8>> = DEFAULT_ENV.iter().map(|e| e.as_bytes().to_vec()).collect();
    for extra in launch.env {
        let key = extra.split('=').next().unwrap_or_default();
        env.retain(|e| !e.starts_with(format!("{key}=").as_bytes()));
        env.push(extra.as_bytes().to_vec());
    }
    let mut argv = vec![launch.program.as_bytes().to_vec()];
    argv.extend(launch.args.iter().map(|a| a.as_bytes().to_vec()));
    Ok(vmm.spawn(Program {
        path: launch.program.as_bytes().to_vec(),
        argv,
        envp: env,
        cwd: launch.cwd.as_bytes().to_vec(),
        ram_bytes: launch.memory_mib << 20,
        fs: Fs::with_limit(image.clone(), launch.overlay_limit),
        console: launch.console,
        control_channel: false,
    })?)
}

/// Runs the program in a jailed worker (see `forkvm_worker`) and returns the exit status
/// forkvm should exit with. The worker inherits this command's standard streams, so the
/// program reads the terminal and writes to it directly.
pub fn run(options: RunProgram) -> Result<i32> {
    let cache = forkvm_template::rootfs::default_cache_dir();
    let sealer =
        forkvm_template::seal::Sealer::open(&cache).context("opening the cache's seal key")?;
    // Verified (and stamped) here, where the stamp can be written: the worker sees the
    // image read-only.
    let image = PathBuf::from(&options.image);
    forkvm_template::snapshot::open_verified_image(&image, &sealer)
        .with_context(|| format!("opening image {}", image.display()))?;
    let mut worker = forkvm_worker::spawn::spawn(Path::new(forkvm_worker::spawn::OWN_BINARY))
        .context("starting a worker")?;
    write_frame(&mut worker.socket, &Start::Run(options)).context("starting the worker")?;
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    while unsafe { libc::waitpid(worker.pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            anyhow::bail!(
                "waiting for the worker: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    if libc::WIFEXITED(status) {
        return Ok(libc::WEXITSTATUS(status));
    }
    let signal = libc::WTERMSIG(status);
    eprintln!("forkvm: the worker running the program was killed by signal {signal}");
    Ok(EXIT_INTERNAL)
}

/// `forkvm worker`'s side of `run`: jails itself to the image, then runs the program and
/// returns the status to exit with.
pub fn run_jailed(program: RunProgram) -> i32 {
    match run_in_jail(program) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("forkvm: {e:#}");
            EXIT_INTERNAL
        }
    }
}

fn run_in_jail(options: RunProgram) -> Result<i32> {
    let image_path = PathBuf::from(&options.image);
    let sealer = forkvm_template::seal::Sealer::open(&forkvm_template::rootfs::default_cache_dir())
        .context("opening the cache's seal key")?;
    forkvm_worker::jail::enter(&forkvm_worker::jail::Paths::for_image(
        &image_path,
        sealer.key_path(),
    ))
    .context("entering the jail")?;
    let vmm = Vmm::new().context("starting the VMM")?;
    let image = forkvm_template::snapshot::open_verified_image(&image_path, &sealer)
        .with_context(|| format!("opening image {}", image_path.display()))?;
    forkvm_worker::jail::drop_privileges().context("dropping privileges")?;
    forkvm_worker::seccomp::install().context("installing the seccomp filter")?;
    let console = Console::new(
        Input::Host(Box::new(std::io::stdin())),
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
        options.output_limit,
    );
    let mut sandbox = launch(
        &vmm,
        &image,
        Launch {
            program: &options.program,
            args: &options.args,
            env: &options.env,
            cwd: &options.cwd,
            memory_mib: options.memory_mib,
            overlay_limit: options.overlay_limit,
            console,
        },
    )?;
    if options.strace {
        sandbox
            .process_mut()
            .set_strace(Some(Box::new(std::io::stderr())));
    }
    sandbox.set_cpu_limit(options.cpu_time);
    let deadline = options.timeout.map(|t| Instant::now() + t);
    let exit = sandbox.run(deadline);
    let stats = sandbox.process().stats();
    if !stats.unsupported.is_empty() {
        tracing::info!(unsupported = ?stats.unsupported, "unsupported syscalls were called");
    }
    tracing::debug!(syscalls = stats.total, "sandbox finished");
    std::io::stdout().flush()?;
    Ok(report(&exit, options.timeout))
}

/// Prints why the sandbox ended (when it did not simply exit) and maps it to a status.
fn report(exit: &SandboxExit, timeout: Option<Duration>) -> i32 {
    let mut stderr = std::io::stderr();

    match exit {
        SandboxExit::Exited(code) => *code & 0xff,
        SandboxExit::Signaled(signal) => {
            let _ = writeln!(stderr, "forkvm: program killed by signal {signal}");
            128 + signal
        }
        SandboxExit::Fault(fault) => {
            let _ = writeln!(stderr, "forkvm: program crashed: {fault}");
            128 + fault.signal
        }
        SandboxExit::Timeout => {
            let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
            let _ = writeln!(stderr, "forkvm: timeout: stopped after {secs} s");
            EXIT_TIMEOUT
        }
        SandboxExit::CpuTimeout => {
            let _ = writeln!(stderr, "forkvm: timeout: CPU time limit used up");
            EXIT_TIMEOUT
        }
        SandboxExit::OutputLimit(limit) => {
            let _ = writeln!(
                stderr,
                "\nforkvm: output truncated: {:?} reached its {}-byte limit; program stopped",
                limit.stream, limit.limit
            );
            EXIT_OUTPUT_LIMIT
        }
        SandboxExit::Deadlock(why) => {
            let _ = writeln!(stderr, "forkvm: program deadlocked: {why}");
            EXIT_INTERNAL
        }
        SandboxExit::ProcessLimit(limit) => {
            let _ = writeln!(
                stderr,
                "forkvm: process limit: a fork passed the limit of {limit} processes; stopped"
            );
            EXIT_PROCESS_LIMIT
        }
        SandboxExit::Internal(why) => {
            let _ = writeln!(stderr, "forkvm: internal error: {why}");
            EXIT_INTERNAL
        }
    }
}
