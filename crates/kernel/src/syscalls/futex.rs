//! `futex`: the waits and wakes glibc's mutexes, condition variables, semaphores and thread
//! joins are built on. A process's threads share one address space and all processes one
//! syscall layer, so checking the word and blocking is atomic by construction. A wake of a
//! word in shared memory (`shm`) also reaches waiters in the other processes that map it. Priority-inheritance operations are not offered (`ENOSYS`);
//! glibc uses them only for mutexes created with `PTHREAD_PRIO_INHERIT`.

use syscalls::Errno;

use super::{Stop, SysResult};
use crate::abi::Timespec;
use crate::process::Process;
use crate::threads::{Resume, SignalWake, Wait, WaitOn, monotonic_ns};

const FUTEX_WAIT: i32 = 0;
const FUTEX_WAKE: i32 = 1;
const FUTEX_REQUEUE: i32 = 3;
const FUTEX_CMP_REQUEUE: i32 = 4;
const FUTEX_WAKE_OP: i32 = 5;
const FUTEX_WAIT_BITSET: i32 = 9;
const FUTEX_WAKE_BITSET: i32 = 10;
const FUTEX_PRIVATE_FLAG: i32 = 128;
const FUTEX_CLOCK_REALTIME: i32 = 256;
const FUTEX_BITSET_MATCH_ANY: u32 = u32::MAX;

/// A count argument as Linux reads it (an `int`; negative counts as none).
fn count(value: u32) -> usize {
    usize::try_from(value as i32).unwrap_or(0)
}

impl Process {
    fn futex_word(&self, addr: u64) -> Result<u32, Errno> {
        if !addr.is_multiple_of(4) {
            return Err(Errno::EINVAL);
        }
        self.read_obj(addr)
    }

    pub(crate) fn sys_futex(
        &mut self,
        addr: u64,
        op: i32,
        value: u32,
        timeout_or_count: u64,
        addr2: u64,
        value3: u32,
    ) -> SysResult {
        let realtime = op & FUTEX_CLOCK_REALTIME != 0;
        match op & !(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME) {
            FUTEX_WAIT => {
                // A relative timeout, always on the monotonic clock.
                let deadline = self.wait_deadline(timeout_or_count, false, false)?;
                self.futex_wait(addr, value, FUTEX_BITSET_MATCH_ANY, deadline)
            }
            FUTEX_WAIT_BITSET => {
                if value3 == 0 {
                    return Err(Errno::EINVAL.into());
                }
                let deadline = self.wait_deadline(timeout_or_count, true, realtime)?;
                self.futex_wait(addr, value, value3, deadline)
            }
            FUTEX_WAKE => self.futex_wake(addr, FUTEX_BITSET_MATCH_ANY, count(value)),
            FUTEX_WAKE_BITSET => {
                if value3 == 0 {
                    return Err(Errno::EINVAL.into());
                }
                self.futex_wake(addr, value3, count(value))
            }
            FUTEX_REQUEUE | FUTEX_CMP_REQUEUE => {
                if op & !(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME) == FUTEX_CMP_REQUEUE
                    && self.futex_word(addr)? != value3
                {
                    return Err(Errno::EAGAIN.into());
                }
                self.futex_word(addr2)?;
                let (woken, moved) = self.threads.futex_requeue(
                    addr,
                    addr2,
                    count(value),
                    count(timeout_or_count as u32),
                );
                Ok((woken + moved) as u64)
            }
            FUTEX_WAKE_OP => self.futex_wake_op(
                addr,
                addr2,
                count(value),
                count(timeout_or_count as u32),
                value3,
            ),
            _ => Err(Errno::ENOSYS.into()),
        }
    }

