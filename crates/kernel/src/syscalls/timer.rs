//! Timer syscalls: `alarm`, `setitimer`/`getitimer`, and the POSIX timers
//! (`timer_create`, `timer_settime`, `timer_gettime`, `timer_getoverrun`, `timer_delete`).
//! The timers themselves are in `crate::timers`.

use syscalls::Errno;

use super::SysResult;
use super::time::Timespec;
use crate::process::Process;
use crate::threads::monotonic_ns;
use crate::timers::{Notify, PosixTimer, Schedule};

const NS_PER_SEC: u64 = 1_000_000_000;
const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD_ID: i32 = 4;

/// A `struct timeval` in nanoseconds (`None` unless valid and non-negative).
fn timeval_ns(sec: i64, usec: i64) -> Option<u64> {
    if sec < 0 || !(0..1_000_000).contains(&usec) {
        return None;
    }
    (sec as u64)
        .checked_mul(NS_PER_SEC)?
        .checked_add(usec as u64 * 1000)
}

fn timeval_words(ns: u64) -> [i64; 2] {
    [(ns / NS_PER_SEC) as i64, ((ns % NS_PER_SEC) / 1000) as i64]
}

fn timespec_words(ns: u64) -> [i64; 2] {
    [(ns / NS_PER_SEC) as i64, (ns % NS_PER_SEC) as i64]
}

fn words_bytes(words: &[i64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl Process {
    fn read_words<const N: usize>(&self, addr: u64) -> Result<[i64; N], Errno> {
        let bytes = self.read_user(addr, N * 8)?;
        let mut words = [0i64; N];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = i64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        Ok(words)
    }

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
            let [isec, iusec, vsec, vusec] = self.read_words::<4>(new)?;
            let interval = timeval_ns(isec, iusec).ok_or(Errno::EINVAL)?;
            let value = timeval_ns(vsec, vusec).ok_or(Errno::EINVAL)?;
            (value > 0).then(|| Schedule {
                next_ns: now + value,
                interval_ns: interval,
            })
        };
        if old != 0 {
            self.check_user(old, 32)?;
        }
        let (left, interval) = self.swap_itimer(which, schedule, now);
        if old != 0 {
            let words = [timeval_words(interval), timeval_words(left)].concat();
            self.write_user(old, &words_bytes(&words))?;
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
        let words = [timeval_words(interval), timeval_words(left)].concat();
        self.write_user(out, &words_bytes(&words))?;
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
        self.check_user(id_out, 4)?;
        let mut timer = PosixTimer {
            clock,
            notify: Notify::Process,
            signal: libc::SIGALRM,
            value: 0,
            schedule: None,
            overrun: 0,
        };
        if event != 0 {
            // struct sigevent: value (8), signo (4), notify (4), then the thread id.
            let bytes = self.read_user(event, 20)?;
            timer.value = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
            timer.signal = i32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
            let notify = i32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
            let tid = i32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
            timer.notify = match notify {
                SIGEV_NONE => Notify::Nothing,
                SIGEV_SIGNAL => Notify::Process,
                SIGEV_THREAD_ID => Notify::Thread(self.timer_thread(tid)?),
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
        self.write_user(id_out, &id.to_le_bytes())?;
        Ok(0)
    }

    fn posix_timer(&self, id: i64) -> Result<(u32, PosixTimer), Errno> {
        let id = u32::try_from(id).map_err(|_| Errno::EINVAL)?;
        let timer = *self.timers.posix.get(&id).ok_or(Errno::EINVAL)?;
        Ok((id, timer))
    }

    /// The remaining time and interval of a timer, as an `itimerspec` (interval first).
    fn itimerspec_of(timer: &PosixTimer, now: u64) -> Vec<u8> {
        let (left, interval) = timer.schedule.map_or((0, 0), |s| {
            (s.next_ns.saturating_sub(now).max(1), s.interval_ns)
        });
        words_bytes(&[timespec_words(interval), timespec_words(left)].concat())
    }

    pub(crate) fn sys_timer_settime(
        &mut self,
        id: i64,
        flags: i32,
        new: u64,
        old: u64,
    ) -> SysResult {
        let (id, timer) = self.posix_timer(id)?;
        let [isec, insec, vsec, vnsec] = self.read_words::<4>(new)?;
        let ns = |sec: i64, nsec: i64| {
            Timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            }
            .as_ns()
            .ok_or(Errno::EINVAL)
        };
        let interval = ns(isec, insec)?;
        let value = ns(vsec, vnsec)?;
        let now = monotonic_ns();
        if old != 0 {
            self.write_user(old, &Self::itimerspec_of(&timer, now))?;
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
        self.write_user(out, &Self::itimerspec_of(&timer, monotonic_ns()))?;
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
