//! File descriptors and the open file descriptions they share.
//!
//! `dup` makes two descriptors share one description (offset, status flags), as in Linux.
//! Descriptions live in a slab indexed by number rather than behind `Arc`s, so cloning the
//! table for a fork keeps the sharing structure and copies no file data.

use serde::{Deserialize, Serialize};
use syscalls::Errno;

use crate::file::OpenFile;

/// One descriptor: which description it refers to and its per-descriptor flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Slot {
    description: usize,
    cloexec: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Shared {
    file: OpenFile,
    refs: usize,
}

/// One process's descriptors while another process's are in the table (see
/// `FdTable::exchange`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FdSlots {
    slots: Vec<Option<Slot>>,
    max_fds: usize,
}

/// The descriptors of the current process, and the open file descriptions of the whole
/// sandbox: after `fork` a parent's and a child's descriptors share descriptions (one offset,
/// one set of status flags), and a description is released with its last descriptor in any
/// process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FdTable {
    slots: Vec<Option<Slot>>,
    descriptions: Vec<Option<Shared>>,
    max_fds: usize,
}

impl FdTable {
    /// An empty table that allows descriptors `0..max_fds`.
    pub fn new(max_fds: usize) -> Self {
        Self {
            slots: Vec::new(),
            descriptions: Vec::new(),
            max_fds,
        }
    }

    /// The descriptor limit (`RLIMIT_NOFILE`).
    pub fn max_fds(&self) -> usize {
        self.max_fds
    }

    /// Sets the descriptor limit. Descriptors already open above it stay open; new ones
    /// must fit below it.
    pub fn set_max_fds(&mut self, max_fds: usize) {
        self.max_fds = max_fds;
    }

    /// Puts `other`'s descriptors in the table and the current ones in `other` (another
    /// process becomes current).
    pub fn exchange(&mut self, other: &mut FdSlots) {
        std::mem::swap(&mut self.slots, &mut other.slots);
        std::mem::swap(&mut self.max_fds, &mut other.max_fds);
    }

    /// A new process's descriptors (`fork`): a copy of the current ones, each sharing its
    /// description, except `skip`.
    pub fn fork(&mut self, skip: &[i32]) -> FdSlots {
        let mut slots = self.slots.clone();
        for (fd, slot) in slots.iter_mut().enumerate() {
            if skip.contains(&(fd as i32)) {
                *slot = None;
            }
            if let Some(slot) = slot {
                self.descriptions[slot.description]
                    .as_mut()
                    .expect("a slot always refers to a live description")
                    .refs += 1;
            }
        }
        FdSlots {
            slots,
            max_fds: self.max_fds,
        }
    }

