//! Writing into a template's filesystem before its program starts: the agents, a spec's
//! files, and packages staged on the host. What is written here is in the snapshot's
//! overlay, shared by every fork.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use forkvm_image::{Fs, FsError, NodeId};
use sha2::{Digest, Sha256};

/// A digest of a template's filesystem before its program starts: the image's digest, then
/// every file, directory and link a build adds over it (path, kind, mode and bytes, never
/// times), in the order added, which is deterministic. Two builds that install the same
/// packages and files over the same image have the same digest (`build::lock`).
pub struct Contents(Sha256);

impl Contents {
    pub fn new(image_digest: &str) -> Contents {
        let mut hasher = Sha256::new();
        hasher.update(image_digest.as_bytes());
        Contents(hasher)
    }

    fn entry(&mut self, kind: u8, path: &[u8], mode: u32, data: &[u8]) {
        self.0.update([kind]);
        self.0.update((path.len() as u64).to_le_bytes());
        self.0.update(path);
        self.0.update(mode.to_le_bytes());
        self.0.update((data.len() as u64).to_le_bytes());
        self.0.update(data);
    }

    /// A file written at `path`.
    pub fn file(&mut self, path: &[u8], mode: u32, data: &[u8]) {
        self.entry(b'f', path, mode, data);
    }

    /// The digest, in hex.
    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Why something could not be placed.
#[derive(Debug, thiserror::Error)]
#[error("placing {what}: {reason}")]
pub struct PlaceError {
    pub what: String,
    pub reason: String,
}

fn failed(what: &str) -> impl Fn(FsError) -> PlaceError + '_ {
    move |e| PlaceError {
        what: what.to_string(),
        reason: e.to_string(),
    }
}

/// The directory at absolute `path`, made (with its parents) where missing.
pub fn make_dirs(fs: &mut Fs, path: &str) -> Result<NodeId, PlaceError> {
    let mut dir = fs.root();
    for name in path.split('/').filter(|n| !n.is_empty()) {
        dir = match fs.lookup(dir, name.as_bytes()).map_err(failed(path))? {
            Some(node) => node,
            None => fs
                .mkdir(dir, name.as_bytes(), 0o755)
                .map_err(failed(path))?,
        };
    }
    Ok(dir)
}

/// Writes `data` as the file `name` in `dir` (replacing one of that name).
pub fn write_file(
    fs: &mut Fs,
    dir: NodeId,
    name: &[u8],
    data: &[u8],
    mode: u32,
) -> Result<(), PlaceError> {
    let what = String::from_utf8_lossy(name).into_owned();
    if fs.lookup(dir, name).map_err(failed(&what))?.is_some() {
        fs.unlink(dir, name).map_err(failed(&what))?;
    }
    let file = fs.create_file(dir, name, mode).map_err(failed(&what))?;
    fs.write_at(file, 0, data).map_err(failed(&what))?;
    Ok(())
}

/// Copies the host file or directory `from` to the absolute sandbox path `to`: directories
/// recursively, symlinks as symlinks, modes kept; each is added to `contents`. Nothing
/// outside `from` is read.
pub fn copy_in(
    fs: &mut Fs,
    from: &Path,
    to: &str,
    contents: &mut Contents,
) -> Result<(), PlaceError> {
    let io = |e: std::io::Error| PlaceError {
        what: from.display().to_string(),
        reason: e.to_string(),
    };
    let meta = std::fs::symlink_metadata(from).map_err(io)?;
    let (parent, name) = match to.trim_end_matches('/').rsplit_once('/') {
        Some((parent, name)) if !name.is_empty() => (parent, name),
        _ => {
            return Err(PlaceError {
                what: to.to_string(),
                reason: "not a path to a file or directory".into(),
            });
        }
    };
    let dir = make_dirs(fs, parent)?;
    let path = to.trim_end_matches('/').as_bytes().to_vec();
    copy_node(fs, from, &meta, dir, name.as_bytes(), &path, contents)
}

/// Copies `from` as `name` in `dir` (sandbox path `path`).
fn copy_node(
    fs: &mut Fs,
    from: &Path,
    meta: &std::fs::Metadata,
    dir: NodeId,
    name: &[u8],
    path: &[u8],
    contents: &mut Contents,
) -> Result<(), PlaceError> {
    let what = from.display().to_string();
    let io = |e: std::io::Error| PlaceError {
        what: what.clone(),
        reason: e.to_string(),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(io)?;
        contents.entry(b'l', path, 0, target.as_os_str().as_bytes());
        if fs.lookup(dir, name).map_err(failed(&what))?.is_none() {
            fs.symlink(dir, name, target.as_os_str().as_bytes())
                .map_err(failed(&what))?;
        }
    } else if meta.is_dir() {
        contents.entry(b'd', path, mode, &[]);
        let sub = match fs.lookup(dir, name).map_err(failed(&what))? {
            Some(node) => node,
            None => fs.mkdir(dir, name, mode).map_err(failed(&what))?,
        };
        let mut entries: Vec<_> = std::fs::read_dir(from)
            .map_err(io)?
            .collect::<Result<_, _>>()
            .map_err(io)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let meta = std::fs::symlink_metadata(entry.path()).map_err(io)?;
            let name = entry.file_name();
            let child = [path, b"/", name.as_bytes()].concat();
            copy_node(
                fs,
                &entry.path(),
                &meta,
                sub,
                name.as_bytes(),
                &child,
                contents,
            )?;
        }
    } else if meta.is_file() {
        let data = std::fs::read(from).map_err(io)?;
        contents.file(path, mode, &data);
        write_file(fs, dir, name, &data, mode)?;
    }
    // Sockets, FIFOs and devices are not copied.
    Ok(())
}
