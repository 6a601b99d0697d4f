//! Packages from PyPI and npm for a template, fetched on the host at build time (never at
//! run time) and copied into the template's filesystem.
//!
//! PyPI packages are installed by the host's Debian `python3 -m pip` into a staging
//! directory, wheels only: the host's Python is the sandbox's (Debian 12's 3.11, the same
//! glibc), so pip picks the wheels the sandbox can load, and no package's build code runs
//! on the host. npm packages are installed by the host's `npm`. Both report what they
//! resolved, which the template records.

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

/// Installs `requirements` (and their dependencies) from PyPI, wheels only.
pub fn stage_pypi(requirements: &[String]) -> Result<Staged, PackageError> {
    requirements.iter().try_for_each(|r| check(r))?;
    let dir = tempfile::tempdir()?;
    let tree = dir.path().join("site-packages");
    let report = dir.path().join("report.json");
    run(
        "pip",
        Command::new("/usr/bin/python3")
            .args([
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
            .arg("--")
            .args(requirements)
            .env("PIP_ROOT_USER_ACTION", "ignore"),
        requirements,
    )?;
    let resolved = pip_report(&report)?;
    Ok(Staged {
        _dir: dir,
        tree,
        guest_dir: PYPI_DIR,
        resolved,
    })
}

fn pip_report(path: &Path) -> Result<Vec<String>, PackageError> {
    let bad = |reason: String| PackageError::Report {
        tool: "pip",
        reason,
    };
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| bad(e.to_string()))?;
    let installs = report["install"]
        .as_array()
        .ok_or_else(|| bad("no \"install\" list".into()))?;
    let mut resolved: Vec<String> = installs
        .iter()
        .map(|i| {
            let meta = &i["metadata"];
            format!(
                "{}=={}",
                meta["name"].as_str().unwrap_or("?"),
                meta["version"].as_str().unwrap_or("?")
            )
        })
        .collect();
    resolved.sort();
    Ok(resolved)
}

/// Installs `packages` (and their dependencies) from npm.
pub fn stage_npm(packages: &[String]) -> Result<Staged, PackageError> {
    packages.iter().try_for_each(|p| check(p))?;
    let dir = tempfile::tempdir()?;
    run(
        "npm",
        Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--omit=dev",
            ])
            .arg("--prefix")
            .arg(dir.path())
            .arg("--")
            .args(packages),
        packages,
    )?;
    let resolved = npm_lock(&dir.path().join("package-lock.json"))?;
    Ok(Staged {
        tree: dir.path().join("node_modules"),
        _dir: dir,
        guest_dir: NPM_DIR,
        resolved,
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
            r#"{"install": [{"metadata": {"name": "httpx", "version": "0.28.1"}},
                {"metadata": {"name": "Faker", "version": "40.0"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            pip_report(&report).unwrap(),
            ["Faker==40.0", "httpx==0.28.1"]
        );
    }
}
