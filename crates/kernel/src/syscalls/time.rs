//! Clocks and sleeping, answered from the host clock (the vDSO answers most clock reads in
//! the guest; these are the rest): a fork of an old snapshot reads the true current time.
//! A sleep blocks only the calling thread.

use syscalls::Errno;

use super::{Stop, SysResult};
use crate::abi::{Timespec, Timeval};
use crate::process::Process;
use crate::threads::{Resume, SignalWake, Wait, WaitOn, monotonic_ns};

fn host_clock(clock: i32) -> Result<Timespec, Errno> {
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
    Ok(Timespec {
        tv_sec: ts.tv_sec,
        tv_nsec: ts.tv_nsec,
    })
}

impl Timespec {
    /// A host clock now.
    pub(crate) fn now(clock: i32) -> Timespec {
        host_clock(clock).unwrap_or_default()
    }
}

impl Process {
    /// Reads a `struct timespec` argument; `EINVAL` unless it is a valid, non-negative time.
    pub(crate) fn read_timespec_value(&self, addr: u64) -> Result<Timespec, Errno> {
        let ts: Timespec = self.read_obj(addr)?;
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
        self.write_obj(out, &host_clock(clock)?)?;
        Ok(0)
    }

    pub(crate) fn sys_clock_getres(&mut self, clock: i32, out: u64) -> SysResult {
        host_clock(clock)?;
        if out != 0 {
            let resolution = Timespec {
                tv_sec: 0,
                tv_nsec: 1,
            };
            self.write_obj(out, &resolution)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_gettimeofday(&mut self, out: u64) -> SysResult {
        if out != 0 {
            let ts = host_clock(libc::CLOCK_REALTIME)?;
            let tv = Timeval {
                tv_sec: ts.tv_sec,
                tv_usec: ts.tv_nsec / 1000,
            };
            self.write_obj(out, &tv)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_time(&mut self, out: u64) -> SysResult {
        let now = host_clock(libc::CLOCK_REALTIME)?.tv_sec;
        if out != 0 {
            self.write_obj(out, &now)?;
        }
        Ok(now as u64)
    }

    pub(crate) fn sys_nanosleep(&mut self, request: u64, remaining: u64) -> SysResult {
        if request == 0 {
            return Err(Errno::EFAULT.into());
        }
        let deadline = self.wait_deadline(request, false, false)?;
        if remaining != 0 {
            self.check_user(remaining, size_of::<Timespec>() as u64)?;
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
            self.check_user(remaining, size_of::<Timespec>() as u64)?;
        }
        self.sleep_until(deadline.unwrap_or(0))
    }
}
