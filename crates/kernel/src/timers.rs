//! Timers that raise signals: `alarm` and the interval timers (`setitimer`), and POSIX
//! timers (`timer_create`). Expiry times are kept on `CLOCK_MONOTONIC`; the scheduler
//! interrupts the running thread or ends an idle wait when one is due (`Process::next_timer`).
//!
//! `ITIMER_VIRTUAL` and `ITIMER_PROF` measure the process's CPU time on Linux. Here they
//! run on wall-clock time: the sandbox's one vCPU is busy or waiting, and a program that
//! spins (what these timers are used to interrupt) sees them expire the same way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use syscalls::Errno;

use crate::process::Process;
use crate::signals::SigInfo;
use crate::threads::Tid;

/// POSIX timers a sandbox may have at once.
pub const MAX_POSIX_TIMERS: usize = 256;

/// An armed timer: when it fires next, and its period (0: once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub next_ns: u64,
    pub interval_ns: u64,
}

impl Schedule {
    /// Advances past `now`; returns how many expiries were missed besides the one that
    /// fires, or `None` when a one-shot timer is spent.
    pub(crate) fn advance(&mut self, now: u64) -> Option<u64> {
        if self.interval_ns == 0 {
            return None;
        }
        let late = now - self.next_ns;
        let missed = late / self.interval_ns;
        self.next_ns += (missed + 1) * self.interval_ns;
        Some(missed)
    }
}

/// How a POSIX timer tells the program it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notify {
    /// A signal to the process.
    Process,
    /// A signal to one thread (`SIGEV_THREAD_ID`, which glibc's `SIGEV_THREAD` uses).
    Thread(Tid),
    /// Nothing (`SIGEV_NONE`): the program polls `timer_gettime`.
    Nothing,
}

/// A POSIX timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub clock: i32,
    pub notify: Notify,
    pub signal: i32,
    /// `sigev_value`, passed in the signal's `siginfo`.
    pub value: u64,
    pub schedule: Option<Schedule>,
    /// Expiries missed at the last firing (`timer_getoverrun`).
    pub overrun: u32,
}

/// The process's timers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timers {
    /// `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`.
    pub itimers: [Option<Schedule>; 3],
    pub posix: BTreeMap<u32, PosixTimer>,
    next_id: u32,
}

/// The signal each interval timer raises.
const ITIMER_SIGNALS: [i32; 3] = [libc::SIGALRM, libc::SIGVTALRM, libc::SIGPROF];

impl Timers {
    /// Adds a timer; its id, or `EAGAIN` past the limit.
    pub fn create(&mut self, timer: PosixTimer) -> Result<u32, Errno> {
        if self.posix.len() >= MAX_POSIX_TIMERS {
            return Err(Errno::EAGAIN);
        }
        while self.posix.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.posix.insert(id, timer);
        Ok(id)
    }

    /// The earliest time a timer that raises a signal fires.
    pub fn next_expiry(&self) -> Option<u64> {
        let interval = self.itimers.iter().flatten().map(|s| s.next_ns);
        let posix = self
            .posix
            .values()
            .filter(|t| t.notify != Notify::Nothing)
            .filter_map(|t| t.schedule.map(|s| s.next_ns));
        interval.chain(posix).min()
    }
}

impl Process {
    /// The earliest time a timer fires (`CLOCK_MONOTONIC` ns).
    pub(crate) fn next_timer(&self) -> Option<u64> {
        match (self.timers.next_expiry(), self.notifiers.next_timer()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires every timer due at `now`: raises its signal and re-arms it or disarms it.
    pub(crate) fn fire_timers(&mut self, now: u64) {
        self.fire_timerfds(now);
        for (which, signal) in ITIMER_SIGNALS.into_iter().enumerate() {
            let Some(mut schedule) = self.timers.itimers[which] else {
                continue;
            };
            if schedule.next_ns > now {
                continue;
            }
            self.timers.itimers[which] = schedule.advance(now).map(|_| schedule);
            self.send_to_process(SigInfo::kernel(signal));
        }
        let due: Vec<u32> = self
            .timers
            .posix
            .iter()
            .filter(|(_, t)| t.schedule.is_some_and(|s| s.next_ns <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            let Some(timer) = self.timers.posix.get_mut(&id) else {
                continue;
            };
            let mut schedule = timer.schedule.expect("due timers are armed");
            let missed = schedule.advance(now);
            timer.schedule = missed.map(|_| schedule);
            timer.overrun = missed.unwrap_or(0).min(i32::MAX as u64) as u32;
            let timer = *timer;
            let info = SigInfo::timer(timer.signal, id, timer.overrun, timer.value);
            match timer.notify {
                Notify::Process => self.send_to_process(info),
                Notify::Thread(tid) => {
                    // A target thread that is gone: Linux sends to the process instead.
                    if self.send_to_thread(tid, info).is_err() {
                        self.send_to_process(info);
                    }
                }
                Notify::Nothing => {}
            }
        }
    }

    /// The interval timer `which`: its remaining time and interval (ns), then replaces it.
    pub(crate) fn swap_itimer(
        &mut self,
        which: usize,
        new: Option<Schedule>,
        now: u64,
    ) -> (u64, u64) {
        let old = std::mem::replace(&mut self.timers.itimers[which], new);
        old.map_or((0, 0), |s| {
            (s.next_ns.saturating_sub(now).max(1), s.interval_ns)
        })
    }

    /// The tid a `SIGEV_THREAD_ID` timer may name: one of the process's threads.
    pub(crate) fn timer_thread(&self, tid: i32) -> Result<Tid, Errno> {
        let tid = u32::try_from(tid).map_err(|_| Errno::EINVAL)?;
        if self.threads.exists(tid) {
            Ok(tid)
        } else {
            Err(Errno::EINVAL)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_schedules_count_what_they_missed() {
        let mut s = Schedule {
            next_ns: 100,
            interval_ns: 10,
        };
        assert_eq!(s.advance(135), Some(3));
        assert_eq!(s.next_ns, 140);
        let mut once = Schedule {
            next_ns: 100,
            interval_ns: 0,
        };
        assert_eq!(once.advance(100), None);
    }
}
