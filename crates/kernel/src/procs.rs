//! The sandbox's processes: the table of them (pids, parents, groups, sessions, exit
//! statuses), and which one is current.
//!
//! Every process has guest RAM and a KVM VM of its own: guest addresses are physical here
//! (see docs/ARCHITECTURE.md), so two address spaces cannot share one VM. All of them are
//! served by this one syscall layer on one host thread, as the threads of one process are.
//! `Process` holds the *current* process's state in its fields, so syscall handlers need not
//! know there are others; the rest wait in `Procs::parked` and are exchanged in when the
//! scheduler picks one of their threads, or when a syscall acts on them (`with_process`).
//! Descriptions, pipes, sockets, the filesystem and the console belong to the sandbox and
//! are never exchanged.
//!
//! A `vfork` child borrows its parent's memory (and so its VM) until it calls `execve` or
//! exits; the parent waits meanwhile. Memory is kept with its owner whenever its user is
//! not current (`memory_owner`), so lending needs no copy and no bookkeeping beyond that.

use std::collections::BTreeMap;

use forkvm_memory::ram::GuestRam;
use rangemap::RangeMap;
use serde::{Deserialize, Serialize};

use crate::fdtable::FdSlots;
use crate::mm::AddressSpace;
use crate::pagetable::PageTables;
use crate::process::Process;
use crate::signals::{Disposition, SigInfo, SignalState};
use crate::syscalls::creds::Creds;
use crate::threads::{Threads, Tid, monotonic_ns};
use crate::timers::Timers;
use crate::vdso::VdsoPlacement;

/// A process id (the id of its main thread; threads and processes share one id space).
pub type Pid = Tid;

/// The first process: the program the sandbox started (or the template's agent). When it
/// ends, the sandbox ends, and orphans become its children.
pub const INIT: Pid = 1;

/// Processes (live and zombie) a sandbox may have at once. A `fork` beyond it ends the
/// sandbox with `ExitReason::ProcessLimit`: a fork bomb is stopped at once rather than left
/// to spin on `EAGAIN` until the wall clock runs out.
pub const MAX_PROCESSES: usize = 128;

/// `SA_NOCLDWAIT`: children of a process with it set on `SIGCHLD` are reaped at once.
const SA_NOCLDWAIT: u64 = 2;
/// `siginfo.si_code` values of `SIGCHLD`.
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;

/// A process's memory: its guest RAM and what describes it.
pub(crate) struct Memory {
    pub ram: GuestRam,
    pub mm: AddressSpace,
    pub tables: PageTables,
    pub stale: RangeMap<u64, u64>,
    pub vdso: Option<VdsoPlacement>,
}

/// What a process has of its own besides memory.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Own {
    pub files: FdSlots,
    pub cwd: Vec<u8>,
    pub signals: SignalState,
    pub exe_path: Vec<u8>,
    pub umask: u32,
    pub threads: Threads,
    pub timers: Timers,
}

impl Default for Own {
    fn default() -> Self {
        Own {
            files: FdSlots::default(),
            cwd: Vec::new(),
            signals: SignalState::default(),
            exe_path: Vec::new(),
            umask: 0o022,
            threads: Threads::new(0),
            timers: Timers::default(),
        }
    }
}

/// A live process that is not current.
#[derive(Default)]
pub(crate) struct Parked {
    pub own: Own,
    /// Its memory, or `None` while the current process uses it (a `vfork` child's, or the
    /// child's own parent's... see `memory_owner`).
    pub memory: Option<Memory>,
}

/// A wait status as `wait4` reports it.
pub type WaitStatus = i32;

/// The status of a process that called `exit(code)`.
pub fn exited(code: i32) -> WaitStatus {
    (code & 0xff) << 8
}

/// The status of a process a signal ended.
pub fn killed(signal: i32) -> WaitStatus {
    signal & 0x7f
}

/// Whether a process lives or waits to be reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Life {
    Alive,
    Zombie(WaitStatus),
}

