//! Signal dispositions and the blocked mask, recorded so `rt_sigaction`/`rt_sigprocmask`
//! answer as Linux does. No signal is ever delivered asynchronously to the program: the
//! sandbox has no other processes and no timers that raise them.

use serde::{Deserialize, Serialize};

/// Number of signals (1..=64).
pub const NSIG: usize = 64;

/// A `struct kernel_sigaction` as the program set it (x86-64 layout: handler, flags,
/// restorer, mask).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

impl SigAction {
    pub const SIZE: usize = 32;

    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Self {
            handler: word(0),
            flags: word(1),
            restorer: word(2),
            mask: word(3),
        }
    }

    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// Per-process signal state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalState {
    /// Indexed by signal number - 1; always `NSIG` long.
    pub actions: Vec<SigAction>,
    pub blocked: u64,
    /// `sigaltstack` as set: (sp, flags, size).
    pub alt_stack: (u64, i32, u64),
}

impl Default for SignalState {
    fn default() -> Self {
        Self {
            actions: vec![SigAction::default(); NSIG],
            blocked: 0,
            alt_stack: (0, libc::SS_DISABLE, 0),
        }
    }
}

/// True for signals whose default action terminates the process.
pub fn default_terminates(signal: i32) -> bool {
    !matches!(
        signal,
        libc::SIGCHLD | libc::SIGCONT | libc::SIGURG | libc::SIGWINCH
    )
}
