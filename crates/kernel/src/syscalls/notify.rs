//! `eventfd`, `timerfd` and `signalfd`: creating them, and reading and writing them.

use std::mem::offset_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use super::{Stop, SysResult};
use crate::abi::{Itimerspec, Timespec};
use crate::file::{FileObject, OpenFile};
use crate::notify::{EventFd, SignalFd, TimerFd};
use crate::process::Process;
use crate::readiness::{IN, OUT, RDNORM, WRNORM};
use crate::signals::{SigInfo, SigSet, UNBLOCKABLE, next_signal};
use crate::threads::monotonic_ns;
use crate::timers::Schedule;

const EFD_SEMAPHORE: i32 = 1;
const TFD_TIMER_ABSTIME: i32 = 1;
const TFD_TIMER_CANCEL_ON_SET: i32 = 2;
/// The largest value an eventfd counter holds.
const EVENTFD_MAX: u64 = u64::MAX - 1;

/// `struct signalfd_siginfo`, its padding made fields.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SignalfdSiginfo {
    ssi_signo: u32,
    ssi_errno: i32,
    ssi_code: i32,
    ssi_pid: u32,
    ssi_uid: u32,
    ssi_fd: i32,
    ssi_tid: u32,
    ssi_band: u32,
    ssi_overrun: u32,
    ssi_trapno: u32,
    ssi_status: i32,
    ssi_int: i32,
    ssi_ptr: u64,
    ssi_utime: u64,
    ssi_stime: u64,
    ssi_addr: u64,
    ssi_addr_lsb: u16,
    pad2: u16,
    ssi_syscall: i32,
    ssi_call_addr: u64,
    ssi_arch: u32,
    pad: [u8; 28],
}

// SAFETY: `repr(C)` integers and a byte array laid out without padding (checked below):
// every byte pattern is a value.
unsafe impl ByteValued for SignalfdSiginfo {}

const _: () = {
    assert!(size_of::<SignalfdSiginfo>() == 128);
    assert!(offset_of!(SignalfdSiginfo, ssi_ptr) == 48);
    assert!(offset_of!(SignalfdSiginfo, ssi_addr) == 72);
    assert!(offset_of!(SignalfdSiginfo, ssi_arch) == 96);
};

impl Process {
    /// Installs a descriptor for a new notification object.
    fn open_notifier(&mut self, object: FileObject, flags: i32, name: &str) -> SysResult {
        let status = libc::O_RDWR | (flags & libc::O_NONBLOCK);
        let file = OpenFile::new(object, status, format!("anon_inode:[{name}]").into_bytes());
        Ok(self.files.open(file, flags & libc::O_CLOEXEC != 0)? as u64)
    }

    pub(crate) fn sys_eventfd2(&mut self, initial: u32, flags: i32) -> SysResult {
        if flags & !(libc::O_CLOEXEC | libc::O_NONBLOCK | EFD_SEMAPHORE) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let id = self.notifiers.eventfds.insert(EventFd {
            count: u64::from(initial),
            semaphore: flags & EFD_SEMAPHORE != 0,
        });
        self.open_notifier(FileObject::EventFd(id), flags, "eventfd")
            .inspect_err(|_| {
                self.notifiers.eventfds.release(id);
            })
    }

    pub(crate) fn eventfd_readiness(&self, id: usize) -> u32 {
        self.notifiers.eventfds.get(id).map_or(0, |e| {
            let read = if e.count > 0 { IN | RDNORM } else { 0 };
            let write = if e.count < EVENTFD_MAX {
                OUT | WRNORM
            } else {
                0
            };
            read | write
        })
    }

    pub(crate) fn eventfd_read(
        &mut self,
        id: usize,
        buf: u64,
        len: u64,
        nonblocking: bool,
    ) -> SysResult {
        if len < 8 {
            return Err(Errno::EINVAL.into());
        }
        self.check_user(buf, 8)?;
        let event = self.notifiers.eventfds.get_mut(id).ok_or(Errno::EBADF)?;
        if event.count == 0 {
            return Err(self.wait_or_again(nonblocking));
        }
        let value = if event.semaphore { 1 } else { event.count };
        event.count -= value;
        self.write_obj(buf, &value)?;
        self.io_event();
        Ok(8)
    }

