//! Descriptor management and metadata: close, dup, `fcntl`, `ioctl`, `lseek`, `fstat`,
//! `getdents64`, `ftruncate`, and what a closed description releases.

use std::sync::Arc;

use forkvm_image::Kind;
use syscalls::Errno;

use super::SysResult;
use crate::errno::from_fs;
use crate::file::{DirEntry, FileObject};
use crate::fileinfo::{self, FileStat};
use crate::process::Process;

/// Largest `getdents64` buffer we fill in one call.
const MAX_DIRENT_BUFFER: u64 = 16 << 20;

impl Process {
    pub(crate) fn sys_close(&mut self, fd: i32) -> SysResult {
        self.close_fd(fd)?;
        Ok(0)
    }

    /// Closes descriptor `fd`; with its description's last descriptor, the description
    /// leaves every epoll instance and releases what it held.
    pub(crate) fn close_fd(&mut self, fd: i32) -> Result<(), Errno> {
        let description = self.files.description_of(fd)?;
        if let Some(file) = self.files.close(fd)? {
            self.forget_description(description);
            self.release(file.object);
        }
        Ok(())
    }

    /// Releases what a closed description held: a node's filesystem reference, a pipe end,
    /// a socket (and the descriptors in flight to it), a notification object.
    pub(crate) fn release(&mut self, object: FileObject) {
        match object {
            FileObject::Node { node, .. } => self.fs.close_ref(node),
            FileObject::Pipe { id, end } => {
                self.pipes.release(id, end);
                // A reader may now see end-of-file, a writer a broken pipe.
                self.io_event();
            }
            FileObject::Socket(id) => {
                for orphan in self.sockets.release(id) {
                    self.release(orphan.object);
                }
                self.io_event();
            }
            FileObject::Epoll(id) => {
                self.notifiers.epolls.release(id);
            }
            FileObject::EventFd(id) => {
                self.notifiers.eventfds.release(id);
            }
            FileObject::TimerFd(id) => {
                self.notifiers.timerfds.release(id);
            }
            FileObject::SignalFd(id) => {
                self.notifiers.signalfds.release(id);
            }
            FileObject::Console(_)
            | FileObject::Null
            | FileObject::Zero
            | FileObject::Random
            | FileObject::Control
            | FileObject::Generated(_) => {}
        }
    }

    /// A copy of a description now also refers to `object` (a descriptor passed over a
    /// socket): the object stays until both are released.
    pub(crate) fn retain(&mut self, object: &FileObject) {
        match *object {
            FileObject::Node { node, .. } => self.fs.open_ref(node),
            FileObject::Pipe { id, end } => self.pipes.retain(id, end),
            FileObject::Socket(id) => self.sockets.retain(id),
            FileObject::Epoll(id) => self.notifiers.epolls.retain(id),
            FileObject::EventFd(id) => self.notifiers.eventfds.retain(id),
            FileObject::TimerFd(id) => self.notifiers.timerfds.retain(id),
            FileObject::SignalFd(id) => self.notifiers.signalfds.retain(id),
            FileObject::Console(_)
            | FileObject::Null
            | FileObject::Zero
            | FileObject::Random
            | FileObject::Control
            | FileObject::Generated(_) => {}
        }
    }

    pub(crate) fn sys_close_range(&mut self, first: u32, last: u32, flags: u32) -> SysResult {
        const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
        if first > last || flags & !CLOSE_RANGE_CLOEXEC != 0 {
            return Err(Errno::EINVAL.into());
        }
        let targets: Vec<i32> = self
            .files
            .fds()
            .filter(|&fd| (first..=last).contains(&(fd as u32)))
            .collect();
        for fd in targets {
            if flags & CLOSE_RANGE_CLOEXEC != 0 {
                self.files.set_cloexec(fd, true)?;
            } else {
                self.sys_close(fd)?;
            }
        }
        Ok(0)
    }

