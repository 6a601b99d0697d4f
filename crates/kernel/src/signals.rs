//! Signals: dispositions, what is pending and with what `siginfo`, and which signals are
//! fatal by default. Delivery (the frame a handler runs on) is in `delivery`; the syscalls
//! are in `syscalls::signal`.

use serde::{Deserialize, Serialize};
use vm_memory::ByteValued;

/// Number of signals (1..=64).
pub const NSIG: usize = 64;
/// The first real-time signal: from here on, every instance queues.
pub const SIGRTMIN: i32 = 32;
/// Queued instances of real-time signals a sandbox may have pending (`RLIMIT_SIGPENDING`).
pub const MAX_QUEUED: usize = 1024;

/// A set of signals: bit `n - 1` for signal `n`.
pub type SigSet = u64;

/// The bit of `signal` in a `SigSet`.
pub fn bit(signal: i32) -> SigSet {
    1u64 << (signal - 1)
}

/// Signals no mask can block.
pub const UNBLOCKABLE: SigSet = (1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1));

/// Signals a CPU fault raises: delivered before any other pending one.
pub const SYNCHRONOUS: SigSet = (1 << (libc::SIGSEGV - 1))
    | (1 << (libc::SIGBUS - 1))
    | (1 << (libc::SIGILL - 1))
    | (1 << (libc::SIGFPE - 1))
    | (1 << (libc::SIGTRAP - 1));

/// `si_code` values.
pub mod code {
    pub const SI_USER: i32 = 0;
    pub const SI_KERNEL: i32 = 0x80;
    pub const SI_QUEUE: i32 = -1;
    pub const SI_TIMER: i32 = -2;
    pub const SI_TKILL: i32 = -6;
    pub const SEGV_MAPERR: i32 = 1;
    pub const SEGV_ACCERR: i32 = 2;
    pub const BUS_ADRALN: i32 = 1;
    pub const ILL_ILLOPN: i32 = 2;
    pub const FPE_INTDIV: i32 = 1;
    pub const TRAP_BRKPT: i32 = 1;
}

/// A `struct kernel_sigaction` as the program set it (x86-64 layout: handler, flags,
/// restorer, mask).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

// SAFETY: `repr(C)`, four `u64`s, no padding: every byte pattern is a value.
unsafe impl ByteValued for SigAction {}

const _: () = assert!(std::mem::size_of::<SigAction>() == 32);

/// What happens when a signal is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Discarded.
    Ignore,
    /// Ends the sandbox with the signal.
    Terminate,
    /// A handler runs.
    Handle(SigAction),
}

impl SigAction {
    pub fn disposition(&self, signal: i32) -> Disposition {
        if signal == libc::SIGKILL {
            return Disposition::Terminate;
        }
        match self.handler {
            h if h == libc::SIG_IGN as u64 => Disposition::Ignore,
            h if h == libc::SIG_DFL as u64 => default_action(signal),
            _ => Disposition::Handle(*self),
        }
    }
}

/// The default action. Job-control stops have nothing to stop for in a sandbox (no
/// terminal, no parent to continue it): they are ignored, like `SIGCHLD`.
fn default_action(signal: i32) -> Disposition {
    match signal {
        libc::SIGCHLD
        | libc::SIGCONT
        | libc::SIGURG
        | libc::SIGWINCH
        | libc::SIGSTOP
        | libc::SIGTSTP
        | libc::SIGTTIN
        | libc::SIGTTOU => Disposition::Ignore,
        _ => Disposition::Terminate,
    }
}

/// A `siginfo_t` (128 bytes): number, errno, code, then a union whose first words are the
/// sender (`kill`), the fault address, or the timer and its value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfo {
    pub signo: i32,
    pub errno: i32,
    pub code: i32,
    pad: i32,
    pub fields: [u64; 14],
}

// SAFETY: `repr(C)`, integers only, laid out without padding (checked below).
unsafe impl ByteValued for SigInfo {}

const _: () = assert!(std::mem::size_of::<SigInfo>() == 128);

impl SigInfo {
    /// Sent by a process (`kill`, `tgkill`): the sender's pid and uid.
    pub fn from_process(signal: i32, code: i32, pid: u32, uid: u32) -> SigInfo {
        let mut info = SigInfo {
            signo: signal,
            code,
            ..SigInfo::default()
        };
        info.fields[0] = u64::from(pid) | (u64::from(uid) << 32);
        info
    }

    /// Raised by the kernel itself (a broken pipe, an interval timer).
    pub fn kernel(signal: i32) -> SigInfo {
        SigInfo {
            signo: signal,
            code: code::SI_KERNEL,
            ..SigInfo::default()
        }
    }