    /// Number of open descriptors.
    pub fn open_count(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    fn slot(&self, fd: i32) -> Result<Slot, Errno> {
        usize::try_from(fd)
            .ok()
            .and_then(|i| self.slots.get(i).copied().flatten())
            .ok_or(Errno::EBADF)
    }

    /// The description behind `fd`.
    pub fn get(&self, fd: i32) -> Result<&OpenFile, Errno> {
        let slot = self.slot(fd)?;
        Ok(&self.descriptions[slot.description]
            .as_ref()
            .expect("a slot always refers to a live description")
            .file)
    }

    /// The number of the description behind `fd` (the same for its duplicates).
    pub fn description_of(&self, fd: i32) -> Result<usize, Errno> {
        Ok(self.slot(fd)?.description)
    }

    /// Description number `id`, while a descriptor refers to it.
    pub fn description(&self, id: usize) -> Option<&OpenFile> {
        self.descriptions.get(id)?.as_ref().map(|s| &s.file)
    }

    /// The description behind `fd`, mutably (offsets, flags).
    pub fn get_mut(&mut self, fd: i32) -> Result<&mut OpenFile, Errno> {
        let slot = self.slot(fd)?;
        Ok(&mut self.descriptions[slot.description]
            .as_mut()
            .expect("a slot always refers to a live description")
            .file)
    }

    fn lowest_free(&self, from: usize) -> Result<usize, Errno> {
        (from..self.max_fds)
            .find(|&i| self.slots.get(i).is_none_or(Option::is_none))
            .ok_or(Errno::EMFILE)
    }

    fn put(&mut self, fd: usize, slot: Slot) {
        if self.slots.len() <= fd {
            self.slots.resize(fd + 1, None);
        }
        self.slots[fd] = Some(slot);
    }

    /// Installs a new description at the lowest free descriptor.
    pub fn open(&mut self, file: OpenFile, cloexec: bool) -> Result<i32, Errno> {
        let fd = self.lowest_free(0)?;
        let description = self.new_description(file);
        self.put(
            fd,
            Slot {
                description,
                cloexec,
            },
        );
        Ok(fd as i32)
    }

    /// Installs a new description at exactly `fd` (closing what was there).
    pub fn open_at(&mut self, fd: i32, file: OpenFile) -> Result<(), Errno> {
        let index = usize::try_from(fd).map_err(|_| Errno::EBADF)?;
        if index >= self.max_fds {
            return Err(Errno::EBADF);
        }
        let _ = self.close(fd);
        let description = self.new_description(file);
        self.put(
            index,
            Slot {
                description,
                cloexec: false,
            },
        );
        Ok(())
    }

    fn new_description(&mut self, file: OpenFile) -> usize {
        let shared = Shared { file, refs: 1 };
        match self.descriptions.iter().position(Option::is_none) {
            Some(i) => {
                self.descriptions[i] = Some(shared);
                i
            }
            None => {
                self.descriptions.push(Some(shared));
                self.descriptions.len() - 1
            }
        }
    }

    /// Closes `fd`; returns the description if this was its last descriptor.
    pub fn close(&mut self, fd: i32) -> Result<Option<OpenFile>, Errno> {
        let slot = self.slot(fd)?;
        self.slots[fd as usize] = None;
        let shared = self.descriptions[slot.description]
            .as_mut()
            .expect("a slot always refers to a live description");
        shared.refs -= 1;
        if shared.refs == 0 {
            Ok(self.descriptions[slot.description].take().map(|s| s.file))
        } else {
            Ok(None)
        }
    }

    /// `dup`/`F_DUPFD`: the lowest free descriptor `>= min` sharing `fd`'s description.
    pub fn duplicate(&mut self, fd: i32, min: i32, cloexec: bool) -> Result<i32, Errno> {
        let slot = self.slot(fd)?;
        let min = usize::try_from(min).map_err(|_| Errno::EINVAL)?;
        if min >= self.max_fds {
            return Err(Errno::EINVAL);
        }
        let new_fd = self.lowest_free(min)?;
        self.share(slot.description, new_fd, cloexec);
        Ok(new_fd as i32)
    }

    /// `dup2`/`dup3`: makes `new_fd` share `old_fd`'s description.
    pub fn duplicate_to(&mut self, old_fd: i32, new_fd: i32, cloexec: bool) -> Result<i32, Errno> {
        let slot = self.slot(old_fd)?;
        let index = usize::try_from(new_fd).map_err(|_| Errno::EBADF)?;
        if index >= self.max_fds {
            return Err(Errno::EBADF);
        }
        if old_fd == new_fd {
            return Ok(new_fd);
        }
        let _ = self.close(new_fd);
        self.share(slot.description, index, cloexec);
        Ok(new_fd)
    }

    fn share(&mut self, description: usize, fd: usize, cloexec: bool) {
        self.descriptions[description]
            .as_mut()
            .expect("a slot always refers to a live description")
            .refs += 1;
        self.put(
            fd,
            Slot {
                description,
                cloexec,
            },
        );
    }

    pub fn cloexec(&self, fd: i32) -> Result<bool, Errno> {
        Ok(self.slot(fd)?.cloexec)
    }

    pub fn set_cloexec(&mut self, fd: i32, cloexec: bool) -> Result<(), Errno> {
        self.slot(fd)?;
        if let Some(Some(slot)) = self.slots.get_mut(fd as usize) {
            slot.cloexec = cloexec;
        }
        Ok(())
    }

    /// Open descriptor numbers in ascending order.
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| i as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{FileObject, OpenFile};

    fn null() -> OpenFile {
        OpenFile::new(FileObject::Null, libc::O_RDWR, b"/dev/null".to_vec())
    }

    #[test]
    fn lowest_free_and_limits() {
        let mut t = FdTable::new(3);
        assert_eq!(t.open(null(), false), Ok(0));
        assert_eq!(t.open(null(), false), Ok(1));
        assert_eq!(t.open(null(), false), Ok(2));
        assert_eq!(t.open(null(), false), Err(Errno::EMFILE));
        t.close(1).unwrap();
        assert_eq!(t.open(null(), false), Ok(1));
        assert_eq!(t.get(7).err(), Some(Errno::EBADF));
        assert_eq!(t.get(-1).err(), Some(Errno::EBADF));
    }

    #[test]
    fn dup_shares_offset() {
        let mut t = FdTable::new(16);
        let a = t.open(null(), false).unwrap();
        let b = t.duplicate(a, 5, true).unwrap();
        assert_eq!(b, 5);
        t.get_mut(a).unwrap().offset = 42;
        assert_eq!(t.get(b).unwrap().offset, 42);
        assert!(t.cloexec(b).unwrap());
        assert!(t.close(a).unwrap().is_none());
        assert!(t.close(b).unwrap().is_some());
    }

    #[test]
    fn a_forked_table_shares_descriptions_until_the_last_close() {
        let mut t = FdTable::new(16);
        let a = t.open(null(), false).unwrap();
        let skipped = t.open(null(), false).unwrap();
        let mut child = t.fork(&[skipped]);
        t.exchange(&mut child);
        assert_eq!(t.get(skipped).err(), Some(Errno::EBADF));
        t.get_mut(a).unwrap().offset = 7;
        assert!(t.close(a).unwrap().is_none(), "the parent still has it");
        t.exchange(&mut child);
        assert_eq!(t.get(a).unwrap().offset, 7, "one offset for both");
        assert!(t.close(a).unwrap().is_some());
    }

    #[test]
    fn dup2_replaces_and_clone_is_independent() {
        let mut t = FdTable::new(16);
        let a = t.open(null(), false).unwrap();
        let b = t.open(null(), false).unwrap();
        assert_eq!(t.duplicate_to(a, b, false), Ok(b));
        let mut copy = t.clone();
        copy.get_mut(a).unwrap().offset = 9;
        assert_eq!(copy.get(b).unwrap().offset, 9);
        assert_eq!(t.get(b).unwrap().offset, 0);
        assert_eq!(t.duplicate_to(a, 99, false), Err(Errno::EBADF));
    }
}
