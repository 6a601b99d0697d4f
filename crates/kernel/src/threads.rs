//! The sandbox's threads, and the scheduler that shares its one vCPU between them.
//!
//! Every thread of a sandbox runs on the same vCPU, one at a time; the syscall layer decides
//! which (docs/ARCHITECTURE.md says why this and not a vCPU per thread). A thread leaves the
//! vCPU when it blocks (a futex, a sleep, an empty pipe), yields, exits, or has used its
//! time slice while another is runnable (the VMM interrupts the vCPU for that). Leaving, its
//! user context and vector state are saved here; the next thread's are loaded.
//!
//! A thread blocked in a syscall resumes in one of two ways: the syscall finishes with a
//! value (a futex woken, a timeout), or it is made again (`Restart`: the thread resumes at
//! its `syscall` instruction, like Linux's restart of interrupted calls), which is how a read
//! of a pipe that was empty sees the data another thread wrote.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use syscalls::Errno;

use crate::context::{FpuState, UserContext};
use crate::signals::{Pending, SigInfo, SigSet, bit};

/// A thread id (the main thread's is the process id).
pub type Tid = u32;

/// Threads a sandbox may have at once; `clone` beyond it fails with `EAGAIN`.
pub const MAX_THREADS: usize = 256;

/// How long a thread keeps the vCPU while another is runnable.
pub const TIMESLICE_NS: u64 = 10_000_000;

/// The host's `CLOCK_MONOTONIC` in nanoseconds: deadlines are kept in it, so they survive
/// a snapshot (unlike `Instant`).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// How a thread that left the vCPU goes on when it gets it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resume {
    /// Exactly where it was (it was preempted, or is new).
    Continue,
    /// Its syscall returns this value.
    Return(u64),
    /// Its syscall is made again.
    Restart,
    /// A signal woke it from its syscall: the syscall is made again or fails with `EINTR`,
    /// depending on the handler that runs (see `SignalWake`).
    Interrupted(SignalWake),
}

/// What a signal does to a blocked syscall (Linux's `ERESTARTSYS` and `ERESTARTNOHAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SignalWake {
    /// Made again if the handler has `SA_RESTART` (or none runs); else `EINTR`.
    Restart,
    /// `EINTR` if a handler runs; made again if none does (poll, sleeps, sigsuspend).
    Interrupt,
}

/// What a blocked thread waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitOn {
    /// A `FUTEX_WAKE` on `addr` whose bitset meets `bitset`.
    Futex { addr: u64, bitset: u32 },
    /// Only its deadline (`nanosleep`).
    Sleep,
    /// Any descriptor becoming ready (a pipe read or write, `poll`): woken by every I/O
    /// event in the sandbox, it makes its syscall again and looks.
    Io,
    /// Only a signal (`sigsuspend`, `pause`).
    Signal,
    /// One of these signals becoming pending, blocked or not (`sigtimedwait`).
    SignalIn(SigSet),
    /// A child process changing state (`wait4`, `waitid`): made again when one does.
    Child,
    /// The `vfork` child with this pid giving back the memory it borrowed (by `execve` or
    /// exiting). No signal ends this wait, as in Linux.
    Vfork(Tid),
    /// A request on the control channel: the agent between a session's requests, while the
    /// sandbox's other threads run (`between`). Only the VMM ends this wait.
    Control,
}

/// A blocked thread's wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    pub on: WaitOn,
    /// `CLOCK_MONOTONIC` nanoseconds at which the wait ends by itself.
    pub deadline_ns: Option<u64>,
    /// How the syscall finishes when the deadline passes.
    pub on_timeout: Resume,
    /// What a signal does to it.
    pub on_signal: SignalWake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    /// On the vCPU.
    Running,
    Runnable(Resume),
    /// Blocked since `seq` (wakes are first come, first served).
    Blocked {
        wait: Wait,
        seq: u64,
    },
}

