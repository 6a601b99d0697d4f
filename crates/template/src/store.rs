//! Where templates live: `<cache>/templates/<name>/` holding one snapshot each. Creation is
//! atomic (a temporary directory renamed into place), so a reader never sees half a
//! template and a failed build leaves the previous one intact.

use std::fs;
use std::path::{Path, PathBuf};

use forkvm_vmm::{ForkSource, Vmm};

use crate::seal::Sealer;
use crate::snapshot::{self, SnapshotError, SnapshotMeta};

/// Why a template operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid template name {0:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    #[error("no template named {0:?} (build it with `forkvm template build {0}`)")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error("opening the image: {0}")]
    Image(#[from] forkvm_image::ImageError),
    #[error(transparent)]
    Vmm(#[from] forkvm_vmm::VmmError),
    #[error("starting the entry program: {0}")]
    Spawn(#[from] forkvm_kernel::SpawnError),
    #[error("installing the agent: {0}")]
    Agent(String),
    #[error(transparent)]
    Packages(#[from] crate::packages::PackageError),
    #[error(transparent)]
    Place(#[from] crate::overlay::PlaceError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(
        "the entry program ended ({exit}) before reading its first request; its output:\n{output}"
    )]
    EntryEnded { exit: String, output: String },
    #[error(
        "{count} paused session(s) are layered over template {name:?}: rebuilding or deleting it would leave them unable to resume; delete them first (DELETE /v1/sandboxes/ID)"
    )]
    PausedSessions { name: String, count: usize },
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether `name` is a valid template name (it becomes a directory name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A template's name and its metadata, or why that cannot be read.
pub type Listed = (String, Result<SnapshotMeta, SnapshotError>);

/// The templates under one cache directory.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    cache_dir: PathBuf,
    root: PathBuf,
}

impl TemplateStore {
    /// The store under `cache_dir` (see `rootfs::default_cache_dir`).
    pub fn new(cache_dir: &Path) -> TemplateStore {
        TemplateStore {
            cache_dir: cache_dir.to_owned(),
            root: cache_dir.join("templates"),
        }
    }

    /// The cache directory's sealing key (created on first use).
    pub fn sealer(&self) -> Result<Sealer, StoreError> {
        Sealer::open(&self.cache_dir).map_err(|e| StoreError::Snapshot(SnapshotError::Key(e)))
    }

    /// The directory of template `name`.
    pub fn dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    /// Template names with their metadata (or why it cannot be read), sorted by name.
    pub fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&self.root)(e)),
        };
        let mut templates = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error(&self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_name(&name) && entry.path().is_dir() {
                templates.push((name, snapshot::read_meta(&entry.path())));
            }
        }
        templates.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(templates)
    }

    /// The metadata of template `name`.
    pub fn show(&self, name: &str) -> Result<SnapshotMeta, StoreError> {
        let dir = self.existing(name)?;
        Ok(snapshot::read_meta(&dir)?)
    }

    /// Loads and verifies template `name` for forking.
    pub fn load(&self, name: &str, vmm: &Vmm) -> Result<(SnapshotMeta, ForkSource), StoreError> {
        let dir = self.existing(name)?;
        Ok(snapshot::load(&dir, vmm, &self.sealer()?)?)
    }

    /// Verifies template `name` in full as `load` does, without loading it for forking.
    pub fn verify(&self, name: &str, vmm: &Vmm) -> Result<SnapshotMeta, StoreError> {
        let dir = self.existing(name)?;
        Ok(snapshot::verify(&dir, vmm, &self.sealer()?)?)
    }

    /// Refuses to replace or delete template `name` while paused sessions are layered over
    /// its memory (running forks hold its files open; paused ones need them on disk).
    fn check_unused(&self, name: &str) -> Result<(), StoreError> {
        if !self.cache_dir.join("sessions").is_dir() {
            return Ok(());
        }
        let store =
            crate::paused::PausedStore::open(&self.cache_dir).map_err(|e| StoreError::Io {
                path: self.cache_dir.join("sessions"),
                source: std::io::Error::other(e.to_string()),
            })?;
        match store.sessions_over(name) {
            0 => Ok(()),
            count => Err(StoreError::PausedSessions {
                name: name.to_string(),
                count,
            }),
        }
    }

    /// Deletes template `name`. Running forks keep working: they hold the memory file open.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.existing(name)?;
        self.check_unused(name)?;
        fs::remove_dir_all(&dir).map_err(io_error(&dir))
    }

    fn existing(&self, name: &str) -> Result<PathBuf, StoreError> {
        let dir = self.dir(name)?;
        if !dir.is_dir() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(dir)
    }

    /// Creates template `name` by running `fill` on a fresh directory, then moving it into
    /// place (replacing an existing template of that name).
    pub fn create<T>(
        &self,
        name: &str,
        fill: impl FnOnce(&Path) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let dir = self.dir(name)?;
        if dir.exists() {
            self.check_unused(name)?;
        }
        fs::create_dir_all(&self.root).map_err(io_error(&self.root))?;
        let staging = self
            .root
            .join(format!(".staging-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir(&staging).map_err(io_error(&staging))?;
        let result = fill(&staging);
        let value = match result {
            Ok(value) => value,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let retired = self
            .root
            .join(format!(".retired-{name}-{}", std::process::id()));
        if dir.exists() {
            fs::rename(&dir, &retired).map_err(io_error(&dir))?;
        }
        fs::rename(&staging, &dir).map_err(io_error(&dir))?;
        let _ = fs::remove_dir_all(&retired);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("python"));
        assert!(valid_name("py-3.11_numpy"));
        for bad in ["", ".hidden", "a/b", "..", "x y", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn create_is_atomic_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(tmp.path());
        store
            .create("t", |dir| {
                fs::write(dir.join("memory"), b"one").unwrap();
                Ok(())
            })
            .unwrap();
        let failed: Result<(), _> = store.create("t", |dir| {
            fs::write(dir.join("memory"), b"two").unwrap();
            Err(StoreError::Agent("boom".into()))
        });
        assert!(failed.is_err());
        assert_eq!(
            fs::read(store.dir("t").unwrap().join("memory")).unwrap(),
            b"one"
        );
        store
            .create("t", |dir| {
                fs::write(dir.join("memory"), b"three").unwrap();
                Ok(())
            })
            .unwrap();
        assert_eq!(
            fs::read(store.dir("t").unwrap().join("memory")).unwrap(),
            b"three"
        );
        assert_eq!(
            fs::read_dir(tmp.path().join("templates")).unwrap().count(),
            1
        );
        assert!(matches!(store.remove("u"), Err(StoreError::NotFound(_))));
        store.remove("t").unwrap();
        assert!(store.list().unwrap().is_empty());
    }
}
