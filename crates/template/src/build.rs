//! Building a template: run the entry program (by default the Python agent, importing the
//! template's modules) until it parks reading its control channel, then snapshot it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkvm_image::Fs;
use forkvm_kernel::{CaptureBuffer, Console, Input};
use forkvm_vmm::{Program, RunResult, Vmm};

use crate::lock::Lock;
use crate::overlay::{self, Contents, PlaceError};
use crate::packages::{self, Pins};
use crate::rootfs::{RootfsSpec, default_cache_dir, ensure_rootfs};
use crate::runtime::Runtime;
use crate::snapshot::{self, Provenance, SnapshotMeta};
use crate::store::{StoreError, TemplateStore};

/// Where the Python agent is placed inside every template's filesystem.
pub const AGENT_PATH: &str = "/opt/forkvm/agent.py";
/// The Python agent itself (see `guest/agent.py`).
pub const AGENT_SOURCE: &str = include_str!("../../../guest/agent.py");
/// Where the Node.js agent is placed.
pub const NODE_AGENT_PATH: &str = "/opt/forkvm/agent.js";
/// The Node.js agent (see `guest/agent.js`).
pub const NODE_AGENT_SOURCE: &str = include_str!("../../../guest/agent.js");

/// SHA-256 (hex) of both agents, recorded in every template this forkvm builds: a template
/// built with other agents speaks another version of the protocol.
pub fn agent_digest() -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(AGENT_SOURCE.as_bytes());
    hasher.update(NODE_AGENT_SOURCE.as_bytes());
    hasher
        .finalize()
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
    pub runtime: Runtime,
    /// Modules the agent loads before the snapshot: Python modules it imports (numpy by
    /// default), or Node.js modules it `require`s.
    pub modules: Vec<String>,
    /// Debian packages added to the default root filesystem.
    pub extra_packages: Vec<String>,
    /// A custom entry program's argv (it must read descriptor 3); default: the agent.
    pub entry: Option<Vec<String>>,
    /// Guest RAM of the template and every fork.
    pub memory_mib: u64,
    /// Environment added to the defaults.
    pub env: Vec<String>,
    /// Packages fetched from PyPI and npm on the host at build time (`packages`).
    pub pypi: Vec<String>,
    pub npm: Vec<String>,
    /// Host files and directories copied to sandbox paths.
    pub files: Vec<(PathBuf, String)>,
    /// Code the agent runs once before the snapshot (in the runtime's language).
    pub warmup: Option<String>,
    /// The spec file's text, when the template comes from one.
    pub spec_text: Option<String>,
    /// Build exactly what this lock pins (`lock`), or fail naming what differs.
    pub lock: Option<Lock>,
}

impl TemplateSpec {
    /// The default Python template: the agent with numpy imported.
    pub fn python(name: &str) -> TemplateSpec {
        TemplateSpec {
            name: name.to_string(),
            runtime: Runtime::Python,
            modules: vec!["numpy".to_string()],
            extra_packages: Vec::new(),
            entry: None,
            memory_mib: 1024,
            env: Vec::new(),
            pypi: Vec::new(),
            npm: Vec::new(),
            files: Vec::new(),
            warmup: None,
            spec_text: None,
            lock: None,
        }
    }

    /// The Node.js template: the agent with the TypeScript compiler loaded.
    pub fn node(name: &str) -> TemplateSpec {
        TemplateSpec {
            runtime: Runtime::Node,
            modules: Vec::new(),
            ..TemplateSpec::python(name)
        }
    }