/// One thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Thread {
    state: State,
    /// Its user context while it is off the vCPU.
    context: UserContext,
    /// Its vector state, when not the vCPU's (see `Threads::fpu_owner`).
    fpu: FpuState,
    /// `CLONE_CHILD_CLEARTID`/`set_tid_address`: zeroed and futex-woken when it exits.
    clear_child_tid: u64,
    /// `set_robust_list`: the head of its robust futex list.
    robust_list: u64,
    /// The deadline of the wait its syscall last blocked in: a restarted syscall keeps it
    /// (a `poll` woken by unrelated I/O must not start its timeout over).
    restart_deadline_ns: Option<u64>,
    /// Bytes its blocked syscall already moved (a blocking pipe write waits until all of it
    /// is written): what the syscall returns if a signal ends the wait.
    progress: u64,
    /// Signals it blocks.
    mask: SigSet,
    /// Signals sent to it (not to the process).
    pending: Pending,
    /// `sigaltstack`.
    alt_stack: AltStack,
    /// The mask to restore after the next handler, when a syscall (`sigsuspend`, `ppoll`)
    /// replaced it for the duration of its wait.
    saved_mask: Option<SigSet>,
}

/// A thread's alternate signal stack (`stack_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

impl Default for AltStack {
    fn default() -> Self {
        AltStack {
            sp: 0,
            flags: libc::SS_DISABLE,
            size: 0,
        }
    }
}

impl AltStack {
    /// Whether `sp` lies on this stack.
    pub fn contains(&self, sp: u64) -> bool {
        self.flags & libc::SS_DISABLE == 0
            && sp > self.sp
            && sp <= self.sp.saturating_add(self.size)
    }
}

/// The thread table and the scheduler's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Threads {
    threads: BTreeMap<Tid, Thread>,
    /// The thread on the vCPU, or the one that last left it.
    current: Tid,
    /// The thread whose vector state the vCPU holds (saved lazily, only when another
    /// thread's is loaded).
    fpu_owner: Tid,
    next_seq: u64,
    /// When the current thread got the vCPU.
    slice_start_ns: u64,
}

/// What the scheduler decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `tid` runs next.
    Run(Tid),
    /// Nothing can run until this `CLOCK_MONOTONIC` time.
    Idle(u64),
    /// Nothing can ever run again.
    Deadlock,
}

impl Threads {
    /// A table holding only the main thread, running.
    pub fn new(main: Tid) -> Threads {
        let mut threads = BTreeMap::new();
        threads.insert(
            main,
            Thread {
                state: State::Running,
                context: UserContext::default(),
                fpu: FpuState::default(),
                clear_child_tid: 0,
                robust_list: 0,
                restart_deadline_ns: None,
                progress: 0,
                mask: 0,
                pending: Pending::default(),
                alt_stack: AltStack::default(),
                saved_mask: None,
            },
        );
        Threads {
            threads,
            current: main,
            fpu_owner: main,
            next_seq: 0,
            slice_start_ns: 0,
        }
    }

    /// The table of a new process: its one thread `main`, runnable from `context` with
    /// vector state `fpu`. The process's vCPU holds no thread's state yet (a new VM's, or
    /// the parent's lent by `vfork`), so `fpu` is loaded when the thread first runs.
    pub fn forked(main: Tid, context: UserContext, fpu: FpuState) -> Threads {
        let mut table = Threads::new(main);
        let thread = table.threads.get_mut(&main).expect("just made");
        thread.state = State::Runnable(Resume::Continue);
        thread.context = context;
        thread.fpu = fpu;
        table.fpu_owner = 0;
        table
    }

    pub fn current(&self) -> Tid {
        self.current
    }

    pub fn count(&self) -> usize {
        self.threads.len()
    }

    pub fn exists(&self, tid: Tid) -> bool {
        self.threads.contains_key(&tid)
    }

    /// Whether the current thread is on the vCPU (not blocked, exited or yielding).
    pub fn current_is_running(&self) -> bool {
        self.threads
            .get(&self.current)
            .is_some_and(|t| t.state == State::Running)
    }

