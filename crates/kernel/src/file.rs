//! Open file descriptions: what a descriptor refers to, its offset and status flags.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use forkvm_image::NodeId;

use crate::pipe::PipeEnd;

/// The standard streams the host connects to the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

/// One entry of a directory listing, as `getdents64` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// `DT_*` type.
    pub kind: u8,
}

/// What an open file description refers to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileObject {
    /// A file, directory or symlink of the sandbox filesystem. Directories carry the listing
    /// taken at the first `getdents64`, so a listing is consistent while it is read.
    Node {
        node: NodeId,
        listing: Option<Arc<Vec<DirEntry>>>,
    },
    /// A standard stream served by the host.
    Console(Stream),
    /// `/dev/null`.
    Null,
    /// `/dev/zero`.
    Zero,
    /// `/dev/random` and `/dev/urandom` (host CSPRNG).
    Random,
    /// One end of a pipe or FIFO (`crate::pipe`), or both ends of a FIFO.
    Pipe { id: usize, end: PipeEnd },
    /// The control channel to the VMM (`crate::control`).
    Control,
    /// A read-only file generated when it was opened (`/proc/self/maps` …, see `procfs`).
    Generated(Arc<Vec<u8>>),
    /// A socket (`crate::net`), by id.
    Socket(usize),
    /// An epoll instance (`crate::notify`), by id.
    Epoll(usize),
    /// An `eventfd` counter, by id.
    EventFd(usize),
    /// A `timerfd`, by id.
    TimerFd(usize),
    /// A `signalfd`, by id.
    SignalFd(usize),
}

/// An open file description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenFile {
    pub object: FileObject,
    pub offset: u64,
    /// `O_ACCMODE`, `O_APPEND`, `O_NONBLOCK` … as given to `open` or `F_SETFL`.
    pub status_flags: i32,
    /// The absolute path it was opened by (for `/proc/self/fd` and `fchdir`).
    pub path: Vec<u8>,
}

impl OpenFile {
    pub fn new(object: FileObject, status_flags: i32, path: Vec<u8>) -> Self {
        Self {
            object,
            offset: 0,
            status_flags,
            path,
        }
    }

    pub fn readable(&self) -> bool {
        matches!(
            self.status_flags & libc::O_ACCMODE,
            libc::O_RDONLY | libc::O_RDWR
        )
    }

    pub fn writable(&self) -> bool {
        matches!(
            self.status_flags & libc::O_ACCMODE,
            libc::O_WRONLY | libc::O_RDWR
        )
    }
}