    pub(crate) fn sys_lseek(&mut self, fd: i32, offset: i64, whence: i32) -> SysResult {
        let file = self.files.get(fd)?;
        let size = match &file.object {
            FileObject::Node { node, .. } => self.fs.stat(*node).map_err(from_fs)?.size,
            FileObject::Generated(content) => content.len() as u64,
            FileObject::Null | FileObject::Zero | FileObject::Random => return Ok(0),
            _ => return Err(Errno::ESPIPE.into()),
        };
        let current = file.offset;
        let target = match whence {
            libc::SEEK_SET => offset,
            libc::SEEK_CUR => (current as i64)
                .checked_add(offset)
                .ok_or(Errno::EOVERFLOW)?,
            libc::SEEK_END => (size as i64).checked_add(offset).ok_or(Errno::EOVERFLOW)?,
            libc::SEEK_DATA => {
                if offset < 0 || offset as u64 >= size {
                    return Err(Errno::ENXIO.into());
                }
                offset
            }
            libc::SEEK_HOLE => {
                if offset < 0 || offset as u64 >= size {
                    return Err(Errno::ENXIO.into());
                }
                size as i64
            }
            _ => return Err(Errno::EINVAL.into()),
        };
        if target < 0 {
            return Err(Errno::EINVAL.into());
        }
        self.files.get_mut(fd)?.offset = target as u64;
        Ok(target as u64)
    }

    pub(crate) fn sys_dup(&mut self, fd: i32) -> SysResult {
        Ok(self.files.duplicate(fd, 0, false)? as u64)
    }

    pub(crate) fn sys_dup2(&mut self, old: i32, new: i32) -> SysResult {
        self.files.get(old)?;
        if old != new {
            self.close_quietly(new);
        }
        Ok(self.files.duplicate_to(old, new, false)? as u64)
    }

    pub(crate) fn sys_dup3(&mut self, old: i32, new: i32, flags: i32) -> SysResult {
        if old == new || flags & !libc::O_CLOEXEC != 0 {
            return Err(Errno::EINVAL.into());
        }
        self.files.get(old)?;
        self.close_quietly(new);
        Ok(self
            .files
            .duplicate_to(old, new, flags & libc::O_CLOEXEC != 0)? as u64)
    }

    /// Closes `fd` if open (for dup2 replacing a descriptor), releasing its node.
    fn close_quietly(&mut self, fd: i32) {
        let _ = self.close_fd(fd);
    }

    pub(crate) fn sys_fcntl(&mut self, fd: i32, cmd: i32, arg: u64) -> SysResult {
        const SETTABLE: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME;
        match cmd {
            libc::F_DUPFD => Ok(self.files.duplicate(fd, arg as i32, false)? as u64),
            libc::F_DUPFD_CLOEXEC => Ok(self.files.duplicate(fd, arg as i32, true)? as u64),
            libc::F_GETFD => Ok(u64::from(self.files.cloexec(fd)?)),
            libc::F_SETFD => {
                self.files
                    .set_cloexec(fd, arg as i32 & libc::FD_CLOEXEC != 0)?;
                Ok(0)
            }
            libc::F_GETFL => Ok(self.files.get(fd)?.status_flags as u64),
            libc::F_SETFL => {
                let file = self.files.get_mut(fd)?;
                file.status_flags = (file.status_flags & !SETTABLE) | (arg as i32 & SETTABLE);
                Ok(0)
            }
            libc::F_GETLK | libc::F_OFD_GETLK => {
                self.files.get(fd)?;
                // struct flock starts with l_type (short): nobody else holds locks.
                self.write_obj(arg, &(libc::F_UNLCK as i16))?;
                Ok(0)
            }
            libc::F_SETLK | libc::F_SETLKW | libc::F_OFD_SETLK | libc::F_OFD_SETLKW => {
                self.files.get(fd)?;
                Ok(0)
            }
            libc::F_GETPIPE_SZ | libc::F_SETPIPE_SZ => {
                let FileObject::Pipe { id, .. } = self.files.get(fd)?.object else {
                    return Err(Errno::EBADF.into());
                };
                let pipe = self.pipes.get_mut(id).ok_or(Errno::EBADF)?;
                if cmd == libc::F_GETPIPE_SZ {
                    return Ok(pipe.capacity() as u64);
                }
                let size = pipe.resize(arg)?;
                // A larger pipe may have room for a waiting writer.
                self.io_event();
                Ok(size as u64)
            }
            _ => {
                self.files.get(fd)?;
                Err(Errno::EINVAL.into())
            }
        }
    }

