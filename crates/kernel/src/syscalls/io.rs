//! Data transfer: read/write and their vector and positional forms.

use forkvm_image::Kind;
use syscalls::Errno;
use vm_memory::ByteValued;

use super::{ExitReason, Stop, SysResult};
use crate::control::PendingRead;
use crate::errno::from_fs;
use crate::file::{FileObject, Stream};
use crate::process::Process;

/// Largest transfer one read/write call performs (Linux caps at 2 GiB; a short count is
/// always allowed and keeps host buffers bounded).
pub(crate) const MAX_IO: u64 = 16 << 20;
/// Bytes copied per step between guest memory and a host stream.
const CHUNK: u64 = 1 << 20;
/// `struct iovec`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Iovec {
    iov_base: u64,
    iov_len: u64,
}

// SAFETY: `repr(C)`, two `u64`s: no padding, every byte pattern is a value.
unsafe impl ByteValued for Iovec {}

const _: () = assert!(size_of::<Iovec>() == 16);

/// Most iovec entries per call (`IOV_MAX`).
const IOV_MAX: u64 = 1024;

/// Bytes a write takes: in program memory, or already on the host (`sendfile`).
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    Guest { addr: u64, len: usize },
    Host(&'a [u8]),
}

impl Source<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Source::Guest { len, .. } => *len,
            Source::Host(data) => data.len(),
        }
    }

    /// The first `n` bytes, copied out.
    pub(crate) fn take(&self, process: &Process, n: usize) -> Result<Vec<u8>, Errno> {
        match self {
            Source::Guest { addr, len } => process.read_user(*addr, n.min(*len)),
            Source::Host(data) => Ok(data[..n.min(data.len())].to_vec()),
        }
    }
}

/// Where a transfer happens: at the description's offset (advancing it) or at a fixed one.
#[derive(Clone, Copy)]
enum At {
    Cursor,
    Offset(u64),
}

fn file_flags_nonblocking(process: &Process, fd: i32) -> Result<bool, Errno> {
    Ok(process.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0)
}

impl Process {
    fn io_offset(&self, fd: i32, at: At) -> Result<u64, Errno> {
        Ok(match at {
            At::Cursor => self.files.get(fd)?.offset,
            At::Offset(o) => o,
        })
    }

    /// Reads up to `len` bytes from `fd` into guest memory at `buf`.
    fn read_into(&mut self, fd: i32, buf: u64, len: u64, at: At) -> SysResult {
        let len = len.min(MAX_IO);
        self.check_user(buf, len)?;
        let file = self.files.get(fd)?;
        if !file.readable() {
            return Err(Errno::EBADF.into());
        }
        let object = file.object.clone();
        if matches!(at, At::Offset(_))
            && !matches!(object, FileObject::Node { .. } | FileObject::Generated(_))
        {
            return Err(Errno::ESPIPE.into());
        }
        let n = match object {
            FileObject::Generated(content) => {
                let offset = self.io_offset(fd, at)?;
                let start = usize::try_from(offset).map_or(content.len(), |o| o.min(content.len()));
                let end = start.saturating_add(len as usize).min(content.len());
                self.write_user(buf, &content[start..end])?;
                (end - start) as u64
            }
            FileObject::Node { node, .. } => {
                if self.fs.kind(node).map_err(from_fs)? == Kind::Dir {
                    return Err(Errno::EISDIR.into());
                }
                self.sync_shared_to_file(node)?;
                let offset = self.io_offset(fd, at)?;
                let mut data = vec![0u8; len.min(CHUNK) as usize];
                let mut done = 0u64;
                while done < len {
                    let want = ((len - done) as usize).min(data.len());
                    let n = self
                        .fs
                        .read_at(node, offset + done, &mut data[..want])
                        .map_err(from_fs)?;
                    if n == 0 {
                        break;
                    }
                    self.write_user(buf + done, &data[..n])?;
                    done += n as u64;
                }
                done
            }
            FileObject::Console(Stream::Stdin) => {
                let mut data = vec![0u8; len.min(CHUNK) as usize];
                let n = self.console.read(&mut data).map_err(|_| Errno::EIO)?;
                self.write_user(buf, &data[..n])?;
                n as u64
            }
            FileObject::Console(_) => return Err(Errno::EBADF.into()),
            FileObject::Null => 0,
            FileObject::Zero => {
                self.zero_user(buf, len)?;
                len
            }
            FileObject::Random => {
                let n = len.min(CHUNK);
                let mut data = vec![0u8; n as usize];
                crate::entropy::host_random(&mut data);
                self.write_user(buf, &data)?;
                n
            }
            FileObject::Pipe { id, .. } => {
                let nonblocking = self.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0;
                return self.pipe_read(id, buf, len, nonblocking);
            }
            FileObject::Socket(_) => return self.socket_read(fd, &[(buf, len)]),
            FileObject::EventFd(id) => {
                return self.eventfd_read(id, buf, len, file_flags_nonblocking(self, fd)?);
            }
            FileObject::TimerFd(id) => {
                return self.timerfd_read(id, buf, len, file_flags_nonblocking(self, fd)?);
            }
            FileObject::SignalFd(id) => {
                return self.signalfd_read(id, buf, len, file_flags_nonblocking(self, fd)?);
            }
            FileObject::Epoll(_) => return Err(Errno::EINVAL.into()),
            FileObject::Control => {
                if !self.control.has_inbound() {
                    self.control.set_pending(PendingRead { buf, len });
                    return Err(Stop::AwaitingControl);
                }
                let bytes = self.control.take_inbound(len as usize);
                self.write_user(buf, &bytes)?;
                bytes.len() as u64
            }
        };
        if let At::Cursor = at {
            self.files.get_mut(fd)?.offset += n;
        }
        Ok(n)
    }

