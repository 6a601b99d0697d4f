//! Switching the vCPU between threads (the scheduling policy is in `threads`).
//!
//! The VMM runs whichever thread's context the syscall layer hands it. When the running
//! thread blocks, yields, exits or is preempted, the syscall layer saves its context, picks
//! the next thread, and puts that one's context (and, when it differs, vector state) in
//! place. When no thread can run, the VMM waits until the earliest deadline and asks again.

use crate::context::{Fpu, UserContext};
use crate::process::Process;
use crate::procs::{INIT, Pid, exited, killed};
use crate::syscalls::{ExitReason, Outcome};
use crate::threads::{Decision, Resume, Tid, monotonic_ns};

impl Process {
    /// The current thread left the vCPU (its state says why): saves its context and runs
    /// the next thread.
    pub(crate) fn reschedule(&mut self, ctx: &mut UserContext, fpu: &mut dyn Fpu) -> Outcome {
        self.threads.save_current(ctx);
        self.resume(ctx, fpu)
    }

    /// Runs the next runnable thread: its context replaces `ctx` and its vector state is
    /// loaded (`Outcome::Switched`). With none runnable: `Idle` until the earliest
    /// deadline, after which the VMM calls this again, or a deadlock when there is none.
    pub fn resume(&mut self, ctx: &mut UserContext, fpu: &mut dyn Fpu) -> Outcome {
        let outcome = self.pick(ctx, fpu);
        self.settle(outcome)
    }

