//! Writing into a template's filesystem before its program starts: the agents, a spec's
//! files, and packages staged on the host. What is written here is in the snapshot's
//! overlay, shared by every fork.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use forkvm_image::{Fs, FsError, NodeId};

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
/// recursively, symlinks as symlinks, modes kept. Nothing outside `from` is read.
pub fn copy_in(fs: &mut Fs, from: &Path, to: &str) -> Result<(), PlaceError> {
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
    copy_node(fs, from, &meta, dir, name.as_bytes())
}

fn copy_node(
    fs: &mut Fs,
    from: &Path,
    meta: &std::fs::Metadata,
    dir: NodeId,
    name: &[u8],
) -> Result<(), PlaceError> {
    let what = from.display().to_string();
    let io = |e: std::io::Error| PlaceError {
        what: what.clone(),
        reason: e.to_string(),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(io)?;
        if fs.lookup(dir, name).map_err(failed(&what))?.is_none() {
            fs.symlink(dir, name, target.as_os_str().as_bytes())
                .map_err(failed(&what))?;
        }
    } else if meta.is_dir() {
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
            copy_node(fs, &entry.path(), &meta, sub, entry.file_name().as_bytes())?;
        }
    } else if meta.is_file() {
        let data = std::fs::read(from).map_err(io)?;
        write_file(fs, dir, name, &data, mode)?;
    }
    // Sockets, FIFOs and devices are not copied.
    Ok(())
}
