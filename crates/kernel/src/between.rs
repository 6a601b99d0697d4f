//! Between a session's requests the sandbox does not stop: a server a request started keeps
//! serving, a background job keeps going, a thread keeps training its model.
//!
//! The agent parks on its control channel after each request (`Outcome::AwaitingControl`),
//! which is where a session is snapshotted, forked and handed its next request. To run
//! the rest of the sandbox, the VMM turns that parked read into an ordinary wait
//! (`WaitOn::Control`) and lets the scheduler run every other thread and process, in
//! slices (`Sandbox::run_between_requests`). A slice ends when its time is up or when no
//! thread has anything left to do; the agent then makes its read again, finds nothing,
//! and parks the sandbox exactly as a request leaves it.

use crate::context::{Fpu, UserContext};
use crate::process::Process;
use crate::procs::Pid;
use crate::syscalls::Outcome;
use crate::threads::{Resume, SignalWake, Tid, Wait, WaitOn, monotonic_ns};

/// The agent's place while the rest of the sandbox runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BetweenRequests {
    pid: Pid,
    agent: Tid,
    /// The slice is over: the agent runs next, to park.
    returning: bool,
}

impl Process {
    /// While parked on the control channel: when (`CLOCK_MONOTONIC` ns) some other thread
    /// of the sandbox next has work (a past time if one can run now), or `None` if nothing
    /// can happen before the next request.
    pub fn work_between_requests(&self) -> Option<u64> {
        if !self.awaiting_control() {
            return None;
        }
        if self.threads.has_runnable() || self.others_runnable() {
            return Some(monotonic_ns());
        }
        [
            self.threads.next_deadline(),
            self.next_timer(),
            self.procs.parked_deadline(),
            self.memory_check_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Starts a slice: `ctx` is the parked agent's context at its read (`rip` after the
    /// `syscall`, `rax` its number). The agent waits for a request like any blocked
    /// thread, and the next thread runs (`Outcome` as from any syscall that blocks).
    pub fn start_between_requests(&mut self, ctx: &mut UserContext, fpu: &mut dyn Fpu) -> Outcome {
        self.control.take_pending();
        self.procs.between = Some(BetweenRequests {
            pid: self.pid(),
            agent: self.threads.current(),
            returning: false,
        });
        let wait = Wait {
            on: WaitOn::Control,
            deadline_ns: None,
            on_timeout: Resume::Restart,
            on_signal: SignalWake::Restart,
        };
        self.threads.block_current(wait, self.signals.pending.set());
        self.reschedule(ctx, fpu)
    }

    /// Ends the slice: the thread on the vCPU (whose live context is `ctx`) goes back to
    /// the run queue, and the agent runs next, makes its read again, and parks. `None` if
    /// no slice is running or it is already ending.
    pub fn end_between_requests(
        &mut self,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
    ) -> Option<Outcome> {
        if !self.return_to_agent() {
            return None;
        }
        if self.threads.current_is_running() {
            self.threads.requeue_current(Resume::Continue);
            self.threads.save_current(ctx);
        }
        Some(self.resume(ctx, fpu))
    }

    /// Whether a thread is on the vCPU (not blocked, or idle while every thread waits).
    pub fn thread_running(&self) -> bool {
        self.threads.current_is_running()
    }

    /// Wakes the agent for the end of the slice. False if there is no slice to end.
    pub(crate) fn return_to_agent(&mut self) -> bool {
        let Some(between) = self.procs.between.as_mut() else {
            return false;
        };
        if between.returning {
            return false;
        }
        between.returning = true;
        let (pid, agent) = (between.pid, between.agent);
        if pid == self.pid() {
            self.threads.wake_control_reader(agent);
        } else if let Some(parked) = self.procs.parked.get_mut(&pid) {
            parked.own.threads.wake_control_reader(agent);
        }
        true
    }

    /// The agent's process and thread, when the slice is ending and it should run next.
    pub(crate) fn agent_due(&self) -> Option<(Pid, Tid)> {
        self.procs
            .between
            .filter(|b| b.returning)
            .map(|b| (b.pid, b.agent))
    }

    /// The agent parked again (or another thread parked the sandbox on the channel).
    pub(crate) fn between_requests_over(&mut self) {
        self.procs.between = None;
    }
}
