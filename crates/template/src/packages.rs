//! Packages from PyPI and npm for a template, fetched on the host at build time (never at
//! run time) and copied into the template's filesystem.
//!
//! PyPI packages are installed by the host's Debian `python3 -m pip` into a staging
//! directory, wheels only: the host's Python is the sandbox's (Debian 12's 3.11, the same
//! glibc), so pip picks the wheels the sandbox can load, and no package's build code runs
//! on the host. npm packages are installed by the host's `npm`, their install scripts not
//! run (the host is not the sandbox). Both report what they resolved, which the template
//! records, and what pins it (`lock`): pip's wheel hashes, npm's lock file. The same
//! packages give the same bytes in every build (`compile_python`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where PyPI packages go in the sandbox (on Debian's `sys.path`).
pub const PYPI_DIR: &str = "/usr/local/lib/python3.11/dist-packages";
/// Where npm packages go in the sandbox: `/node_modules` is found by `require` and `import`
/// from every directory.
pub const NPM_DIR: &str = "/node_modules";

/// Why packages could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("invalid package requirement {0:?}")]
    Invalid(String),
    #[error("running {tool}: {source} (scripts/setup.sh installs it)")]
    Spawn {
        tool: &'static str,
        source: io::Error,
    },
    #[error("{tool} could not install {packages}:\n{output}")]
    Failed {
        tool: &'static str,
        packages: String,
        output: String,
    },
    #[error("reading what {tool} resolved: {reason}")]
    Report { tool: &'static str, reason: String },
    #[error("staging directory: {0}")]
    Io(#[from] io::Error),
}

/// Packages installed in a host directory, to be copied to `guest_dir`.
pub struct Staged {
    _dir: tempfile::TempDir,
    /// The tree to copy.
    pub tree: PathBuf,
    pub guest_dir: &'static str,
    /// What was resolved, as `name==version` (PyPI) or `name@version` (npm), sorted.
    pub resolved: Vec<String>,
    /// What pins it, for a lock.
    pub pins: Pins,
}

/// What pins a staged set of packages (see `lock::Lock`).
pub enum Pins {
    /// `name==version --hash=sha256:HEX` lines, sorted.
    Pypi(Vec<String>),
    /// npm's `package.json` and `package-lock.json`.
    Npm { manifest: String, lock: String },
}

/// A requirement is a package name with an optional version constraint: letters, digits,
/// and `. _ - = < > ! ~ , @ / [ ] ^ *`; never an option or a path.
fn check(requirement: &str) -> Result<(), PackageError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-=<>!~,@/[]^*".contains(c);
    if requirement.is_empty()
        || requirement.starts_with('-')
        || requirement.starts_with('.')
        || requirement.starts_with('/')
        || !requirement.chars().all(allowed)
    {
        return Err(PackageError::Invalid(requirement.to_string()));
    }
    Ok(())
}

