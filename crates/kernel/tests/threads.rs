//! Threads without KVM: `clone` as glibc's `pthread_create` calls it, futex waits and wakes
//! switching the "vCPU" (the harness's context) between threads, joins through the child-tid
//! word, blocking pipes, timeouts, the thread limit, robust mutexes, and deadlocks.

mod common;

use common::{Harness, err};
use forkvm_kernel::threads::MAX_THREADS;
use forkvm_kernel::{ExitReason, Outcome};

const PAGE: u64 = 4096;
const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_THREAD: u64 = 0x10000;
const CLONE_SYSVSEM: u64 = 0x40000;
const CLONE_SETTLS: u64 = 0x80000;
const CLONE_PARENT_SETTID: u64 = 0x100000;
const CLONE_CHILD_CLEARTID: u64 = 0x200000;
/// What glibc 2.36's `pthread_create` passes.
const PTHREAD_FLAGS: u64 = CLONE_VM
    | CLONE_FS
    | CLONE_FILES
    | CLONE_SIGHAND
    | CLONE_THREAD
    | CLONE_SYSVSEM
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID;
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_CMP_REQUEUE: u64 = 4;
const FUTEX_WAKE_OP: u64 = 5;
const FUTEX_PRIVATE: u64 = 128;

fn word(h: &Harness, addr: u64) -> u32 {
    u32::from_le_bytes(h.peek(addr, 4).try_into().unwrap())
}

/// A harness whose main thread made a thread the way `pthread_create` does; returns the
/// new thread's tid and its tid word (its stack is a fresh mapping).
fn with_thread(h: &mut Harness) -> (u64, u64) {
    let stack = h.mmap_anon(16 * PAGE) as u64 + 16 * PAGE;
    let tid_word = h.at(0x200);
    let tls = h.at(0x300);
    let tid = h.sys(
        libc::SYS_clone,
        &[PTHREAD_FLAGS, stack, tid_word, tid_word, tls],
    );
    assert!(tid > 1, "clone: {tid}");
    assert_eq!(u64::from(word(h, tid_word)), tid as u64);
    (tid as u64, tid_word)
}

#[test]
fn a_new_thread_resumes_from_clone_with_zero_on_its_own_stack_and_tls() {
    let mut h = Harness::new();
    h.ctx.regs.rip = 0x40_1000;
    h.ctx.regs.r12 = 0xaaaa;
    h.ctx.fs_base = 0x1234;
    let (tid, tid_word) = with_thread(&mut h);
    assert_eq!(h.ctx.fs_base, 0x1234, "the parent keeps running as itself");

    // The parent joins: it waits on the tid word, and the vCPU goes to the child.
    let outcome = h.call(libc::SYS_futex, &[tid_word, FUTEX_WAIT, tid, 0]);
    assert_eq!(outcome, Outcome::Switched);
    assert_eq!(h.ctx.regs.rax, 0, "the child sees clone return 0");
    assert_eq!(h.ctx.regs.rip, 0x40_1000, "from the same place");
    assert_eq!(h.ctx.regs.r12, 0xaaaa, "with the parent's other registers");
    assert_eq!(h.ctx.fs_base, h.at(0x300), "and its own TLS");
    let stack_vma = h
        .process
        .address_space()
        .vma_at(h.ctx.regs.rsp - 8)
        .unwrap();
    assert_eq!(h.ctx.regs.rsp, stack_vma.end, "on its own stack");
    assert_eq!(h.sys(libc::SYS_gettid, &[]) as u64, tid);
    assert_eq!(h.sys(libc::SYS_getpid, &[]), 1);

    // The child exits: its tid word is cleared and the joining parent woken.
    assert_eq!(h.call(libc::SYS_exit, &[0]), Outcome::Switched);
    assert_eq!(word(&h, tid_word), 0);
    assert_eq!(h.ctx.regs.rax, 0, "the parent's futex wait returns 0");
    assert_eq!(h.ctx.fs_base, 0x1234);
    assert_eq!(h.sys(libc::SYS_gettid, &[]), 1);
    // The last thread's exit is the process's.
    assert_eq!(
        h.call(libc::SYS_exit, &[7]),
        Outcome::Exit(ExitReason::Exited(7))
    );
}

#[test]
fn futex_waits_check_the_word_and_time_out() {
    let mut h = Harness::new();
    let addr = h.at(0x100);
    h.poke(addr, &5u32.to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_futex, &[addr, FUTEX_WAIT, 4, 0]),
        err(libc::EAGAIN)
    );
    assert_eq!(
        h.sys(libc::SYS_futex, &[addr + 1, FUTEX_WAIT, 5, 0]),
        err(libc::EINVAL)
    );
    // One millisecond, with no other thread: the sandbox idles until then.
    let timeout = h.at(0x180);
    h.poke(
        timeout,
        &[0u64.to_le_bytes(), 1_000_000u64.to_le_bytes()].concat(),
    );
    let Outcome::Idle(until) = h.call(libc::SYS_futex, &[addr, FUTEX_WAIT, 5, timeout]) else {
        panic!("a timed wait with nobody to wake it idles");
    };
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert!(until <= forkvm_kernel::threads::monotonic_ns());
    let outcome = h.process.resume(&mut h.ctx, &mut h.fpu);
    assert_eq!(outcome, Outcome::Switched);
    assert_eq!(h.ctx.regs.rax as i64, err(libc::ETIMEDOUT));
}

