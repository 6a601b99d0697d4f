//! Directory operations on the layered tree: lookups and listings that merge image entries
//! with overlay entries minus whiteouts, and the namespace changes (create, link, unlink,
//! rmdir, rename) that record themselves in the overlay.
//!
//! Every operation checks its arguments and its worst-case space first, then mutates, so a
//! failure never leaves half an operation behind.

use std::sync::Arc;

use crate::format::{Kind, NAME_MAX};

use super::namei::PATH_MAX;
use super::node::{Body, Delta, Node, Slot, entry_cost};
use super::{Fs, FsError, NodeId, now};

/// One entry of a merged directory listing. Listings leave out `.` and `..`: the syscall
/// layer adds them (it knows the directory and can ask [`Fs::parent`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntryInfo {
    /// Entry name.
    pub name: Vec<u8>,
    /// The node it names.
    pub node: NodeId,
    /// The node's kind (for `d_type`).
    pub kind: Kind,
}

/// Checks a single name given to a namespace operation.
fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() {
        return Err(FsError::NotFound);
    }
    if name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Fs {
    /// The overlay's entry changes for `dir`, if it has any record.
    fn delta(&self, dir: NodeId) -> Option<&Delta> {
        match self.nodes.get(&dir) {
            Some(Node {
                body: Body::Dir(delta),
                ..
            }) => Some(delta),
            _ => None,
        }
    }

    /// Whether `dir` was removed: it is then empty, whatever its record still holds (a
    /// removed image directory's whiteouts are freed with it).
    fn is_removed(&self, dir: NodeId) -> bool {
        self.nodes.get(&dir).is_some_and(|node| node.nlink == 0)
    }

    /// Looks `name` up in directory `dir`: the overlay's entry or whiteout if it has one,
    /// else the image's entry for an image directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Result<Option<NodeId>, FsError> {
        if self.kind(dir)? != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if self.is_removed(dir) {
            return Ok(None);
        }
        if let Some(slot) = self.delta(dir).and_then(|delta| delta.get(name)) {
            return Ok(match slot {
                Slot::Present(node) => Some(*node),
                Slot::Whiteout => None,
            });
        }
        match dir {
            NodeId::Image(ino) => Ok(self.image.lookup(ino, name)?.map(NodeId::Image)),
            NodeId::Overlay(_) => Ok(None),
        }
    }

    /// The entries of directory `dir` sorted by name: image entries not shadowed by the
    /// overlay, plus the overlay's present entries. Without `.` and `..`.
    pub fn read_dir(&self, dir: NodeId) -> Result<Vec<DirEntryInfo>, FsError> {
        if self.kind(dir)? != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let delta = self.delta(dir);
        let mut entries = Vec::new();
        if self.is_removed(dir) {
            return Ok(entries);
        }
        if let NodeId::Image(ino) = dir {
            for entry in self.image.read_dir(ino)? {
                if !delta.is_some_and(|delta| delta.contains_key(entry.name)) {
                    entries.push(DirEntryInfo {
                        name: entry.name.to_vec(),
                        node: NodeId::Image(entry.ino),
                        kind: entry.kind,
                    });
                }
            }
        }
        for (name, slot) in delta.into_iter().flatten() {
            if let Slot::Present(node) = slot {
                entries.push(DirEntryInfo {
                    name: name.clone(),
                    node: *node,
                    kind: self.kind(*node)?,
                });
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// The directory containing directory `dir` (the root is its own parent), for `..`.
    pub fn parent(&self, dir: NodeId) -> Result<NodeId, FsError> {
        let node = self.view(dir)?;
        if node.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        node.parent.ok_or(FsError::NotFound)
    }

    /// Whether `ancestor` is `node` or one of the directories above it.
    fn is_ancestor_or_self(&self, ancestor: NodeId, node: NodeId) -> Result<bool, FsError> {
        let mut current = node;
        // Depth is bounded by PATH_MAX; a longer chain is a corrupt parent loop.
        for _ in 0..PATH_MAX {
            if current == ancestor {
                return Ok(true);
            }
            if current == self.root() {
                return Ok(false);
            }
            current = self.parent(current)?;
        }
        Err(FsError::Loop)
    }

    /// Checks that new entries may go into `dir`: a directory that has not been removed.
    fn check_live_dir(&self, dir: NodeId) -> Result<(), FsError> {
        let node = self.view(dir)?;
        if node.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if node.nlink == 0 {
            return Err(FsError::NotFound);
        }
        Ok(())
    }

    /// Sets `dir`'s entry `name` in the overlay (room already checked).
    fn set_entry(&mut self, dir: NodeId, name: &[u8], slot: Slot) -> Result<(), FsError> {
        let node = self.node_mut(dir)?;
        let Body::Dir(delta) = &mut node.body else {
            return Err(FsError::NotDir);
        };
        if delta.insert(name.to_vec(), slot).is_none() {
            self.used += entry_cost(name);
        }
        Ok(())
    }

    /// Removes `dir`'s entry `name`: a whiteout if the image has that name, else the
    /// overlay entry itself (room already checked).
    fn remove_entry(&mut self, dir: NodeId, name: &[u8]) -> Result<(), FsError> {
        let in_image = match dir {
            NodeId::Image(ino) => self.image.lookup(ino, name)?.is_some(),
            NodeId::Overlay(_) => false,
        };
        let node = self.node_mut(dir)?;
        let Body::Dir(delta) = &mut node.body else {
            return Err(FsError::NotDir);
        };
        if in_image {
            if delta.insert(name.to_vec(), Slot::Whiteout).is_none() {
                self.used += entry_cost(name);
            }
        } else if delta.remove(name).is_some() {
            self.used -= entry_cost(name);
        }
        Ok(())
    }

    /// Stamps a change of `dir`'s entries and adjusts its link count by `subdirs`.
    fn touch_dir(&mut self, dir: NodeId, subdirs: i32) -> Result<(), FsError> {
        let time = now();
        let node = self.node_mut(dir)?;
        node.mtime = time;
        node.ctime = time;
        node.nlink = node.nlink.saturating_add_signed(subdirs);
        Ok(())
    }

    /// Drops one link to non-directory `id`, freeing it if that was the last name and handle.
    fn unlink_node(&mut self, id: NodeId) -> Result<(), FsError> {
        let time = now();
        let node = self.node_mut(id)?;
        node.nlink = node.nlink.saturating_sub(1);
        node.ctime = time;
        self.drop_if_orphaned(id);
        Ok(())
    }

    /// Marks directory `id` removed, freeing it unless a handle holds it.
    fn remove_dir_node(&mut self, id: NodeId) -> Result<(), FsError> {
        let time = now();
        let node = self.node_mut(id)?;
        node.nlink = 0;
        node.ctime = time;
        self.drop_if_orphaned(id);
        Ok(())
    }

    /// Adds `node` to `dir` under `name`; `Exists` if the name is taken.
    fn create_node(&mut self, dir: NodeId, name: &[u8], mut node: Node) -> Result<NodeId, FsError> {
        check_name(name)?;
        self.check_live_dir(dir)?;
        if self.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        self.ensure_room(node.cost() + self.copy_up_cost(dir) + entry_cost(name))?;
        let is_dir = node.kind == Kind::Dir;
        if is_dir {
            node.parent = Some(dir);
        }
        let id = self.insert_node(node);
        self.set_entry(dir, name, Slot::Present(id))?;
        self.touch_dir(dir, i32::from(is_dir))?;
        Ok(id)
    }

    /// Creates an empty regular file `name` in `dir` with permission bits `mode` (the caller
    /// has applied its umask). `Exists` if the name is taken: `O_CREAT` without `O_EXCL` is
    /// the caller's lookup first.
    pub fn create_file(&mut self, dir: NodeId, name: &[u8], mode: u32) -> Result<NodeId, FsError> {
        let body = Body::File(Arc::new(Vec::new()));
        let node = Node::new(Kind::File, mode, self.owner, now(), body);
        self.create_node(dir, name, node)
    }

    /// Creates a FIFO or socket name `name` in `dir` (`kind` is `Fifo` or `Socket`).
    pub fn create_special(
        &mut self,
        dir: NodeId,
        name: &[u8],
        kind: Kind,
        mode: u32,
    ) -> Result<NodeId, FsError> {
        if !matches!(kind, Kind::Fifo | Kind::Socket) {
            return Err(FsError::Invalid);
        }
        let node = Node::new(kind, mode, self.owner, now(), Body::Special);
        self.create_node(dir, name, node)
    }

    /// Creates an empty directory `name` in `dir`.
    pub fn mkdir(&mut self, dir: NodeId, name: &[u8], mode: u32) -> Result<NodeId, FsError> {
        let node = Node::new(Kind::Dir, mode, self.owner, now(), Body::Dir(Delta::new()));
        self.create_node(dir, name, node)
    }

    /// Creates symlink `name` in `dir` pointing at `target` (stored as given, resolved only
    /// when followed).
    pub fn symlink(&mut self, dir: NodeId, name: &[u8], target: &[u8]) -> Result<NodeId, FsError> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() >= PATH_MAX {
            return Err(FsError::NameTooLong);
        }
        let body = Body::Symlink(Arc::from(target));
        let node = Node::new(Kind::Symlink, 0o777, self.owner, now(), body);
        self.create_node(dir, name, node)
    }

    /// Adds hard link `name` in `dir` to the existing non-directory `target`.
    pub fn link(&mut self, target: NodeId, dir: NodeId, name: &[u8]) -> Result<(), FsError> {
        check_name(name)?;
        let node = self.view(target)?;
        if node.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if node.nlink == 0 {
            return Err(FsError::NotFound);
        }
        self.check_live_dir(dir)?;
        if self.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        self.ensure_room(self.copy_up_cost(target) + self.copy_up_cost(dir) + entry_cost(name))?;
        self.set_entry(dir, name, Slot::Present(target))?;
        let time = now();
        let node = self.node_mut(target)?;
        node.nlink += 1;
        node.ctime = time;
        self.touch_dir(dir, 0)
    }

    /// Removes non-directory entry `name` from `dir`. The node stays usable through open
    /// handles until the last [`Fs::close_ref`].
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Result<(), FsError> {
        check_name(name)?;
        let child = self.lookup(dir, name)?.ok_or(FsError::NotFound)?;
        if self.kind(child)? == Kind::Dir {
            return Err(FsError::IsDir);
        }
        self.ensure_room(self.copy_up_cost(dir) + entry_cost(name) + self.copy_up_cost(child))?;
        self.remove_entry(dir, name)?;
        self.touch_dir(dir, 0)?;
        self.unlink_node(child)
    }

    /// Removes empty directory `name` from `dir`.
    pub fn rmdir(&mut self, dir: NodeId, name: &[u8]) -> Result<(), FsError> {
        check_name(name)?;
        let child = self.lookup(dir, name)?.ok_or(FsError::NotFound)?;
        if self.kind(child)? != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if !self.read_dir(child)?.is_empty() {
            return Err(FsError::NotEmpty);
        }
        self.ensure_room(self.copy_up_cost(dir) + entry_cost(name) + self.copy_up_cost(child))?;
        self.remove_entry(dir, name)?;
        self.touch_dir(dir, -1)?;
        self.remove_dir_node(child)
    }

    /// Moves entry `old_name` of `old_dir` to `new_name` in `new_dir`, replacing a
    /// non-directory there with a non-directory, or an empty directory with a directory
    /// (Linux `rename(2)` without flags). Renaming onto another name of the same node does
    /// nothing; moving a directory into its own subtree is `Invalid`.
    pub fn rename(
        &mut self,
        old_dir: NodeId,
        old_name: &[u8],
        new_dir: NodeId,
        new_name: &[u8],
    ) -> Result<(), FsError> {
        check_name(old_name)?;
        check_name(new_name)?;
        let source = self.lookup(old_dir, old_name)?.ok_or(FsError::NotFound)?;
        self.check_live_dir(new_dir)?;
        let replaced = self.lookup(new_dir, new_name)?;
        if replaced == Some(source) {
            return Ok(());
        }
        let source_is_dir = self.kind(source)? == Kind::Dir;
        if source_is_dir && self.is_ancestor_or_self(source, new_dir)? {
            return Err(FsError::Invalid);
        }
        let replaced_is_dir = match replaced {
            Some(node) => self.kind(node)? == Kind::Dir,
            None => false,
        };
        if let Some(node) = replaced {
            match (source_is_dir, replaced_is_dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.read_dir(node)?.is_empty() => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
        }
        let copy_ups = [Some(old_dir), Some(new_dir), Some(source), replaced]
            .into_iter()
            .flatten()
            .map(|id| self.copy_up_cost(id))
            .sum::<u64>();
        self.ensure_room(copy_ups + entry_cost(old_name) + entry_cost(new_name))?;

        self.set_entry(new_dir, new_name, Slot::Present(source))?;
        self.remove_entry(old_dir, old_name)?;
        let moved_dir = source_is_dir && old_dir != new_dir;
        match replaced {
            Some(node) if replaced_is_dir => {
                self.touch_dir(new_dir, if moved_dir { 0 } else { -1 })?;
                self.remove_dir_node(node)?;
            }
            Some(node) => {
                self.touch_dir(new_dir, i32::from(moved_dir))?;
                self.unlink_node(node)?;
            }
            None => self.touch_dir(new_dir, i32::from(moved_dir))?,
        }
        self.touch_dir(old_dir, if moved_dir { -1 } else { 0 })?;
        let time = now();
        let node = self.node_mut(source)?;
        node.ctime = time;
        if source_is_dir {
            node.parent = Some(new_dir);
        }
        Ok(())
    }
}
