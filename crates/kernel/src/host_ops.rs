//! What the host does to a parked process between runs: set a request's limits, place its
//! files, and read back what happened (limit refusals, unsupported syscalls).

use forkvm_image::{FsError, Kind};

use crate::console::Console;
use crate::process::Process;
use forkvm_memory::ram::GuestRam;

/// Why a file could not be read from the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Fs { path: String, source: FsError },
    #[error("{path}: not a regular file")]
    NotAFile { path: String },
    #[error("{path}: {size} bytes is more than the {max}-byte limit")]
    TooLarge { path: String, size: u64, max: u64 },
}

/// Why a file could not be placed into the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("{path}: path must be absolute and name a file")]
    BadPath { path: String },
    #[error("{path}: {source}")]
    Fs { path: String, source: FsError },
}

impl Process {
    /// Host memory this sandbox holds of its own: private copies of guest pages (in its
    /// mappings, the system area and its page tables), unmapped pages kept for reuse, and
    /// the data of the files it wrote. Pages it shares with its template or layers (read,
    /// never written) are not counted; neither are the bounded buffers of its pipes and
    /// sockets.
    pub fn host_bytes(&self) -> u64 {
        self.private_ram_bytes() + self.kept_and_file_bytes()
    }

    /// The private guest pages of `host_bytes`, in every process's memory, and the shared
    /// memory segments (walks the host's page map of everything mapped: the costly part).
    pub fn private_ram_bytes(&self) -> u64 {
        let pages: u64 = self.private_ram_by_process().iter().map(|(_, b)| b).sum();
        pages + self.segments.resident_bytes()
    }

    /// The rest of `host_bytes`: unmapped pages kept for reuse (in every process's memory),
    /// and file data (cheap).
    pub fn kept_and_file_bytes(&self) -> u64 {
        let retained: u64 = self.all_ram().map(GuestRam::retained_bytes).sum();
        retained + self.fs.used_bytes()
    }

    /// Bytes the program has mapped (what the memory limit counts).
    pub fn mapped_bytes(&self) -> u64 {
        self.mm.charged_bytes()
    }

    /// Lets the program have at most `base + extra` bytes mapped (its heap, arrays,
    /// buffers beyond `base`), within guest RAM. A fresh fork passes what it has mapped
    /// now; a session what it had mapped when it was created, so that its requests
    /// together stay within one limit instead of each adding its own.
    /// The same number is the budget of host pages all its processes may hold together
    /// (`memory_budget`).
    pub fn limit_memory(&mut self, base: u64, extra: u64) {
        let limit = base.saturating_add(extra).min(self.ram.size());
        self.mm.set_limit_bytes(limit);
        self.set_memory_budget(limit);
    }

    /// Caps the descriptor table (`RLIMIT_NOFILE`).
    pub fn limit_open_files(&mut self, max: usize) {
        self.files.set_max_fds(max);
    }

    /// How many allocations the memory limit refused, and processes the sandbox-wide
    /// budget killed.
    pub fn memory_limit_refusals(&self) -> u64 {
        self.mm.limit_refusals() + self.memory_budget_kills()
    }

    /// Replaces the standard streams (a fork of a session gets its own).
    pub fn replace_console(&mut self, console: Console) {
        self.console = console;
    }

    /// Reads a whole file from the sandbox's filesystem (symlinks followed, relative paths
    /// from the root), refusing files larger than `max` bytes.
    pub fn read_file(&self, path: &str, max: u64) -> Result<Vec<u8>, ReadError> {
        let fs_error = |source| ReadError::Fs {
            path: path.to_string(),
            source,
        };
        let node = self
            .fs
            .resolve(b"/", path.as_bytes(), true)
            .map_err(fs_error)?
            .node;
        let stat = self.fs.stat(node).map_err(fs_error)?;
        if stat.kind != Kind::File {
            return Err(ReadError::NotAFile {
                path: path.to_string(),
            });
        }
        if stat.size > max {
            return Err(ReadError::TooLarge {
                path: path.to_string(),
                size: stat.size,
                max,
            });
        }
        Ok(self.fs.contents(node).map_err(fs_error)?.to_vec())
    }

    /// Makes directory `path` (absolute, without `..`) and its parents where missing, as
    /// `mkdir -p` would; an error if a component exists and is not a directory.
    pub fn make_dirs(&mut self, path: &str) -> Result<(), PlaceError> {
        let components: Vec<&[u8]> = path
            .as_bytes()
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        if !path.starts_with('/') || components.contains(&&b".."[..]) {
            return Err(PlaceError::BadPath {
                path: path.to_string(),
            });
        }
        self.make_dir_path(&components)
            .map(|_| ())
            .map_err(|source| PlaceError::Fs {
                path: path.to_string(),
                source,
            })
    }

    /// Walks `components` from the root, making the directories that are missing.
    fn make_dir_path(&mut self, components: &[&[u8]]) -> Result<forkvm_image::NodeId, FsError> {
        let mut dir = self.fs.root();
        for component in components.iter().filter(|c| **c != b".") {
            dir = match self.fs.lookup(dir, component)? {
                Some(node) if self.fs.kind(node)? == Kind::Dir => node,
                Some(_) => return Err(FsError::NotDir),
                None => self.fs.mkdir(dir, component, 0o755)?,
            };
        }
        Ok(dir)
    }

    /// Writes a file into the sandbox's filesystem (creating parent directories and
    /// replacing an existing file), as if the program had.
    pub fn place_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<(), PlaceError> {
        let bad = || PlaceError::BadPath {
            path: path.to_string(),
        };
        let fs_error = |source| PlaceError::Fs {
            path: path.to_string(),
            source,
        };
        if !path.starts_with('/') || path.ends_with('/') {
            return Err(bad());
        }
        let components: Vec<&[u8]> = path
            .as_bytes()
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let (name, parents) = components.split_last().ok_or_else(bad)?;
        if *name == b"." || *name == b".." || parents.iter().any(|c| *c == b"..") {
            return Err(bad());
        }
        let dir = self.make_dir_path(parents).map_err(fs_error)?;
        let file = match self.fs.lookup(dir, name).map_err(fs_error)? {
            Some(node) => {
                self.fs.truncate(node, 0).map_err(fs_error)?;
                node
            }
            None => self
                .fs
                .create_file(dir, name, mode & 0o7777)
                .map_err(fs_error)?,
        };
        self.fs.write_at(file, 0, data).map_err(fs_error)?;
        self.fs.set_mode(file, mode & 0o7777).map_err(fs_error)?;
        Ok(())
    }
}