    pub(crate) fn sys_ioctl(&mut self, fd: i32, request: u64, arg: u64) -> SysResult {
        let file = self.files.get(fd)?;
        match request as libc::c_ulong {
            libc::FIOCLEX | libc::FIONCLEX => {
                self.files
                    .set_cloexec(fd, request as libc::c_ulong == libc::FIOCLEX)?;
                Ok(0)
            }
            libc::FIONREAD => {
                let available = match &file.object {
                    FileObject::Node { node, .. } => self
                        .fs
                        .stat(*node)
                        .map_err(from_fs)?
                        .size
                        .saturating_sub(file.offset),
                    FileObject::Pipe { id, .. } => {
                        self.pipes.get(*id).map_or(0, |p| p.data.len() as u64)
                    }
                    FileObject::Socket(id) => self
                        .sockets
                        .get(*id)
                        .map_or(0, |s| s.readable_bytes() as u64),
                    _ => 0,
                };
                self.write_obj(arg, &(available as i32))?;
                Ok(0)
            }
            libc::FIONBIO => {
                let on = self.read_user(arg, 4)? != [0, 0, 0, 0];
                let file = self.files.get_mut(fd)?;
                if on {
                    file.status_flags |= libc::O_NONBLOCK;
                } else {
                    file.status_flags &= !libc::O_NONBLOCK;
                }
                Ok(0)
            }
            // Nothing in the sandbox is a terminal (TCGETS, TIOCGWINSZ, …).
            _ => Err(Errno::ENOTTY.into()),
        }
    }

    /// Attributes of an open description.
    pub(crate) fn fd_stat(&self, fd: i32) -> Result<FileStat, Errno> {
        let file = self.files.get(fd)?;
        Ok(match &file.object {
            FileObject::Node { node, .. } => self.fs.stat(*node).map_err(from_fs)?.into(),
            FileObject::Console(_) => {
                FileStat::device(libc::S_IFIFO | 0o600, (0, 0), 3 + fd as u64)
            }
            FileObject::Null => FileStat::device(libc::S_IFCHR | 0o666, (1, 3), 1),
            FileObject::Zero => FileStat::device(libc::S_IFCHR | 0o666, (1, 5), 2),
            FileObject::Random => FileStat::device(libc::S_IFCHR | 0o666, (1, 9), 3),
            FileObject::Control => FileStat::device(libc::S_IFSOCK | 0o600, (0, 0), 99),
            FileObject::Generated(_) => FileStat::proc_file(),
            FileObject::Pipe { id, .. } => {
                let mut stat = FileStat::device(libc::S_IFIFO | 0o600, (0, 0), 100 + *id as u64);
                stat.size = self.pipes.get(*id).map_or(0, |p| p.data.len() as u64);
                stat
            }
            FileObject::Socket(id) => {
                FileStat::device(libc::S_IFSOCK | 0o777, (0, 0), 0x10_0000 + *id as u64)
            }
            // Anonymous inodes: Linux reports mode 0600 without a file type.
            FileObject::Epoll(_)
            | FileObject::EventFd(_)
            | FileObject::TimerFd(_)
            | FileObject::SignalFd(_) => FileStat::device(0o600, (0, 0), 0x20_0000),
        })
    }

    pub(crate) fn sys_fstat(&mut self, fd: i32, out: u64) -> SysResult {
        let stat = self.fd_stat(fd)?;
        self.write_obj(out, &stat.to_stat())?;
        Ok(0)
    }

