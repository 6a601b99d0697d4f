//! Path resolution inside the layered tree, Linux-style: absolute and relative paths, `.` and
//! `..` (physical: `..` of a followed symlink's target, never above the root), symlinks in any
//! component (absolute targets restart at the sandbox root, never the host's), at most 40
//! symlinks per resolution. No permission checks: a sandbox owns its whole tree.

use crate::format::{Kind, NAME_MAX};

use super::{Fs, FsError, NodeId};

/// Longest path accepted, including the terminating NUL a C caller passes (Linux `PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// Symlinks followed in one resolution before giving up with `Loop` (Linux `MAXSYMLINKS`).
pub const MAX_SYMLINKS: u32 = 40;

/// A resolved path: the node and the canonical absolute path (no `.`, `..`, symlinks or
/// repeated slashes) that leads to it, for `getcwd` and for remembering where an fd points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The node the path names.
    pub node: NodeId,
    /// Canonical absolute path, `/` for the root.
    pub path: Vec<u8>,
}

/// The directory a path's final component lives in, for operations that create or remove
/// that name (`open(O_CREAT)`, `mkdir`, `unlink`, `rename`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// The containing directory, resolved (symlinks followed).
    pub dir: Resolved,
    /// The final component: never empty, `.` or `..`, at most 255 bytes.
    pub name: Vec<u8>,
    /// Whether the path ended in `/`, so the name must be (or become) a directory.
    pub trailing_slash: bool,
}

impl Parent {
    /// The canonical path the final component would have.
    pub fn child_path(&self) -> Vec<u8> {
        join(&self.dir.path, &self.name)
    }
}

/// `dir/name` without doubling the root's slash.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = dir.to_vec();
    if !path.ends_with(b"/") {
        path.push(b'/');
    }
    path.extend_from_slice(name);
    path
}

/// The non-empty components of `path`, in order.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

fn check_path(path: &[u8]) -> Result<(), FsError> {
    if path.is_empty() {
        return Err(FsError::NotFound);
    }
    if path.len() >= PATH_MAX {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

impl Fs {
    /// Resolves `path` (relative ones against `cwd`, a canonical absolute path such as a
    /// previous [`Resolved::path`]). A final symlink is followed only when `follow_last` (or
    /// the path ends in `/`); a path ending in `/` must name a directory.
    pub fn resolve(&self, cwd: &[u8], path: &[u8], follow_last: bool) -> Result<Resolved, FsError> {
        check_path(path)?;
        let trailing_slash = path.ends_with(b"/");
        let base: &[u8] = if path.starts_with(b"/") { b"" } else { cwd };
        // A stack of components still to walk: the next one is at the end.
        let mut pending: Vec<Vec<u8>> = components(base)
            .chain(components(path))
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut stack: Vec<(Vec<u8>, NodeId)> = Vec::new();
        let mut must_be_dir = trailing_slash;
        let mut links = 0;
        while let Some(name) = pending.pop() {
            let dir = stack.last().map_or(self.root(), |(_, node)| *node);
            if self.kind(dir)? != Kind::Dir {
                return Err(FsError::NotDir);
            }
            match name.as_slice() {
                b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ if name.len() > NAME_MAX => return Err(FsError::NameTooLong),
                _ => {}
            }
            let child = self.lookup(dir, &name)?.ok_or(FsError::NotFound)?;
            let last = pending.is_empty();
            if (!last || follow_last || trailing_slash) && self.kind(child)? == Kind::Symlink {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(FsError::Loop);
                }
                let target = self.read_link(child)?;
                if target.is_empty() {
                    return Err(FsError::NotFound);
                }
                if target.starts_with(b"/") {
                    stack.clear();
                }
                if last && target.ends_with(b"/") {
                    must_be_dir = true;
                }
                pending.extend(components(target).rev().map(<[u8]>::to_vec));
                continue;
            }
            stack.push((name, child));
        }
        let node = stack.last().map_or(self.root(), |(_, node)| *node);
        if must_be_dir && self.kind(node)? != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let mut canonical = Vec::new();
        for (name, _) in &stack {
            canonical.push(b'/');
            canonical.extend_from_slice(name);
        }
        if canonical.is_empty() {
            canonical.push(b'/');
        }
        Ok(Resolved {
            node,
            path: canonical,
        })
    }

    /// Splits `path` into its containing directory (resolved, following symlinks) and final
    /// name. Paths whose final component is `.` or `..`, and `/` itself, are `Invalid`: they
    /// name no entry that could be created or removed.
    pub fn resolve_parent(&self, cwd: &[u8], path: &[u8]) -> Result<Parent, FsError> {
        check_path(path)?;
        let end = path
            .iter()
            .rposition(|&b| b != b'/')
            .ok_or(FsError::Invalid)?
            + 1;
        let trimmed = &path[..end];
        let (dir_path, name): (&[u8], &[u8]) = match trimmed.iter().rposition(|&b| b == b'/') {
            None => (b".", trimmed),
            Some(0) => (b"/", &trimmed[1..]),
            Some(slash) => (&trimmed[..slash], &trimmed[slash + 1..]),
        };
        if name == b"." || name == b".." {
            return Err(FsError::Invalid);
        }
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let dir = self.resolve(cwd, dir_path, true)?;
        if self.kind(dir.node)? != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(Parent {
            dir,
            name: name.to_vec(),
            trailing_slash: end < path.len(),
        })
    }

    /// The canonical absolute path of directory `dir` now, following parent links (so it
    /// reflects renames since `dir` was resolved). `NotFound` for a removed directory.
    pub fn canonical_path(&self, dir: NodeId) -> Result<Vec<u8>, FsError> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut current = dir;
        while current != self.root() {
            let node = self.view(current)?;
            if node.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if node.nlink == 0 {
                return Err(FsError::NotFound);
            }
            let parent = node.parent.ok_or(FsError::NotFound)?;
            let entry = self
                .read_dir(parent)?
                .into_iter()
                .find(|entry| entry.node == current)
                .ok_or(FsError::NotFound)?;
            names.push(entry.name);
            // Each level adds at least two bytes, so a longer chain is a corrupt parent loop.
            if names.len() > PATH_MAX / 2 {
                return Err(FsError::NameTooLong);
            }
            current = parent;
        }
        Ok(names
            .iter()
            .rev()
            .fold(b"/".to_vec(), |path, name| join(&path, name)))
    }
}
