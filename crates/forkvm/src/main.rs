//! The `forkvm` command: run programs in kernel-less KVM sandboxes.

mod run;

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
enum Command {
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

fn execute(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run {
            image,
            timeout,
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
                None => anyhow::bail!("--image is required until the default image builder lands"),
            };
            let mut command = command.into_iter();
            let program = command.next().expect("clap requires a program");
            run::run(run::RunOptions {
                image,
                program,
                args: command.collect(),
                env,
                cwd,
                timeout: timeout.map(Duration::from_secs_f64),
                memory_mib: memory,
                output_limit,
                overlay_limit,
                strace,
            })
        }
    }
}
