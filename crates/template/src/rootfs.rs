//! The default root filesystem: Debian packages installed by `mmdebstrap`, byte-compiled,
//! trimmed, and packed into a forkvm image that is cached per machine.
//!
//! The cache key covers everything that changes the result (builder version, image format
//! version, suite, package set), so an image is built once and rebuilt only when an input
//! changes. Builds take an exclusive lock beside the image, so concurrent callers wait for
//! one build instead of racing several.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use forkvm_image::{BuildError, FORMAT_VERSION, Image, ImageError, build_image};
use sha2::{Digest, Sha256};

/// Bumped whenever the build steps below change what ends up in the image.
pub const BUILDER_VERSION: u32 = 4;

/// Where images are cached when `$FORKVM_CACHE_DIR` is unset.
pub const SYSTEM_CACHE_DIR: &str = "/var/cache/forkvm";

/// Directories whose contents are dropped from the tree: documentation, translations and
/// package-manager state that no sandboxed program reads.
const TRIMMED_DIRS: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
];

/// Byte-compiles every Python tree in the chroot: without `.pyc` files the first
/// `import numpy` in a sandbox is ~3x slower. Runs as an mmdebstrap hook because it needs
/// the chroot's `/dev/shm` (for `-j0` worker processes), which mmdebstrap mounts for hooks.
/// The excluded files are test data that is invalid Python on purpose. Output goes to
/// stderr, where failures are reported from.
const COMPILE_HOOK: &str = r#"[ ! -x "$1/usr/bin/python3" ] || chroot "$1" sh -c 'exec python3 -m compileall -q -j0 -x "/lib2to3/tests/data/|/test/bad(_coding|syntax_)" /usr/lib/python3*' >&2"#;

/// Lines of mmdebstrap's stderr kept for error reports.
const STDERR_TAIL_LINES: usize = 40;

