//! Signal syscalls: dispositions, masks, alternate stacks, sending (`kill`, `tgkill`,
//! `rt_sigqueueinfo`), and waiting (`rt_sigsuspend`, `pause`, `rt_sigtimedwait`). Handlers
//! run when a thread next returns to user mode (see `delivery`).

use syscalls::Errno;

use super::{Stop, SysResult};
use crate::abi::StackT;
use crate::delivery::MIN_SIGNAL_STACK;
use crate::process::Process;
use crate::signals::{Disposition, NSIG, SigAction, SigInfo, SigSet, UNBLOCKABLE, bit, code};
use crate::threads::{AltStack, Resume, SignalWake, Tid, Wait, WaitOn};

/// Whether `signal` is a signal number (1..=64).
fn valid(signal: i32) -> bool {
    (1..=NSIG as i32).contains(&signal)
}

impl Process {
    fn read_sigset(&self, addr: u64, size: u64) -> Result<SigSet, Errno> {
        if size != 8 {
            return Err(Errno::EINVAL);
        }
        self.read_u64(addr)
    }

    /// Sends `info` to the process: any thread that does not block it takes it. A signal
    /// the process ignores is dropped at once unless the running thread blocks it (it may
    /// be unignored before it is unblocked).
    pub(crate) fn send_to_process(&mut self, info: SigInfo) {
        let signal = info.signo;
        let blocked = self.threads.current_mask() & bit(signal) != 0;
        if self.signals.disposition(signal) == Disposition::Ignore && !blocked {
            return;
        }
        self.signals.pending.add(info);
        self.threads
            .notify_process_signal(signal, self.procs.current);
        self.signalfd_event();
    }

    /// Whether `signal`, just sent to the current process, ends it by its default action:
    /// `SIGKILL`, or a signal it neither handles nor ignores that one of its threads lets
    /// through.
    pub(crate) fn dies_of(&self, signal: i32) -> bool {
        signal == libc::SIGKILL
            || (self.signals.disposition(signal) == Disposition::Terminate
                && self.threads.any_unblocked(signal))
    }

    /// A signal became pending: a thread waiting on a signalfd looks again.
    fn signalfd_event(&mut self) {
        if !self.notifiers.signalfds.is_empty() {
            self.io_event();
        }
    }

    /// Sends `info` to thread `tid`; `ESRCH` if there is none.
    pub(crate) fn send_to_thread(&mut self, tid: Tid, info: SigInfo) -> Result<(), Errno> {
        if !self.threads.exists(tid) {
            return Err(Errno::ESRCH);
        }
        if self.signals.disposition(info.signo) == Disposition::Ignore {
            return Ok(());
        }
        self.threads.signal_thread(tid, info);
        self.signalfd_event();
        Ok(())
    }

    /// `tgkill`/`tkill`.
    pub(crate) fn sys_tgkill(&mut self, tgid: i64, tid: i64, signal: i32) -> SysResult {
        if tgid <= 0 || tid <= 0 || (signal != 0 && !valid(signal)) {
            return Err(Errno::EINVAL.into());
        }
        let tid = u32::try_from(tid).map_err(|_| Errno::ESRCH)?;
        let tgid = Tid::try_from(tgid).map_err(|_| Errno::ESRCH)?;
        let info = SigInfo::from_process(
            signal,
            code::SI_TKILL,
            self.shown(self.pid()),
            self.creds().uid[0],
        );
        if tgid != self.pid() {
            // A thread of another process: that process's table says whether it exists.
            if !self.procs.is_alive(tgid) {
                return Err(Errno::ESRCH.into());
            }
            return self
                .with_process(tgid, |p| match signal {
                    0 if p.threads.exists(tid) => Ok(()),
                    0 => Err(Errno::ESRCH),
                    _ => p.send_to_thread(tid, info),
                })
                .map(|()| 0)
                .map_err(Stop::from);
        }
        if !self.threads.exists(tid) {
            return Err(Errno::ESRCH.into());
        }
        if signal != 0 {
            self.send_to_thread(tid, info)?;
        }
        Ok(0)
    }

    /// `rt_sigqueueinfo` (to the process) and `rt_tgsigqueueinfo` (to a thread, `tid`):
    /// the caller's own `siginfo`, with the signal number put right.
    pub(crate) fn sys_rt_sigqueueinfo(
        &mut self,
        pid: i64,
        tid: Option<i64>,
        signal: i32,
        info: u64,
    ) -> SysResult {
        if pid != i64::from(self.pid()) {
            return Err(Errno::ESRCH.into());
        }
        if !valid(signal) {
            return Err(Errno::EINVAL.into());
        }
        let mut parsed: SigInfo = self.read_obj(info)?;
        parsed.signo = signal;
        match tid {
            None => self.send_to_process(parsed),
            Some(tid) => {
                self.send_to_thread(u32::try_from(tid).map_err(|_| Errno::ESRCH)?, parsed)?
            }
        }
        Ok(0)
    }

