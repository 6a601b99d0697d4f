//! Syscall counters: how often each syscall ran, and which unsupported ones the program tried
//! (the list of what to implement next).

use std::collections::BTreeMap;

/// Counts by syscall name.
#[derive(Debug, Clone, Default)]
pub struct SyscallStats {
    pub total: u64,
    pub by_name: BTreeMap<&'static str, u64>,
    pub unsupported: BTreeMap<&'static str, u64>,
}

impl SyscallStats {
    pub fn record(&mut self, name: &'static str) {
        self.total += 1;
        *self.by_name.entry(name).or_default() += 1;
    }

    pub fn record_unsupported(&mut self, name: &'static str) {
        *self.unsupported.entry(name).or_default() += 1;
    }
}