/// Why the root filesystem could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A suite or package name that is not a valid Debian name.
    #[error("invalid {what} name {name:?}")]
    InvalidName { what: &'static str, name: String },
    /// Creating the cache directory or taking the build lock failed.
    #[error("preparing cache directory {path}: {source}")]
    CacheDir { path: PathBuf, source: io::Error },
    /// mmdebstrap is not installed.
    #[error("mmdebstrap not found: run scripts/setup.sh to install the build tools")]
    MmdebstrapMissing,
    /// mmdebstrap could not be started or its output read.
    #[error("running mmdebstrap: {0}")]
    MmdebstrapSpawn(io::Error),
    /// mmdebstrap exited with an error.
    #[error("mmdebstrap failed ({status}):\n{stderr_tail}")]
    MmdebstrapFailed {
        status: ExitStatus,
        stderr_tail: String,
    },
    /// Trimming or fixing up the installed tree failed.
    #[error("preparing tree at {path}: {source}")]
    PrepareTree { path: PathBuf, source: io::Error },
    /// A file every root filesystem needs is missing after the install.
    #[error("built tree lacks {0}")]
    MissingFile(&'static str),
    /// Something is still mounted inside the build tree; deleting it could reach the host.
    #[error("{0} still has mounts inside it; unmount them and remove it by hand")]
    MountsInTree(PathBuf),
    /// Packing the tree into an image failed.
    #[error("packing root filesystem image: {0}")]
    Pack(#[from] BuildError),
    /// The freshly built image does not open.
    #[error("opening built image: {0}")]
    Open(#[from] ImageError),
}

/// What goes into a root filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsSpec {
    /// Debian suite, e.g. `bookworm`; packages come from the machine's own apt sources.
    pub suite: String,
    /// Packages installed on top of the `minbase` variant (their dependencies follow).
    pub packages: Vec<String>,
}

impl Default for RootfsSpec {
    /// CPython with numpy and pandas; OpenBLAS, which Debian's alternatives then select as
    /// the BLAS and LAPACK, as on a host where it is installed (numpy's own dependency,
    /// `libblas3 | libblas.so.3`, resolves to the reference BLAS, 15-20x slower at a matrix
    /// product); msgpack, which the in-sandbox agent speaks to the VMM with; netbase
    /// (`/etc/services` and `/etc/protocols`, which name ports and protocols); and the
    /// standard library's test suite (used to check the syscall layer against real
    /// programs); and the userland an agent's shell commands expect: bash and the core
    /// utilities (in every Debian), plus gawk, compressors and archivers, `file`, `less`,
    /// `ps` and friends, git, pip and venv. SciPy and scikit-learn stay out: Debian's SciPy depends on a compiler
    /// toolchain through Pythran, which triples the image; templates add them
    /// (`forkvm template build NAME --packages numpy,sklearn`).
    fn default() -> Self {
        RootfsSpec {
            suite: "bookworm".to_owned(),
            packages: [
                "python3",
                "python3-numpy",
                "libopenblas0-pthread",
                "python3-pandas",
                "python3-msgpack",
                "netbase",
                "libpython3.11-testsuite",
                "gawk",
                "xz-utils",
                "bzip2",
                "zip",
                "unzip",
                "file",
                "less",
                "procps",
                "git",
                "python3-pip",
                "python3-venv",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Whether `name` is a valid Debian package or suite name (also keeps it from smuggling
/// options or list separators into the mmdebstrap command line).
fn is_debian_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

impl RootfsSpec {
    fn validate(&self) -> Result<(), RootfsError> {
        let invalid = |what, name: &str| RootfsError::InvalidName {
            what,
            name: name.to_owned(),
        };
        if !is_debian_name(&self.suite) {
            return Err(invalid("suite", &self.suite));
        }
        match self
            .packages
            .iter()
            .find(|p| !is_debian_name(p) || p.len() < 2)
        {
            Some(package) => Err(invalid("package", package)),
            None => Ok(()),
        }
    }

    /// The package set in canonical form: sorted, without duplicates.
    fn canonical_packages(&self) -> Vec<&str> {
        let mut packages: Vec<&str> = self.packages.iter().map(String::as_str).collect();
        packages.sort_unstable();
        packages.dedup();
        packages
    }

    /// Hex SHA-256 over every input that determines the image (length-prefixed fields, so
    /// no two different specs encode alike). Independent of package order and duplicates.
    pub fn cache_key(&self) -> String {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(b"forkvm-rootfs");
        field(&BUILDER_VERSION.to_le_bytes());
        field(&FORMAT_VERSION.to_le_bytes());
        field(self.suite.as_bytes());
        for package in self.canonical_packages() {
            field(package.as_bytes());
        }
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// Where this spec's image is cached inside `cache_dir`.
    pub fn image_path(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join(format!("rootfs-{}.img", &self.cache_key()[..16]))
    }
}

/// The image cache directory: `$FORKVM_CACHE_DIR` when set, else [`SYSTEM_CACHE_DIR`]
/// (building needs root for mmdebstrap's chroot anyway).
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os("FORKVM_CACHE_DIR"))
}

fn cache_dir_from(env: Option<std::ffi::OsString>) -> PathBuf {
    env.filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(SYSTEM_CACHE_DIR), PathBuf::from)
}

/// Returns the path of the image for `spec` in `cache_dir`, building it first if no valid
/// cached image exists. Building runs mmdebstrap (root, network access to the apt sources,
/// about a minute) and reports steps through `progress`.
pub fn ensure_rootfs(
    spec: &RootfsSpec,
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, RootfsError> {
    spec.validate()?;
    let image_path = spec.image_path(cache_dir);
    if Image::open(&image_path).is_ok() {
        return Ok(image_path);
    }
    let cache_error = |source| RootfsError::CacheDir {
        path: cache_dir.to_owned(),
        source,
    };
    fs::create_dir_all(cache_dir).map_err(cache_error)?;
    let lock = File::create(image_path.with_extension("lock")).map_err(cache_error)?;
    lock.lock().map_err(cache_error)?;
    // Another process may have finished the build while we waited for the lock.
    if Image::open(&image_path).is_ok() {
        return Ok(image_path);
    }
    if image_path.exists() {
        progress("cached root filesystem image is unreadable; rebuilding it");
    }
    build_rootfs(spec, &image_path, progress)?;
    Image::open(&image_path)?;
    Ok(image_path)
}

/// Runs the whole build into `image_path` through a scratch tree beside it.
fn build_rootfs(
    spec: &RootfsSpec,
    image_path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RootfsError> {
    let started = Instant::now();
    let tree = ScratchTree {
        path: image_path.with_extension(format!("build-{}", std::process::id())),
    };
    tree.clear()?;
    progress("building root filesystem (first run, ~1 minute)…");
    run_mmdebstrap(spec, &tree.path, progress)?;
    prepare_tree(&tree.path)?;
    progress("packing image…");
    let stats = build_image(&tree.path, image_path)?;
    tree.clear()?;
    progress(&format!(
        "root filesystem ready: {} ({} files, {} MiB) in {:.0} s",
        image_path.display(),
        stats.files,
        stats.image_len >> 20,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn run_mmdebstrap(
    spec: &RootfsSpec,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RootfsError> {
    // No mirror argument: mmdebstrap then uses the machine's own apt sources.
    let mut child = Command::new("mmdebstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", spec.canonical_packages().join(",")))
        .arg(format!("--customize-hook={COMPILE_HOOK}"))
        .arg(&spec.suite)
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => RootfsError::MmdebstrapMissing,
            _ => RootfsError::MmdebstrapSpawn(error),
        })?;
    let mut tail: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).split(b'\n') {
            let line =
                String::from_utf8_lossy(&line.map_err(RootfsError::MmdebstrapSpawn)?).into_owned();
            // mmdebstrap's "I: <step>" lines make useful progress; the rest is kept for errors.
            if let Some(step) = line.strip_prefix("I: ") {
                progress(&format!("mmdebstrap: {step}"));
            }
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().map_err(RootfsError::MmdebstrapSpawn)?;
    if !status.success() {
        return Err(RootfsError::MmdebstrapFailed {
            status,
            stderr_tail: Vec::from(tail).join("\n"),
        });
    }
    Ok(())
}

/// Trims the installed tree and makes sure the basics a sandbox relies on are there.
fn prepare_tree(root: &Path) -> Result<(), RootfsError> {
    for dir in TRIMMED_DIRS {
        let dir = root.join(dir);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(prepare_error(&dir)(error)),
        };
        for entry in entries {
            let path = entry.map_err(prepare_error(&dir))?.path();
            let meta = fs::symlink_metadata(&path).map_err(prepare_error(&path))?;
            let removed = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(prepare_error(&path))?;
        }
    }
    let tmp = root.join("tmp");
    if !tmp.is_dir() {
        fs::create_dir(&tmp).map_err(prepare_error(&tmp))?;
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(prepare_error(&tmp))?;
    write_network_identity(root)?;
    // Not following the link: on Debian it is relative into /usr/lib, valid inside the image.
    if fs::symlink_metadata(root.join("etc/os-release")).is_err() {
        return Err(RootfsError::MissingFile("/etc/os-release"));
    }
    Ok(())
}

/// The sandbox's own name and name service, not the build host's: `localhost` and the
/// hostname resolve from `/etc/hosts`; other names fail at once (the resolver's default
/// server, loopback port 53, answers nothing, and a sandbox reaches no other network).
const NETWORK_FILES: &[(&str, &str)] = &[
    (
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\tforkvm\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
    ("etc/hostname", "forkvm\n"),
    (
        "etc/resolv.conf",
        "# forkvm sandboxes have no network: names resolve from /etc/hosts only.\noptions timeout:1 attempts:1\n",
    ),
];

fn write_network_identity(root: &Path) -> Result<(), RootfsError> {
    for (path, content) in NETWORK_FILES {
        let path = root.join(path);
        // A symlink (resolv.conf often is one) would write through to its target.
        if fs::symlink_metadata(&path).is_ok() {
            fs::remove_file(&path).map_err(prepare_error(&path))?;
        }
        fs::write(&path, content).map_err(prepare_error(&path))?;
    }
    Ok(())
}

/// Maps an I/O error on `path` while preparing the tree.
fn prepare_error(path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::PrepareTree { path, source }
}

/// The scratch directory mmdebstrap installs into; removed on drop, but never while
/// anything is mounted inside it (a leftover bind mount of `/dev` or `/proc` after a killed
/// mmdebstrap would otherwise make the removal reach the host).
struct ScratchTree {
    path: PathBuf,
}

impl ScratchTree {
    /// Removes the tree if it exists.
    fn clear(&self) -> Result<(), RootfsError> {
        if fs::symlink_metadata(&self.path).is_err() {
            return Ok(());
        }
        if has_mounts_under(&self.path) {
            return Err(RootfsError::MountsInTree(self.path.clone()));
        }
        fs::remove_dir_all(&self.path).map_err(|source| RootfsError::PrepareTree {
            path: self.path.clone(),
            source,
        })
    }
}

impl Drop for ScratchTree {
    fn drop(&mut self) {
        // Best effort on error paths: the build error is what the caller needs to see, and
        // `clear` refuses to delete through mounts.
        let _ = self.clear();
    }
}

/// Whether any mount point lies at or below `dir`, from `/proc/self/mountinfo`. Unreadable
/// mount information counts as "yes": refusing to delete is the safe side.
fn has_mounts_under(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return true;
    };
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(&unescape_mount_path(mount_point)).starts_with(&dir))
}

/// Decodes the octal escapes (`\040` for space, ...) the kernel uses in mountinfo paths.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