    pub(crate) fn sys_rt_sigaction(
        &mut self,
        signal: i32,
        new: u64,
        old: u64,
        sigsetsize: u64,
    ) -> SysResult {
        if sigsetsize != 8 || !valid(signal) {
            return Err(Errno::EINVAL.into());
        }
        let previous = self.signals.action(signal);
        if new != 0 {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                return Err(Errno::EINVAL.into());
            }
            let mut action: SigAction = self.read_obj(new)?;
            action.mask &= !UNBLOCKABLE;
            self.signals.actions[signal as usize - 1] = action;
            // POSIX: setting a signal to be ignored discards what is pending of it.
            if action.disposition(signal) == Disposition::Ignore {
                self.signals.pending.discard(signal);
                self.threads.discard_pending(signal);
            }
        }
        if old != 0 {
            self.write_obj(old, &previous)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_rt_sigprocmask(
        &mut self,
        how: i32,
        set: u64,
        old: u64,
        size: u64,
    ) -> SysResult {
        if size != 8 {
            return Err(Errno::EINVAL.into());
        }
        let previous = self.threads.current_mask();
        if set != 0 {
            let mask = self.read_u64(set)?;
            let next = match how {
                libc::SIG_BLOCK => previous | mask,
                libc::SIG_UNBLOCK => previous & !mask,
                libc::SIG_SETMASK => mask,
                _ => return Err(Errno::EINVAL.into()),
            };
            self.threads.set_current_mask(next & !UNBLOCKABLE);
        }
        if old != 0 {
            self.write_u64(old, previous)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_rt_sigpending(&mut self, set: u64, size: u64) -> SysResult {
        if size > 8 {
            return Err(Errno::EINVAL.into());
        }
        let pending = (self.threads.current_pending() | self.signals.pending.set())
            & self.threads.current_mask();
        self.write_u64(set, pending)?;
        Ok(0)
    }

    pub(crate) fn sys_sigaltstack(&mut self, new: u64, old: u64, rsp: u64) -> SysResult {
        let current = self.threads.alt_stack();
        let on_stack = current.contains(rsp);
        if new != 0 {
            let StackT {
                ss_sp: sp,
                ss_flags: flags,
                ss_size: size,
                ..
            } = self.read_obj(new)?;
            if on_stack {
                return Err(Errno::EPERM.into());
            }
            // SS_AUTODISARM (1 << 31) is accepted and has no effect here.
            if flags & !(libc::SS_DISABLE | libc::SS_ONSTACK | (1 << 31)) != 0 {
                return Err(Errno::EINVAL.into());
            }
            let stack = if flags & libc::SS_DISABLE != 0 {
                AltStack::default()
            } else if size < MIN_SIGNAL_STACK {
                return Err(Errno::ENOMEM.into());
            } else {
                AltStack { sp, flags: 0, size }
            };
            self.threads.set_alt_stack(stack);
        }
        if old != 0 {
            let stack = StackT {
                ss_sp: current.sp,
                ss_flags: current.flags | if on_stack { libc::SS_ONSTACK } else { 0 },
                pad: 0,
                ss_size: current.size,
            };
            self.write_obj(old, &stack)?;
        }
        Ok(0)
    }

    /// `rt_sigsuspend`: waits with `mask` in place until a handler has run; returns `EINTR`
    /// (the handler's frame restores the thread's own mask).
    pub(crate) fn sys_rt_sigsuspend(&mut self, mask: u64, size: u64) -> SysResult {
        let mask = self.read_sigset(mask, size)?;
        self.threads.replace_mask_for_wait(mask & !UNBLOCKABLE);
        Err(Stop::Block(Self::signal_wait(WaitOn::Signal, None)))
    }

    /// `pause`: waits until a handler has run.
    pub(crate) fn sys_pause(&mut self) -> SysResult {
        Err(Stop::Block(Self::signal_wait(WaitOn::Signal, None)))
    }

    /// `rt_sigtimedwait`: takes a pending signal of `set` (blocked or not), waiting for one
    /// until the timeout; `EAGAIN` when it passes.
    pub(crate) fn sys_rt_sigtimedwait(
        &mut self,
        set: u64,
        info: u64,
        timeout: u64,
        size: u64,
    ) -> SysResult {
        let set = self.read_sigset(set, size)? & !UNBLOCKABLE;
        let candidates = (self.threads.current_pending() | self.signals.pending.set()) & set;
        if let Some(signal) = crate::signals::next_signal(candidates) {
            let taken = self
                .threads
                .take_current_pending(signal)
                .or_else(|| self.signals.pending.take(signal))
                .unwrap_or_else(|| SigInfo::kernel(signal));
            if info != 0 {
                self.write_obj(info, &taken)?;
            }
            return Ok(signal as u64);
        }
        let deadline = self.wait_deadline(timeout, false, false)?;
        if deadline.is_some_and(|d| d <= crate::threads::monotonic_ns()) {
            return Err(Errno::EAGAIN.into());
        }
        let mut wait = Self::signal_wait(WaitOn::SignalIn(set), deadline);
        // A signal outside the set with a handler interrupts the wait (EINTR).
        wait.on_timeout = Resume::Return((-i64::from(Errno::EAGAIN.into_raw())) as u64);
        Err(Stop::Block(wait))
    }

    fn signal_wait(on: WaitOn, deadline: Option<u64>) -> Wait {
        Wait {
            on,
            deadline_ns: deadline,
            on_timeout: Resume::Restart,
            on_signal: SignalWake::Interrupt,
        }
    }
}
