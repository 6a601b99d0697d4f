//! Authentic artifacts: what this machine's forkvm built, nobody else changed.
//!
//! A digest stored beside the data it covers proves only that the two agree: whoever can
//! rewrite one can rewrite both. So each cache directory has a key (`seal.key`, 32 random
//! bytes, readable by its owner only), and what must be authentic carries an HMAC-SHA256
//! made with it: a template's `meta.json` (which holds the digests of its memory, state and
//! image, so the seal covers them all), and a stamp beside each large file that was
//! verified in full (`<file>.verified`). The stamp names the file's identity and change
//! time (device, inode, size, mtime, ctime): any write to the file changes its ctime, which
//! no unprivileged program can set back, so a stamp that still matches means the file is
//! unchanged since it was verified, and the next load can skip hashing hundreds of
//! megabytes.

use std::fs::File;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key file inside a cache directory.
const KEY_FILE: &str = "seal.key";
const KEY_LEN: usize = 32;

/// Seals with one cache directory's key.
#[derive(Clone)]
pub struct Sealer {
    key: [u8; KEY_LEN],
    key_path: PathBuf,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// The key of `cache_dir`, created (0600) on first use.
    pub fn open(cache_dir: &Path) -> std::io::Result<Sealer> {
        let key_path = cache_dir.join(KEY_FILE);
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => create_key(cache_dir, &key_path)?,
            Err(e) => return Err(e),
        };
        let key: [u8; KEY_LEN] = key.try_into().map_err(|_| {
            std::io::Error::new(
                ErrorKind::InvalidData,
                format!("{}: not a {KEY_LEN}-byte key", key_path.display()),
            )
        })?;
        Ok(Sealer { key, key_path })
    }

    /// Where the key lives (for messages).
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    /// The seal of `data` (hex).
    pub fn seal(&self, data: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(data);
        hex(&mac.finalize().into_bytes())
    }

    /// Whether `seal` is `data`'s seal (compared in constant time).
    pub fn check(&self, data: &[u8], seal: &str) -> bool {
        let Some(tag) = unhex(seal) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(data);
        mac.verify_slice(&tag).is_ok()
    }

    /// Whether `file` (open at `path`) was verified in full since it last changed.
    pub fn is_verified(&self, path: &Path, file: &File) -> bool {
        let Ok(identity) = identity(file) else {
            return false;
        };
        std::fs::read_to_string(stamp_path(path))
            .is_ok_and(|stamp| self.check(identity.as_bytes(), stamp.trim()))
    }

    /// Records that `file` (open at `path`) was just verified in full. Best effort: without
    /// the stamp the next load verifies again.
    pub fn record_verified(&self, path: &Path, file: &File) {
        if let Ok(identity) = identity(file) {
            let _ = write_private(&stamp_path(path), self.seal(identity.as_bytes()).as_bytes());
        }
    }
}

/// Where the stamp of `path` lives.
pub fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

/// What changes whenever the file's content can have changed.
fn identity(file: &File) -> std::io::Result<String> {
    let m = file.metadata()?;
    Ok(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

fn create_key(dir: &Path, path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::create_dir_all(dir)?;
    let mut key = vec![0u8; KEY_LEN];
    forkvm_kernel::entropy::host_random(&mut key);
    let mut tmp = tempfile::Builder::new().prefix(".seal-").tempfile_in(dir)?;
    tmp.write_all(&key)?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(key),
        // Another process made it first: use theirs.
        Err(e) if e.error.kind() == ErrorKind::AlreadyExists => std::fs::read(path),
        Err(e) => Err(e.error),
    }
}

/// Replaces `path` with `data` through a 0600 temporary file beside it.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".stamp-")
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_check_and_keys_persist() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::open(dir.path()).unwrap();
        let seal = sealer.seal(b"meta");
        assert!(sealer.check(b"meta", &seal));
        assert!(!sealer.check(b"meta!", &seal));
        assert!(!sealer.check(b"meta", "zz"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(sealer.key_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The same directory, the same key; another directory, another key.
        assert!(Sealer::open(dir.path()).unwrap().check(b"meta", &seal));
        let other = tempfile::tempdir().unwrap();
        assert!(!Sealer::open(other.path()).unwrap().check(b"meta", &seal));
    }

    #[test]
    fn a_stamp_lasts_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::open(dir.path()).unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"verified bytes").unwrap();
        let file = File::open(&path).unwrap();
        assert!(!sealer.is_verified(&path, &file));
        sealer.record_verified(&path, &file);
        assert!(sealer.is_verified(&path, &file));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert!(!sealer.is_verified(&path, &File::open(&path).unwrap()));
    }
}
