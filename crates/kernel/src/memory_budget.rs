//! One memory budget for all of a sandbox's processes.
//!
//! Each address space has the request's limit on what it may map; past it, a mapping fails
//! with `ENOMEM` (Python's `MemoryError`). With more than one process that alone would let
//! a sandbox hold the limit once per process. So while there are several, the host pages
//! they hold together (private copies of guest pages, and shared segments) are measured
//! from the host's page map, and when they pass the budget the largest process other than
//! the first is killed with `SIGKILL`, as Linux's OOM killer does in a memory cgroup, with a
//! line on stderr saying so. A measure costs about 0.25 ms per python-sized process: it is
//! made on a syscall, a preemption or a thread switch at most every 50 ms (less often when
//! it costs more); one skipped as too soon is owed, and the scheduler wakes for it even
//! when every thread sleeps, so memory touched just before a sleep is still counted.

use crate::file::Stream;
use crate::process::Process;
use crate::procs::{INIT, Pid};
use crate::signals::SigInfo;
use crate::threads::monotonic_ns;

/// The shortest time between two measures.
const CHECK_INTERVAL_NS: u64 = 50_000_000;
/// Measures take at most 1/`COST_SHARE` of the sandbox's time.
const COST_SHARE: u64 = 20;

/// The budget and when it is next checked.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MemoryBudget {
    /// Bytes every process's private pages and the shared segments may hold together.
    pub limit: u64,
    next_check_ns: u64,
    /// A measure was skipped as too soon: it is made at `next_check_ns`.
    owed: bool,
    /// Processes killed for passing it.
    pub kills: u64,
}

impl Process {
    /// Sets the budget all processes share (see `limit_memory`).
    pub(crate) fn set_memory_budget(&mut self, limit: u64) {
        let budget = self.procs.memory_budget.get_or_insert_default();
        budget.limit = limit;
        budget.next_check_ns = 0;
    }

    /// Measures the sandbox's processes if it is time to, and kills the largest one other
    /// than the first if together they hold more than the budget.
    pub(crate) fn enforce_memory_budget(&mut self) {
        let Some(budget) = self.procs.memory_budget else {
            return;
        };
        // One process alone is held to its address space's limit.
        if self.procs.parked.is_empty() {
            return;
        }
        let now = monotonic_ns();
        if now < budget.next_check_ns {
            if let Some(b) = self.procs.memory_budget.as_mut() {
                b.owed = true;
            }
            return;
        }
        let usage = self.private_ram_by_process();
        let total =
            usage.iter().map(|(_, bytes)| bytes).sum::<u64>() + self.segments.resident_bytes();
        let cost = monotonic_ns().saturating_sub(now);
        let next_check_ns = now + CHECK_INTERVAL_NS.max(cost.saturating_mul(COST_SHARE));
        if let Some(b) = self.procs.memory_budget.as_mut() {
            b.next_check_ns = next_check_ns;
            b.owed = false;
        }
        if total <= budget.limit {
            return;
        }
        let Some(&(victim, bytes)) = usage
            .iter()
            .filter(|(pid, _)| *pid != INIT)
            .max_by_key(|(_, bytes)| *bytes)
        else {
            return;
        };
        if let Some(b) = self.procs.memory_budget.as_mut() {
            b.kills += 1;
        }
        let note = format!(
            "forkvm: out of memory: killed process {victim} ({} MiB); the sandbox's processes \
             together passed their {} MiB\n",
            bytes >> 20,
            budget.limit >> 20
        );
        let _ = self.console.write(Stream::Stderr, note.as_bytes());
        self.signal_process(victim, SigInfo::kernel(libc::SIGKILL));
    }

    /// When the owed measure is due, if one is.
    pub(crate) fn memory_check_due(&self) -> Option<u64> {
        self.procs
            .memory_budget
            .filter(|b| b.owed && !self.procs.parked.is_empty())
            .map(|b| b.next_check_ns)
    }

    /// How many processes the budget killed.
    pub(crate) fn memory_budget_kills(&self) -> u64 {
        self.procs.memory_budget.map_or(0, |b| b.kills)
    }

    /// Each live process's private guest pages, in bytes (a `vfork` child, which borrows
    /// its parent's memory, holds none of its own).
    pub(crate) fn private_ram_by_process(&self) -> Vec<(Pid, u64)> {
        let private = |ram: &forkvm_memory::ram::GuestRam, mm: &crate::mm::AddressSpace| {
            crate::process::populated_ranges(mm, ram.size())
                .into_iter()
                .filter_map(|(start, end)| ram.residency(start, end).ok())
                .map(|r| r.private_pages * forkvm_memory::PAGE_SIZE)
                .sum::<u64>()
        };
        let current = (self.pid(), private(&self.ram, &self.mm));
        std::iter::once(current)
            .chain(
                self.procs.parked.iter().filter_map(|(pid, p)| {
                    p.memory.as_ref().map(|m| (*pid, private(&m.ram, &m.mm)))
                }),
            )
            .collect()
    }
}
