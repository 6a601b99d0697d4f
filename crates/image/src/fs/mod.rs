//! The layered file system a sandbox sees: the read-only [`Image`] under an in-memory writable
//! overlay, with overlayfs semantics (copy-up on change, whiteouts for removed image entries,
//! merged directory listings).
//!
//! All overlay state lives in persistent maps (`im`), and file data in `Arc`s that are copied
//! only when a clone writes, so cloning an [`Fs`] for a fork is O(1) and never copies bytes.
//! Nodes are named by [`NodeId`], never by path: an open file keeps working after it is
//! unlinked or renamed. Paths are resolved entirely inside the layered tree (see `namei`), so
//! `..` and symlinks cannot reach the host. Errors are [`FsError`]s; mapping them to errno
//! values is the syscall layer's job.

mod data;
mod dir;
mod namei;
mod node;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::format::{Kind, Timespec};
use crate::reader::{Image, ImageError, Ino};

use node::{Body, Node};

pub use dir::DirEntryInfo;
pub use namei::{MAX_SYMLINKS, PATH_MAX, Parent, Resolved};

/// File-type bits of `Stat::mode` (as in Linux `st_mode`).
pub const S_IFMT: u32 = 0o170_000;
/// Regular file type bits.
pub const S_IFREG: u32 = 0o100_000;
/// Directory type bits.
pub const S_IFDIR: u32 = 0o040_000;
/// Symbolic link type bits.
pub const S_IFLNK: u32 = 0o120_000;
/// FIFO type bits.
pub const S_IFIFO: u32 = 0o010_000;
/// Socket type bits.
pub const S_IFSOCK: u32 = 0o140_000;

/// Overlay byte cap used by [`Fs::new`].
pub const DEFAULT_OVERLAY_LIMIT: u64 = 512 << 20;
/// Largest file size the overlay accepts, whatever the cap (Linux tmpfs-like `MAX_LFS_FILESIZE`
/// is far larger, but a sandbox file lives in host memory).
pub const MAX_FILE_SIZE: u64 = 1 << 40;

/// Why a file system operation failed; the syscall layer maps these to errno values.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such file or directory.
    #[error("no such file or directory")]
    NotFound,
    /// A path component or the target is not a directory where one is required.
    #[error("not a directory")]
    NotDir,
    /// A directory where a non-directory is required.
    #[error("is a directory")]
    IsDir,
    /// The name already exists.
    #[error("file exists")]
    Exists,
    /// Removing or replacing a directory that still has entries.
    #[error("directory not empty")]
    NotEmpty,
    /// Too many symlinks while resolving a path (a loop or more than 40).
    #[error("too many levels of symbolic links")]
    Loop,
    /// A name over 255 bytes or a path over 4095 bytes.
    #[error("file name too long")]
    NameTooLong,
    /// An invalid argument: a `.`/`..`/empty final name, writing a symlink, moving a directory
    /// into itself.
    #[error("invalid argument")]
    Invalid,
    /// An operation not permitted on this kind of node (hard-linking a directory).
    #[error("operation not permitted")]
    NotPermitted,
    /// The overlay's byte cap would be exceeded.
    #[error("no space left in the sandbox file system")]
    NoSpace,
    /// A write or truncate beyond [`MAX_FILE_SIZE`].
    #[error("file too large")]
    FileTooBig,
    /// The image is corrupt (the syscall layer reports `EIO`).
    #[error("corrupt image: {0}")]
    Image(#[from] ImageError),
}

/// A node of the layered file system: an image inode (possibly changed in the overlay) or a
/// node created in the overlay. Stable for the node's lifetime; fd tables hold these.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum NodeId {
    /// An inode of the image.
    Image(Ino),
    /// A node created in the overlay, numbered in creation order.
    Overlay(u64),
}

impl NodeId {
    /// The `st_ino` to report: image inodes from 1, overlay nodes from 2^32, never colliding.
    pub fn ino(self) -> u64 {
        match self {
            NodeId::Image(ino) => u64::from(ino.0) + 1,
            NodeId::Overlay(n) => (1 << 32) + n,
        }
    }
}

/// A node's attributes, shaped like Linux `struct stat` (without `st_dev`/`st_rdev`, which
/// the syscall layer supplies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Inode number, see [`NodeId::ino`].
    pub ino: u64,
    /// The node's kind (also encoded in `mode`'s `S_IFMT` bits).
    pub kind: Kind,
    /// File-type bits plus permission bits.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Bytes for files, target length for symlinks, 4096 for directories.
    pub size: u64,
    /// 512-byte blocks, as a 4 KiB-block file system would allocate.
    pub blocks: u64,
    /// Preferred I/O size.
    pub blksize: u32,
    /// Last access (not updated by reads: the file system behaves as if mounted `noatime`).
    pub atime: Timespec,
    /// Last data modification.
    pub mtime: Timespec,
    /// Last status change.
    pub ctime: Timespec,
}