    fn zero_user(&self, addr: u64, len: u64) -> Result<(), Errno> {
        self.check_user_writable(addr, len)?;
        self.ram.fill_zero(addr, len).map_err(|_| Errno::EFAULT)
    }

    /// Writes `len` bytes of guest memory at `buf` to `fd`.
    fn write_from(&mut self, fd: i32, buf: u64, len: u64, at: At) -> SysResult {
        let len = len.min(MAX_IO);
        self.check_user(buf, len)?;
        let file = self.files.get(fd)?;
        if !file.writable() {
            return Err(Errno::EBADF.into());
        }
        let append = file.status_flags & libc::O_APPEND != 0;
        let object = file.object.clone();
        if matches!(at, At::Offset(_)) && !matches!(object, FileObject::Node { .. }) {
            return Err(Errno::ESPIPE.into());
        }
        match object {
            FileObject::Node { node, .. } => {
                let mut offset = match at {
                    At::Cursor if append => self.fs.stat(node).map_err(from_fs)?.size,
                    other => self.io_offset(fd, other)?,
                };
                let start = offset;
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let data = self.read_user(buf + done, n as usize)?;
                    match self.fs.write_at(node, offset, &data) {
                        Ok(written) => {
                            offset += written as u64;
                            done += written as u64;
                        }
                        // A partial write is reported as such; an error only if nothing was
                        // written (as Linux does).
                        Err(_) if done > 0 => break,
                        Err(e) => return Err(from_fs(e).into()),
                    }
                }
                if let At::Cursor = at {
                    self.files.get_mut(fd)?.offset = start + done;
                }
                self.sync_file_to_shared(node, start, done)?;
                Ok(done)
            }
            FileObject::Console(stream) => {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK);
                    let data = self.read_user(buf + done, n as usize)?;
                    if let Err(limit) = self.console.write(stream, &data) {
                        return Err(Stop::Exit(ExitReason::OutputLimit(limit)));
                    }
                    done += n;
                }
                Ok(len)
            }
            FileObject::Null | FileObject::Zero | FileObject::Random => Ok(len),
            FileObject::Generated(_) => Err(Errno::EBADF.into()),
            FileObject::Pipe { id, .. } => {
                let nonblocking = file_flags_nonblocking(self, fd)?;
                let data = Source::Guest {
                    addr: buf,
                    len: len as usize,
                };
                self.pipe_write(id, data, nonblocking)
            }
            FileObject::Socket(_) => self.socket_write(fd, &[(buf, len)]),
            FileObject::EventFd(id) => {
                let nonblocking = file_flags_nonblocking(self, fd)?;
                self.eventfd_write(id, buf, len, nonblocking)
            }
            FileObject::TimerFd(_) | FileObject::SignalFd(_) | FileObject::Epoll(_) => {
                Err(Errno::EINVAL.into())
            }
            FileObject::Control => {
                let data = self.read_user(buf, len as usize)?;
                if !self.control.push_outbound(&data) {
                    return Err(Errno::EFBIG.into());
                }
                Ok(len)
            }
        }
    }

    pub(crate) fn sys_read(&mut self, fd: i32, buf: u64, len: u64) -> SysResult {
        self.read_into(fd, buf, len, At::Cursor)
    }

    pub(crate) fn sys_write(&mut self, fd: i32, buf: u64, len: u64) -> SysResult {
        self.write_from(fd, buf, len, At::Cursor)
    }

    pub(crate) fn sys_pread(&mut self, fd: i32, buf: u64, len: u64, offset: i64) -> SysResult {
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        self.read_into(fd, buf, len, At::Offset(offset))
    }

    pub(crate) fn sys_pwrite(&mut self, fd: i32, buf: u64, len: u64, offset: i64) -> SysResult {
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        self.write_from(fd, buf, len, At::Offset(offset))
    }

    pub(crate) fn read_iovecs(&self, iov: u64, count: u64) -> Result<Vec<(u64, u64)>, Errno> {
        if count > IOV_MAX {
            return Err(Errno::EINVAL);
        }
        let mut total = 0u64;
        let vecs: Vec<(u64, u64)> = self
            .read_objs::<Iovec>(iov, count as usize)?
            .into_iter()
            .map(|v| (v.iov_base, v.iov_len))
            .collect();
        for &(_, len) in &vecs {
            total = total.checked_add(len).ok_or(Errno::EINVAL)?;
            if total > isize::MAX as u64 {
                return Err(Errno::EINVAL);
            }
        }
        Ok(vecs)
    }

    pub(crate) fn sys_readv(
        &mut self,
        fd: i32,
        iov: u64,
        count: u64,
        offset: Option<i64>,
    ) -> SysResult {
        if offset.is_none() && matches!(self.files.get(fd)?.object, FileObject::Socket(_)) {
            // One receive: a datagram is not split across iovecs' calls.
            let vecs = self.read_iovecs(iov, count)?;
            return self.socket_read(fd, &vecs);
        }
        self.transfer_vectored(fd, iov, count, offset, Self::read_into)
    }

    pub(crate) fn sys_writev(
        &mut self,
        fd: i32,
        iov: u64,
        count: u64,
        offset: Option<i64>,
    ) -> SysResult {
        if offset.is_none() {
            match self.files.get(fd)?.object {
                FileObject::Socket(_) => {
                    let vecs = self.read_iovecs(iov, count)?;
                    return self.socket_write(fd, &vecs);
                }
                FileObject::Console(stream @ (Stream::Stdout | Stream::Stderr)) => {
                    return self.console_writev(stream, iov, count);
                }
                _ => {}
            }
        }
        self.transfer_vectored(fd, iov, count, offset, Self::write_from)
    }

    /// `writev` to stdout or stderr: the pieces gathered into writes of up to `CHUNK`
    /// bytes, as one `write` of them all would make (a program writing a line as many
    /// small pieces sends the host one chunk, not one per piece).
    fn console_writev(&mut self, stream: Stream, iov: u64, count: u64) -> SysResult {
        let vecs = self.read_iovecs(iov, count)?;
        let mut gathered: Vec<u8> = Vec::new();
        let mut total = 0u64;
        let flush = |p: &mut Self, gathered: &mut Vec<u8>| -> Result<(), Stop> {
            if !gathered.is_empty() {
                p.console
                    .write(stream, gathered)
                    .map_err(|limit| Stop::Exit(ExitReason::OutputLimit(limit)))?;
                gathered.clear();
            }
            Ok(())
        };
        for (base, len) in vecs {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK - gathered.len() as u64);
                match self.read_user(base + done, n as usize) {
                    Ok(data) => gathered.extend_from_slice(&data),
                    // Linux writes what came before a bad piece and reports that.
                    Err(e) if total + done == 0 => return Err(e.into()),
                    Err(_) => {
                        flush(self, &mut gathered)?;
                        return Ok(total + done);
                    }
                }
                done += n;
                if gathered.len() as u64 == CHUNK {
                    flush(self, &mut gathered)?;
                }
            }
            total += len;
        }
        flush(self, &mut gathered)?;
        Ok(total)
    }

    /// `readv`/`writev` and their positional forms: one transfer per iovec until one comes
    /// up short. An error after some bytes moved ends early with the count so far (as Linux
    /// does); an ending of the sandbox always propagates.
    fn transfer_vectored(
        &mut self,
        fd: i32,
        iov: u64,
        count: u64,
        offset: Option<i64>,
        transfer: fn(&mut Self, i32, u64, u64, At) -> SysResult,
    ) -> SysResult {
        let vecs = self.read_iovecs(iov, count)?;
        let mut offset = offset
            .map(|o| u64::try_from(o).map_err(|_| Errno::EINVAL))
            .transpose()?;
        let mut total = 0;
        for (base, len) in vecs {
            if len == 0 {
                continue;
            }
            let at = offset.map_or(At::Cursor, At::Offset);
            let n = match transfer(self, fd, base, len, at) {
                Ok(n) => n,
                Err(Stop::Errno(e)) if total == 0 => return Err(e.into()),
                Err(Stop::Errno(_)) => break,
                Err(stop) if total == 0 => return Err(stop),
                // Some moved already: that is the answer, not a wait.
                Err(Stop::Block(_)) => {
                    total += self.threads.progress();
                    self.threads.set_progress(0);
                    break;
                }
                Err(Stop::AwaitingControl) => {
                    // Not parking after all: the bytes already read are the answer.
                    self.control.take_pending();
                    break;
                }
                Err(stop) => return Err(stop),
            };
            total += n;
            offset = offset.map(|o| o + n);
            if n < len {
                break;
            }
        }
        Ok(total)
    }
}
