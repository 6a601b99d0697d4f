//! `poll`, `ppoll`, `select` and `pselect6`: which descriptors are ready (see `readiness`),
//! waiting for one when none is. A wait ends at any I/O in the sandbox (the call then looks
//! again), at its timeout, or at a signal (`EINTR` when a handler ran).

use syscalls::Errno;
use vm_memory::ByteValued;

use super::{Stop, SysResult};
use crate::abi::{Timespec, Timeval};
use crate::process::Process;
use crate::readiness::{ALWAYS, ERR, HUP, IN, NVAL, OUT, PRI, RDNORM, WRNORM};
use crate::signals::{SigSet, UNBLOCKABLE};
use crate::threads::{Resume, SignalWake, Wait, monotonic_ns};

/// What `select` counts as readable, writable and exceptional (Linux's `POLLIN_SET` …).
const SELECT_READ: u32 = IN | RDNORM | HUP | ERR;
const SELECT_WRITE: u32 = OUT | WRNORM | ERR;
const SELECT_EXCEPT: u32 = PRI;

/// `struct pollfd`. The event masks are `short`s; they are kept unsigned so that no bit
/// spreads when widened.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PollFd {
    fd: i32,
    events: u16,
    revents: u16,
}

// SAFETY: `repr(C)` integers without padding (checked below): every byte pattern is a value.
unsafe impl ByteValued for PollFd {}

const _: () = assert!(size_of::<PollFd>() == 8);

/// When a wait with nothing ready ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// At once (a zero timeout).
    Now,
    Never,
    /// At this `CLOCK_MONOTONIC` time.
    At(u64),
}

impl Deadline {
    /// The deadline `ns` from now, or the one a restarted call already had.
    pub(crate) fn after(process: &Process, ns: u64) -> Deadline {
        let now = monotonic_ns();
        if ns == 0 {
            return Deadline::Now;
        }
        match process
            .threads
            .restart_deadline()
            .unwrap_or_else(|| now.saturating_add(ns))
        {
            at if at <= now => Deadline::Now,
            at => Deadline::At(at),
        }
    }

    /// Nanoseconds left (for the timeouts `select` writes back).
    fn remaining(self) -> u64 {
        match self {
            Deadline::At(at) => at.saturating_sub(monotonic_ns()),
            _ => 0,
        }
    }
}

impl Process {
    /// What descriptor `fd` is ready for (`NVAL` when it is not open).
    pub(crate) fn fd_readiness(&self, fd: i32) -> u32 {
        self.files.get(fd).map_or(NVAL, |file| self.readiness(file))
    }

    /// Nothing was ready: waits for I/O until `deadline` (`Ok(())` for `Deadline::Now`: the
    /// caller reports nothing ready). With `mask`, the thread's signal mask is that one
    /// while it waits and until a handler the wait ends for has run.
    pub(crate) fn wait_for_io(
        &mut self,
        deadline: Deadline,
        mask: Option<SigSet>,
    ) -> Result<(), Stop> {
        let deadline_ns = match deadline {
            Deadline::Now => return Ok(()),
            Deadline::Never => None,
            Deadline::At(at) => Some(at),
        };
        if let Some(mask) = mask {
            self.threads.replace_mask_for_wait(mask & !UNBLOCKABLE);
        }
        Err(Stop::Block(Wait {
            deadline_ns,
            on_timeout: Resume::Restart,
            on_signal: SignalWake::Interrupt,
            ..Self::io_wait()
        }))
    }

    /// Reads the signal mask argument of `ppoll`/`pselect6`/`epoll_pwait` (0: none).
    pub(crate) fn read_wait_mask(&self, addr: u64, size: u64) -> Result<Option<SigSet>, Errno> {
        if addr == 0 {
            return Ok(None);
        }
        if size != 8 {
            return Err(Errno::EINVAL);
        }
        Ok(Some(self.read_u64(addr)?))
    }

    /// `poll`: `timeout_ms` negative waits without limit, zero does not wait.
    pub(crate) fn sys_poll(&mut self, fds: u64, count: u64, timeout_ms: i32) -> SysResult {
        let deadline = match timeout_ms {
            t if t < 0 => Deadline::Never,
            t => Deadline::after(self, t as u64 * 1_000_000),
        };
        self.poll_or_wait(fds, count, deadline, None)
    }

    /// `ppoll`: a null timeout waits without limit; the mask applies while waiting.
    pub(crate) fn sys_ppoll(
        &mut self,
        fds: u64,
        count: u64,
        timeout: u64,
        mask: u64,
        mask_size: u64,
    ) -> SysResult {
        let mask = self.read_wait_mask(mask, mask_size)?;
        let deadline = match self.wait_deadline(timeout, false, false)? {
            None => Deadline::Never,
            Some(at) if at <= monotonic_ns() => Deadline::Now,
            Some(at) => Deadline::At(at),
        };
        self.poll_or_wait(fds, count, deadline, mask)
    }