/// One process's entry in the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub ppid: Pid,
    pub pgid: Pid,
    pub sid: Pid,
    pub life: Life,
    /// The signal its parent gets when it ends (`SIGCHLD`, or what `clone` named).
    pub exit_signal: i32,
    /// The parent whose memory it uses, while a `vfork` child has not yet called `execve`.
    pub borrows_from: Option<Pid>,
    /// `PR_SET_PDEATHSIG`: the signal it gets when its parent ends.
    pub pdeathsig: i32,
    /// Its arguments, NUL-separated (`/proc/[pid]/cmdline`).
    pub cmdline: Vec<u8>,
    /// Whether it has called `execve` (a parent may no longer `setpgid` it).
    pub execed: bool,
    /// `CLOCK_MONOTONIC` nanoseconds when it was made.
    pub started_ns: u64,
    /// It was orphaned and adopted by `INIT`, which did not make it and so will not wait
    /// for it: it is reaped when it ends rather than left a zombie.
    pub adopted: bool,
    /// Its user and group ids.
    pub creds: Creds,
    /// Its scheduling policy, priority and nice value.
    pub sched: crate::syscalls::sched::Sched,
}

impl Entry {
    fn init() -> Entry {
        Entry {
            ppid: 0,
            pgid: INIT,
            sid: INIT,
            life: Life::Alive,
            exit_signal: libc::SIGCHLD,
            borrows_from: None,
            pdeathsig: 0,
            cmdline: Vec::new(),
            execed: true,
            started_ns: monotonic_ns(),
            adopted: false,
            creds: Creds::default(),
            sched: Default::default(),
        }
    }
}

/// The process table.
pub(crate) struct Procs {
    pub entries: BTreeMap<Pid, Entry>,
    pub parked: BTreeMap<Pid, Parked>,
    pub current: Pid,
    /// The next thread or process id to give out.
    next_id: Tid,
    /// When the current process got the vCPU (processes take turns by time slice).
    pub slice_start_ns: u64,
    /// RAM of processes that ended or replaced their image: the VMM drops their VMs, then
    /// these (`Process::take_retired_ram`).
    pub retired: Vec<GuestRam>,
    /// `CLOCK_MONOTONIC` nanoseconds when the sandbox started (its "boot").
    pub boot_ns: u64,
    /// Set while the sandbox runs between a session's requests (`between`).
    pub between: Option<crate::between::BetweenRequests>,
    /// What all processes together may hold (`memory_budget`), once a limit is set.
    pub memory_budget: Option<crate::memory_budget::MemoryBudget>,
    /// The id programs see for `INIT` (and its first thread): `INIT` itself in a template,
    /// a new number in every fork (`Process::renumber_for_fork`), so libraries that detect
    /// a fork by a changed pid (OpenSSL's generators) reseed.
    pub shown_init: Pid,
}

impl Procs {
    /// A table holding only `INIT`, ids given out from `next_id` on.
    pub fn new(next_id: Tid) -> Procs {
        Procs {
            entries: BTreeMap::from([(INIT, Entry::init())]),
            parked: BTreeMap::new(),
            current: INIT,
            next_id: next_id.max(INIT + 1),
            slice_start_ns: 0,
            retired: Vec::new(),
            boot_ns: monotonic_ns(),
            between: None,
            memory_budget: None,
            shown_init: INIT,
        }
    }

    /// The next id given out (a snapshot keeps it).
    pub fn next_id(&self) -> Tid {
        self.next_id
    }

    /// A new thread or process id (`EAGAIN` if they ran out).
    pub fn alloc_id(&mut self) -> Result<Tid, syscalls::Errno> {
        if self.next_id == self.shown_init {
            // Taken: the first process answers to it.
            self.next_id += 1;
        }
        let id = self.next_id;
        self.next_id = id
            .checked_add(1)
            .filter(|&n| n < 1 << 22)
            .ok_or(syscalls::Errno::EAGAIN)?;
        Ok(id)
    }

    pub fn is_alive(&self, pid: Pid) -> bool {
        self.entries
            .get(&pid)
            .is_some_and(|e| e.life == Life::Alive)
    }

    /// The process whose memory `pid` uses.
    pub fn memory_owner(&self, pid: Pid) -> Pid {
        self.entries
            .get(&pid)
            .and_then(|e| e.borrows_from)
            .unwrap_or(pid)
    }

