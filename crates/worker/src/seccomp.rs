//! The worker's seccomp-bpf allowlist. Installed once, before the template's pool starts and
//! so before any guest code runs, on every thread the worker has: every thread it starts
//! later (pool refill, calls running vCPUs, the watchdog) inherits it. They share one list
//! because they do the same work: each call thread forks a VM, runs its vCPU and emulates
//! its system calls, which is what the refill threads do too.
//!
//! Anything else kills the whole worker (`SECCOMP_RET_KILL_PROCESS`): a worker making a
//! call it never makes is compromised, and the server replaces it. The list and the reason
//! for each entry are in docs/ARCHITECTURE.md (keep them in step).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The KVM ioctl type byte: `ioctl` is allowed for KVM requests only.
const KVM_IOCTL_TYPE: u64 = 0xAE;

/// System calls allowed with any arguments, and why.
pub const ALLOWED: &[(i64, &str)] = &[
    // Guest RAM, snapshot mappings, copy-on-write resets, thread stacks, the heap.
    (libc::SYS_munmap, "unmap guest RAM, snapshot files, buffers"),
    (libc::SYS_madvise, "discard guest pages on reset and unmap"),
    (libc::SYS_mremap, "grow buffers"),
    (libc::SYS_brk, "the allocator's heap"),
    (libc::SYS_mlock, "keep the image in memory"),
    (
        libc::SYS_memfd_create,
        "memory layers, shared memory segments",
    ),
    (libc::SYS_ftruncate, "size memory layers and segments"),
    // Files already opened or opened read-only inside the jail.
    (libc::SYS_close, "descriptors"),
    (libc::SYS_read, "the server's socket, template files"),
    (libc::SYS_write, "the server's socket, logs"),
    (libc::SYS_pread64, "the image, pagemap"),
    (
        libc::SYS_pwrite64,
        "memory layers, segments filled from files",
    ),
    (libc::SYS_readv, "socket reads"),
    (libc::SYS_writev, "socket and log writes"),
    (libc::SYS_lseek, "SEEK_DATA/SEEK_HOLE over memory files"),
    (libc::SYS_fstat, "file sizes"),
    (libc::SYS_newfstatat, "file metadata"),
    (libc::SYS_statx, "file metadata"),
    (libc::SYS_fcntl, "descriptor flags"),
    (libc::SYS_recvfrom, "the server's socket"),
    (libc::SYS_sendto, "the server's socket"),
    (
        libc::SYS_recvmsg,
        "the server's socket: frames with memory files attached",
    ),
    (
        libc::SYS_sendmsg,
        "the server's socket: frames with memory files attached",
    ),
    // Threads.
    (libc::SYS_futex, "locks and condition variables"),
    (libc::SYS_set_robust_list, "new threads"),
    (libc::SYS_rseq, "new threads"),
    (libc::SYS_sched_yield, "spinning locks"),
    (libc::SYS_sched_getaffinity, "available parallelism"),
    (libc::SYS_gettid, "thread ids for the watchdog's timers"),
    (libc::SYS_getpid, "the watchdog signals its own process"),
    (libc::SYS_tgkill, "the watchdog interrupts KVM_RUN"),
    (libc::SYS_rt_sigaction, "the vCPU kick signal"),
    (libc::SYS_rt_sigprocmask, "thread creation, the kick signal"),
    (libc::SYS_rt_sigreturn, "return from the kick handler"),
    (libc::SYS_sigaltstack, "Rust's stack-overflow guard"),
    (libc::SYS_exit, "a thread ends"),
    (libc::SYS_exit_group, "the worker ends"),
    // Time.
    (libc::SYS_clock_gettime, "clocks (also through the vDSO)"),
    (libc::SYS_clock_nanosleep, "sleeps"),
    (libc::SYS_nanosleep, "sleeps"),
    (
        libc::SYS_timer_create,
        "per-vCPU CPU-time and preemption timers",
    ),
    (libc::SYS_timer_settime, "arm them"),
    (libc::SYS_timer_delete, "remove them"),
    (libc::SYS_getrandom, "entropy for guests and hashing"),
];

