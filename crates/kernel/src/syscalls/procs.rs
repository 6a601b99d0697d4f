//! Processes: `fork`, `vfork` and `clone` of a new process, `wait4`/`waitid`, process
//! groups and sessions, `kill` between processes. (`execve` is in `exec`; the table itself
//! and switching between processes in `crate::procs`.)

use syscalls::Errno;

use super::{ExitReason, Stop, SysResult};
use crate::context::{Fpu, UserContext};
use crate::file::FileObject;
use crate::pagetable::PageTables;
use crate::process::{Process, identity};
use crate::procs::{Entry, INIT, Life, MAX_PROCESSES, Memory, Own, Parked, Pid};
use crate::signals::{SigInfo, SignalState, code};
use crate::threads::{Resume, SignalWake, Threads, Wait, WaitOn};

use super::thread::{
    CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID, CLONE_FILES, CLONE_FS, CLONE_PARENT_SETTID,
    CLONE_SETTLS, CLONE_SIGHAND, CLONE_VFORK, CLONE_VM, child_context,
};

const CLONE_PARENT: u64 = 0x8000;

/// Flags a new process may be created with.
const PROCESS_FLAGS: u64 = CLONE_VM
    | CLONE_VFORK
    | CLONE_PARENT
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID
    | CLONE_CHILD_SETTID;

/// `wait4`/`waitid` options.
const WNOHANG: i32 = 1;
const WUNTRACED: i32 = 2;
const WEXITED: i32 = 4;
const WCONTINUED: i32 = 8;
const WNOWAIT: i32 = 0x0100_0000;
const WALL_CLONE: i32 = 0x4000_0000 | i32::MIN; // __WALL | __WCLONE
const WNOTHREAD: i32 = 0x2000_0000;
/// `waitid` id types.
const P_ALL: i32 = 0;
const P_PID: i32 = 1;
const P_PGID: i32 = 2;
/// `struct rusage` is 144 bytes; a reaped child's is reported as zeros.
const RUSAGE_SIZE: usize = 144;

/// Which children a wait is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Any,
    Pid(Pid),
    Group(Pid),
}

/// What a new process gets from `clone`'s arguments.
pub(crate) struct NewProcess {
    pub flags: u64,
    pub exit_signal: i32,
    pub stack: u64,
    pub tls: u64,
    pub parent_tid: u64,
    pub child_tid: u64,
}

impl NewProcess {
    /// `fork` (`flags` 0) or `vfork`: `SIGCHLD` at the end, nothing else.
    pub(crate) fn plain(flags: u64) -> NewProcess {
        NewProcess {
            flags,
            exit_signal: libc::SIGCHLD,
            stack: 0,
            tls: 0,
            parent_tid: 0,
            child_tid: 0,
        }
    }
}

