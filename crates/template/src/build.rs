//! Building a template: run the entry program (by default the Python agent, importing the
//! template's modules) until it parks reading its control channel, then snapshot it.

use std::path::Path;
use std::time::{Duration, Instant};

use forkvm_image::Fs;
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_vmm::{Program, RunResult, Vmm};

use crate::rootfs::{RootfsSpec, default_cache_dir, ensure_rootfs};
use crate::snapshot::{self, SnapshotMeta};
use crate::store::{StoreError, TemplateStore};

/// Where the agent is placed inside every template's filesystem.
pub const AGENT_PATH: &str = "/opt/forkvm/agent.py";
/// The agent itself (see `guest/agent.py`).
pub const AGENT_SOURCE: &str = include_str!("../../../guest/agent.py");
/// SHA-256 (hex) of `AGENT_SOURCE`, recorded in every template this forkvm builds.
pub fn agent_digest() -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(AGENT_SOURCE.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long a template's entry program may take to reach its first request.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// What a template is made of.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    pub name: String,
    /// Python modules the agent imports before the snapshot (numpy by default).
    pub modules: Vec<String>,
    /// Debian packages added to the default root filesystem.
    pub extra_packages: Vec<String>,
    /// A custom entry program's argv (it must read descriptor 3); default: the agent.
    pub entry: Option<Vec<String>>,
    /// Guest RAM of the template and every fork.
    pub memory_mib: u64,
    /// Environment added to the defaults.
    pub env: Vec<String>,
}

impl TemplateSpec {
    /// The default Python template: the agent with numpy imported.
    pub fn python(name: &str) -> TemplateSpec {
        TemplateSpec {
            name: name.to_string(),
            modules: vec!["numpy".to_string()],
            extra_packages: Vec::new(),
            entry: None,
            memory_mib: 1024,
            env: Vec::new(),
        }
    }

    fn argv(&self) -> Vec<String> {
        match &self.entry {
            Some(argv) => argv.clone(),
            None => {
                let mut argv = vec!["/usr/bin/python3".to_string(), AGENT_PATH.to_string()];
                argv.extend(self.modules.iter().cloned());
                argv
            }
        }
    }
}

/// Environment every template's program starts with.
pub const TEMPLATE_ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
    // The sandbox has one thread: keep OpenBLAS from trying to start its pool.
    "OPENBLAS_NUM_THREADS=1",
];

/// Places the agent in the overlay so every template (and fork) finds it.
fn install_agent(fs: &mut Fs) -> Result<(), StoreError> {
    let failed = |e: forkvm_image::FsError| StoreError::Agent(e.to_string());
    let opt = fs.resolve(b"/", b"/opt", true).map_err(failed)?.node;
    let dir = match fs.lookup(opt, b"forkvm").map_err(failed)? {
        Some(node) => node,
        None => fs.mkdir(opt, b"forkvm", 0o755).map_err(failed)?,
    };
    let file = fs.create_file(dir, b"agent.py", 0o644).map_err(failed)?;
    fs.write_at(file, 0, AGENT_SOURCE.as_bytes())
        .map_err(failed)?;
    Ok(())
}

/// Builds `spec` into `store`, replacing a template of the same name.
pub fn build(
    store: &TemplateStore,
    vmm: &Vmm,
    spec: &TemplateSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<SnapshotMeta, StoreError> {
    let mut rootfs = RootfsSpec::default();
    rootfs.packages.extend(spec.extra_packages.iter().cloned());
    let image_path = ensure_rootfs(&rootfs, &default_cache_dir(), progress)?;
    let sealer = store.sealer()?;
    let image = snapshot::open_verified_image(&image_path, &sealer)?;

    let mut fs = Fs::with_limit(image, 256 << 20);
    install_agent(&mut fs)?;
    let argv = spec.argv();
    let mut env: Vec<Vec<u8>> = TEMPLATE_ENV.iter().map(|e| e.as_bytes().to_vec()).collect();
    env.extend(spec.env.iter().map(|e| e.as_bytes().to_vec()));
    let output = CaptureBuffer::default();
    let console = Console::new(
        Input::Empty,
        Box::new(output.clone()),
        Box::new(output.clone()),
        64 << 20,
    );
    let mut sandbox = vmm.spawn(Program {
        path: argv[0].as_bytes().to_vec(),
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        envp: env,
        cwd: b"/root".to_vec(),
        ram_bytes: spec.memory_mib << 20,
        fs,
        console,
        control_channel: true,
    })?;

    progress(&format!("starting {} …", argv.join(" ")));
    let started = Instant::now();
    match sandbox.run_until_request(Some(Instant::now() + BUILD_TIMEOUT)) {
        RunResult::AwaitingRequest => {}
        RunResult::Ended(exit) => {
            let all = output.contents();
            let tail =
                String::from_utf8_lossy(&all[all.len().saturating_sub(16 * 1024)..]).into_owned();
            return Err(StoreError::EntryEnded {
                exit: format!("{exit:?}"),
                output: tail,
            });
        }
    }
    progress(&format!(
        "entry program ready after {:.2} s; writing snapshot",
        started.elapsed().as_secs_f64()
    ));
    store.create(&spec.name, |dir: &Path| {
        snapshot::write(
            dir,
            &mut sandbox,
            vmm,
            argv.clone(),
            agent_digest(),
            &sealer,
        )
        .map_err(StoreError::from)
    })
}
