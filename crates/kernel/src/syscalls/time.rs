//! Clocks and sleeping, answered from the host clock (the vDSO answers most clock reads in
//! the guest; these are the rest): a fork of an old snapshot reads the true current time.
//! A sleep blocks only the calling thread.

use syscalls::Errno;
use vm_memory::ByteValued;

use super::{Stop, SysResult};
use crate::process::Process;
use crate::threads::{Resume, SignalWake, Wait, WaitOn, monotonic_ns};

fn host_clock(clock: i32) -> Result<libc::timespec, Errno> {
    let host_clock = match clock {
        libc::CLOCK_REALTIME
        | libc::CLOCK_MONOTONIC
        | libc::CLOCK_MONOTONIC_RAW
        | libc::CLOCK_REALTIME_COARSE
        | libc::CLOCK_MONOTONIC_COARSE
        | libc::CLOCK_BOOTTIME
        | libc::CLOCK_TAI => clock,
        // The sandbox's CPU time is the vCPU thread's CPU time.
        libc::CLOCK_PROCESS_CPUTIME_ID | libc::CLOCK_THREAD_CPUTIME_ID => {
            libc::CLOCK_THREAD_CPUTIME_ID
        }
        _ => return Err(Errno::EINVAL),
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame.
    let rc = unsafe { libc::clock_gettime(host_clock, &mut ts) };
    if rc != 0 {
        return Err(Errno::EINVAL);
    }
    Ok(ts)
}

/// `struct timespec` as the program reads and writes it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Timespec {
    pub tv_sec: i64,
    pub tv_nsec: i64,
}

// SAFETY: two `i64`s, `repr(C)`, no padding: every byte pattern is a value.
unsafe impl ByteValued for Timespec {}

const _: () = assert!(std::mem::size_of::<Timespec>() == 16);

impl Timespec {
    /// Nanoseconds, for a valid non-negative value (`None` otherwise).
    pub(crate) fn as_ns(&self) -> Option<u64> {
        if self.tv_sec < 0 || !(0..1_000_000_000).contains(&self.tv_nsec) {
            return None;
        }
        (self.tv_sec as u64)
            .checked_mul(1_000_000_000)?
            .checked_add(self.tv_nsec as u64)
    }

    /// A host clock now.
    pub(crate) fn now(clock: i32) -> Timespec {
        host_clock(clock).map_or(Timespec::default(), |ts| Timespec {
            tv_sec: ts.tv_sec,
            tv_nsec: ts.tv_nsec,
        })
    }
}

fn timespec_bytes(sec: i64, nsec: i64) -> [u8; 16] {
    let ts = Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    ts.as_slice().try_into().expect("16 bytes")
}

impl Process {
    /// Reads a `struct timespec` argument; `EINVAL` unless it is a valid, non-negative time.
    pub(crate) fn read_timespec_value(&self, addr: u64) -> Result<Timespec, Errno> {
        let mut ts = Timespec::default();
        ts.as_mut_slice()
            .copy_from_slice(&self.read_user(addr, std::mem::size_of::<Timespec>())?);
        ts.as_ns().ok_or(Errno::EINVAL)?;
        Ok(ts)
    }

    /// Blocks the calling thread until `deadline` (`CLOCK_MONOTONIC` ns); the syscall then
    /// returns 0. Other threads run meanwhile; with none, the VMM waits (never past the
    /// sandbox's own deadline, which ends it).
    fn sleep_until(&self, deadline: u64) -> SysResult {
        if deadline <= monotonic_ns() {
            return Ok(0);
        }
        Err(Stop::Block(Wait {
            on: WaitOn::Sleep,
            deadline_ns: Some(deadline),
            on_timeout: Resume::Return(0),
            on_signal: SignalWake::Interrupt,
        }))
    }

    pub(crate) fn sys_clock_gettime(&mut self, clock: i32, out: u64) -> SysResult {
        let ts = host_clock(clock)?;
        self.write_user(out, &timespec_bytes(ts.tv_sec, ts.tv_nsec))?;
        Ok(0)
    }

    pub(crate) fn sys_clock_getres(&mut self, clock: i32, out: u64) -> SysResult {
        host_clock(clock)?;
        if out != 0 {
            self.write_user(out, &timespec_bytes(0, 1))?;
        }
        Ok(0)
    }

    pub(crate) fn sys_gettimeofday(&mut self, out: u64) -> SysResult {
        if out != 0 {
            let ts = host_clock(libc::CLOCK_REALTIME)?;
            self.write_user(out, &timespec_bytes(ts.tv_sec, ts.tv_nsec / 1000))?;
        }
        Ok(0)
    }

    pub(crate) fn sys_time(&mut self, out: u64) -> SysResult {
        let now = host_clock(libc::CLOCK_REALTIME)?.tv_sec;
        if out != 0 {
            self.write_user(out, &now.to_le_bytes())?;
        }
        Ok(now as u64)
    }

    pub(crate) fn sys_nanosleep(&mut self, request: u64, remaining: u64) -> SysResult {
        if request == 0 {
            return Err(Errno::EFAULT.into());
        }
        let deadline = self.wait_deadline(request, false, false)?;
        if remaining != 0 {
            self.check_user(remaining, 16)?;
        }
        self.sleep_until(deadline.unwrap_or(0))
    }

    pub(crate) fn sys_clock_nanosleep(
        &mut self,
        clock: i32,
        flags: i32,
        request: u64,
        remaining: u64,
    ) -> SysResult {
        host_clock(clock)?;
        if request == 0 {
            return Err(Errno::EFAULT.into());
        }
        if matches!(
            clock,
            libc::CLOCK_PROCESS_CPUTIME_ID | libc::CLOCK_THREAD_CPUTIME_ID
        ) {
            return Err(Errno::EINVAL.into());
        }
        let absolute = flags & libc::TIMER_ABSTIME != 0;
        let realtime = matches!(clock, libc::CLOCK_REALTIME | libc::CLOCK_TAI);
        let deadline = self.wait_deadline(request, absolute, realtime)?;
        if remaining != 0 && !absolute {
            self.check_user(remaining, 16)?;
        }
        self.sleep_until(deadline.unwrap_or(0))
    }
}