    pub(crate) fn sys_getdents64(&mut self, fd: i32, buf: u64, len: u64) -> SysResult {
        let len = len.min(MAX_DIRENT_BUFFER);
        self.check_user(buf, len)?;
        let file = self.files.get(fd)?;
        let FileObject::Node { node, listing } = &file.object else {
            return Err(Errno::ENOTDIR.into());
        };
        let (node, offset) = (*node, file.offset);
        let listing = match listing {
            Some(listing) => listing.clone(),
            None => {
                let listing = Arc::new(self.list_directory(node)?);
                if let FileObject::Node { listing: slot, .. } = &mut self.files.get_mut(fd)?.object
                {
                    *slot = Some(listing.clone());
                }
                listing
            }
        };
        let (bytes, count) = fileinfo::encode_dirents(&listing, offset as usize, len as usize);
        if count == 0 && (offset as usize) < listing.len() {
            return Err(Errno::EINVAL.into());
        }
        self.write_user(buf, &bytes)?;
        self.files.get_mut(fd)?.offset = offset + count as u64;
        Ok(bytes.len() as u64)
    }

    /// `.`, `..` and the merged entries of a directory.
    fn list_directory(&self, node: forkvm_image::NodeId) -> Result<Vec<DirEntry>, Errno> {
        if self.fs.kind(node).map_err(from_fs)? != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let parent = self.fs.parent(node).map_err(from_fs)?;
        let mut entries = vec![
            DirEntry {
                name: b".".to_vec(),
                ino: node.ino(),
                kind: libc::DT_DIR,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: parent.ino(),
                kind: libc::DT_DIR,
            },
        ];
        for entry in self.fs.read_dir(node).map_err(from_fs)? {
            entries.push(DirEntry {
                name: entry.name,
                ino: entry.node.ino(),
                kind: fileinfo::dirent_type(entry.kind),
            });
        }
        Ok(entries)
    }

    pub(crate) fn sys_ftruncate(&mut self, fd: i32, len: i64) -> SysResult {
        let len = u64::try_from(len).map_err(|_| Errno::EINVAL)?;
        let file = self.files.get(fd)?;
        let FileObject::Node { node, .. } = &file.object else {
            return Err(Errno::EINVAL.into());
        };
        if !file.writable() {
            return Err(Errno::EINVAL.into());
        }
        let node = *node;
        self.fs.truncate(node, len).map_err(from_fs)?;
        Ok(0)
    }

    /// `fallocate`: mode 0 makes the file at least `offset + len` long (the overlay holds
    /// no holes, so there is nothing else to reserve); other modes are not offered.
    pub(crate) fn sys_fallocate(&mut self, fd: i32, mode: i32, offset: i64, len: i64) -> SysResult {
        let file = self.files.get(fd)?;
        let FileObject::Node { node, .. } = &file.object else {
            return Err(match file.object {
                FileObject::Pipe { .. } | FileObject::Socket { .. } => Errno::ESPIPE,
                _ => Errno::ENODEV,
            }
            .into());
        };
        if offset < 0 || len <= 0 {
            return Err(Errno::EINVAL.into());
        }
        if !file.writable() {
            return Err(Errno::EBADF.into());
        }
        if mode != 0 {
            return Err(Errno::EOPNOTSUPP.into());
        }
        let node = *node;
        let end = (offset as u64)
            .checked_add(len as u64)
            .ok_or(Errno::EFBIG)?;
        if self.fs.stat(node).map_err(from_fs)?.size < end {
            self.fs.truncate(node, end).map_err(from_fs)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_fsync(&mut self, fd: i32) -> SysResult {
        self.files.get(fd)?;
        Ok(0)
    }

    pub(crate) fn sys_fchmod(&mut self, fd: i32, mode: u32) -> SysResult {
        if let FileObject::Node { node, .. } = self.files.get(fd)?.object {
            self.fs.set_mode(node, mode).map_err(from_fs)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_fchdir(&mut self, fd: i32) -> SysResult {
        let FileObject::Node { node, .. } = self.files.get(fd)?.object else {
            return Err(Errno::ENOTDIR.into());
        };
        if self.fs.kind(node).map_err(from_fs)? != Kind::Dir {
            return Err(Errno::ENOTDIR.into());
        }
        self.cwd = self.fs.canonical_path(node).map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_fstatfs(&mut self, fd: i32, out: u64) -> SysResult {
        self.files.get(fd)?;
        self.write_obj(
            out,
            &fileinfo::statfs(self.fs.limit(), self.fs.used_bytes()),
        )?;
        Ok(0)
    }
}
