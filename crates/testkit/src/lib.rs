//! Helpers shared by the KVM integration tests and the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// True when `/dev/kvm` can be used. Without it, a test should return early — unless
/// `FORKVM_REQUIRE_KVM=1` (set by CI), in which case this panics so the run fails loudly.
pub fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        if std::env::var("FORKVM_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("FORKVM_REQUIRE_KVM=1 but /dev/kvm cannot be opened");
        }
        eprintln!("skipping: /dev/kvm is not available (set FORKVM_REQUIRE_KVM=1 to fail instead)");
    }
    usable
}

/// The default Debian image (python3, numpy, the CPython test suite), built on first use.
pub fn default_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let spec = forkvm_template::rootfs::RootfsSpec::default();
            let cache = forkvm_template::rootfs::default_cache_dir();
            forkvm_template::rootfs::ensure_rootfs(&spec, &cache, &mut |step| {
                eprintln!("testkit: {step}");
            })
            .expect("building the default root filesystem image (run scripts/setup.sh first)")
        })
        .clone()
}

/// The Node.js templates' image (the default one plus Node.js, npm and TypeScript), built on
/// first use.
pub fn node_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let mut spec = forkvm_template::rootfs::RootfsSpec::default();
            let node = forkvm_template::Runtime::Node.packages();
            spec.packages.extend(node.iter().map(|p| p.to_string()));
            let cache = forkvm_template::rootfs::default_cache_dir();
            forkvm_template::rootfs::ensure_rootfs(&spec, &cache, &mut |step| {
                eprintln!("testkit: {step}");
            })
            .expect("building the node root filesystem image (run scripts/setup.sh first)")
        })
        .clone()
}

/// A template store in `dir` holding a freshly built `python` template (the agent with numpy
/// imported). Built once per test process; later calls return the same store.
pub fn python_template(dir: &Path) -> forkvm_template::TemplateStore {
    static STORE: OnceLock<forkvm_template::TemplateStore> = OnceLock::new();
    built_once(&STORE, dir, forkvm_template::TemplateSpec::python("python"))
}

/// A template store in `dir` holding a freshly built `node` template (the Node.js agent with
/// the TypeScript compiler loaded). Built once per test process.
pub fn node_template(dir: &Path) -> forkvm_template::TemplateStore {
    static STORE: OnceLock<forkvm_template::TemplateStore> = OnceLock::new();
    built_once(&STORE, dir, forkvm_template::TemplateSpec::node("node"))
}

/// The store in `cell`, made on first use by building `spec` into `dir`.
fn built_once(
    cell: &'static OnceLock<forkvm_template::TemplateStore>,
    dir: &Path,
    spec: forkvm_template::TemplateSpec,
) -> forkvm_template::TemplateStore {
    cell.get_or_init(|| {
        let store = forkvm_template::TemplateStore::new(dir);
        let vmm = forkvm_vmm::Vmm::new().expect("opening /dev/kvm");
        forkvm_template::build(&store, &vmm, &spec, &mut |step| {
            eprintln!("testkit: {step}")
        })
        .unwrap_or_else(|e| panic!("building the {} template: {e}", spec.name));
        store
    })
    .clone()
}

/// SHA-256 of a file's contents, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path).expect("opening file to hash");
    std::io::copy(&mut file, &mut hasher).expect("hashing file");
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compiles C sources into static executables inside `root` (at `/name` for each
/// `(name, source)`), so tests can run small, exactly known programs.
pub fn compile_static(root: &Path, programs: &[(&str, &str)]) {
    for (name, source) in programs {
        let src = root.join(format!("{name}.c"));
        std::fs::write(&src, source).expect("writing C source");
        let status = Command::new("gcc")
            .args(["-static", "-O1", "-o"])
            .arg(root.join(name))
            .arg(&src)
            .status()
            .expect("running gcc (install it with scripts/setup.sh)");
        assert!(status.success(), "gcc failed for {name}");
        std::fs::remove_file(src).expect("removing C source");
    }
}

/// Packs `root` into an image inside `dir` and returns its path.
pub fn pack(root: &Path, dir: &Path) -> PathBuf {
    let image = dir.join("test.img");
    forkvm_image::build_image(root, &image).expect("packing the test image");
    image
}