    /// Live processes other than the current one, in round-robin order after it.
    pub fn others_in_turn(&self) -> Vec<Pid> {
        let current = self.current;
        self.parked
            .range(current + 1..)
            .chain(self.parked.range(..current))
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// The earliest deadline of a waiting thread or armed timer in a parked process.
    pub fn parked_deadline(&self) -> Option<u64> {
        self.parked
            .values()
            .flat_map(|p| [p.own.threads.next_deadline(), p.own.timers.next_expiry()])
            .flatten()
            .min()
    }
}

impl Process {
    /// The current process's id.
    pub fn pid(&self) -> Pid {
        self.procs.current
    }

    /// The id programs see for process or thread `id`: the first process (and its first
    /// thread) show as `Procs::shown_init`.
    pub(crate) fn shown(&self, id: Pid) -> Pid {
        if id == INIT {
            self.procs.shown_init
        } else {
            id
        }
    }

    /// `shown` of a syscall's result that is an id.
    pub(crate) fn shown_u64(&self, id: u64) -> u64 {
        u32::try_from(id).map_or(id, |id| u64::from(self.shown(id)))
    }

    /// The process, thread or process group a program's `id` names: the first process
    /// answers to what it shows as, and to `INIT` still (a thread library may have cached
    /// its first id). Negative ids (groups, for `kill` and `wait4`) are left to the callers,
    /// which name the group `named(-id)`: `-INIT` is `kill`'s "everyone".
    pub(crate) fn named(&self, id: i64) -> i64 {
        if id == i64::from(self.procs.shown_init) {
            i64::from(INIT)
        } else {
            id
        }
    }

    /// Gives the first process a new id that programs see, as a fork gets from Linux: a
    /// fresh fork of a template (or a session) calls this before its first request.
    /// Nothing inside changes: the table still knows the process as `INIT`.
    pub fn renumber_for_fork(&mut self) {
        let mut bytes = [0u8; 4];
        loop {
            crate::entropy::host_random(&mut bytes);
            // Above every id the table gave out, below Linux's pid_max (2^22).
            let id = (u32::from_le_bytes(bytes) % (1 << 22)).max(1 << 16);
            if id != self.procs.shown_init && id >= self.procs.next_id() {
                self.procs.shown_init = id;
                return;
            }
        }
    }

    /// Makes the first process current again (to take the sandbox apart: its VM is the one
    /// a pool resets and reuses).
    pub fn make_init_current(&mut self) {
        if self.pid() != INIT && self.procs.parked.contains_key(&INIT) {
            self.switch_to(INIT);
        }
    }

    /// Records the current process's arguments (`/proc/[pid]/cmdline`).
    pub(crate) fn set_cmdline(&mut self, argv: &[Vec<u8>]) {
        let pid = self.pid();
        if let Some(entry) = self.procs.entries.get_mut(&pid) {
            entry.cmdline = argv.join(&0u8);
            entry.cmdline.push(0);
        }
    }

    /// How many processes the sandbox has, live or waiting to be reaped.
    pub fn process_count(&self) -> usize {
        self.procs.entries.len()
    }

    /// Guest RAM of processes that are gone. The VMM drops the VMs over them first, then
    /// the RAM.
    pub fn take_retired_ram(&mut self) -> Vec<GuestRam> {
        std::mem::take(&mut self.procs.retired)
    }

    /// Every live process's guest RAM (for memory accounting).
    pub fn all_ram(&self) -> impl Iterator<Item = &GuestRam> {
        std::iter::once(&self.ram).chain(
            self.procs
                .parked
                .values()
                .filter_map(|p| p.memory.as_ref().map(|m| &m.ram)),
        )
    }

    fn exchange_own(&mut self, own: &mut Own) {
        self.files.exchange(&mut own.files);
        std::mem::swap(&mut self.cwd, &mut own.cwd);
        std::mem::swap(&mut self.signals, &mut own.signals);
        std::mem::swap(&mut self.exe_path, &mut own.exe_path);
        std::mem::swap(&mut self.umask, &mut own.umask);
        std::mem::swap(&mut self.threads, &mut own.threads);
        std::mem::swap(&mut self.timers, &mut own.timers);
    }

    /// Puts `memory` in place of the current memory, which goes into `memory`.
    pub(crate) fn exchange_memory(&mut self, memory: &mut Memory) {
        std::mem::swap(&mut self.ram, &mut memory.ram);
        std::mem::swap(&mut self.mm, &mut memory.mm);
        std::mem::swap(&mut self.tables, &mut memory.tables);
        std::mem::swap(&mut self.stale, &mut memory.stale);
        std::mem::swap(&mut self.vdso, &mut memory.vdso);
    }

