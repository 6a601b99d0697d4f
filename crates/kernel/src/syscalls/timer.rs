//! Timer syscalls: `alarm`, `setitimer`/`getitimer`, and the POSIX timers
//! (`timer_create`, `timer_settime`, `timer_gettime`, `timer_getoverrun`, `timer_delete`).
//! The timers themselves are in `crate::timers`.

use std::mem::offset_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use super::SysResult;
use crate::abi::{Itimerspec, Itimerval, Timespec, from_prefix};
use crate::process::Process;
use crate::threads::monotonic_ns;
use crate::timers::{Notify, PosixTimer, Schedule};

const NS_PER_SEC: u64 = 1_000_000_000;
const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD_ID: i32 = 4;

/// The leading words of `struct sigevent` (64 bytes): the value, the signal, how to
/// notify, and (for `SIGEV_THREAD_ID`) the thread.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SigEvent {
    sigev_value: u64,
    sigev_signo: i32,
    sigev_notify: i32,
    sigev_tid: i32,
    pad: i32,
}

// SAFETY: `repr(C)` integers with the tail padding made a field (checked below): every
// byte pattern is a value.
unsafe impl ByteValued for SigEvent {}

const _: () = {
    assert!(size_of::<SigEvent>() == 24);
    assert!(offset_of!(SigEvent, sigev_tid) == 16);
};

/// The bytes of a `sigevent` read: up to the thread id (Linux would read all 64).
const SIGEVENT_READ: usize = offset_of!(SigEvent, sigev_tid) + 4;

impl Process {
    /// `alarm`: `SIGALRM` in `seconds` (0 cancels); returns the seconds the previous alarm
    /// had left, rounded up.
    pub(crate) fn sys_alarm(&mut self, seconds: u32) -> SysResult {
        let now = monotonic_ns();
        let new = (seconds > 0).then(|| Schedule {
            next_ns: now + u64::from(seconds) * NS_PER_SEC,
            interval_ns: 0,
        });
        let (left, _) = self.swap_itimer(0, new, now);
        Ok(left.div_ceil(NS_PER_SEC))
    }

    pub(crate) fn sys_setitimer(&mut self, which: i32, new: u64, old: u64) -> SysResult {
        let which = usize::try_from(which)
            .ok()
            .filter(|&w| w < 3)
            .ok_or(Errno::EINVAL)?;
        let now = monotonic_ns();
        let schedule = if new == 0 {
            None
        } else {
            let spec: Itimerval = self.read_obj(new)?;
            let interval = spec.it_interval.as_ns().ok_or(Errno::EINVAL)?;
            let value = spec.it_value.as_ns().ok_or(Errno::EINVAL)?;
            (value > 0).then(|| Schedule {
                next_ns: now + value,
                interval_ns: interval,
            })
        };
        if old != 0 {
            self.check_user(old, size_of::<Itimerval>() as u64)?;
        }
        let (left, interval) = self.swap_itimer(which, schedule, now);
        if old != 0 {
            self.write_obj(old, &Itimerval::from_ns(left, interval))?;
        }
        Ok(0)
    }

    pub(crate) fn sys_getitimer(&mut self, which: i32, out: u64) -> SysResult {
        let which = usize::try_from(which)
            .ok()
            .filter(|&w| w < 3)
            .ok_or(Errno::EINVAL)?;
        let now = monotonic_ns();
        let (left, interval) = self.timers.itimers[which].map_or((0, 0), |s| {
            (s.next_ns.saturating_sub(now).max(1), s.interval_ns)
        });
        self.write_obj(out, &Itimerval::from_ns(left, interval))?;
        Ok(0)
    }

