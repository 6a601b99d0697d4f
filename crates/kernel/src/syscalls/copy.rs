//! Copies between descriptors without the program's memory: `sendfile` (from a file to
//! anything writable; `shutil.copyfile` and HTTP servers use it), `copy_file_range`
//! (file to file), and the pipe family: `splice` (into or out of a pipe), `tee` (pipe to
//! pipe, leaving the data) and `vmsplice` (memory and a pipe).

use forkvm_image::Kind;
use syscalls::Errno;

use super::io::Source;
use super::socket::Message;
use super::{ExitReason, Stop, SysResult};
use crate::errno::from_fs;
use crate::file::FileObject;
use crate::pipe::PipeEnd;
use crate::process::Process;

/// The most one call copies (a short count is always allowed; it bounds host buffers).
const MAX_COPY: u64 = 4 << 20;

impl Process {
    /// The regular file behind `fd`, readable.
    fn readable_file(&self, fd: i32) -> Result<forkvm_image::NodeId, Errno> {
        let file = self.files.get(fd)?;
        if !file.readable() {
            return Err(Errno::EBADF);
        }
        match file.object {
            FileObject::Node { node, .. } if self.fs.kind(node).map_err(from_fs)? == Kind::File => {
                Ok(node)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    /// Reads an `loff_t` argument (null: use the description's offset).
    fn offset_arg(&self, ptr: u64) -> Result<Option<u64>, Errno> {
        if ptr == 0 {
            return Ok(None);
        }
        let offset = self.read_u64(ptr)? as i64;
        u64::try_from(offset).map(Some).map_err(|_| Errno::EINVAL)
    }

    /// Reads up to `len` bytes of file `fd` at `offset` (or its cursor).
    fn read_file_bytes(
        &mut self,
        fd: i32,
        offset: Option<u64>,
        len: u64,
    ) -> Result<Vec<u8>, Errno> {
        let node = self.readable_file(fd)?;
        self.sync_shared_to_file(node)?;
        let at = match offset {
            Some(at) => at,
            None => self.files.get(fd)?.offset,
        };
        let mut data = vec![0u8; len.min(MAX_COPY) as usize];
        let mut done = 0;
        while done < data.len() {
            let n = self
                .fs
                .read_at(node, at + done as u64, &mut data[done..])
                .map_err(from_fs)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        data.truncate(done);
        Ok(data)
    }

    /// Writes host bytes to `fd` as `write` would (files at their cursor, or `at`).
    fn write_host(&mut self, fd: i32, data: &[u8], at: Option<u64>) -> SysResult {
        let file = self.files.get(fd)?;
        if !file.writable() {
            return Err(Errno::EBADF.into());
        }
        let nonblocking = file.status_flags & libc::O_NONBLOCK != 0;
        match file.object.clone() {
            FileObject::Node { node, .. } => {
                if self.fs.kind(node).map_err(from_fs)? != Kind::File {
                    return Err(Errno::EINVAL.into());
                }
                let append = file.status_flags & libc::O_APPEND != 0;
                let offset = match at {
                    Some(at) => at,
                    None if append => self.fs.stat(node).map_err(from_fs)?.size,
                    None => file.offset,
                };
                let n = self.fs.write_at(node, offset, data).map_err(from_fs)?;
                if at.is_none() {
                    self.files.get_mut(fd)?.offset = offset + n as u64;
                }
                self.sync_file_to_shared(node, offset, n as u64)?;
                Ok(n as u64)
            }
            FileObject::Console(stream) => match self.console.write(stream, data) {
                Ok(()) => Ok(data.len() as u64),
                Err(limit) => Err(Stop::Exit(ExitReason::OutputLimit(limit))),
            },
            FileObject::Null | FileObject::Zero | FileObject::Random => Ok(data.len() as u64),
            FileObject::Pipe { id, .. } => self.pipe_write(id, Source::Host(data), nonblocking),
            FileObject::Socket(id) => {
                self.socket_send_data(id, data, Message::plain(), 0, nonblocking)
            }
            _ => Err(Errno::EINVAL.into()),
        }
    }

    /// `sendfile(out, in, offset, count)`: `in` is a regular file, read at `*offset` (which
    /// advances) or at its cursor.
    pub(crate) fn sys_sendfile(
        &mut self,
        out_fd: i32,
        in_fd: i32,
        offset_ptr: u64,
        count: u64,
    ) -> SysResult {
        let offset = self.offset_arg(offset_ptr)?;
        let out = self.files.get(out_fd)?;
        if !out.writable() {
            return Err(Errno::EBADF.into());
        }
        if out.status_flags & libc::O_APPEND != 0 {
            return Err(Errno::EINVAL.into());
        }
        let data = self.read_file_bytes(in_fd, offset, count)?;
        if data.is_empty() {
            return Ok(0);
        }
        let n = self.write_host(out_fd, &data, None)?;
        match offset {
            Some(at) => self.write_u64(offset_ptr, at + n)?,
            None => self.files.get_mut(in_fd)?.offset += n,
        }
        Ok(n)
    }

    /// `copy_file_range`: file to file, each at its `*offset` (advancing) or cursor.
    pub(crate) fn sys_copy_file_range(
        &mut self,
        in_fd: i32,
        in_offset_ptr: u64,
        out_fd: i32,
        out_offset_ptr: u64,
        count: u64,
        flags: u32,
    ) -> SysResult {
        if flags != 0 {
            return Err(Errno::EINVAL.into());
        }
        let in_offset = self.offset_arg(in_offset_ptr)?;
        let out_offset = self.offset_arg(out_offset_ptr)?;
        let out = self.files.get(out_fd)?;
        if !out.writable() {
            return Err(Errno::EBADF.into());
        }
        if out.status_flags & libc::O_APPEND != 0 {
            return Err(Errno::EBADF.into());
        }
        if !matches!(out.object, FileObject::Node { .. }) {
            return Err(Errno::EINVAL.into());
        }
        let data = self.read_file_bytes(in_fd, in_offset, count)?;
        if data.is_empty() {
            return Ok(0);
        }
        let n = self.write_host(out_fd, &data, out_offset)?;
        match in_offset {
            Some(at) => self.write_u64(in_offset_ptr, at + n)?,
            None => self.files.get_mut(in_fd)?.offset += n,
        }
        if let Some(at) = out_offset {
            self.write_u64(out_offset_ptr, at + n)?;
        }
        Ok(n)
    }

    /// The pipe behind `fd`, if it is one, and which end the descriptor holds.
    fn pipe_of(&self, fd: i32) -> Result<Option<(usize, PipeEnd)>, Errno> {
        Ok(match self.files.get(fd)?.object {
            FileObject::Pipe { id, end } => Some((id, end)),
            _ => None,
        })
    }

    /// Whether an operation on `fd` must not wait: its `O_NONBLOCK`, or `SPLICE_F_NONBLOCK`.
    fn splice_nonblocking(&self, fd: i32, flags: u32) -> Result<bool, Errno> {
        Ok(flags & SPLICE_F_NONBLOCK != 0
            || self.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0)
    }

    /// Up to `len` bytes at the front of pipe `id`, without taking them; `Ok(None)` at the
    /// end (empty, no writer). An empty pipe with a writer waits (or `EAGAIN`).
    fn pipe_front(
        &mut self,
        id: usize,
        len: u64,
        nonblocking: bool,
    ) -> Result<Option<Vec<u8>>, Stop> {
        let pipe = self.pipes.get(id).ok_or(Errno::EBADF)?;
        if pipe.data.is_empty() {
            if pipe.writers == 0 && (pipe.had_writer || nonblocking) {
                return Ok(None);
            }
            return Err(self.wait_or_again(nonblocking));
        }
        let n = len.min(MAX_COPY) as usize;
        Ok(Some(pipe.data.iter().take(n).copied().collect()))
    }

    /// `splice(in, in_off, out, out_off, len, flags)`: moves bytes out of a pipe into any
    /// writable descriptor, or from a regular file into a pipe. An offset is only allowed on
    /// the side that is not a pipe (`ESPIPE`).
    pub(crate) fn sys_splice(
        &mut self,
        in_fd: i32,
        in_offset_ptr: u64,
        out_fd: i32,
        out_offset_ptr: u64,
        len: u64,
        flags: u32,
    ) -> SysResult {
        if flags & !SPLICE_FLAGS != 0 {
            return Err(Errno::EINVAL.into());
        }
        let (from, to) = (self.pipe_of(in_fd)?, self.pipe_of(out_fd)?);
        if !self.files.get(in_fd)?.readable() || !self.files.get(out_fd)?.writable() {
            return Err(Errno::EBADF.into());
        }
        if (from.is_some() && in_offset_ptr != 0) || (to.is_some() && out_offset_ptr != 0) {
            return Err(Errno::ESPIPE.into());
        }
        match (from, to) {
            (Some((a, _)), Some((b, _))) if a == b => Err(Errno::EINVAL.into()),
            (Some((pipe, _)), _) => {
                let out_offset = self.offset_arg(out_offset_ptr)?;
                if out_offset.is_some()
                    && self.files.get(out_fd)?.status_flags & libc::O_APPEND != 0
                {
                    return Err(Errno::EINVAL.into());
                }
                if len == 0 {
                    return Ok(0);
                }
                let nonblocking = self.splice_nonblocking(in_fd, flags)?;
                let Some(data) = self.pipe_front(pipe, len, nonblocking)? else {
                    return Ok(0);
                };
                // Only what the destination took leaves the pipe.
                let n = self.write_host(out_fd, &data, out_offset)?;
                if let Some(pipe) = self.pipes.get_mut(pipe) {
                    pipe.data.drain(..n as usize);
                }
                self.io_event();
                if let Some(at) = out_offset {
                    self.write_u64(out_offset_ptr, at + n)?;
                }
                Ok(n)
            }
            (None, Some((pipe, _))) => {
                let in_offset = self.offset_arg(in_offset_ptr)?;
                if len == 0 {
                    return Ok(0);
                }
                let nonblocking = self.splice_nonblocking(out_fd, flags)?;
                let room = self.pipes.get(pipe).ok_or(Errno::EBADF)?.room() as u64;
                // A full pipe waits (or a pipe without readers raises SIGPIPE) as a write does.
                let want = len.min(room.max(1));
                let data = self.read_file_bytes(in_fd, in_offset, want)?;
                if data.is_empty() {
                    return Ok(0);
                }
                let n = self.pipe_write(pipe, Source::Host(&data), nonblocking)?;
                match in_offset {
                    Some(at) => self.write_u64(in_offset_ptr, at + n)?,
                    None => self.files.get_mut(in_fd)?.offset += n,
                }
                Ok(n)
            }
            // Neither is a pipe; sockets and other streams as the source are not supported.
            (None, None) => Err(Errno::EINVAL.into()),
        }
    }

    /// `tee(in, out, len, flags)`: copies bytes from one pipe to another, leaving them in the
    /// first.
    pub(crate) fn sys_tee(&mut self, in_fd: i32, out_fd: i32, len: u64, flags: u32) -> SysResult {
        if flags & !SPLICE_FLAGS != 0 {
            return Err(Errno::EINVAL.into());
        }
        let (Some((from, from_end)), Some((to, to_end))) =
            (self.pipe_of(in_fd)?, self.pipe_of(out_fd)?)
        else {
            return Err(Errno::EINVAL.into());
        };
        if !from_end.reads() || !to_end.writes() {
            return Err(Errno::EBADF.into());
        }
        if from == to {
            return Err(Errno::EINVAL.into());
        }
        if len == 0 {
            return Ok(0);
        }
        let nonblocking = self.splice_nonblocking(in_fd, flags)?;
        let Some(data) = self.pipe_front(from, len, nonblocking)? else {
            return Ok(0);
        };
        let nonblocking = self.splice_nonblocking(out_fd, flags)?;
        self.pipe_write(to, Source::Host(&data), nonblocking)
    }

    /// `vmsplice(fd, iov, count, flags)`: the program's memory into a pipe (as `writev`) or
    /// out of one (as `readv`); the pages are copied, never shared.
    pub(crate) fn sys_vmsplice(&mut self, fd: i32, iov: u64, count: u64, flags: u32) -> SysResult {
        if flags & !(SPLICE_FLAGS | SPLICE_F_GIFT) != 0 {
            return Err(Errno::EINVAL.into());
        }
        match self.pipe_of(fd)? {
            Some((_, end)) if end.writes() => self.sys_writev(fd, iov, count, None),
            Some(_) => self.sys_readv(fd, iov, count, None),
            None => Err(Errno::EBADF.into()),
        }
    }
}

/// `splice` flags: `SPLICE_F_MOVE` and `SPLICE_F_MORE` are hints; `SPLICE_F_NONBLOCK`
/// makes the pipe side nonblocking.
const SPLICE_F_MOVE: u32 = 1;
const SPLICE_F_NONBLOCK: u32 = 2;
const SPLICE_F_MORE: u32 = 4;
const SPLICE_F_GIFT: u32 = 8;
const SPLICE_FLAGS: u32 = SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE;