    fn poll_or_wait(
        &mut self,
        fds: u64,
        count: u64,
        deadline: Deadline,
        mask: Option<SigSet>,
    ) -> SysResult {
        if count > self.files.max_fds() as u64 {
            return Err(Errno::EINVAL.into());
        }
        let mut entries: Vec<PollFd> = self.read_objs(fds, count as usize)?;
        self.fire_timers(monotonic_ns());
        let mut ready = 0;
        for entry in &mut entries {
            let revents = if entry.fd < 0 {
                0
            } else {
                self.fd_readiness(entry.fd) & (u32::from(entry.events) | ALWAYS)
            };
            entry.revents = revents as u16;
            if revents != 0 {
                ready += 1;
            }
        }
        if ready == 0 {
            self.wait_for_io(deadline, mask)?;
        }
        self.write_objs(fds, &entries)?;
        Ok(ready)
    }

    /// `select`: the timeout is a `timeval` (null: no limit), and what is left of it is
    /// written back, as Linux does.
    pub(crate) fn sys_select(
        &mut self,
        nfds: i32,
        read: u64,
        write: u64,
        except: u64,
        timeout: u64,
    ) -> SysResult {
        let deadline = if timeout == 0 {
            Deadline::Never
        } else {
            let tv: Timeval = self.read_obj(timeout)?;
            if !tv.is_valid() {
                return Err(Errno::EINVAL.into());
            }
            // Saturating, unlike `Timeval::as_ns`: a huge timeout waits without end.
            let ns = (tv.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(tv.tv_usec as u64 * 1000);
            Deadline::after(self, ns)
        };
        let result = self.select_or_wait(nfds, [read, write, except], deadline, None);
        if timeout != 0 && !matches!(result, Err(Stop::Block(_))) {
            self.write_obj(timeout, &Timeval::from_ns(deadline.remaining()))?;
        }
        result
    }

    /// `pselect6`: a `timespec` timeout and, in the sixth argument, a pointer to the mask
    /// pointer and its size.
    pub(crate) fn sys_pselect6(
        &mut self,
        nfds: i32,
        sets: [u64; 3],
        timeout: u64,
        mask_arg: u64,
    ) -> SysResult {
        let deadline = match self.wait_deadline(timeout, false, false)? {
            None => Deadline::Never,
            Some(at) if at <= monotonic_ns() => Deadline::Now,
            Some(at) => Deadline::At(at),
        };
        let mask = if mask_arg == 0 {
            None
        } else {
            let [addr, size] = self.read_obj::<[u64; 2]>(mask_arg)?;
            self.read_wait_mask(addr, size)?
        };
        let result = self.select_or_wait(nfds, sets, deadline, mask);
        if timeout != 0 && !matches!(result, Err(Stop::Block(_))) {
            self.write_obj(timeout, &Timespec::from_ns(deadline.remaining()))?;
        }
        result
    }

    /// The three `fd_set`s (each may be null) are read, replaced with the ready subsets,
    /// and the number of ready bits returned; with none, the thread waits.
    fn select_or_wait(
        &mut self,
        nfds: i32,
        sets: [u64; 3],
        deadline: Deadline,
        mask: Option<SigSet>,
    ) -> SysResult {
        // Linux looks no further than the descriptor table goes.
        let nfds = usize::try_from(nfds)
            .map_err(|_| Errno::EINVAL)?
            .min(self.files.max_fds());
        let bytes = nfds.div_ceil(64) * 8;
        let mut wanted = [Vec::new(), Vec::new(), Vec::new()];
        for (set, addr) in wanted.iter_mut().zip(sets) {
            if addr != 0 {
                *set = self.read_user(addr, bytes)?;
            }
        }
        self.fire_timers(monotonic_ns());
        let mut ready = [vec![0u8; bytes], vec![0u8; bytes], vec![0u8; bytes]];
        let mut count = 0;
        for fd in 0..nfds {
            let (byte, bit) = (fd / 8, 1u8 << (fd % 8));
            let asked: Vec<bool> = wanted
                .iter()
                .map(|set| set.get(byte).is_some_and(|b| b & bit != 0))
                .collect();
            if !asked.contains(&true) {
                continue;
            }
            let state = self.fd_readiness(fd as i32);
            if state & NVAL != 0 {
                return Err(Errno::EBADF.into());
            }
            for (i, events) in [SELECT_READ, SELECT_WRITE, SELECT_EXCEPT]
                .into_iter()
                .enumerate()
            {
                if asked[i] && state & events != 0 {
                    ready[i][byte] |= bit;
                    count += 1;
                }
            }
        }
        if count == 0 {
            self.wait_for_io(deadline, mask)?;
        }
        for (set, addr) in ready.iter().zip(sets) {
            if addr != 0 {
                self.write_user(addr, set)?;
            }
        }
        Ok(count)
    }
}