    /// `timer_create(clock, sigevent, id)`. A null `sigevent` means `SIGALRM` to the process
    /// with the timer's id as its value.
    pub(crate) fn sys_timer_create(&mut self, clock: i32, event: u64, id_out: u64) -> SysResult {
        let clock_ok = matches!(
            clock,
            libc::CLOCK_REALTIME
                | libc::CLOCK_MONOTONIC
                | libc::CLOCK_BOOTTIME
                | libc::CLOCK_TAI
                | libc::CLOCK_PROCESS_CPUTIME_ID
                | libc::CLOCK_THREAD_CPUTIME_ID
        );
        if !clock_ok {
            return Err(Errno::EINVAL.into());
        }
        self.check_user(id_out, size_of::<u32>() as u64)?;
        let mut timer = PosixTimer {
            clock,
            notify: Notify::Process,
            signal: libc::SIGALRM,
            value: 0,
            schedule: None,
            overrun: 0,
        };
        if event != 0 {
            let sigevent: SigEvent = from_prefix(&self.read_user(event, SIGEVENT_READ)?);
            timer.value = sigevent.sigev_value;
            timer.signal = sigevent.sigev_signo;
            timer.notify = match sigevent.sigev_notify {
                SIGEV_NONE => Notify::Nothing,
                SIGEV_SIGNAL => Notify::Process,
                SIGEV_THREAD_ID => Notify::Thread(self.timer_thread(sigevent.sigev_tid)?),
                _ => return Err(Errno::EINVAL.into()),
            };
            if timer.notify != Notify::Nothing
                && !(1..=crate::signals::NSIG as i32).contains(&timer.signal)
            {
                return Err(Errno::EINVAL.into());
            }
        }
        let id = self.timers.create(timer)?;
        if event == 0
            && let Some(t) = self.timers.posix.get_mut(&id)
        {
            t.value = u64::from(id);
        }
        self.write_obj(id_out, &id)?;
        Ok(0)
    }

    fn posix_timer(&self, id: i64) -> Result<(u32, PosixTimer), Errno> {
        let id = u32::try_from(id).map_err(|_| Errno::EINVAL)?;
        let timer = *self.timers.posix.get(&id).ok_or(Errno::EINVAL)?;
        Ok((id, timer))
    }

    /// The remaining time and interval of a timer.
    fn itimerspec_of(timer: &PosixTimer, now: u64) -> Itimerspec {
        let (left, interval) = timer.schedule.map_or((0, 0), |s| {
            (s.next_ns.saturating_sub(now).max(1), s.interval_ns)
        });
        Itimerspec::from_ns(left, interval)
    }

    pub(crate) fn sys_timer_settime(
        &mut self,
        id: i64,
        flags: i32,
        new: u64,
        old: u64,
    ) -> SysResult {
        let (id, timer) = self.posix_timer(id)?;
        let spec: Itimerspec = self.read_obj(new)?;
        let interval = spec.it_interval.as_ns().ok_or(Errno::EINVAL)?;
        let value = spec.it_value.as_ns().ok_or(Errno::EINVAL)?;
        let now = monotonic_ns();
        if old != 0 {
            self.write_obj(old, &Self::itimerspec_of(&timer, now))?;
        }
        let schedule = (value > 0).then(|| {
            let next = if flags & libc::TIMER_ABSTIME != 0 {
                // An absolute time on the timer's clock, turned into a monotonic one now.
                let clock_now = Timespec::now(timer.clock).as_ns().unwrap_or(0);
                now.saturating_add(value.saturating_sub(clock_now))
            } else {
                now.saturating_add(value)
            };
            Schedule {
                next_ns: next,
                interval_ns: interval,
            }
        });
        if let Some(t) = self.timers.posix.get_mut(&id) {
            t.schedule = schedule;
            t.overrun = 0;
        }
        Ok(0)
    }

    pub(crate) fn sys_timer_gettime(&mut self, id: i64, out: u64) -> SysResult {
        let (_, timer) = self.posix_timer(id)?;
        self.write_obj(out, &Self::itimerspec_of(&timer, monotonic_ns()))?;
        Ok(0)
    }

    pub(crate) fn sys_timer_getoverrun(&mut self, id: i64) -> SysResult {
        Ok(u64::from(self.posix_timer(id)?.1.overrun))
    }

    pub(crate) fn sys_timer_delete(&mut self, id: i64) -> SysResult {
        let (id, _) = self.posix_timer(id)?;
        self.timers.posix.remove(&id);
        Ok(0)
    }
}
