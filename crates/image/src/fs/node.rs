//! Overlay inode state and what it costs against the overlay's byte cap.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::format::{Kind, Timespec};
use crate::reader::InodeInfo;

use super::NodeId;

/// Charged per overlay inode record, so a flood of empty files still hits the cap.
pub(super) const NODE_COST: u64 = 128;
/// Charged per overlay directory entry or whiteout, on top of its name bytes.
pub(super) const ENTRY_COST: u64 = 64;

/// What a directory entry in the overlay says about a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Slot {
    /// The name refers to this node (hiding any image entry of the same name).
    Present(NodeId),
    /// The name was removed: the image entry of the same name is hidden.
    Whiteout,
}

/// Changes to a directory's entries by name; sorted like the image's entry runs.
pub(super) type Delta = im::OrdMap<Vec<u8>, Slot>;

/// The contents of an overlay inode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Body {
    /// An image file or symlink whose contents are unchanged: read them from the image.
    ImageData,
    /// File data owned by the overlay; shared between clones until one writes (`make_mut`).
    File(Arc<Vec<u8>>),
    /// Entry changes: on top of the image's entries for an image directory, the complete
    /// listing for a directory created in the overlay.
    Dir(Delta),
    /// Target of a symlink created in the overlay.
    Symlink(Arc<[u8]>),
    /// A FIFO or socket name: no data.
    Special,
}

/// An inode whose metadata or contents live in the overlay: every overlay-created node, and
/// every image node once anything about it changed (copy-up, metadata first, data on write).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Node {
    pub kind: Kind,
    /// Permission bits only; the file-type bits come from `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// The directory containing this one (the root is its own parent); `None` for non-dirs.
    pub parent: Option<NodeId>,
    pub body: Body,
}

impl Node {
    /// The overlay record for an image inode before any change.
    pub fn from_image(info: &InodeInfo, parent: Option<NodeId>) -> Node {
        Node {
            kind: info.kind,
            mode: info.mode,
            uid: info.uid,
            gid: info.gid,
            nlink: info.nlink,
            atime: info.mtime,
            mtime: info.mtime,
            ctime: info.mtime,
            parent,
            body: match info.kind {
                Kind::Dir => Body::Dir(Delta::new()),
                Kind::File | Kind::Symlink | Kind::Fifo | Kind::Socket => Body::ImageData,
            },
        }
    }

    /// A fresh overlay node stamped with `now`.
    pub fn new(kind: Kind, mode: u32, owner: (u32, u32), now: Timespec, body: Body) -> Node {
        Node {
            kind,
            mode: mode & 0o7777,
            uid: owner.0,
            gid: owner.1,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            atime: now,
            mtime: now,
            ctime: now,
            parent: None,
            body,
        }
    }

    /// Bytes this node holds against the overlay cap, including its entries.
    pub fn cost(&self) -> u64 {
        NODE_COST
            + match &self.body {
                Body::ImageData => 0,
                Body::File(data) => data.len() as u64,
                Body::Dir(delta) => delta.keys().map(|name| entry_cost(name)).sum(),
                Body::Symlink(target) => target.len() as u64,
                Body::Special => 0,
            }
    }
}

/// Bytes one directory entry named `name` holds against the overlay cap.
pub(super) fn entry_cost(name: &[u8]) -> u64 {
    ENTRY_COST + name.len() as u64
}