/// Everything a sandbox's overlay holds, without the image under it: what a snapshot
/// stores. Cloning is O(1), like cloning an [`Fs`].
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct OverlayState {
    nodes: im::HashMap<NodeId, Node>,
    open_counts: im::HashMap<NodeId, u32>,
    next_overlay: u64,
    used: u64,
    limit: u64,
    owner: (u32, u32),
}

/// A sandbox's file system: a shared image plus this sandbox's overlay. `Clone` is O(1).
#[derive(Clone)]
pub struct Fs {
    image: Arc<Image>,
    nodes: im::HashMap<NodeId, Node>,
    open_counts: im::HashMap<NodeId, u32>,
    next_overlay: u64,
    used: u64,
    limit: u64,
    owner: (u32, u32),
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("image", &self.image.path())
            .field("overlay_nodes", &self.nodes.len())
            .field("used", &self.used)
            .field("limit", &self.limit)
            .finish()
    }
}

/// The current wall-clock time for new and changed nodes.
fn now() -> Timespec {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timespec {
        sec: since_epoch.as_secs() as i64,
        nsec: since_epoch.subsec_nanos(),
    }
}

impl Fs {
    /// A file system over `image` with an empty overlay capped at [`DEFAULT_OVERLAY_LIMIT`].
    pub fn new(image: Arc<Image>) -> Fs {
        Fs::with_limit(image, DEFAULT_OVERLAY_LIMIT)
    }

    /// A file system over `image` whose overlay may hold at most `limit` bytes (file data,
    /// symlink targets and a fixed charge per node and entry); past it writes fail `NoSpace`.
    pub fn with_limit(image: Arc<Image>, limit: u64) -> Fs {
        Fs {
            image,
            nodes: im::HashMap::new(),
            open_counts: im::HashMap::new(),
            next_overlay: 0,
            used: 0,
            limit,
            owner: (0, 0),
        }
    }

    /// The overlay alone, for a snapshot.
    pub fn overlay_state(&self) -> OverlayState {
        OverlayState {
            nodes: self.nodes.clone(),
            open_counts: self.open_counts.clone(),
            next_overlay: self.next_overlay,
            used: self.used,
            limit: self.limit,
            owner: self.owner,
        }
    }

    /// A file system over `image` with a previously saved overlay. The overlay must have been
    /// taken over the same image (snapshots check the image digest before this).
    pub fn from_overlay_state(image: Arc<Image>, state: OverlayState) -> Fs {
        Fs {
            image,
            nodes: state.nodes,
            open_counts: state.open_counts,
            next_overlay: state.next_overlay,
            used: state.used,
            limit: state.limit,
            owner: state.owner,
        }
    }

    /// Sets the owner (`uid`, `gid`) given to nodes created from now on.
    pub fn set_default_owner(&mut self, uid: u32, gid: u32) {
        self.owner = (uid, gid);
    }

    /// The image under the overlay (its file is what [`Fs::image_backing`] offsets refer to).
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The root directory.
    pub fn root(&self) -> NodeId {
        NodeId::Image(self.image.root())
    }

    /// Bytes currently charged to the overlay.
    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    /// The overlay's byte cap.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Fails with `NoSpace` unless `extra` more bytes fit under the cap. Mutations check their
    /// worst case with this first, so they never stop half-done for lack of space.
    fn ensure_room(&self, extra: u64) -> Result<(), FsError> {
        match self.used.checked_add(extra) {
            Some(total) if total <= self.limit => Ok(()),
            _ => Err(FsError::NoSpace),
        }
    }

    /// The node's state: its overlay record, or one made from the image inode. Unknown overlay
    /// ids (dropped nodes) are `NotFound`.
    fn view(&self, id: NodeId) -> Result<Node, FsError> {
        match (self.nodes.get(&id), id) {
            (Some(node), _) => Ok(node.clone()),
            (None, NodeId::Image(ino)) => {
                let info = self.image.inode(ino)?;
                let parent = match info.kind {
                    Kind::Dir => Some(NodeId::Image(self.image.parent(ino)?)),
                    Kind::File | Kind::Symlink | Kind::Fifo | Kind::Socket => None,
                };
                Ok(Node::from_image(&info, parent))
            }
            (None, NodeId::Overlay(_)) => Err(FsError::NotFound),
        }
    }

    /// The node's overlay record for changing, copying an image node's metadata up first.
    /// The caller has checked room for [`node::NODE_COST`].
    fn node_mut(&mut self, id: NodeId) -> Result<&mut Node, FsError> {
        if !self.nodes.contains_key(&id) {
            let node = self.view(id)?;
            self.used += node.cost();
            self.nodes.insert(id, node);
        }
        self.nodes.get_mut(&id).ok_or(FsError::NotFound)
    }

    /// Whether changing `id` would first copy its metadata up (and so cost a node record).
    fn copy_up_cost(&self, id: NodeId) -> u64 {
        if self.nodes.contains_key(&id) {
            0
        } else {
            node::NODE_COST
        }
    }

    /// Adds a new overlay node and returns its id (room already checked).
    fn insert_node(&mut self, node: Node) -> NodeId {
        let id = NodeId::Overlay(self.next_overlay);
        self.next_overlay += 1;
        self.used += node.cost();
        self.nodes.insert(id, node);
        id
    }