impl Process {
    /// `fork`, `vfork`, and `clone`/`clone3` without `CLONE_THREAD`. A child has its own
    /// copy of the caller's memory (see `GuestRam::duplicate`), or with `CLONE_VM |
    /// CLONE_VFORK` borrows it while the caller waits for it to `execve` or exit.
    pub(crate) fn sys_fork(
        &mut self,
        new: NewProcess,
        ctx: &UserContext,
        fpu: &mut dyn Fpu,
    ) -> SysResult {
        let flags = new.flags;
        let vfork = flags & (CLONE_VM | CLONE_VFORK) == CLONE_VM | CLONE_VFORK;
        if flags & CLONE_VM != 0 && !vfork {
            // Two processes running at once in one address space: not something a
            // VM per address space can give, and no common program asks for it.
            return Err(Errno::EINVAL.into());
        }
        if flags & (CLONE_FILES | CLONE_FS | CLONE_SIGHAND) != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & !PROCESS_FLAGS != 0 {
            // Namespaces, ptrace, pidfds, cgroups: nothing a sandboxed process can have.
            return Err(Errno::EPERM.into());
        }
        if !(0..=64).contains(&new.exit_signal) {
            return Err(Errno::EINVAL.into());
        }
        if self.procs.entries.len() >= MAX_PROCESSES {
            return Err(Stop::Exit(ExitReason::ProcessLimit(MAX_PROCESSES)));
        }
        for (flag, addr) in [
            (CLONE_PARENT_SETTID, new.parent_tid),
            (CLONE_CHILD_SETTID, new.child_tid),
        ] {
            if flags & flag != 0 {
                self.check_user(addr, 4)?;
            }
        }
        let pid = self.procs.alloc_id()?;
        if flags & CLONE_PARENT_SETTID != 0 {
            self.write_obj(new.parent_tid, &pid)?;
        }
        let memory = if vfork {
            None
        } else {
            let ram = self.duplicate_memory()?;
            let mut mm = self.mm.clone();
            let skip = mm.advised_for_fork(|f| f.skip);
            let wipe = mm.advised_for_fork(|f| f.wipe && !f.skip);
            for &(start, end) in &skip {
                mm.unmap(start, end - start)?;
            }
            for (start, end) in wipe.into_iter().chain(skip) {
                ram.discard(start, end - start).map_err(|e| {
                    tracing::warn!(error = %e, "wiping memory for fork");
                    Errno::ENOMEM
                })?;
            }
            if flags & CLONE_CHILD_SETTID != 0 {
                if !mm.is_writable(new.child_tid, 4) {
                    return Err(Errno::EFAULT.into());
                }
                ram.write(new.child_tid, &pid.to_le_bytes())
                    .map_err(|_| Errno::EFAULT)?;
            }
            Some(Memory {
                tables: PageTables::for_ram(ram.size()),
                ram,
                mm,
                stale: rangemap::RangeMap::new(),
                vdso: self.vdso,
            })
        };
        if vfork && flags & CLONE_CHILD_SETTID != 0 {
            self.write_obj(new.child_tid, &pid)?;
        }

        let child = child_context(ctx, flags, new.stack, new.tls);
        let state = fpu.save();
        let mut threads = Threads::forked(pid, child, state.clone());
        threads.set_current_mask(self.threads.current_mask());
        threads.set_alt_stack(self.threads.alt_stack());
        let control: Vec<i32> = self
            .files
            .fds()
            .filter(|&fd| {
                self.files
                    .get(fd)
                    .is_ok_and(|f| matches!(f.object, FileObject::Control))
            })
            .collect();
        let own = Own {
            files: self.files.fork(&control),
            cwd: self.cwd.clone(),
            signals: SignalState {
                actions: self.signals.actions.clone(),
                pending: Default::default(),
            },
            exe_path: self.exe_path.clone(),
            umask: self.umask,
            threads,
            timers: Default::default(),
        };
        let me = self.pid();
        let parent_entry = self.procs.entries[&me].clone();
        self.procs.entries.insert(
            pid,
            Entry {
                ppid: if flags & CLONE_PARENT != 0 {
                    parent_entry.ppid
                } else {
                    me
                },
                pgid: parent_entry.pgid,
                sid: parent_entry.sid,
                life: Life::Alive,
                exit_signal: new.exit_signal,
                borrows_from: vfork.then_some(self.procs.memory_owner(me)),
                pdeathsig: 0,
                cmdline: parent_entry.cmdline,
                creds: parent_entry.creds,
                sched: parent_entry.sched,
                execed: false,
                started_ns: crate::threads::monotonic_ns(),
                adopted: false,
            },
        );
        self.procs.parked.insert(pid, Parked { own, memory });
        if !vfork {
            return Ok(u64::from(pid));
        }
        // The child will load its own vector state into the vCPU both use; ours is kept
        // with our thread until we run again.
        let tid = self.threads.current();
        self.threads.store_fpu(tid, state);
        self.threads.set_fpu_owner(0);
        Err(Stop::Block(Wait {
            on: WaitOn::Vfork(pid),
            deadline_ns: None,
            on_timeout: Resume::Return(u64::from(pid)),
            on_signal: SignalWake::Restart,
        }))
    }

    /// A copy of the current memory for a forked child: private pages copied (copy-on-write
    /// from the snapshot where there is one), shared segments mapped.
    fn duplicate_memory(&self) -> Result<forkvm_memory::ram::GuestRam, Errno> {
        let segments = self.segment_ranges();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (start, end) in self.populated_ranges() {
            let mut from = start;
            for &(s, e, _, _) in segments.iter().filter(|r| r.0 < end && start < r.1) {
                if from < s {
                    ranges.push((from, s));
                }
                from = from.max(e);
            }
            if from < end {
                ranges.push((from, end));
            }
        }
        let host_error = |e: forkvm_memory::ram::MemoryError| {
            tracing::warn!(error = %e, "copying memory for fork");
            Errno::ENOMEM
        };
        let ram = self.ram.duplicate(&ranges).map_err(host_error)?;
        for (start, end, id, offset) in segments {
            let segment = self.segments.get(id).ok_or(Errno::ENOMEM)?;
            segment.map_into(&ram, start, end - start, offset)?;
        }
        Ok(ram)
    }

    /// The children of the current process a wait for `which` may report.
    fn children(&self, which: Which) -> Vec<(Pid, Life)> {
        let me = self.pid();
        self.procs
            .entries
            .iter()
            .filter(|(_, e)| e.ppid == me)
            .filter(|&(&pid, e)| match which {
                Which::Any => true,
                Which::Pid(p) => pid == p,
                Which::Group(g) => e.pgid == g,
            })
            .map(|(&pid, e)| (pid, e.life))
            .collect()
    }