    pub fn set_clear_child_tid(&mut self, addr: u64) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.clear_child_tid = addr;
        }
    }

    pub fn set_robust_list(&mut self, head: u64) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.robust_list = head;
        }
    }

    pub fn robust_list(&self) -> u64 {
        self.threads.get(&self.current).map_or(0, |t| t.robust_list)
    }

    /// Whether another thread may be added.
    pub fn has_room(&self) -> bool {
        self.threads.len() < MAX_THREADS
    }

    /// Adds thread `tid` (an id the process table gave out), runnable from `context` and
    /// `fpu`, with the creator's signal mask (a new thread has no alternate stack and
    /// nothing pending).
    pub fn spawn(
        &mut self,
        tid: Tid,
        context: UserContext,
        fpu: FpuState,
        clear_child_tid: u64,
    ) -> Result<Tid, Errno> {
        let mask = self.current_mask();
        if !self.has_room() || self.threads.contains_key(&tid) {
            return Err(Errno::EAGAIN);
        }
        self.threads.insert(
            tid,
            Thread {
                state: State::Runnable(Resume::Continue),
                context,
                fpu,
                clear_child_tid,
                robust_list: 0,
                restart_deadline_ns: None,
                progress: 0,
                mask,
                pending: Pending::default(),
                alt_stack: AltStack::default(),
                saved_mask: None,
            },
        );
        Ok(tid)
    }

    /// Blocks the current thread. A signal already pending for it (or, in `process_pending`,
    /// for the process) that the wait's mask lets through ends the wait at once, as one
    /// arriving later would (`sigsuspend` after blocking and raising a signal).
    pub fn block_current(&mut self, wait: Wait, process_pending: SigSet) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some(thread) = self.threads.get_mut(&self.current) else {
            return;
        };
        thread.state = State::Blocked { wait, seq };
        thread.restart_deadline_ns = wait.deadline_ns;
        let pending = thread.pending.set() | process_pending;
        let woken = (1..=64)
            .filter(|&signal| pending & bit(signal) != 0)
            .find_map(|signal| Self::wakes(thread, signal));
        if let Some(resume) = woken {
            Self::end_wait(thread, resume);
        }
    }

    /// The deadline the current thread's syscall had when it last blocked (for a restart).
    pub fn restart_deadline(&self) -> Option<u64> {
        self.threads
            .get(&self.current)
            .and_then(|t| t.restart_deadline_ns)
    }

    /// Bytes the current thread's syscall moved before it last blocked.
    pub fn progress(&self) -> u64 {
        self.threads.get(&self.current).map_or(0, |t| t.progress)
    }

    /// Records what the current thread's syscall has moved so far (0 when it finishes).
    pub fn set_progress(&mut self, bytes: u64) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.progress = bytes;
        }
    }

    /// The current thread's syscall finished: a later one starts its own timeout.
    pub fn clear_restart_deadline(&mut self) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.restart_deadline_ns = None;
        }
    }

    /// Makes the current thread runnable (it yields, or is preempted).
    pub fn requeue_current(&mut self, resume: Resume) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.state = State::Runnable(resume);
        }
    }

    /// Removes the current thread; returns its `clear_child_tid` address.
    pub fn remove_current(&mut self) -> u64 {
        self.threads
            .remove(&self.current)
            .map_or(0, |thread| thread.clear_child_tid)
    }

    /// Wakes up to `count` threads blocked on `matches` (oldest first), with `resume`.
    fn wake(&mut self, count: usize, resume: Resume, matches: impl Fn(&WaitOn) -> bool) -> usize {
        let mut waiters: Vec<(u64, Tid)> = self
            .threads
            .iter()
            .filter_map(|(&tid, t)| match t.state {
                State::Blocked { wait, seq } if matches(&wait.on) => Some((seq, tid)),
                _ => None,
            })
            .collect();
        waiters.sort_unstable();
        waiters.truncate(count);
        for &(_, tid) in &waiters {
            if let Some(thread) = self.threads.get_mut(&tid) {
                Self::end_wait(thread, resume);
            }
        }
        waiters.len()
    }

    /// `FUTEX_WAKE`: wakes up to `count` waiters on `addr` whose bitset meets `bitset`.
    pub fn futex_wake(&mut self, addr: u64, bitset: u32, count: usize) -> usize {
        self.wake(count, Resume::Return(0), |on| {
            matches!(on, WaitOn::Futex { addr: a, bitset: b } if *a == addr && b & bitset != 0)
        })
    }

    /// `FUTEX_REQUEUE`: wakes up to `wake` waiters on `from`, then moves up to `requeue` of
    /// the rest to wait on `to`. Returns how many were woken and how many moved.
    pub fn futex_requeue(
        &mut self,
        from: u64,
        to: u64,
        wake: usize,
        requeue: usize,
    ) -> (usize, usize) {
        let woken = self.futex_wake(from, u32::MAX, wake);
        let mut waiters: Vec<(u64, Tid)> = self
            .threads
            .iter()
            .filter_map(|(&tid, t)| match t.state {
                State::Blocked { wait, seq } if matches!(wait.on, WaitOn::Futex { addr, .. } if addr == from) => {
                    Some((seq, tid))
                }
                _ => None,
            })
            .collect();
        waiters.sort_unstable();
        waiters.truncate(requeue);
        for &(_, tid) in &waiters {
            if let Some(Thread {
                state: State::Blocked { wait, .. },
                ..
            }) = self.threads.get_mut(&tid)
                && let WaitOn::Futex { addr, .. } = &mut wait.on
            {
                *addr = to;
            }
        }
        (woken, waiters.len())
    }

    /// Something happened to a descriptor: every thread waiting for I/O looks again.
    pub fn wake_io(&mut self) {
        self.wake(usize::MAX, Resume::Restart, |on| *on == WaitOn::Io);
    }

    /// A child process changed state: every thread in `wait4`/`waitid` looks again.
    pub fn wake_child_waiters(&mut self) {
        self.wake(usize::MAX, Resume::Restart, |on| *on == WaitOn::Child);
    }

    /// The `vfork` child `child` gave its parent's memory back: the parent's `vfork`
    /// returns the child's pid.
    pub fn vfork_done(&mut self, child: Tid) {
        self.wake(1, Resume::Return(u64::from(child)), |on| {
            *on == WaitOn::Vfork(child)
        });
    }

    /// Ends `tid`'s wait for a request: it makes its control-channel read again.
    pub fn wake_control_reader(&mut self, tid: Tid) -> bool {
        match self.threads.get_mut(&tid) {
            Some(thread) if matches!(thread.state, State::Blocked { wait, .. } if wait.on == WaitOn::Control) =>
            {
                Self::end_wait(thread, Resume::Restart);
                true
            }
            _ => false,
        }
    }

    /// Whether `tid` can be picked to run.
    pub fn is_runnable(&self, tid: Tid) -> bool {
        self.threads
            .get(&tid)
            .is_some_and(|t| matches!(t.state, State::Runnable(_)))
    }

    /// Whether some thread does not block `signal`.
    pub fn any_unblocked(&self, signal: i32) -> bool {
        self.threads.values().any(|t| t.mask & bit(signal) == 0)
    }

    /// Whether any thread can run.
    pub fn has_runnable(&self) -> bool {
        self.threads
            .values()
            .any(|t| matches!(t.state, State::Runnable(_)))
    }

    /// The ids of every thread.
    pub fn tids(&self) -> impl Iterator<Item = Tid> + '_ {
        self.threads.keys().copied()
    }

    /// Ends the waits whose deadline is at or before `now`. Returns whether any did.
    pub fn expire(&mut self, now: u64) -> bool {
        let mut any = false;
        for thread in self.threads.values_mut() {
            if let State::Blocked { wait, .. } = thread.state
                && wait.deadline_ns.is_some_and(|d| d <= now)
            {
                Self::end_wait(thread, wait.on_timeout);
                any = true;
            }
        }
        any
    }

    /// The earliest deadline of a blocked thread.
    pub fn next_deadline(&self) -> Option<u64> {
        self.threads
            .values()
            .filter_map(|t| match t.state {
                State::Blocked { wait, .. } => wait.deadline_ns,
                _ => None,
            })
            .min()
    }

    fn runnable_other_than_current(&self) -> bool {
        self.threads
            .iter()
            .any(|(&tid, t)| tid != self.current && matches!(t.state, State::Runnable(_)))
    }

    /// When the VMM should interrupt the running thread to let the scheduler look again:
    /// the end of its time slice if another thread is runnable, or the earliest deadline.
    pub fn next_interrupt(&self) -> Option<u64> {
        let slice_end = self
            .runnable_other_than_current()
            .then(|| self.slice_start_ns.saturating_add(TIMESLICE_NS));
        match (slice_end, self.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the running thread should give up the vCPU at `now`: its slice is over and
    /// another is runnable, or a wait ended (a sleeper is due; it gets the vCPU promptly).
    pub fn should_preempt(&mut self, now: u64) -> bool {
        let expired = self.expire(now);
        expired
            || (self.runnable_other_than_current()
                && now.saturating_sub(self.slice_start_ns) >= TIMESLICE_NS)
    }

    /// Picks the next thread to run: round robin among the runnable ones, starting after
    /// the current one (which comes last, so a yield lets the others go first).
    pub fn decide(&mut self, now: u64) -> Decision {
        self.expire(now);
        let after = self
            .threads
            .range(self.current + 1..)
            .chain(self.threads.range(..=self.current))
            .find(|(_, t)| matches!(t.state, State::Runnable(_)))
            .map(|(&tid, _)| tid);
        match after {
            Some(tid) => Decision::Run(tid),
            None => self
                .next_deadline()
                .map_or(Decision::Deadlock, Decision::Idle),
        }
    }

    /// Saves the context of the thread that is leaving the vCPU (when it still exists).
    pub fn save_current(&mut self, context: &UserContext) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.context = *context;
        }
    }

    /// The thread whose vector state the vCPU holds, and whether it still exists.
    pub fn fpu_owner(&self) -> (Tid, bool) {
        (self.fpu_owner, self.exists(self.fpu_owner))
    }

    pub fn store_fpu(&mut self, tid: Tid, fpu: FpuState) {
        if let Some(thread) = self.threads.get_mut(&tid) {
            thread.fpu = fpu;
        }
    }

    pub fn fpu_of(&self, tid: Tid) -> Option<&FpuState> {
        self.threads.get(&tid).map(|t| &t.fpu)
    }

    pub fn set_fpu_owner(&mut self, tid: Tid) {
        self.fpu_owner = tid;
    }

    /// Puts `tid` on the vCPU: returns its saved context and how to resume it.
    pub fn run(&mut self, tid: Tid, now: u64) -> Option<(UserContext, Resume)> {
        let thread = self.threads.get_mut(&tid)?;
        let State::Runnable(resume) = thread.state else {
            return None;
        };
        thread.state = State::Running;
        // Only a syscall made again keeps the deadline it had; one that finished is done.
        if resume != Resume::Restart {
            thread.restart_deadline_ns = None;
        }
        self.current = tid;
        self.slice_start_ns = now;
        Some((thread.context, resume))
    }

    pub fn current_mask(&self) -> SigSet {
        self.threads.get(&self.current).map_or(0, |t| t.mask)
    }

    pub fn set_current_mask(&mut self, mask: SigSet) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.mask = mask;
        }
    }

    /// Replaces the current thread's mask until its next handler ends (`sigsuspend`): the
    /// handler's frame records the mask from before.
    pub fn replace_mask_for_wait(&mut self, mask: SigSet) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.saved_mask.get_or_insert(thread.mask);
            thread.mask = mask;
        }
    }

    /// The mask a handler's frame should restore, and forgets the saved one.
    pub fn take_saved_mask(&mut self) -> Option<SigSet> {
        self.threads
            .get_mut(&self.current)
            .and_then(|t| t.saved_mask.take())
    }

    /// A syscall that replaced the mask for its wait finished without a handler running:
    /// the thread's own mask comes back.
    pub fn restore_saved_mask(&mut self) {
        if let Some(thread) = self.threads.get_mut(&self.current)
            && let Some(mask) = thread.saved_mask.take()
        {
            thread.mask = mask;
        }
    }

    pub fn current_pending(&self) -> SigSet {
        self.threads
            .get(&self.current)
            .map_or(0, |t| t.pending.set())
    }

    pub fn take_current_pending(&mut self, signal: i32) -> Option<SigInfo> {
        self.threads
            .get_mut(&self.current)
            .and_then(|t| t.pending.take(signal))
    }

    /// Drops every pending instance of `signal` in every thread (it became ignored).
    pub fn discard_pending(&mut self, signal: i32) {
        for thread in self.threads.values_mut() {
            thread.pending.discard(signal);
        }
    }

    pub fn alt_stack(&self) -> AltStack {
        self.threads
            .get(&self.current)
            .map_or(AltStack::default(), |t| t.alt_stack)
    }

    pub fn set_alt_stack(&mut self, stack: AltStack) {
        if let Some(thread) = self.threads.get_mut(&self.current) {
            thread.alt_stack = stack;
        }
    }

    /// Whether `signal` to thread `tid` would wake it: it waits for it, or is blocked in an
    /// interruptible wait and does not block it.
    fn wakes(thread: &Thread, signal: i32) -> Option<Resume> {
        let State::Blocked { wait, .. } = thread.state else {
            return None;
        };
        match wait.on {
            WaitOn::Vfork(_) => None,
            WaitOn::SignalIn(set) if set & bit(signal) != 0 => Some(Resume::Restart),
            _ if thread.mask & bit(signal) != 0 => None,
            // A syscall that moved some bytes returns their count, as Linux's do.
            _ if thread.progress > 0 => Some(Resume::Return(thread.progress)),
            _ => Some(Resume::Interrupted(wait.on_signal)),
        }
    }

    /// Wakes a blocked thread: unless its syscall is made again, it is over.
    fn end_wait(thread: &mut Thread, resume: Resume) {
        thread.state = State::Runnable(resume);
        if resume != Resume::Restart {
            thread.progress = 0;
        }
    }

    /// Queues `info` for thread `tid` and wakes it if it waits interruptibly. False if the
    /// thread does not exist.
    pub fn signal_thread(&mut self, tid: Tid, info: SigInfo) -> bool {
        let Some(thread) = self.threads.get_mut(&tid) else {
            return false;
        };
        thread.pending.add(info);
        if let Some(resume) = Self::wakes(thread, info.signo) {
            Self::end_wait(thread, resume);
        }
        true
    }

    /// A signal was sent to the process: if the running thread does not block it, it takes
    /// it on its way back to user mode; otherwise one thread that does not block it (the
    /// main thread first, as Linux prefers the one `kill` named) is woken to take it.
    pub fn notify_process_signal(&mut self, signal: i32, main: Tid) {
        if self
            .threads
            .get(&self.current)
            .is_some_and(|t| t.state == State::Running && t.mask & bit(signal) == 0)
        {
            return;
        }
        let order =
            std::iter::once(main).chain(self.threads.keys().copied().filter(|&t| t != main));
        for tid in order.collect::<Vec<_>>() {
            if let Some(thread) = self.threads.get_mut(&tid)
                && let Some(resume) = Self::wakes(thread, signal)
            {
                Self::end_wait(thread, resume);
                return;
            }
        }
    }

    /// Whether the running thread has a signal it does not block in `process_pending`
    /// or its own pending set (so the VMM should interrupt it).
    pub fn current_has_deliverable(&self, process_pending: SigSet) -> bool {
        self.threads.get(&self.current).is_some_and(|t| {
            t.state == State::Running && (t.pending.set() | process_pending) & !t.mask != 0
        })
    }

    /// A line per blocked thread, for a deadlock report.
    pub fn describe_waits(&self) -> String {
        self.threads
            .iter()
            .filter_map(|(tid, t)| match t.state {
                State::Blocked { wait, .. } => Some(match wait.on {
                    WaitOn::Futex { addr, .. } => format!("thread {tid} waits on futex {addr:#x}"),
                    WaitOn::Sleep => format!("thread {tid} sleeps"),
                    WaitOn::Io => format!("thread {tid} waits for a descriptor"),
                    WaitOn::Signal | WaitOn::SignalIn(_) => {
                        format!("thread {tid} waits for a signal")
                    }
                    WaitOn::Child => format!("thread {tid} waits for a child process"),
                    WaitOn::Vfork(child) => format!("thread {tid} waits for vfork child {child}"),
                    WaitOn::Control => format!("thread {tid} waits for a request"),
                }),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Thread ids for tests, never the same twice.
    fn next() -> Tid {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(100);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn futex(addr: u64) -> Wait {
        Wait {
            on: WaitOn::Futex {
                addr,
                bitset: u32::MAX,
            },
            deadline_ns: None,
            on_timeout: Resume::Return(0),
            on_signal: SignalWake::Restart,
        }
    }

    #[test]
    fn wakes_are_first_come_first_served_and_respect_the_count() {
        let mut t = Threads::new(1);
        let a = t
            .spawn(next(), UserContext::default(), FpuState::default(), 0)
            .unwrap();
        let b = t
            .spawn(next(), UserContext::default(), FpuState::default(), 0)
            .unwrap();
        t.block_current(futex(0x1000), 0);
        assert_eq!(t.run(b, 0).map(|r| r.1), Some(Resume::Continue));
        t.block_current(futex(0x1000), 0);
        assert_eq!(t.decide(0), Decision::Run(a));
        t.run(a, 0);
        assert_eq!(t.futex_wake(0x1000, u32::MAX, 1), 1);
        // Thread 1 blocked first, so it is the one woken.
        assert!(matches!(
            t.threads[&1].state,
            State::Runnable(Resume::Return(0))
        ));
        assert!(matches!(t.threads[&b].state, State::Blocked { .. }));
        assert_eq!(t.futex_requeue(0x1000, 0x2000, 0, 8), (0, 1));
        assert_eq!(t.futex_wake(0x2000, u32::MAX, 8), 1);
    }

    #[test]
    fn deadlines_wake_sleepers_and_nothing_left_is_a_deadlock() {
        let mut t = Threads::new(1);
        t.block_current(
            Wait {
                on: WaitOn::Sleep,
                deadline_ns: Some(500),
                on_timeout: Resume::Return(0),
                on_signal: SignalWake::Interrupt,
            },
            0,
        );
        assert_eq!(t.decide(100), Decision::Idle(500));
        assert_eq!(t.decide(500), Decision::Run(1));
        t.run(1, 500);
        t.block_current(futex(0x10), 0);
        assert_eq!(t.decide(600), Decision::Deadlock);
        assert!(t.describe_waits().contains("futex 0x10"));
    }

    #[test]
    fn only_a_restarted_syscall_keeps_its_deadline() {
        let mut t = Threads::new(1);
        let timed = |deadline| Wait {
            on: WaitOn::Io,
            deadline_ns: Some(deadline),
            on_timeout: Resume::Restart,
            on_signal: SignalWake::Interrupt,
        };
        t.block_current(timed(1000), 0);
        t.wake_io();
        t.run(1, 10);
        assert_eq!(t.restart_deadline(), Some(1000), "restarted: same deadline");
        t.block_current(timed(2000), 0);
        t.futex_wake(0, u32::MAX, 1);
        t.requeue_current(Resume::Return(0));
        t.run(1, 20);
        assert_eq!(
            t.restart_deadline(),
            None,
            "finished: a later wait starts afresh"
        );
    }

    #[test]
    fn the_limit_holds() {
        let mut t = Threads::new(1);
        for _ in 1..MAX_THREADS {
            t.spawn(next(), UserContext::default(), FpuState::default(), 0)
                .unwrap();
        }
        assert_eq!(
            t.spawn(next(), UserContext::default(), FpuState::default(), 0),
            Err(Errno::EAGAIN)
        );
    }
}