    /// Makes `pid` (live) the current process. The one leaving is parked, or, if it has
    /// ended, dropped: its memory is retired, or given back to the parent it borrowed it
    /// from.
    pub(crate) fn switch_to(&mut self, pid: Pid) {
        let out = self.procs.current;
        if pid == out {
            return;
        }
        let mut incoming = self
            .procs
            .parked
            .remove(&pid)
            .expect("only a parked process is switched to");
        let mut outgoing = Parked::default();
        self.exchange_own(&mut outgoing.own);
        self.exchange_own(&mut incoming.own);
        let (owner_out, owner_in) = (self.procs.memory_owner(out), self.procs.memory_owner(pid));
        if owner_out != owner_in {
            let mut memory = if owner_in == pid {
                incoming.memory.take()
            } else {
                self.procs
                    .parked
                    .get_mut(&owner_in)
                    .and_then(|p| p.memory.take())
            }
            .expect("a process's memory is with its owner while it is not current");
            self.exchange_memory(&mut memory);
            let out_alive = self.procs.is_alive(out);
            if owner_out == out {
                if out_alive {
                    outgoing.memory = Some(memory);
                } else {
                    self.procs.retired.push(memory.ram);
                }
            } else if let Some(lender) = self.procs.parked.get_mut(&owner_out) {
                lender.memory = Some(memory);
            }
        }
        if self.procs.is_alive(out) {
            self.procs.parked.insert(out, outgoing);
        } else if let Some(entry) = self.procs.entries.get_mut(&out) {
            entry.borrows_from = None;
        }
        self.procs.current = pid;
    }

    /// Runs `f` with `pid` (live) as the current process, then switches back.
    pub(crate) fn with_process<R>(&mut self, pid: Pid, f: impl FnOnce(&mut Process) -> R) -> R {
        let back = self.procs.current;
        self.switch_to(pid);
        let result = f(self);
        self.switch_to(back);
        result
    }

    /// Sends `info` to process `pid` (live, current or not).
    pub(crate) fn signal_process(&mut self, pid: Pid, info: SigInfo) {
        if pid == self.pid() {
            self.send_to_process(info);
        } else if self.procs.is_alive(pid) {
            let fatal = self.with_process(pid, |p| {
                p.send_to_process(info);
                p.dies_of(info.signo)
            });
            // A parked process that would die of it on its way back to user mode dies now:
            // it would run none of its code first, and nobody need wait for it to be run.
            if fatal && pid != INIT && self.procs.memory_owner(pid) == pid {
                self.end_parked(pid, killed(info.signo));
            }
        }
    }

    /// The current process (not `INIT`) ends with `status`: its descriptors close, its
    /// children go to `INIT`, its parent is told, and another process becomes current.
    pub(crate) fn exit_process(&mut self, status: WaitStatus) {
        let pid = self.pid();
        let (parent, reap_at_once) = self.wind_up(status);
        // Everything that needs this process current is done: it becomes a zombie, and
        // the next process to run takes its place.
        let now = monotonic_ns();
        let next = self
            .other_runnable(now)
            .or_else(|| self.procs.is_alive(parent).then_some(parent))
            .unwrap_or(INIT);
        self.become_zombie(status);
        self.switch_to(next);
        self.settle_zombie(pid, reap_at_once);
        self.procs.slice_start_ns = now;
    }

    /// Ends parked process `pid` (not `INIT`) at once with `status`, as a signal whose
    /// default action ends it does: it would run no code of its own before dying.
    fn end_parked(&mut self, pid: Pid, status: WaitStatus) {
        let reap_at_once = self.with_process(pid, |p| {
            let (_, reap) = p.wind_up(status);
            p.become_zombie(status);
            reap
        });
        self.settle_zombie(pid, reap_at_once);
    }

    /// The current process is now a zombie: no thread of it will run again.
    fn become_zombie(&mut self, status: WaitStatus) {
        let pid = self.pid();
        self.threads = Threads::new(0);
        if let Some(e) = self.procs.entries.get_mut(&pid) {
            e.life = Life::Zombie(status);
        }
    }