fn run(tool: &'static str, command: &mut Command, packages: &[String]) -> Result<(), PackageError> {
    let output = command
        .output()
        .map_err(|source| PackageError::Spawn { tool, source })?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    Err(PackageError::Failed {
        tool,
        packages: packages.join(" "),
        output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

/// Installs `requirements` (and their dependencies) from PyPI, wheels only; or, with
/// `locked` lines (`lock::pinned_requirement`), exactly those wheels and nothing else.
pub fn stage_pypi(
    requirements: &[String],
    locked: Option<&[String]>,
) -> Result<Staged, PackageError> {
    requirements.iter().try_for_each(|r| check(r))?;
    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("site-packages");
    let report = dir.path().join("report.json");
    let mut pip = Command::new("/usr/bin/python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--no-input",
        "--disable-pip-version-check",
    ])
    .args([
        "--quiet",
        "--only-binary=:all:",
        "--no-warn-script-location",
    ])
    .arg("--target")
    .arg(&tree)
    .arg("--report")
    .arg(&report)
    .arg("--no-compile")
    .env("PIP_ROOT_USER_ACTION", "ignore");
    match locked {
        Some(lines) => {
            if let Some(bad) = lines.iter().find(|l| !crate::lock::pinned_requirement(l)) {
                return Err(PackageError::Invalid(bad.clone()));
            }
            let file = dir.path().join("requirements.txt");
            std::fs::write(&file, lines.join("\n") + "\n")?;
            pip.args(["--no-deps", "--require-hashes", "-r"]).arg(file);
        }
        None => {
            pip.arg("--").args(requirements);
        }
    }
    run("pip", &mut pip, requirements)?;
    compile_python(&tree)?;
    let (resolved, pinned) = pip_report(&report)?;
    Ok(Staged {
        _dir: dir,
        tree,
        guest_dir: PYPI_DIR,
        resolved,
        pins: Pins::Pypi(pinned),
    })
}

/// Compiles the staged Python files as the sandbox will find them: named by their sandbox
/// paths, hash-checked (no times inside), with a fixed hash seed (set constants in a fixed
/// order), so the same packages give the same bytes. pip's own compiling names each file by
/// a random host directory. A file that does not compile (code for another Python) is left
/// to be compiled, or fail, at import, as pip leaves it.
fn compile_python(tree: &Path) -> Result<(), PackageError> {
    Command::new("/usr/bin/python3")
        .args(["-m", "compileall", "-q", "-d", PYPI_DIR])
        .args(["--invalidation-mode", "checked-hash"])
        .arg(tree)
        .env("PYTHONHASHSEED", "0")
        .output()
        .map_err(|source| PackageError::Spawn {
            tool: "python3 -m compileall",
            source,
        })?;
    Ok(())
}

/// What pip's report says it installed: `name==version`, and the same pinned with the
/// wheel's hash.
fn pip_report(path: &Path) -> Result<(Vec<String>, Vec<String>), PackageError> {
    let bad = |reason: String| PackageError::Report {
        tool: "pip",
        reason,
    };
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| bad(e.to_string()))?;
    let installs = report["install"]
        .as_array()
        .ok_or_else(|| bad("no \"install\" list".into()))?;
    let mut resolved = Vec::new();
    let mut pinned = Vec::new();
    for install in installs {
        let meta = &install["metadata"];
        let name = meta["name"].as_str().unwrap_or("?");
        let version = meta["version"].as_str().unwrap_or("?");
        let archive = &install["download_info"]["archive_info"];
        let hash = archive["hashes"]["sha256"].as_str().or_else(|| {
            archive["hash"]
                .as_str()
                .and_then(|h| h.strip_prefix("sha256="))
        });
        let hash = hash.ok_or_else(|| bad(format!("no sha256 for {name}")))?;
        resolved.push(format!("{name}=={version}"));
        pinned.push(format!("{name}=={version} --hash=sha256:{hash}"));
    }
    resolved.sort();
    pinned.sort();
    Ok((resolved, pinned))
}

/// Installs `packages` (and their dependencies) from npm; or, with a `locked` manifest and
/// lock file, exactly what they name (`npm ci`, which checks every package's hash).
pub fn stage_npm(
    packages: &[String],
    locked: Option<(&str, &str)>,
) -> Result<Staged, PackageError> {
    packages.iter().try_for_each(|p| check(p))?;
    let dir = tempfile::tempdir()?;
    let mut npm = Command::new("npm");
    match locked {
        Some((manifest, lock)) => {
            std::fs::write(dir.path().join("package.json"), manifest)?;
            std::fs::write(dir.path().join("package-lock.json"), lock)?;
            npm.arg("ci");
        }
        None => {
            npm.arg("install");
        }
    }
    npm.args([
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        "--omit=dev",
        "--ignore-scripts",
    ])
    .arg("--prefix")
    .arg(dir.path());
    if locked.is_none() {
        npm.arg("--").args(packages);
    }
    run("npm", &mut npm, packages)?;
    let lock_path = dir.path().join("package-lock.json");
    let resolved = npm_lock(&lock_path)?;
    let pins = Pins::Npm {
        manifest: std::fs::read_to_string(dir.path().join("package.json"))?,
        lock: std::fs::read_to_string(&lock_path)?,
    };
    Ok(Staged {
        tree: dir.path().join("node_modules"),
        _dir: dir,
        guest_dir: NPM_DIR,
        resolved,
        pins,
    })
}

fn npm_lock(path: &Path) -> Result<Vec<String>, PackageError> {
    let bad = |reason: String| PackageError::Report {
        tool: "npm",
        reason,
    };
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| bad(e.to_string()))?;
    let packages = lock["packages"]
        .as_object()
        .ok_or_else(|| bad("no \"packages\" map".into()))?;
    let mut resolved: Vec<String> = packages
        .iter()
        .filter_map(|(key, value)| {
            let name = key
                .rsplit("node_modules/")
                .next()
                .filter(|n| !n.is_empty())?;
            Some(format!(
                "{name}@{}",
                value["version"].as_str().unwrap_or("?")
            ))
        })
        .collect();
    resolved.sort();
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_are_names_and_versions_never_options_or_paths() {
        for good in [
            "faker",
            "httpx==0.28.1",
            "numpy>=1.20,<3",
            "lodash@4",
            "@types/node",
        ] {
            assert!(check(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-e",
            "--index-url=x",
            "./local",
            "/etc",
            "a b",
            "x;rm",
            "$(id)",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lock_files_list_what_was_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("package-lock.json");
        std::fs::write(
            &lock,
            r#"{"packages": {"": {"name": "x"}, "node_modules/lodash": {"version": "4.18.1"},
                "node_modules/@scope/a": {"version": "1.0.0"}}}"#,
        )
        .unwrap();
        assert_eq!(
            npm_lock(&lock).unwrap(),
            ["@scope/a@1.0.0", "lodash@4.18.1"]
        );
        let report = dir.path().join("report.json");
        std::fs::write(
            &report,
            format!(
                r#"{{"install": [{{"metadata": {{"name": "httpx", "version": "0.28.1"}},
                  "download_info": {{"archive_info": {{"hashes": {{"sha256": "{}"}}}}}}}},
                {{"metadata": {{"name": "Faker", "version": "40.0"}},
                  "download_info": {{"archive_info": {{"hash": "sha256={}"}}}}}}]}}"#,
                "a".repeat(64),
                "b".repeat(64)
            ),
        )
        .unwrap();
        let (resolved, pinned) = pip_report(&report).unwrap();
        assert_eq!(resolved, ["Faker==40.0", "httpx==0.28.1"]);
        assert_eq!(
            pinned,
            [
                format!("Faker==40.0 --hash=sha256:{}", "b".repeat(64)),
                format!("httpx==0.28.1 --hash=sha256:{}", "a".repeat(64))
            ]
        );
    }
}