    /// Frees a node's data once nothing names it and no handle holds it. An overlay node goes
    /// away entirely; a removed image node keeps a bare record with `nlink == 0`, since
    /// without one it would read as the image's live inode again.
    fn drop_if_orphaned(&mut self, id: NodeId) {
        let orphaned = self.nodes.get(&id).is_some_and(|node| node.nlink == 0);
        if !orphaned || self.open_counts.contains_key(&id) {
            return;
        }
        let Some(mut node) = self.nodes.remove(&id) else {
            return;
        };
        self.used -= node.cost();
        if let NodeId::Image(_) = id {
            node.body = match node.body {
                Body::Dir(_) => Body::Dir(node::Delta::new()),
                Body::File(_) => Body::File(Arc::default()),
                body @ (Body::ImageData | Body::Symlink(_) | Body::Special) => body,
            };
            self.used += node.cost();
            self.nodes.insert(id, node);
        }
    }

    /// The node's kind.
    pub fn kind(&self, id: NodeId) -> Result<Kind, FsError> {
        match (self.nodes.get(&id), id) {
            (Some(node), _) => Ok(node.kind),
            (None, NodeId::Image(ino)) => Ok(self.image.inode(ino)?.kind),
            (None, NodeId::Overlay(_)) => Err(FsError::NotFound),
        }
    }

    /// The node's attributes.
    pub fn stat(&self, id: NodeId) -> Result<Stat, FsError> {
        let node = self.view(id)?;
        let (type_bits, size) = match node.kind {
            Kind::File => (S_IFREG, self.contents(id)?.len() as u64),
            Kind::Dir => (S_IFDIR, 4096),
            Kind::Symlink => (S_IFLNK, self.read_link(id)?.len() as u64),
            Kind::Fifo => (S_IFIFO, 0),
            Kind::Socket => (S_IFSOCK, 0),
        };
        Ok(Stat {
            ino: id.ino(),
            kind: node.kind,
            mode: type_bits | node.mode,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            size,
            blocks: size.div_ceil(4096) * 8,
            blksize: 4096,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
        })
    }

    /// Records that a handle (fd, mapping, cwd) holds `id`, keeping it alive after unlink.
    pub fn open_ref(&mut self, id: NodeId) {
        let count = self.open_counts.get(&id).copied().unwrap_or(0);
        self.open_counts.insert(id, count + 1);
    }

    /// Releases a hold taken with [`Fs::open_ref`]; the last release of an unlinked node
    /// frees its overlay data.
    pub fn close_ref(&mut self, id: NodeId) {
        match self.open_counts.get(&id).copied() {
            Some(count) if count > 1 => {
                self.open_counts.insert(id, count - 1);
            }
            Some(_) => {
                self.open_counts.remove(&id);
                self.drop_if_orphaned(id);
            }
            None => {}
        }
    }

    /// Applies `change` to the node's metadata (copying it up) and stamps ctime.
    fn change_meta(&mut self, id: NodeId, change: impl FnOnce(&mut Node)) -> Result<(), FsError> {
        self.ensure_room(self.copy_up_cost(id))?;
        let time = now();
        let node = self.node_mut(id)?;
        change(node);
        node.ctime = time;
        Ok(())
    }

    /// Sets the permission bits (`chmod`); file-type bits in `mode` are ignored.
    pub fn set_mode(&mut self, id: NodeId, mode: u32) -> Result<(), FsError> {
        self.change_meta(id, |node| node.mode = mode & 0o7777)
    }

    /// Sets the owner and/or group (`chown`); `None` leaves one unchanged.
    pub fn set_owner(
        &mut self,
        id: NodeId,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), FsError> {
        self.change_meta(id, |node| {
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
        })
    }

    /// Sets access and/or modification times (`utimensat`); `None` leaves one unchanged.
    /// The caller turns `UTIME_NOW` into the current time.
    pub fn set_times(
        &mut self,
        id: NodeId,
        atime: Option<Timespec>,
        mtime: Option<Timespec>,
    ) -> Result<(), FsError> {
        self.change_meta(id, |node| {
            node.atime = atime.unwrap_or(node.atime);
            node.mtime = mtime.unwrap_or(node.mtime);
        })
    }

    /// A symlink's target, borrowed from the image or the overlay.
    pub fn read_link(&self, id: NodeId) -> Result<&[u8], FsError> {
        match (self.nodes.get(&id), id) {
            (
                Some(Node {
                    body: Body::Symlink(target),
                    ..
                }),
                _,
            ) => Ok(target),
            (
                Some(Node {
                    kind: Kind::Symlink,
                    body: Body::ImageData,
                    ..
                }),
                NodeId::Image(ino),
            )
            | (None, NodeId::Image(ino)) => match self.image.inode(ino)?.kind {
                Kind::Symlink => Ok(self.image.read_link(ino)?),
                Kind::File | Kind::Dir | Kind::Fifo | Kind::Socket => Err(FsError::Invalid),
            },
            (Some(_), _) => Err(FsError::Invalid),
            (None, NodeId::Overlay(_)) => Err(FsError::NotFound),
        }
    }
}