    pub(crate) fn eventfd_write(
        &mut self,
        id: usize,
        buf: u64,
        len: u64,
        nonblocking: bool,
    ) -> SysResult {
        if len < 8 {
            return Err(Errno::EINVAL.into());
        }
        let value = self.read_u64(buf)?;
        if value == u64::MAX {
            return Err(Errno::EINVAL.into());
        }
        let event = self.notifiers.eventfds.get_mut(id).ok_or(Errno::EBADF)?;
        if EVENTFD_MAX - event.count < value {
            return Err(self.wait_or_again(nonblocking));
        }
        event.count += value;
        self.io_event();
        Ok(8)
    }

    pub(crate) fn sys_timerfd_create(&mut self, clock: i32, flags: i32) -> SysResult {
        if !matches!(
            clock,
            libc::CLOCK_REALTIME | libc::CLOCK_MONOTONIC | libc::CLOCK_BOOTTIME
        ) {
            return Err(Errno::EINVAL.into());
        }
        if flags & !(libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let id = self.notifiers.timerfds.insert(TimerFd {
            clock,
            schedule: None,
            expirations: 0,
        });
        self.open_notifier(FileObject::TimerFd(id), flags, "timerfd")
            .inspect_err(|_| {
                self.notifiers.timerfds.release(id);
            })
    }

    fn timerfd_id(&self, fd: i32) -> Result<usize, Errno> {
        match self.files.get(fd)?.object {
            FileObject::TimerFd(id) => Ok(id),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The remaining time and interval of `timer`.
    fn timerfd_spec(timer: &TimerFd, now: u64) -> Itimerspec {
        let (left, interval) = timer.schedule.map_or((0, 0), |s| {
            (s.next_ns.saturating_sub(now).max(1), s.interval_ns)
        });
        Itimerspec::from_ns(left, interval)
    }

    pub(crate) fn sys_timerfd_settime(
        &mut self,
        fd: i32,
        flags: i32,
        new: u64,
        old: u64,
    ) -> SysResult {
        if flags & !(TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let id = self.timerfd_id(fd)?;
        // Each half is read and checked in turn: a bad interval is EINVAL even when the
        // value behind it is unmapped.
        let value_at = new + offset_of!(Itimerspec, it_value) as u64;
        let interval = self.read_timespec_value(new)?.as_ns().unwrap_or(0);
        let value = self.read_timespec_value(value_at)?.as_ns().unwrap_or(0);
        let now = monotonic_ns();
        let timer = self.notifiers.timerfds.get(id).ok_or(Errno::EBADF)?;
        if old != 0 {
            self.write_obj(old, &Self::timerfd_spec(timer, now))?;
        }
        let clock = timer.clock;
        let schedule = (value > 0).then(|| {
            let next = if flags & TFD_TIMER_ABSTIME != 0 {
                let clock_now = Timespec::now(clock).as_ns().unwrap_or(0);
                now.saturating_add(value.saturating_sub(clock_now))
            } else {
                now.saturating_add(value)
            };
            Schedule {
                next_ns: next,
                interval_ns: interval,
            }
        });
        let timer = self.notifiers.timerfds.get_mut(id).ok_or(Errno::EBADF)?;
        timer.schedule = schedule;
        timer.expirations = 0;
        Ok(0)
    }

    pub(crate) fn sys_timerfd_gettime(&mut self, fd: i32, out: u64) -> SysResult {
        let id = self.timerfd_id(fd)?;
        let timer = self.notifiers.timerfds.get(id).ok_or(Errno::EBADF)?;
        let spec = Self::timerfd_spec(timer, monotonic_ns());
        self.write_obj(out, &spec)?;
        Ok(0)
    }

    pub(crate) fn timerfd_readiness(&self, id: usize) -> u32 {
        self.notifiers
            .timerfds
            .get(id)
            .map_or(0, |t| if t.expirations > 0 { IN | RDNORM } else { 0 })
    }

    pub(crate) fn timerfd_read(
        &mut self,
        id: usize,
        buf: u64,
        len: u64,
        nonblocking: bool,
    ) -> SysResult {
        if len < 8 {
            return Err(Errno::EINVAL.into());
        }
        self.check_user(buf, 8)?;
        self.fire_timers(monotonic_ns());
        let timer = self.notifiers.timerfds.get_mut(id).ok_or(Errno::EBADF)?;
        if timer.expirations == 0 {
            return Err(self.wait_or_again(nonblocking));
        }
        let count = std::mem::take(&mut timer.expirations);
        self.write_obj(buf, &count)?;
        Ok(8)
    }

    /// Counts the expirations of every timerfd due at `now` and re-arms it.
    pub(crate) fn fire_timerfds(&mut self, now: u64) {
        let mut fired = false;
        for (_, timer) in self.notifiers.timerfds.iter_mut() {
            let Some(mut schedule) = timer.schedule else {
                continue;
            };
            if schedule.next_ns > now {
                continue;
            }
            // A periodic timer re-arms past `now`, counting the periods it missed.
            let missed = schedule.advance(now);
            timer.schedule = missed.map(|_| schedule);
            let missed = missed.unwrap_or(0);
            timer.expirations = timer.expirations.saturating_add(missed + 1);
            fired = true;
        }
        if fired {
            self.io_event();
        }
    }

    /// `signalfd4(fd, mask, size, flags)`: a new signalfd (`fd` -1) or a new mask for one.
    pub(crate) fn sys_signalfd4(&mut self, fd: i32, mask: u64, size: u64, flags: i32) -> SysResult {
        if size != 8 || flags & !(libc::O_CLOEXEC | libc::O_NONBLOCK) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let mask: SigSet = self.read_u64(mask)? & !UNBLOCKABLE;
        if fd != -1 {
            let FileObject::SignalFd(id) = self.files.get(fd)?.object else {
                return Err(Errno::EINVAL.into());
            };
            self.notifiers
                .signalfds
                .get_mut(id)
                .ok_or(Errno::EBADF)?
                .mask = mask;
            return Ok(fd as u64);
        }
        let id = self.notifiers.signalfds.insert(SignalFd { mask });
        self.open_notifier(FileObject::SignalFd(id), flags, "signalfd")
            .inspect_err(|_| {
                self.notifiers.signalfds.release(id);
            })
    }

    fn signalfd_candidates(&self, id: usize) -> SigSet {
        let mask = self.notifiers.signalfds.get(id).map_or(0, |s| s.mask);
        (self.threads.current_pending() | self.signals.pending.set()) & mask
    }

    pub(crate) fn signalfd_readiness(&self, id: usize) -> u32 {
        if self.signalfd_candidates(id) != 0 {
            IN | RDNORM
        } else {
            0
        }
    }

    /// Reads pending signals of the signalfd's set as `signalfd_siginfo` records, taking
    /// them off the thread's and the process's pending sets.
    pub(crate) fn signalfd_read(
        &mut self,
        id: usize,
        buf: u64,
        len: u64,
        nonblocking: bool,
    ) -> SysResult {
        let room = len as usize / size_of::<SignalfdSiginfo>();
        if room == 0 {
            return Err(Errno::EINVAL.into());
        }
        self.check_user(buf, size_of::<SignalfdSiginfo>() as u64)?;
        let mut records = Vec::new();
        while records.len() < room {
            let Some(signal) = next_signal(self.signalfd_candidates(id)) else {
                break;
            };
            let info = self
                .threads
                .take_current_pending(signal)
                .or_else(|| self.signals.pending.take(signal))
                .unwrap_or_else(|| SigInfo::kernel(signal));
            records.push(signalfd_record(&info));
        }
        if records.is_empty() {
            return Err(self.wait_or_again(nonblocking));
        }
        self.write_objs(buf, &records)?;
        Ok((records.len() * size_of::<SignalfdSiginfo>()) as u64)
    }

    /// For a blocking descriptor: wait for I/O and make the call again; else `EAGAIN`.
    pub(crate) fn wait_or_again(&self, nonblocking: bool) -> Stop {
        if nonblocking {
            Errno::EAGAIN.into()
        } else {
            Stop::Block(Self::io_wait())
        }
    }
}

/// The `signalfd_siginfo` for `info`: number, errno and code; the sender (the first union
/// word of a kill-style siginfo); the value and the fault address.
fn signalfd_record(info: &SigInfo) -> SignalfdSiginfo {
    SignalfdSiginfo {
        ssi_signo: info.signo as u32,
        ssi_errno: info.errno,
        ssi_code: info.code,
        ssi_pid: info.fields[0] as u32,
        ssi_uid: (info.fields[0] >> 32) as u32,
        ssi_ptr: info.fields[1],
        ssi_addr: info.fields[0],
        ..SignalfdSiginfo::default()
    }
}