    /// Blocks until a wake on `addr`, if it still holds `expected`.
    fn futex_wait(
        &mut self,
        addr: u64,
        expected: u32,
        bitset: u32,
        deadline: Option<u64>,
    ) -> SysResult {
        if self.futex_word(addr)? != expected {
            return Err(Errno::EAGAIN.into());
        }
        if deadline.is_some_and(|d| d <= monotonic_ns()) {
            return Err(Errno::ETIMEDOUT.into());
        }
        Err(Stop::Block(Wait {
            on: WaitOn::Futex { addr, bitset },
            deadline_ns: deadline,
            on_timeout: Resume::Return((-i64::from(Errno::ETIMEDOUT.into_raw())) as u64),
            on_signal: SignalWake::Restart,
        }))
    }

    fn futex_wake(&mut self, addr: u64, bitset: u32, count: usize) -> SysResult {
        self.futex_word(addr)?;
        let mut woken = self.threads.futex_wake(addr, bitset, count);
        if woken < count {
            woken += self.wake_shared_futex(addr, bitset, count - woken);
        }
        Ok(woken as u64)
    }

    /// `FUTEX_WAKE_OP`: changes the word at `addr2`, wakes waiters on `addr`, and on
    /// `addr2` too when the word's old value passes the comparison encoded in `encoded`.
    fn futex_wake_op(
        &mut self,
        addr: u64,
        addr2: u64,
        wake: usize,
        wake2: usize,
        encoded: u32,
    ) -> SysResult {
        let op = (encoded >> 28) & 7;
        let shift = encoded >> 28 & 8 != 0;
        let cmp = (encoded >> 24) & 15;
        // 12-bit signed arguments.
        let sign_extend = |v: u32| ((v << 20) as i32 >> 20) as u32;
        let mut oparg = sign_extend((encoded >> 12) & 0xfff);
        let cmparg = sign_extend(encoded & 0xfff);
        if shift {
            oparg = 1u32.checked_shl(oparg).unwrap_or(0);
        }
        self.futex_word(addr)?;
        let old = self.futex_word(addr2)?;
        let new = match op {
            0 => oparg,
            1 => old.wrapping_add(oparg),
            2 => old | oparg,
            3 => old & !oparg,
            4 => old ^ oparg,
            _ => return Err(Errno::ENOSYS.into()),
        };
        let passes = match cmp {
            0 => old == cmparg,
            1 => old != cmparg,
            2 => (old as i32) < cmparg as i32,
            3 => (old as i32) <= cmparg as i32,
            4 => (old as i32) > cmparg as i32,
            5 => (old as i32) >= cmparg as i32,
            _ => return Err(Errno::ENOSYS.into()),
        };
        self.write_obj(addr2, &new)?;
        let mut woken = self.threads.futex_wake(addr, FUTEX_BITSET_MATCH_ANY, wake);
        if passes {
            woken += self
                .threads
                .futex_wake(addr2, FUTEX_BITSET_MATCH_ANY, wake2);
        }
        Ok(woken as u64)
    }

    /// The `CLOCK_MONOTONIC` deadline of a wait given a timeout pointer (0: none). An
    /// `absolute` timeout is a point on the realtime clock when `realtime`, else on the
    /// monotonic one. A restarted syscall keeps the deadline it first had.
    pub(crate) fn wait_deadline(
        &self,
        timeout: u64,
        absolute: bool,
        realtime: bool,
    ) -> Result<Option<u64>, Errno> {
        if timeout == 0 {
            return Ok(None);
        }
        if let Some(deadline) = self.threads.restart_deadline() {
            return Ok(Some(deadline));
        }
        let ts = self.read_timespec_value(timeout)?;
        let ns = ts.as_ns().ok_or(Errno::EINVAL)?;
        let now = monotonic_ns();
        Ok(Some(if !absolute {
            now.saturating_add(ns)
        } else if realtime {
            let wall_now = Timespec::now(libc::CLOCK_REALTIME).as_ns().unwrap_or(0);
            now.saturating_add(ns.saturating_sub(wall_now))
        } else {
            ns
        }))
    }
}