/// Allowed only with the argument shown.
fn conditional_rules() -> Vec<(i64, &'static str, SeccompRule)> {
    let masked = |arg, mask, value| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
        .expect("valid condition")
    };
    let equal = |arg, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
            .expect("valid condition")
    };
    let rule = |conditions| SeccompRule::new(conditions).expect("valid rule");
    vec![
        (
            libc::SYS_ioctl,
            "KVM requests only (type 0xAE)",
            rule(vec![masked(1, 0xff00, KVM_IOCTL_TYPE << 8)]),
        ),
        (
            libc::SYS_clone,
            "threads only (CLONE_THREAD): no new processes",
            rule(vec![masked(
                0,
                libc::CLONE_THREAD as u64,
                libc::CLONE_THREAD as u64,
            )]),
        ),
        (
            libc::SYS_prctl,
            "PR_SET_NAME only (thread names)",
            rule(vec![equal(0, libc::PR_SET_NAME as u64)]),
        ),
        (
            libc::SYS_mmap,
            "guest RAM, snapshot files, heap, stacks; never executable (W^X for the worker)",
            rule(vec![masked(2, libc::PROT_EXEC as u64, 0)]),
        ),
        (
            libc::SYS_mprotect,
            "guest-page protection toggles (MMU notifier), thread guards; never executable",
            rule(vec![masked(2, libc::PROT_EXEC as u64, 0)]),
        ),
        (
            libc::SYS_openat,
            "read-only opens only: nothing is created or written after the jail",
            rule(vec![masked(
                2,
                (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64,
                0,
            )]),
        ),
    ]
}

/// Every entry of the allowlist and its reason (for docs and tests).
pub fn allowlist() -> Vec<(i64, &'static str)> {
    let mut all: Vec<_> = ALLOWED.to_vec();
    all.extend(
        conditional_rules()
            .into_iter()
            .map(|(nr, why, _)| (nr, why)),
    );
    all.push((libc::SYS_clone3, "answered ENOSYS: glibc then uses clone"));
    all
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, seccompiler::Error> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// Installs the filters on every thread of the process (and so every thread it starts
/// later).
pub fn install() -> Result<(), seccompiler::Error> {
    // clone3's flags sit in memory a filter cannot read, so it is refused softly and glibc
    // falls back to clone, whose flags the allowlist checks. (Of two filters, the
    // stricter answer wins.)
    let clone3 = compile(
        [(libc::SYS_clone3, vec![])].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&(nr, _)| (nr, vec![])).collect();
    rules.insert(libc::SYS_clone3, vec![]);
    for (nr, _, rule) in conditional_rules() {
        rules.entry(nr).or_default().push(rule);
    }
    let allowlist = compile(rules, SeccompAction::KillProcess, SeccompAction::Allow)?;
    // Every thread, including any started before (TSYNC): none may run unfiltered.
    seccompiler::apply_filter_all_threads(&clone3)?;
    seccompiler::apply_filter_all_threads(&allowlist)
}

/// Issues a call the allowlist refuses (`setns` on a bad descriptor, harmless if it were
/// allowed): with the filter live, the worker dies of it.
pub fn probe() {
    // SAFETY: setns with an invalid descriptor changes nothing; it fails with EBADF if
    // the filter let it through.
    unsafe { libc::syscall(libc::SYS_setns, -1, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(nr: i64) -> &'static str {
        usize::try_from(nr)
            .ok()
            .and_then(syscalls::Sysno::new)
            .map_or("?", |s| s.name())
    }

    #[test]
    fn the_allowlist_compiles_and_the_architecture_doc_lists_it() {
        compile(
            allowlist().iter().map(|&(nr, _)| (nr, vec![])).collect(),
            SeccompAction::KillProcess,
            SeccompAction::Allow,
        )
        .unwrap();
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/ARCHITECTURE.md"
        ))
        .unwrap();
        let list = allowlist();
        assert!(
            doc.contains(&format!("The allowlist, {} entries", list.len())),
            "docs/ARCHITECTURE.md states another count than {}",
            list.len()
        );
        for (nr, _) in list {
            let row = format!("| `{}` |", name(nr));
            assert!(doc.contains(&row), "docs/ARCHITECTURE.md lacks {row}");
        }
    }
}