    /// A CPU fault at `addr`.
    pub fn fault(signal: i32, code: i32, addr: u64) -> SigInfo {
        let mut info = SigInfo {
            signo: signal,
            code,
            ..SigInfo::default()
        };
        info.fields[0] = addr;
        info
    }

    /// A POSIX timer's expiry: its id, the expiries missed, and the value it carries.
    pub fn timer(signal: i32, timer: u32, overrun: u32, value: u64) -> SigInfo {
        let mut info = SigInfo {
            signo: signal,
            code: code::SI_TIMER,
            ..SigInfo::default()
        };
        info.fields[0] = u64::from(timer) | (u64::from(overrun) << 32);
        info.fields[1] = value;
        info
    }
}

/// Signals waiting for delivery, with their `siginfo`. A standard signal is pending at most
/// once (later ones merge into it); real-time signals queue, up to `MAX_QUEUED`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    queue: Vec<SigInfo>,
}

impl Pending {
    /// Adds `info`; false when it merged into one already pending or the queue is full.
    pub fn add(&mut self, info: SigInfo) -> bool {
        let queues = info.signo >= SIGRTMIN;
        if (!queues && self.queue.iter().any(|i| i.signo == info.signo))
            || self.queue.len() >= MAX_QUEUED
        {
            return false;
        }
        self.queue.push(info);
        true
    }

    pub fn set(&self) -> SigSet {
        self.queue.iter().fold(0, |set, i| set | bit(i.signo))
    }

    /// Takes the oldest instance of `signal`.
    pub fn take(&mut self, signal: i32) -> Option<SigInfo> {
        let index = self.queue.iter().position(|i| i.signo == signal)?;
        Some(self.queue.remove(index))
    }

    /// Drops every instance of `signal` (it became ignored).
    pub fn discard(&mut self, signal: i32) {
        self.queue.retain(|i| i.signo != signal);
    }
}

/// The signal to deliver next from `candidates`: a fault's first, then the lowest number.
pub fn next_signal(candidates: SigSet) -> Option<i32> {
    if candidates == 0 {
        return None;
    }
    let preferred = if candidates & SYNCHRONOUS != 0 {
        candidates & SYNCHRONOUS
    } else {
        candidates
    };
    Some(preferred.trailing_zeros() as i32 + 1)
}

/// Process-wide signal state: dispositions (shared by all threads) and signals sent to the
/// process rather than to one thread.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalState {
    /// Indexed by signal number - 1; always `NSIG` long.
    pub actions: Vec<SigAction>,
    pub pending: Pending,
}

impl Default for SignalState {
    fn default() -> Self {
        Self {
            actions: vec![SigAction::default(); NSIG],
            pending: Pending::default(),
        }
    }
}

impl SignalState {
    pub fn action(&self, signal: i32) -> SigAction {
        self.actions[signal as usize - 1]
    }

    pub fn disposition(&self, signal: i32) -> Disposition {
        self.action(signal).disposition(signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_signals_merge_and_real_time_ones_queue() {
        let mut p = Pending::default();
        assert!(p.add(SigInfo::kernel(libc::SIGALRM)));
        assert!(!p.add(SigInfo::kernel(libc::SIGALRM)));
        assert!(p.add(SigInfo::kernel(SIGRTMIN)));
        assert!(p.add(SigInfo::kernel(SIGRTMIN)));
        assert_eq!(p.set(), bit(libc::SIGALRM) | bit(SIGRTMIN));
        assert!(p.take(SIGRTMIN).is_some());
        assert_eq!(p.set(), bit(libc::SIGALRM) | bit(SIGRTMIN));
        p.discard(SIGRTMIN);
        assert_eq!(p.set(), bit(libc::SIGALRM));
    }

    #[test]
    fn faults_go_first_then_the_lowest_number() {
        assert_eq!(
            next_signal(bit(libc::SIGINT) | bit(libc::SIGSEGV)),
            Some(libc::SIGSEGV)
        );
        assert_eq!(
            next_signal(bit(libc::SIGTERM) | bit(libc::SIGINT)),
            Some(libc::SIGINT)
        );
        assert_eq!(next_signal(0), None);
    }

    #[test]
    fn default_actions() {
        let dfl = SigAction::default();
        assert_eq!(dfl.disposition(libc::SIGCHLD), Disposition::Ignore);
        assert_eq!(dfl.disposition(libc::SIGTSTP), Disposition::Ignore);
        assert_eq!(dfl.disposition(libc::SIGTERM), Disposition::Terminate);
        let ign = SigAction {
            handler: libc::SIG_IGN as u64,
            ..dfl
        };
        assert_eq!(ign.disposition(libc::SIGTERM), Disposition::Ignore);
        assert_eq!(ign.disposition(libc::SIGKILL), Disposition::Terminate);
    }
}