#[test]
fn a_wait_no_thread_can_end_is_a_deadlock() {
    let mut h = Harness::new();
    let addr = h.at(0x100);
    let Outcome::Exit(ExitReason::Deadlock(why)) =
        h.call(libc::SYS_futex, &[addr, FUTEX_WAIT | FUTEX_PRIVATE, 0, 0])
    else {
        panic!("expected a deadlock");
    };
    assert!(why.contains("futex"), "{why}");
}

#[test]
fn a_read_of_an_empty_pipe_waits_for_another_threads_write() {
    let mut h = Harness::new();
    let fds = h.at(0x400);
    assert_eq!(h.sys(libc::SYS_pipe2, &[fds, 0]), 0);
    let read_fd = u64::from(word(&h, fds));
    let write_fd = u64::from(word(&h, fds + 4));
    h.ctx.regs.rip = 0x40_2000;
    with_thread(&mut h);
    let buf = h.at(0x500);
    // The main thread blocks; the child runs and writes.
    assert_eq!(
        h.call(libc::SYS_read, &[read_fd, buf, 16]),
        Outcome::Switched
    );
    h.poke(buf + 0x100, b"hello");
    assert_eq!(h.sys(libc::SYS_write, &[write_fd, buf + 0x100, 5]), 5);
    assert_eq!(h.call(libc::SYS_exit, &[0]), Outcome::Switched);
    // The main thread makes its read again: it resumes at the `syscall` instruction.
    assert_eq!(h.ctx.regs.rip, 0x40_2000 - 2);
    assert_eq!(h.ctx.regs.rax, libc::SYS_read as u64);
    assert_eq!(h.sys(libc::SYS_read, &[read_fd, buf, 16]), 5);
    assert_eq!(h.peek(buf, 5), b"hello");
}

#[test]
fn yield_lets_the_others_run_first() {
    let mut h = Harness::new();
    let (child, _) = with_thread(&mut h);
    assert_eq!(h.call(libc::SYS_sched_yield, &[]), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_gettid, &[]) as u64, child);
    assert_eq!(h.call(libc::SYS_sched_yield, &[]), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_gettid, &[]), 1);
    assert_eq!(h.ctx.regs.rax, 1, "gettid's result, after yield returned 0");
}

#[test]
fn requeue_and_wake_op_move_and_wake_waiters() {
    let mut h = Harness::new();
    let (a, b) = (h.at(0x600), h.at(0x604));
    h.poke(a, &1u32.to_le_bytes());
    h.poke(b, &0u32.to_le_bytes());
    let (child, _) = with_thread(&mut h);
    // Main waits on `a`; the child requeues it to `b` (checking `a` still holds 1).
    assert_eq!(
        h.call(libc::SYS_futex, &[a, FUTEX_WAIT, 1, 0]),
        Outcome::Switched
    );
    assert_eq!(h.sys(libc::SYS_gettid, &[]) as u64, child);
    assert_eq!(
        h.sys(libc::SYS_futex, &[a, FUTEX_CMP_REQUEUE, 0, 1, b, 2]),
        err(libc::EAGAIN)
    );
    assert_eq!(
        h.sys(libc::SYS_futex, &[a, FUTEX_CMP_REQUEUE, 0, 1, b, 1]),
        1
    );
    assert_eq!(h.sys(libc::SYS_futex, &[a, FUTEX_WAKE, 1]), 0);
    // FUTEX_WAKE_OP: *b += 1, and wake waiters on `b` if the old value was 0.
    let op = (1 << 28) | (1 << 12);
    assert_eq!(h.sys(libc::SYS_futex, &[a, FUTEX_WAKE_OP, 1, 1, b, op]), 1);
    assert_eq!(word(&h, b), 1);
}

#[test]
fn the_thread_limit_is_a_clean_eagain() {
    let mut h = Harness::new();
    let stack = h.mmap_anon(PAGE) as u64 + PAGE;
    let flags = PTHREAD_FLAGS & !(CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID);
    for _ in 1..MAX_THREADS {
        assert!(h.sys(libc::SYS_clone, &[flags, stack, 0, 0, 0]) > 1);
    }
    assert_eq!(
        h.sys(libc::SYS_clone, &[flags, stack, 0, 0, 0]),
        err(libc::EAGAIN)
    );
    assert_eq!(h.process.thread_count(), MAX_THREADS);
}

#[test]
fn a_thread_dying_with_a_robust_mutex_marks_it_abandoned_and_wakes_a_waiter() {
    let mut h = Harness::new();
    let (child, _) = with_thread(&mut h);
    // robust_list_head { next, futex_offset, pending } and one entry whose futex word sits
    // 16 bytes in: held by the child, with a waiter.
    let (head, entry) = (h.at(0x800), h.at(0x900));
    let mutex = entry + 16;
    let held = child as u32 | 0x8000_0000;
    h.poke(head, &[entry, 16, 0].map(u64::to_le_bytes).concat());
    h.poke(entry, &head.to_le_bytes());
    h.poke(mutex, &held.to_le_bytes());
    // Main waits for the mutex; the child registers its list and dies holding it.
    assert_eq!(
        h.call(libc::SYS_futex, &[mutex, FUTEX_WAIT, u64::from(held), 0]),
        Outcome::Switched
    );
    assert_eq!(
        h.sys(libc::SYS_set_robust_list, &[head, 23]),
        err(libc::EINVAL)
    );
    assert_eq!(h.sys(libc::SYS_set_robust_list, &[head, 24]), 0);
    assert_eq!(h.call(libc::SYS_exit, &[0]), Outcome::Switched);
    assert_eq!(h.sys(libc::SYS_gettid, &[]), 1, "the waiter was woken");
    assert_eq!(
        word(&h, mutex),
        0x8000_0000 | 0x4000_0000,
        "FUTEX_OWNER_DIED"
    );
}