    fn pick(&mut self, ctx: &mut UserContext, fpu: &mut dyn Fpu) -> Outcome {
        self.enforce_memory_budget();
        let now = monotonic_ns();
        self.fire_timers(now);
        // The end of a slice between requests: the agent runs first, to park (`between`).
        if let Some((pid, agent)) = self.agent_due() {
            if pid != self.pid() && self.procs.parked.contains_key(&pid) {
                return self.switch_process(pid, now, fpu);
            }
            if pid == self.pid() && self.threads.is_runnable(agent) {
                return self.run_thread(agent, now, ctx, fpu);
            }
        }
        // Processes take turns by time slice; threads within one by theirs.
        if self.process_slice_over(now)
            && let Some(pid) = self.other_runnable(now)
        {
            return self.switch_process(pid, now, fpu);
        }
        let decision = self.threads.decide(now);
        if !matches!(decision, Decision::Run(_))
            && let Some(pid) = self.other_runnable(now)
        {
            return self.switch_process(pid, now, fpu);
        }
        let next_timer = [
            self.next_timer(),
            self.procs.parked_deadline(),
            self.memory_check_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        match decision {
            Decision::Run(tid) => self.run_thread(tid, now, ctx, fpu),
            Decision::Idle(until) => Outcome::Idle(next_timer.map_or(until, |t| t.min(until))),
            Decision::Deadlock if next_timer.is_some() => Outcome::Idle(next_timer.unwrap_or(now)),
            // Between requests, with nothing left to do: the agent parks.
            Decision::Deadlock if self.return_to_agent() => self.pick(ctx, fpu),
            Decision::Deadlock => Outcome::Exit(ExitReason::Deadlock(format!(
                "every thread waits for something no thread can do: {}",
                self.describe_all_waits()
            ))),
        }
    }

    /// Puts runnable thread `tid` of the current process on the vCPU: its context replaces
    /// `ctx`, its vector state is loaded, and its syscall (if it was in one) finishes.
    fn run_thread(
        &mut self,
        tid: Tid,
        now: u64,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
    ) -> Outcome {
        if let Err(reason) = self.take_fpu(tid, fpu) {
            return Outcome::Exit(reason);
        }
        let (context, resume) = self
            .threads
            .run(tid, now)
            .expect("the scheduler picks runnable threads");
        *ctx = context;
        let mut interrupted = None;
        match resume {
            Resume::Continue => {}
            Resume::Return(value) => ctx.regs.rax = value,
            // Back to the `syscall` instruction (2 bytes), `rax` still the number.
            Resume::Restart => ctx.regs.rip = ctx.regs.rip.wrapping_sub(2),
            Resume::Interrupted(wake) => interrupted = Some(wake),
        }
        self.back_to_user(ctx, fpu, Outcome::Switched, interrupted)
    }

    /// What every thread of every process waits for (a deadlock's report).
    fn describe_all_waits(&self) -> String {
        if self.procs.parked.is_empty() {
            return self.threads.describe_waits();
        }
        std::iter::once((self.pid(), self.threads.describe_waits()))
            .chain(
                self.procs
                    .parked
                    .iter()
                    .map(|(pid, p)| (*pid, p.own.threads.describe_waits())),
            )
            .filter(|(_, waits)| !waits.is_empty())
            .map(|(pid, waits)| format!("process {pid}: {waits}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Makes `pid` current: the VMM then resumes it on the vCPU over its memory. When both
    /// use one vCPU (a `vfork` child and its parent), the vector state in it is saved for
    /// the thread that owns it, and the incoming process loads its own.
    fn switch_process(&mut self, pid: Pid, now: u64, fpu: &mut dyn Fpu) -> Outcome {
        let shared = self.procs.memory_owner(self.pid()) == self.procs.memory_owner(pid);
        if shared {
            let (owner, alive) = self.threads.fpu_owner();
            if alive {
                self.threads.store_fpu(owner, fpu.save());
            }
            self.threads.set_fpu_owner(0);
        }
        self.switch_to(pid);
        if shared {
            self.threads.set_fpu_owner(0);
        }
        self.procs.slice_start_ns = now;
        Outcome::Reschedule
    }

    /// A process other than `INIT` that exits or is killed becomes a zombie and another
    /// runs; `INIT`'s end (and every other end) is the sandbox's.
    pub(crate) fn settle(&mut self, outcome: Outcome) -> Outcome {
        let status = match outcome {
            Outcome::Exit(ExitReason::Exited(code)) if self.pid() != INIT => exited(code),
            Outcome::Exit(ExitReason::Signaled(signal)) if self.pid() != INIT => killed(signal),
            other => return other,
        };
        self.exit_process(status);
        Outcome::Reschedule
    }

    /// Makes the vCPU hold `tid`'s vector state, saving the previous owner's.
    fn take_fpu(&mut self, tid: Tid, fpu: &mut dyn Fpu) -> Result<(), ExitReason> {
        let (owner, owner_alive) = self.threads.fpu_owner();
        if owner == tid {
            return Ok(());
        }
        if owner_alive {
            self.threads.store_fpu(owner, fpu.save());
        }
        if let Some(state) = self.threads.fpu_of(tid) {
            fpu.load(state)
                .map_err(|_| ExitReason::Signaled(libc::SIGSEGV))?;
        }
        self.threads.set_fpu_owner(tid);
        Ok(())
    }

    /// Whether the VMM should interrupt the running thread now: its time slice is over and
    /// another thread is runnable, a waiting thread's deadline or a timer came, or it has a
    /// signal to take.
    pub fn wants_interrupt(&mut self) -> bool {
        if !self.threads.current_is_running() {
            return false;
        }
        let now = monotonic_ns();
        self.fire_timers(now);
        self.process_turn_over(now)
            || self.memory_check_due().is_some_and(|t| t <= now)
            || self.threads.should_preempt(now)
            || self
                .threads
                .current_has_deliverable(self.signals.pending.set())
    }

    /// Interrupts the running thread, whose live context is `ctx`: another thread gets the
    /// vCPU if one is due, and the thread that runs takes its signals.
    pub fn interrupt(&mut self, ctx: &mut UserContext, fpu: &mut dyn Fpu) -> Outcome {
        self.enforce_memory_budget();
        let now = monotonic_ns();
        if self.process_turn_over(now) || self.threads.should_preempt(now) {
            self.threads.requeue_current(Resume::Continue);
            return self.reschedule(ctx, fpu);
        }
        let outcome = self.back_to_user(ctx, fpu, Outcome::Switched, None);
        self.settle(outcome)
    }

    /// Whether the current process has had its slice and another process can run.
    fn process_turn_over(&mut self, now: u64) -> bool {
        self.process_slice_over(now) && self.other_runnable(now).is_some()
    }

    /// When (`CLOCK_MONOTONIC` nanoseconds) the VMM should interrupt the running thread for
    /// the scheduler; `None` while only one thread can run and none waits with a deadline.
    pub fn next_interrupt(&self) -> Option<u64> {
        let turn_end = self.others_runnable().then(|| {
            self.procs
                .slice_start_ns
                .saturating_add(crate::threads::TIMESLICE_NS)
        });
        [
            self.threads.next_interrupt(),
            self.next_timer(),
            self.procs.parked_deadline(),
            self.memory_check_due(),
            turn_end,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// How many threads the process has.
    pub fn thread_count(&self) -> usize {
        self.threads.count()
    }
}
