//! Scheduling attributes per process: the policy and priority (`sched_setscheduler`), the
//! nice value (`setpriority`), the CPU mask. The sandbox's scheduler is round robin over
//! one vCPU whatever they say; they are kept and reported so programs that set and check
//! them (`os.nice`, `posix_spawn`'s scheduler attributes) see what Linux would show.

use syscalls::Errno;

use super::SysResult;
use crate::abi::Timespec;
use crate::process::Process;
use crate::procs::Pid;

const SCHED_OTHER: i32 = 0;
const SCHED_FIFO: i32 = 1;
const SCHED_RR: i32 = 2;
const SCHED_BATCH: i32 = 3;
const SCHED_IDLE: i32 = 5;
/// `SCHED_RESET_ON_FORK`, or-ed into a policy.
const RESET_ON_FORK: i32 = 0x4000_0000;
const PRIO_PROCESS: i32 = 0;
const PRIO_PGRP: i32 = 1;
const PRIO_USER: i32 = 2;
/// The time slice `sched_rr_get_interval` reports (the sandbox's own).
const SLICE_NS: i64 = crate::threads::TIMESLICE_NS as i64;

/// A process's scheduling attributes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sched {
    pub policy: i32,
    pub priority: i32,
    pub nice: i32,
}

/// The priorities `policy` takes (`EINVAL` for an unknown policy).
fn priority_range(policy: i32) -> Result<(i32, i32), Errno> {
    match policy {
        SCHED_FIFO | SCHED_RR => Ok((1, 99)),
        SCHED_OTHER | SCHED_BATCH | SCHED_IDLE => Ok((0, 0)),
        _ => Err(Errno::EINVAL),
    }
}

impl Process {
    /// The process `pid` names (0: the caller): `EINVAL` when negative, `ESRCH` when none.
    fn sched_target(&self, pid: i64) -> Result<Pid, Errno> {
        match pid {
            p if p < 0 => Err(Errno::EINVAL),
            0 => Ok(self.pid()),
            p => Pid::try_from(p)
                .ok()
                .filter(|p| self.procs.is_alive(*p))
                .ok_or(Errno::ESRCH),
        }
    }

    fn sched_of(&mut self, pid: Pid) -> &mut Sched {
        &mut self
            .procs
            .entries
            .get_mut(&pid)
            .expect("a live process")
            .sched
    }

    pub(crate) fn sys_sched_getscheduler(&mut self, pid: i64) -> SysResult {
        let pid = self.sched_target(pid)?;
        Ok(self.sched_of(pid).policy as u64)
    }

    /// `sched_setscheduler` (`policy` given) and `sched_setparam` (`None`: keep it).
    pub(crate) fn sys_sched_setscheduler(
        &mut self,
        pid: i64,
        policy: Option<i32>,
        param: u64,
    ) -> SysResult {
        let pid = self.sched_target(pid)?;
        if param == 0 {
            return Err(Errno::EINVAL.into());
        }
        let priority: i32 = self.read_obj(param)?;
        let policy = match policy {
            Some(p) => p & !RESET_ON_FORK,
            None => self.sched_of(pid).policy,
        };
        let (low, high) = priority_range(policy)?;
        if !(low..=high).contains(&priority) {
            return Err(Errno::EINVAL.into());
        }
        let sched = self.sched_of(pid);
        sched.policy = policy;
        sched.priority = priority;
        Ok(0)
    }

    pub(crate) fn sys_sched_getparam(&mut self, pid: i64, param: u64) -> SysResult {
        let pid = self.sched_target(pid)?;
        if param == 0 {
            return Err(Errno::EINVAL.into());
        }
        let priority = self.sched_of(pid).priority;
        self.write_obj(param, &priority)?;
        Ok(0)
    }

    pub(crate) fn sys_sched_priority(&mut self, policy: i32, max: bool) -> SysResult {
        let (low, high) = priority_range(policy)?;
        Ok((if max { high } else { low }) as u64)
    }

    pub(crate) fn sys_sched_rr_get_interval(&mut self, pid: i64, out: u64) -> SysResult {
        self.sched_target(pid)?;
        let slice = Timespec {
            tv_sec: 0,
            tv_nsec: SLICE_NS,
        };
        self.write_obj(out, &slice)?;
        Ok(0)
    }

    /// The processes `getpriority`/`setpriority` name.
    fn priority_targets(&self, which: i32, who: u32) -> Result<Vec<Pid>, Errno> {
        let me = self.pid();
        let targets: Vec<Pid> = match which {
            PRIO_PROCESS => vec![if who == 0 { me } else { who }],
            PRIO_PGRP => {
                let group = if who == 0 {
                    self.procs.entries[&me].pgid
                } else {
                    who
                };
                self.procs
                    .entries
                    .iter()
                    .filter(|(_, e)| e.pgid == group)
                    .map(|(&p, _)| p)
                    .collect()
            }
            PRIO_USER => {
                let user = if who == 0 { self.creds().uid[0] } else { who };
                self.procs
                    .entries
                    .iter()
                    .filter(|(_, e)| e.creds.uid[0] == user)
                    .map(|(&p, _)| p)
                    .collect()
            }
            _ => return Err(Errno::EINVAL),
        };
        let live: Vec<Pid> = targets
            .into_iter()
            .filter(|p| self.procs.is_alive(*p))
            .collect();
        if live.is_empty() {
            return Err(Errno::ESRCH);
        }
        Ok(live)
    }

    /// `getpriority`: the kernel's `20 - nice` of the highest-priority target.
    pub(crate) fn sys_getpriority(&mut self, which: i32, who: u32) -> SysResult {
        let targets = self.priority_targets(which, who)?;
        let nice = targets
            .iter()
            .map(|p| self.procs.entries[p].sched.nice)
            .min()
            .unwrap_or(0);
        Ok((20 - nice) as u64)
    }

    pub(crate) fn sys_setpriority(&mut self, which: i32, who: u32, nice: i32) -> SysResult {
        let nice = nice.clamp(-20, 19);
        for pid in self.priority_targets(which, who)? {
            self.sched_of(pid).nice = nice;
        }
        Ok(0)
    }

    /// `sched_setaffinity`: the one CPU there is must be in the mask.
    pub(crate) fn sys_sched_setaffinity(&mut self, pid: i64, len: u64, mask: u64) -> SysResult {
        self.sched_target(pid)?;
        if len == 0 {
            return Err(Errno::EINVAL.into());
        }
        let first: u8 = self.read_obj(mask)?;
        if first & 1 == 0 {
            return Err(Errno::EINVAL.into());
        }
        Ok(0)
    }
}
