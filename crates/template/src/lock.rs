//! Template locks: what a build from a spec resolved, pinned, so that building again with
//! the lock installs exactly the same packages and gives the same content digest.
//!
//! `forkvm template build NAME --spec template.toml --lock template.lock` writes the lock
//! when the file does not exist, and builds from it when it does:
//! - PyPI: every distribution installed, with the SHA-256 of its wheel; pip installs those
//!   and nothing else (`--no-deps --require-hashes`), so a re-uploaded file is refused;
//! - npm: the `package.json` and `package-lock.json` npm wrote, installed with `npm ci`
//!   (which checks each package's integrity hash);
//! - the digest of the image (Debian's packages) and of the whole filesystem before the
//!   entry program runs: a rebuild that would differ stops before it runs anything, naming
//!   what changed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest lock file read (package-lock.json of a large tree is a few MiB).
const MAX_LOCK_BYTES: u64 = 16 << 20;

/// A template's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// The digest of the template's filesystem before its entry ran
    /// (`SnapshotMeta::content_sha256`).
    pub content_sha256: String,
    /// The root filesystem image's digest (the Debian packages).
    pub image_sha256: String,
    /// The spec's digest: a lock pins the spec it was made from.
    #[serde(default)]
    pub spec_sha256: Option<String>,
    /// PyPI distributions as requirement lines: `name==version --hash=sha256:HEX`.
    #[serde(default)]
    pub pypi: Vec<String>,
    /// npm's manifest and lock file, as npm wrote them.
    #[serde(default)]
    pub npm_package_json: Option<String>,
    #[serde(default)]
    pub npm_package_lock: Option<String>,
}

/// Why a lock could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("reading the lock {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the lock {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "the rebuilt template would differ from its lock: {what} (lock {locked}, now {now}); \
         delete the lock to accept the new versions"
    )]
    Differs {
        what: &'static str,
        locked: String,
        now: String,
    },
}

impl Lock {
    /// Reads and checks the lock at `path`.
    pub fn load(path: &Path) -> Result<Lock, LockError> {
        let read = |source| LockError::Read {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| LockError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if std::fs::metadata(path).map_err(read)?.len() > MAX_LOCK_BYTES {
            return Err(invalid(format!("larger than {MAX_LOCK_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Lock::parse(&text).map_err(invalid)
    }

    /// A lock from its TOML text, checked.
    pub fn parse(text: &str) -> Result<Lock, String> {
        if text.len() as u64 > MAX_LOCK_BYTES {
            return Err(format!("larger than {MAX_LOCK_BYTES} bytes"));
        }
        let lock: Lock = toml::from_str(text).map_err(|e| e.to_string())?;
        lock.check()?;
        Ok(lock)
    }

    /// The lock as TOML, with a header saying what it is.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("a lock serializes");
        format!(
            "# forkvm template lock: what the build resolved. Building with it again installs\n\
             # exactly these packages; delete it to take new versions.\n{body}"
        )
    }

    /// Lines are exactly `name==version --hash=sha256:HEX` (pip reads them as a
    /// requirements file, where anything else could be an option); the npm files are JSON.
    fn check(&self) -> Result<(), String> {
        for line in &self.pypi {
            if !pinned_requirement(line) {
                return Err(format!("not a pinned requirement with a hash: {line:?}"));
            }
        }
        for (name, text) in [
            ("npm_package_json", &self.npm_package_json),
            ("npm_package_lock", &self.npm_package_lock),
        ] {
            if let Some(text) = text {
                serde_json::from_str::<serde_json::Value>(text)
                    .map_err(|e| format!("{name} is not JSON: {e}"))?;
            }
        }
        if self.npm_package_json.is_some() != self.npm_package_lock.is_some() {
            return Err("npm_package_json and npm_package_lock go together".into());
        }
        Ok(())
    }

    /// Fails unless `what` is the same now as when locked.
    pub fn expect_same(what: &'static str, locked: &str, now: &str) -> Result<(), LockError> {
        if locked == now {
            return Ok(());
        }
        Err(LockError::Differs {
            what,
            locked: locked.to_string(),
            now: now.to_string(),
        })
    }
}

/// `name==version --hash=sha256:HEX`, with a PyPI project name and version.
pub fn pinned_requirement(line: &str) -> bool {
    let Some((requirement, hash)) = line.split_once(" --hash=sha256:") else {
        return false;
    };
    let Some((name, version)) = requirement.split_once("==") else {
        return false;
    };
    let name_ok = !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let version_ok = !version.is_empty()
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+!_-".contains(c));
    let hash_ok = hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit());
    name_ok && version_ok && hash_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_pinned_hashed_requirements_are_accepted() {
        assert!(pinned_requirement(&format!(
            "Faker==40.0 --hash=sha256:{HASH}"
        )));
        assert!(pinned_requirement(&format!(
            "typing_extensions==4.12.2 --hash=sha256:{HASH}"
        )));
        for bad in [
            "faker==40.0".to_string(),
            format!("faker>=40 --hash=sha256:{HASH}"),
            format!("-r x==1 --hash=sha256:{HASH}"),
            format!("faker==40.0 --hash=sha256:{HASH} --index-url=http://x"),
            format!("faker==40.0; os_name=='x' --hash=sha256:{HASH}"),
            "faker==40.0 --hash=sha256:abc".to_string(),
        ] {
            assert!(!pinned_requirement(&bad), "{bad}");
        }
    }

    #[test]
    fn a_lock_survives_writing_and_reading() {
        let lock = Lock {
            content_sha256: "c".repeat(64),
            image_sha256: "i".repeat(64),
            spec_sha256: Some("s".repeat(64)),
            pypi: vec![format!("six==1.16.0 --hash=sha256:{HASH}")],
            npm_package_json: Some("{\"dependencies\": {\"a\": \"^1\"}}".into()),
            npm_package_lock: Some("{\"lockfileVersion\": 3,\n\"packages\": {}}\n".into()),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.lock");
        std::fs::write(&path, lock.to_toml()).unwrap();
        assert_eq!(Lock::load(&path).unwrap(), lock);
        std::fs::write(
            &path,
            "pypi = [\"--index-url=http://evil\"]\ncontent_sha256 = \"\"\nimage_sha256 = \"\"\n",
        )
        .unwrap();
        assert!(
            Lock::load(&path)
                .unwrap_err()
                .to_string()
                .contains("index-url")
        );
    }
}
