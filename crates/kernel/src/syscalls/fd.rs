//! Descriptor management and metadata: close, dup, `fcntl`, `ioctl`, `lseek`, `fstat`,
//! `getdents64`, `ftruncate`, `poll`.

use std::sync::Arc;

use forkvm_image::Kind;
use syscalls::Errno;

use super::{Stop, SysResult};
use crate::errno::from_fs;
use crate::file::{DirEntry, FileObject};
use crate::fileinfo::{self, FileStat};
use crate::pipe::PIPE_CAPACITY;
use crate::process::Process;
use crate::threads::{Resume, SignalWake, Wait, monotonic_ns};

/// Largest `getdents64` buffer we fill in one call.
const MAX_DIRENT_BUFFER: u64 = 16 << 20;

impl Process {
    pub(crate) fn sys_close(&mut self, fd: i32) -> SysResult {
        if let Some(file) = self.files.close(fd)? {
            self.release(file.object);
        }
        Ok(0)
    }

    /// Releases what a closed description held: a node's filesystem reference, a pipe end.
    fn release(&mut self, object: FileObject) {
        match object {
            FileObject::Node { node, .. } => self.fs.close_ref(node),
            FileObject::Pipe { id, write_end } => {
                self.pipes.release(id, write_end);
                // A reader may now see end-of-file, a writer a broken pipe.
                self.threads.wake_io();
            }
            _ => {}
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
                if offset < 0 || offset as u64 > size {
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
        if let Ok(Some(file)) = self.files.close(fd) {
            self.release(file.object);
        }
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
                self.write_user(arg, &(libc::F_UNLCK as i16).to_le_bytes())?;
                Ok(0)
            }
            libc::F_SETLK | libc::F_SETLKW | libc::F_OFD_SETLK | libc::F_OFD_SETLKW => {
                self.files.get(fd)?;
                Ok(0)
            }
            libc::F_GETPIPE_SZ | libc::F_SETPIPE_SZ => match self.files.get(fd)?.object {
                FileObject::Pipe { .. } => Ok(PIPE_CAPACITY as u64),
                _ => Err(Errno::EBADF.into()),
            },
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
                    _ => 0,
                };
                self.write_user(arg, &(available as i32).to_le_bytes())?;
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
        })
    }

    pub(crate) fn sys_fstat(&mut self, fd: i32, out: u64) -> SysResult {
        let stat = self.fd_stat(fd)?;
        self.write_user(out, &stat.to_stat_bytes())?;
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
        self.write_user(
            out,
            &fileinfo::statfs_bytes(self.fs.limit(), self.fs.used_bytes()),
        )?;
        Ok(0)
    }

    /// `poll`: `timeout_ms` negative waits without limit, zero does not wait.
    pub(crate) fn sys_poll(&mut self, fds: u64, count: u64, timeout_ms: i32) -> SysResult {
        let now = monotonic_ns();
        let deadline = match timeout_ms {
            t if t < 0 => PollDeadline::Never,
            0 => PollDeadline::Now,
            t => match self
                .threads
                .restart_deadline()
                .unwrap_or_else(|| now.saturating_add(t as u64 * 1_000_000))
            {
                at if at <= now => PollDeadline::Now,
                at => PollDeadline::At(at),
            },
        };
        self.poll_or_block(fds, count, deadline)
    }

    /// `ppoll`: a null timeout waits without limit. (The signal mask argument takes effect
    /// only while waiting, and no signal is delivered while a thread waits here yet.)
    pub(crate) fn sys_ppoll(&mut self, fds: u64, count: u64, timeout: u64) -> SysResult {
        let deadline = match self.wait_deadline(timeout, false, false)? {
            None => PollDeadline::Never,
            Some(at) if at <= monotonic_ns() => PollDeadline::Now,
            Some(at) => PollDeadline::At(at),
        };
        self.poll_or_block(fds, count, deadline)
    }

    /// Files and devices never block and the host streams are treated as ready (a read of
    /// stdin returns what there is); pipes are ready as their buffers say. With nothing
    /// ready, the thread waits for any I/O in the sandbox, then looks again.
    fn poll_or_block(&mut self, fds: u64, count: u64, deadline: PollDeadline) -> SysResult {
        if count > self.files.max_fds() as u64 {
            return Err(Errno::EINVAL.into());
        }
        let mut raw = self.read_user(fds, (count * 8) as usize)?;
        let mut ready = 0;
        for entry in raw.chunks_exact_mut(8) {
            let fd = i32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
            let events = i16::from_le_bytes(entry[4..6].try_into().expect("2 bytes"));
            let revents = if fd < 0 {
                0
            } else {
                match self.files.get(fd).map(|f| f.object.clone()) {
                    Err(_) => libc::POLLNVAL,
                    Ok(FileObject::Pipe { id, write_end }) => self.pipe_poll(id, write_end, events),
                    Ok(_) => {
                        events
                            & (libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM)
                    }
                }
            };
            entry[6..8].copy_from_slice(&revents.to_le_bytes());
            if revents != 0 {
                ready += 1;
            }
        }
        if ready == 0 {
            match deadline {
                PollDeadline::Now => {}
                PollDeadline::Never => {
                    return Err(Stop::Block(Wait {
                        on_signal: SignalWake::Interrupt,
                        ..Self::io_wait()
                    }));
                }
                PollDeadline::At(at) => {
                    return Err(Stop::Block(Wait {
                        deadline_ns: Some(at),
                        on_timeout: Resume::Restart,
                        on_signal: SignalWake::Interrupt,
                        ..Self::io_wait()
                    }));
                }
            }
        }
        self.write_user(fds, &raw)?;
        Ok(ready)
    }
}

/// When a `poll` with nothing ready stops waiting.
#[derive(Debug, Clone, Copy)]
enum PollDeadline {
    /// At once (a zero timeout).
    Now,
    Never,
    /// At this `CLOCK_MONOTONIC` time.
    At(u64),
}
