//! Clocks and sleeping, answered from the host clock (no vDSO is mapped, so glibc always asks
//! us): a fork of an old snapshot reads the true current time.

use std::time::Duration;

use syscalls::Errno;

use super::SysResult;
use crate::process::Process;

/// Longest single sleep we honour; the wall-clock limit ends the sandbox long before.
const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);

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

fn timespec_bytes(sec: i64, nsec: i64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&sec.to_le_bytes());
    b[8..].copy_from_slice(&nsec.to_le_bytes());
    b
}

impl Process {
    /// Sleeps for `duration`, but never past the sandbox's deadline: the VMM ends a sandbox
    /// whose wall-clock limit passed when the syscall returns.
    pub(crate) fn sleep(&self, duration: Duration) {
        let mut duration = duration.min(MAX_SLEEP);
        if let Some(deadline) = self.deadline {
            duration = duration.min(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        std::thread::sleep(duration);
    }

    fn read_timespec(&self, addr: u64) -> Result<Duration, Errno> {
        let b = self.read_user(addr, 16)?;
        let sec = i64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let nsec = i64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
        if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
            return Err(Errno::EINVAL);
        }
        Ok(Duration::new(sec as u64, nsec as u32))
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
        let duration = self.read_timespec(request)?;
        self.sleep(duration);
        if remaining != 0 {
            self.write_user(remaining, &timespec_bytes(0, 0))?;
        }
        Ok(0)
    }

    pub(crate) fn sys_clock_nanosleep(
        &mut self,
        clock: i32,
        flags: i32,
        request: u64,
        remaining: u64,
    ) -> SysResult {
        let target = self.read_timespec(request)?;
        let duration = if flags & libc::TIMER_ABSTIME != 0 {
            let now = host_clock(clock)?;
            let now = Duration::new(now.tv_sec.max(0) as u64, now.tv_nsec as u32);
            target.saturating_sub(now)
        } else {
            host_clock(clock)?;
            target
        };
        self.sleep(duration);
        if remaining != 0 && flags & libc::TIMER_ABSTIME == 0 {
            self.write_user(remaining, &timespec_bytes(0, 0))?;
        }
        Ok(0)
    }
}