    /// The first ended child `which` names: its pid and wait status, reaped unless
    /// `keep`. `Ok(None)` while they all still run; `ECHILD` when there are none.
    fn reap(&mut self, which: Which, keep: bool) -> Result<Option<(Pid, i32)>, Errno> {
        let children = self.children(which);
        if children.is_empty() {
            return Err(Errno::ECHILD);
        }
        let Some((pid, status)) = children.into_iter().find_map(|(pid, life)| match life {
            Life::Zombie(status) => Some((pid, status)),
            Life::Alive => None,
        }) else {
            return Ok(None);
        };
        if !keep {
            self.procs.entries.remove(&pid);
        }
        Ok(Some((pid, status)))
    }

    /// Blocks the caller until a child changes state (the wait is made again then).
    fn wait_for_child() -> Stop {
        Stop::Block(Wait {
            on: WaitOn::Child,
            deadline_ns: None,
            on_timeout: Resume::Restart,
            on_signal: SignalWake::Restart,
        })
    }

    pub(crate) fn sys_wait4(
        &mut self,
        pid: i64,
        status: u64,
        options: i32,
        rusage: u64,
    ) -> SysResult {
        if options & !(WNOHANG | WUNTRACED | WCONTINUED | WALL_CLONE | WNOTHREAD) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let which = match pid {
            -1 => Which::Any,
            0 => Which::Group(self.procs.entries[&self.pid()].pgid),
            p if p < -1 => Which::Group(Pid::try_from(self.named(-p)).map_err(|_| Errno::ECHILD)?),
            p => Which::Pid(Pid::try_from(p).map_err(|_| Errno::ECHILD)?),
        };
        if status != 0 {
            self.check_user(status, 4)?;
        }
        if rusage != 0 {
            self.check_user(rusage, RUSAGE_SIZE as u64)?;
        }
        match self.reap(which, false)? {
            Some((child, wait_status)) => {
                if status != 0 {
                    self.write_obj(status, &wait_status)?;
                }
                if rusage != 0 {
                    self.write_user(rusage, &[0u8; RUSAGE_SIZE])?;
                }
                Ok(u64::from(child))
            }
            None if options & WNOHANG != 0 => Ok(0),
            None => Err(Self::wait_for_child()),
        }
    }

    pub(crate) fn sys_waitid(
        &mut self,
        idtype: i32,
        id: u64,
        infop: u64,
        options: i32,
        rusage: u64,
    ) -> SysResult {
        if options
            & !(WNOHANG | WUNTRACED | WEXITED | WCONTINUED | WNOWAIT | WALL_CLONE | WNOTHREAD)
            != 0
            || options & (WEXITED | WUNTRACED | WCONTINUED) == 0
        {
            return Err(Errno::EINVAL.into());
        }
        let which = match idtype {
            P_ALL => Which::Any,
            P_PID => Which::Pid(Pid::try_from(id).map_err(|_| Errno::EINVAL)?),
            P_PGID if id == 0 => Which::Group(self.procs.entries[&self.pid()].pgid),
            P_PGID => Which::Group(Pid::try_from(id).map_err(|_| Errno::EINVAL)?),
            _ => return Err(Errno::EINVAL.into()),
        };
        if infop != 0 {
            self.check_user(infop, 128)?;
        }
        if options & WEXITED == 0 {
            // Only stops or continues asked for, and no process here ever stops.
            return match self.children(which).is_empty() {
                true => Err(Errno::ECHILD.into()),
                false if options & WNOHANG != 0 => self.write_waitid(infop, None).map(|_| 0),
                false => Err(Self::wait_for_child()),
            };
        }
        match self.reap(which, options & WNOWAIT != 0)? {
            Some((child, status)) => {
                self.write_waitid(infop, Some((child, status)))?;
                if rusage != 0 {
                    self.write_user(rusage, &[0u8; RUSAGE_SIZE])?;
                }
                Ok(0)
            }
            None if options & WNOHANG != 0 => self.write_waitid(infop, None).map(|_| 0),
            None => Err(Self::wait_for_child()),
        }
    }

    /// Fills `waitid`'s `siginfo_t`: zeros when no child was ready.
    fn write_waitid(&mut self, infop: u64, child: Option<(Pid, i32)>) -> SysResult {
        if infop == 0 {
            return Ok(0);
        }
        let info = match child {
            None => SigInfo::default(),
            Some((pid, status)) => {
                let (code, value) = if status & 0x7f == 0 {
                    (1, (status >> 8) & 0xff)
                } else {
                    (2, status & 0x7f)
                };
                let mut info =
                    SigInfo::from_process(libc::SIGCHLD, code, pid, identity::UID as u32);
                info.fields[1] = value as u32 as u64;
                info
            }
        };
        self.write_obj(infop, &info)?;
        Ok(0)
    }