    /// After a zombie's memory is gone: drops segments nobody maps, and the zombie itself
    /// if nobody will wait for it.
    fn settle_zombie(&mut self, pid: Pid, reap_at_once: bool) {
        self.forget_unused_segments();
        if reap_at_once {
            self.procs.entries.remove(&pid);
        }
    }

    /// What the end of the current process does while it is still current: descriptors
    /// closed, children to `INIT`, a borrowed memory's lender woken, the parent told.
    /// Returns the parent, and whether the zombie is to be reaped at once.
    fn wind_up(&mut self, status: WaitStatus) -> (Pid, bool) {
        let pid = self.pid();
        debug_assert_ne!(pid, INIT, "INIT's end is the sandbox's");
        let fds: Vec<i32> = self.files.fds().collect();
        for fd in fds {
            let _ = self.close_fd(fd);
        }
        self.timers = Timers::default();
        let lender = self.procs.entries.get(&pid).and_then(|e| e.borrows_from);
        let children: Vec<(Pid, Entry)> = self
            .procs
            .entries
            .iter()
            .filter(|(_, e)| e.ppid == pid)
            .map(|(&c, e)| (c, e.clone()))
            .collect();
        for (child, entry) in &children {
            if let Some(e) = self.procs.entries.get_mut(child) {
                e.ppid = INIT;
                e.adopted = true;
            }
            match entry.life {
                // A zombie nobody will wait for now.
                Life::Zombie(_) => {
                    self.procs.entries.remove(child);
                }
                Life::Alive if entry.pdeathsig != 0 => {
                    self.signal_process(*child, SigInfo::kernel(entry.pdeathsig));
                }
                Life::Alive => {}
            }
        }
        let entry = self.procs.entries.get(&pid).cloned();
        let parent = entry.as_ref().map_or(INIT, |e| e.ppid);
        let exit_signal = entry.as_ref().map_or(libc::SIGCHLD, |e| e.exit_signal);
        if let Some(lender) = lender
            && let Some(p) = self.procs.parked.get_mut(&lender)
        {
            p.own.threads.vfork_done(pid);
        }
        let adopted = entry.as_ref().is_some_and(|e| e.adopted);
        let mut reap_at_once = adopted;
        if self.procs.is_alive(parent) && !adopted {
            let (code, value) = if status & 0x7f == 0 {
                (CLD_EXITED, (status >> 8) & 0xff)
            } else {
                (CLD_KILLED, status & 0x7f)
            };
            let mut info = SigInfo::from_process(exit_signal, code, pid, 0);
            info.fields[1] = value as u32 as u64;
            reap_at_once = self.with_process(parent, |p| {
                let action = p.signals.action(libc::SIGCHLD);
                if exit_signal != 0 {
                    p.send_to_process(info);
                }
                p.threads.wake_child_waiters();
                exit_signal == libc::SIGCHLD
                    && (action.disposition(libc::SIGCHLD) == Disposition::Ignore
                        && action.handler == 1
                        || action.flags & SA_NOCLDWAIT != 0)
            });
        }
        (parent, reap_at_once)
    }

    /// A parked process with a thread that can run at `now`, in round-robin order (timers
    /// due in parked processes fire first).
    pub(crate) fn other_runnable(&mut self, now: u64) -> Option<Pid> {
        for pid in self.procs.others_in_turn() {
            let due = self
                .procs
                .parked
                .get(&pid)
                .and_then(|p| p.own.timers.next_expiry())
                .is_some_and(|t| t <= now);
            if due {
                self.with_process(pid, |p| p.fire_timers(now));
            }
            let parked = self.procs.parked.get_mut(&pid)?;
            parked.own.threads.expire(now);
            if parked.own.threads.has_runnable() {
                return Some(pid);
            }
        }
        None
    }

    /// Whether the current process has had the vCPU for a full time slice.
    pub(crate) fn process_slice_over(&self, now: u64) -> bool {
        now.saturating_sub(self.procs.slice_start_ns) >= crate::threads::TIMESLICE_NS
    }

    /// Whether some parked process has a thread that can run (not counting waits that
    /// have timed out but not been looked at).
    pub(crate) fn others_runnable(&self) -> bool {
        self.procs
            .parked
            .values()
            .any(|p| p.own.threads.has_runnable())
    }
}
