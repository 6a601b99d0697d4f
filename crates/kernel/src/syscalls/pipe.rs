//! `pipe`/`pipe2` and the pipe ends' read, write and poll behaviour (see `crate::pipe`).

use syscalls::Errno;

use super::io::Source;
use super::{Stop, SysResult};
use crate::file::{FileObject, OpenFile};
use crate::pipe::{PIPE_BUF, PipeEnd};
use crate::process::Process;
use crate::signals::SigInfo;
use crate::threads::{Resume, SignalWake, Wait, WaitOn};

impl Process {
    pub(crate) fn sys_pipe2(&mut self, fds: u64, flags: i32) -> SysResult {
        if flags & !(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_DIRECT) != 0 {
            return Err(Errno::EINVAL.into());
        }
        self.check_user(fds, 8)?;
        let id = self.pipes.create();
        let name = format!("pipe:[{id}]").into_bytes();
        let status = flags & libc::O_NONBLOCK;
        let cloexec = flags & libc::O_CLOEXEC != 0;
        let read_end = OpenFile::new(
            FileObject::Pipe {
                id,
                end: PipeEnd::Read,
            },
            libc::O_RDONLY | status,
            name.clone(),
        );
        let write_end = OpenFile::new(
            FileObject::Pipe {
                id,
                end: PipeEnd::Write,
            },
            libc::O_WRONLY | status,
            name,
        );
        let read_fd = match self.files.open(read_end, cloexec) {
            Ok(fd) => fd,
            Err(e) => {
                self.pipes.release(id, PipeEnd::Read);
                self.pipes.release(id, PipeEnd::Write);
                return Err(e.into());
            }
        };
        let write_fd = match self.files.open(write_end, cloexec) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = self.files.close(read_fd);
                self.pipes.release(id, PipeEnd::Read);
                self.pipes.release(id, PipeEnd::Write);
                return Err(e.into());
            }
        };
        self.write_obj(fds, &[read_fd, write_fd])?;
        Ok(0)
    }

    pub(crate) fn pipe_read(
        &mut self,
        id: usize,
        buf: u64,
        len: u64,
        nonblocking: bool,
    ) -> SysResult {
        let pipe = self.pipes.get(id).ok_or(Errno::EBADF)?;
        if pipe.data.is_empty() {
            // No writer: the end (a FIFO nobody opened for writing yet makes a blocking
            // reader wait, as Linux's open would; a nonblocking one sees the end).
            if pipe.writers == 0 && (pipe.had_writer || nonblocking) {
                return Ok(0);
            }
            if nonblocking {
                return Err(Errno::EAGAIN.into());
            }
            return Err(Stop::Block(Self::io_wait()));
        }
        let n = (len as usize).min(pipe.data.len());
        let bytes: Vec<u8> = pipe.data.iter().take(n).copied().collect();
        self.write_user(buf, &bytes)?;
        if let Some(pipe) = self.pipes.get_mut(id) {
            pipe.data.drain(..n);
        }
        self.io_event();
        Ok(n as u64)
    }

    /// Writes `data` into pipe `id`. Writes of up to `PIPE_BUF` bytes are atomic: they wait
    /// for room for all of it. A blocking write from program memory waits until all of it is
    /// written (a signal ends it with the count so far); others write what fits.
    pub(crate) fn pipe_write(&mut self, id: usize, data: Source, nonblocking: bool) -> SysResult {
        let whole = !nonblocking && matches!(data, Source::Guest { .. });
        let done = if whole { self.threads.progress() } else { 0 };
        let pipe = self.pipes.get(id).ok_or(Errno::EBADF)?;
        if pipe.readers == 0 {
            self.threads.set_progress(0);
            if done > 0 {
                return Ok(done);
            }
            // SIGPIPE to the writer (fatal unless handled or ignored), and EPIPE.
            let tid = self.threads.current();
            let _ = self.send_to_thread(tid, SigInfo::kernel(libc::SIGPIPE));
            return Err(Errno::EPIPE.into());
        }
        let room = pipe.room();
        let left = data.len() - done as usize;
        if room == 0 || (data.len() <= PIPE_BUF && room < left) {
            return Err(self.wait_or_again(nonblocking));
        }
        let n = left.min(room);
        let bytes = match data {
            Source::Guest { addr, .. } => self.read_user(addr + done, n)?,
            Source::Host(_) => data.take(self, n)?,
        };
        if let Some(pipe) = self.pipes.get_mut(id) {
            pipe.data.extend(bytes);
        }
        self.io_event();
        let done = done + n as u64;
        if whole && (done as usize) < data.len() {
            self.threads.set_progress(done);
            return Err(Stop::Block(Self::io_wait()));
        }
        self.threads.set_progress(0);
        Ok(done)
    }

    /// Waiting for a descriptor to become ready, with no deadline: the syscall is made again
    /// when any I/O happens (a read or write that blocks forever with no other thread able
    /// to help ends the sandbox as a deadlock).
    pub(crate) fn io_wait() -> Wait {
        Wait {
            on: WaitOn::Io,
            deadline_ns: None,
            on_timeout: Resume::Restart,
            on_signal: SignalWake::Restart,
        }
    }
}