    /// The process `pid` names for the group and session calls (0: the caller).
    fn target(&self, pid: i64) -> Result<Pid, Errno> {
        match pid {
            0 => Ok(self.pid()),
            p => Pid::try_from(p)
                .ok()
                .filter(|p| self.procs.entries.contains_key(p))
                .ok_or(Errno::ESRCH),
        }
    }

    pub(crate) fn sys_getppid(&self) -> SysResult {
        Ok(u64::from(self.procs.entries[&self.pid()].ppid))
    }

    pub(crate) fn sys_getpgid(&self, pid: i64) -> SysResult {
        let pid = self.target(pid)?;
        Ok(u64::from(self.procs.entries[&pid].pgid))
    }

    pub(crate) fn sys_getsid(&self, pid: i64) -> SysResult {
        let pid = self.target(pid)?;
        Ok(u64::from(self.procs.entries[&pid].sid))
    }

    /// `setpgid`: the caller or one of its children (not yet past `execve`), in its own
    /// session, joins group `pgid` (0: its own pid), which must exist in that session
    /// unless it is the process's own.
    pub(crate) fn sys_setpgid(&mut self, pid: i64, pgid: i64) -> SysResult {
        if pgid < 0 {
            return Err(Errno::EINVAL.into());
        }
        let me = self.pid();
        let pid = self.target(pid)?;
        let my_sid = self.procs.entries[&me].sid;
        let entry = &self.procs.entries[&pid];
        if pid != me {
            if entry.ppid != me {
                return Err(Errno::ESRCH.into());
            }
            if entry.execed {
                return Err(Errno::EACCES.into());
            }
        }
        if entry.sid != my_sid || entry.sid == pid {
            // A session leader cannot move; a child in another session cannot be moved.
            return Err(Errno::EPERM.into());
        }
        let pgid = if pgid == 0 {
            pid
        } else {
            Pid::try_from(pgid).map_err(|_| Errno::EINVAL)?
        };
        let group_exists = self
            .procs
            .entries
            .values()
            .any(|e| e.pgid == pgid && e.sid == my_sid);
        if pgid != pid && !group_exists {
            return Err(Errno::EPERM.into());
        }
        if let Some(entry) = self.procs.entries.get_mut(&pid) {
            entry.pgid = pgid;
        }
        Ok(0)
    }

    /// `setsid`: a new session and group led by the caller, unless it leads a group.
    pub(crate) fn sys_setsid(&mut self) -> SysResult {
        let me = self.pid();
        if self.procs.entries.values().any(|e| e.pgid == me) {
            return Err(Errno::EPERM.into());
        }
        if let Some(entry) = self.procs.entries.get_mut(&me) {
            entry.pgid = me;
            entry.sid = me;
        }
        Ok(u64::from(me))
    }

    /// `kill`: to one process (`pid > 0`), the caller's group (0), every process but
    /// `INIT` and the caller (-1), or group `-pid`.
    pub(crate) fn sys_kill(&mut self, pid: i64, signal: i32) -> SysResult {
        if !(0..=64).contains(&signal) {
            return Err(Errno::EINVAL.into());
        }
        let me = self.pid();
        let my_pgid = self.procs.entries[&me].pgid;
        let targets: Vec<(Pid, Life)> = self
            .procs
            .entries
            .iter()
            .filter(|&(&p, e)| match pid {
                0 => e.pgid == my_pgid,
                -1 => p != INIT && p != me,
                n if n < -1 => i64::from(e.pgid) == self.named(-n),
                n => i64::from(p) == n,
            })
            .map(|(&p, e)| (p, e.life))
            .collect();
        if targets.is_empty() {
            return Err(Errno::ESRCH.into());
        }
        if signal == 0 {
            return Ok(0);
        }
        let info =
            SigInfo::from_process(signal, code::SI_USER, self.shown(me), self.creds().uid[0]);
        // The caller last: a signal that ends it must not keep the others from theirs.
        for (target, life) in targets.iter().filter(|(p, _)| *p != me) {
            if *life == Life::Alive {
                self.signal_process(*target, info);
            }
        }
        if targets.iter().any(|(p, _)| *p == me) {
            self.send_to_process(info);
        }
        Ok(0)
    }

    /// `prctl(PR_SET_PDEATHSIG)`.
    pub(crate) fn set_pdeathsig(&mut self, signal: u64) -> SysResult {
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (0..=64).contains(s))
            .ok_or(Errno::EINVAL)?;
        let me = self.pid();
        if let Some(entry) = self.procs.entries.get_mut(&me) {
            entry.pdeathsig = signal;
        }
        Ok(0)
    }

    /// `prctl(PR_GET_PDEATHSIG)`.
    pub(crate) fn get_pdeathsig(&mut self, out: u64) -> SysResult {
        let signal = self.procs.entries[&self.pid()].pdeathsig;
        self.write_obj(out, &signal)?;
        Ok(0)
    }
}