    fn argv(&self) -> Vec<String> {
        if let Some(argv) = &self.entry {
            return argv.clone();
        }
        let mut argv: Vec<String> = match self.runtime {
            Runtime::Python => vec!["/usr/bin/python3".into(), AGENT_PATH.into()],
            // The agent runs code the way the REPL does, with Node's own transform for
            // top-level `await` and its bundled parser, both internal modules. V8's memory
            // reducer collects garbage once the heap has been idle a while: in a fork the
            // clock has jumped since the snapshot, so every fork would run that collection
            // on its first request (measured: 190 ms of a 200 ms `console.log`). Helper
            // threads for collection only contend for the sandbox's one vCPU. Flipping JIT
            // code pages writable and back is an `mprotect` (an exit and a page-table
            // change) each time: half a warm request's exits (`bench breakdown`). The
            // sandbox is the VM, so W^X inside it guards nothing beyond it.
            Runtime::Node => vec![
                "/usr/bin/node".into(),
                "--expose-internals".into(),
                "--no-memory-reducer".into(),
                "--single-threaded-gc".into(),
                "--no-write-protect-code-memory".into(),
                NODE_AGENT_PATH.into(),
            ],
        };
        argv.extend(self.modules.iter().cloned());
        argv
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

/// Where the agents look for a template's warm-up code (`WARMUP_PY`, `WARMUP_JS`).
const AGENT_DIR: &str = "/opt/forkvm";

/// Places the agents (and the spec's warm-up code) in the overlay so every template (and
/// fork) finds them.
fn install_agent(
    fs: &mut Fs,
    spec: &TemplateSpec,
    contents: &mut Contents,
) -> Result<(), StoreError> {
    let agent = |e: PlaceError| StoreError::Agent(e.to_string());
    let dir = overlay::make_dirs(fs, AGENT_DIR).map_err(agent)?;
    let mut files = vec![
        ("agent.py", AGENT_SOURCE.as_bytes()),
        ("agent.js", NODE_AGENT_SOURCE.as_bytes()),
    ];
    if let Some(code) = &spec.warmup {
        let name = match spec.runtime {
            Runtime::Python => "warmup.py",
            Runtime::Node => "warmup.js",
        };
        files.push((name, code.as_bytes()));
    }
    for (name, data) in files {
        contents.file(format!("{AGENT_DIR}/{name}").as_bytes(), 0o644, data);
        overlay::write_file(fs, dir, name.as_bytes(), data, 0o644).map_err(agent)?;
    }
    Ok(())
}

/// Fetches the spec's PyPI and npm packages on the host (as its lock pins them, if it has
/// one) and copies them, and its files, into the overlay. Returns what the package managers
/// resolved, and a lock of it (digests not yet filled in).
fn install_extras(
    fs: &mut Fs,
    spec: &TemplateSpec,
    progress: &mut dyn FnMut(&str),
    contents: &mut Contents,
) -> Result<(Vec<String>, Lock), StoreError> {
    let locked = spec.lock.as_ref();
    let mut staged = Vec::new();
    if !spec.pypi.is_empty() {
        progress(&format!("pip: {}", spec.pypi.join(" ")));
        let pins = locked.map(|l| l.pypi.as_slice());
        staged.push(packages::stage_pypi(&spec.pypi, pins)?);
    }
    if !spec.npm.is_empty() {
        progress(&format!("npm: {}", spec.npm.join(" ")));
        let pins = locked.and_then(|l| {
            Some((
                l.npm_package_json.as_deref()?,
                l.npm_package_lock.as_deref()?,
            ))
        });
        staged.push(packages::stage_npm(&spec.npm, pins)?);
    }
    let mut resolved = Vec::new();
    let mut lock = Lock::default();
    for stage in staged {
        overlay::copy_in(fs, &stage.tree, stage.guest_dir, contents)?;
        resolved.extend(stage.resolved);
        match stage.pins {
            Pins::Pypi(lines) => lock.pypi = lines,
            Pins::Npm {
                manifest,
                lock: npm,
            } => {
                lock.npm_package_json = Some(manifest);
                lock.npm_package_lock = Some(npm);
            }
        }
    }
    for (from, to) in &spec.files {
        overlay::copy_in(fs, from, to, contents)?;
    }
    Ok((resolved, lock))
}

/// SHA-256 (hex) of the spec's text, if the template comes from a spec.
fn spec_digest(spec: &TemplateSpec) -> Option<String> {
    use sha2::{Digest, Sha256};
    let text = spec.spec_text.as_ref()?;
    Some(crate::snapshot::hex(&Sha256::digest(text.as_bytes())))
}

/// When the spec came with a lock, checks before anything is installed that it is the spec
/// and the image the lock was made from.
fn check_lock_inputs(spec: &TemplateSpec, image_sha256: &str) -> Result<(), StoreError> {
    let Some(locked) = &spec.lock else {
        return Ok(());
    };
    let none = || "none".to_string();
    Lock::expect_same(
        "the spec",
        &locked.spec_sha256.clone().unwrap_or_else(none),
        &spec_digest(spec).unwrap_or_else(none),
    )?;
    Lock::expect_same(
        "the image (Debian's packages)",
        &locked.image_sha256,
        image_sha256,
    )?;
    Ok(())
}

/// Fills in `lock`'s digests and, when the spec came with a lock, checks that the files
/// this build added are the ones it pins.
fn seal_lock(
    spec: &TemplateSpec,
    mut lock: Lock,
    image_sha256: String,
    contents: Contents,
) -> Result<Lock, StoreError> {
    lock.spec_sha256 = spec_digest(spec);
    lock.image_sha256 = image_sha256;
    lock.content_sha256 = contents.finish();
    if let Some(locked) = &spec.lock {
        Lock::expect_same(
            "the files added over the image",
            &locked.content_sha256,
            &lock.content_sha256,
        )?;
    }
    Ok(lock)
}

/// Builds `spec` into `store`, replacing a template of the same name.
pub fn build(
    store: &TemplateStore,
    vmm: &Vmm,
    spec: &TemplateSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<SnapshotMeta, StoreError> {
    let mut rootfs = RootfsSpec::default();
    rootfs
        .packages
        .extend(spec.runtime.packages().iter().map(|p| p.to_string()));
    rootfs.packages.extend(spec.extra_packages.iter().cloned());
    let image_path = ensure_rootfs(&rootfs, &default_cache_dir(), progress)?;
    let sealer = store.sealer()?;
    let image = snapshot::open_verified_image(&image_path, &sealer)?;

    let image_sha256 = crate::snapshot::hex(&image.digest());
    check_lock_inputs(spec, &image_sha256)?;
    let mut contents = Contents::new(&image_sha256);
    let mut fs = Fs::with_limit(image, 256 << 20);
    install_agent(&mut fs, spec, &mut contents)?;
    let (resolved, lock) = install_extras(&mut fs, spec, progress, &mut contents)?;
    let lock = seal_lock(spec, lock, image_sha256, contents)?;
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
            Provenance {
                runtime: spec.runtime,
                agent_sha256: agent_digest(),
                packages: resolved.clone(),
                spec: spec.spec_text.clone(),
                lock: lock.clone(),
            },
            &sealer,
        )
        .map_err(StoreError::from)
    })
}
