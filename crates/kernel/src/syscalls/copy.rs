//! Copies between descriptors without the program's memory: `sendfile` (from a file to
//! anything writable; `shutil.copyfile` and HTTP servers use it) and `copy_file_range`
//! (file to file).

use forkvm_image::Kind;
use syscalls::Errno;

use super::io::Source;
use super::socket::Message;
use super::{ExitReason, Stop, SysResult};
use crate::errno::from_fs;
use crate::file::FileObject;
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
}
