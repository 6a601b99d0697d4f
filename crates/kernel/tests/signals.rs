//! Signals without KVM: handlers get a Linux `rt_sigframe` and `rt_sigreturn` restores the
//! thread; masks, pending sets, alternate stacks, ignored and fatal signals, interrupted
//! waits, `sigtimedwait`, and the timers that raise signals.

mod common;

use common::{Harness, err};
use forkvm_kernel::{ExitReason, Outcome};

const SA_SIGINFO: u64 = 0x4;
const SA_RESTORER: u64 = 0x0400_0000;
const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTART: u64 = 0x1000_0000;
const SA_RESETHAND: u64 = 0x8000_0000;
const HANDLER: u64 = 0x40_1000;
const RESTORER: u64 = 0x40_2000;
const PAGE: u64 = 4096;

fn bit(signal: i32) -> u64 {
    1 << (signal - 1)
}

/// Installs a handler for `signal` with `flags` (SA_RESTORER added, as glibc does).
fn handle(h: &mut Harness, signal: i32, flags: u64, mask: u64) {
    let act = h.at(0x100);
    h.poke(
        act,
        &[HANDLER, flags | SA_RESTORER, RESTORER, mask]
            .map(u64::to_le_bytes)
            .concat(),
    );
    assert_eq!(
        h.sys(libc::SYS_rt_sigaction, &[signal as u64, act, 0, 8]),
        0
    );
}

fn set_mask(h: &mut Harness, how: i32, mask: u64) -> u64 {
    let (set, old) = (h.at(0x180), h.at(0x188));
    h.poke(set, &mask.to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_rt_sigprocmask, &[how as u64, set, old, 8]),
        0
    );
    h.peek_u64(old)
}

/// A harness with a stack to take frames on, and recognizable registers.
fn harness() -> Harness {
    let mut h = Harness::new();
    let stack = h.mmap_anon(16 * PAGE) as u64;
    h.ctx.regs.rsp = stack + 16 * PAGE - 64;
    h.ctx.regs.rip = 0x40_0123;
    h.ctx.regs.rbx = 0xb0b;
    h
}

/// The handler was entered for `signal`: returns the frame's address.
fn entered(h: &Harness, signal: i32) -> u64 {
    assert_eq!(h.ctx.regs.rip, HANDLER);
    assert_eq!(h.ctx.regs.rdi, signal as u64);
    let frame = h.ctx.regs.rsp;
    assert_eq!((frame + 8) % 16, 0, "entered as if by a call");
    assert_eq!(h.peek_u64(frame), RESTORER, "returns into sa_restorer");
    assert_eq!(h.ctx.regs.rsi, frame + 312, "&siginfo");
    assert_eq!(h.ctx.regs.rdx, frame + 8, "&ucontext");
    let info = h.peek(frame + 312, 12);
    assert_eq!(i32::from_le_bytes(info[0..4].try_into().unwrap()), signal);
    frame
}

/// The handler returns: `ret` pops the return address, and the restorer makes the call.
fn sigreturn(h: &mut Harness) -> Outcome {
    h.ctx.regs.rsp += 8;
    h.call(libc::SYS_rt_sigreturn, &[])
}

#[test]
fn a_handler_runs_on_a_linux_frame_and_sigreturn_restores_the_thread() {
    let mut h = harness();
    handle(&mut h, libc::SIGUSR1, SA_SIGINFO, bit(libc::SIGUSR2));
    let before = h.ctx;
    assert_eq!(
        h.call(libc::SYS_kill, &[1, libc::SIGUSR1 as u64]),
        Outcome::Switched
    );
    let frame = entered(&h, libc::SIGUSR1);
    // uc_mcontext: rbx at +40+88, rip at +40+128, rax (kill's result 0) at +40+104.
    assert_eq!(h.peek_u64(frame + 8 + 40 + 88), 0xb0b);
    assert_eq!(h.peek_u64(frame + 8 + 40 + 128), before.regs.rip);
    assert_eq!(h.peek_u64(frame + 8 + 40 + 104), 0);
    // During the handler: its own signal and sa_mask are blocked.
    let during = set_mask(&mut h, libc::SIG_BLOCK, 0);
    assert_eq!(during, bit(libc::SIGUSR1) | bit(libc::SIGUSR2));
    // The handler scribbles on registers, then returns.
    h.ctx.regs.rbx = 0xdead;
    assert_eq!(sigreturn(&mut h), Outcome::Switched);
    assert_eq!(h.ctx.regs.rip, before.regs.rip);
    assert_eq!(h.ctx.regs.rbx, 0xb0b);
    assert_eq!(h.ctx.regs.rsp, before.regs.rsp);
    assert_eq!(h.ctx.regs.rax, 0, "kill's result");
    assert_eq!(set_mask(&mut h, libc::SIG_BLOCK, 0), 0, "mask restored");
}

#[test]
fn blocked_signals_wait_and_are_delivered_when_unblocked() {
    let mut h = harness();
    handle(&mut h, libc::SIGUSR1, 0, 0);
    set_mask(&mut h, libc::SIG_BLOCK, bit(libc::SIGUSR1));
    assert_eq!(
        h.call(libc::SYS_kill, &[1, libc::SIGUSR1 as u64]),
        Outcome::Return(0)
    );
    let pending = h.at(0x200);
    assert_eq!(h.sys(libc::SYS_rt_sigpending, &[pending, 8]), 0);
    assert_eq!(h.peek_u64(pending), bit(libc::SIGUSR1));
    // Unblocking returns into the handler.
    let (set, old) = (h.at(0x180), h.at(0x188));
    h.poke(set, &bit(libc::SIGUSR1).to_le_bytes());
    assert_eq!(
        h.call(
            libc::SYS_rt_sigprocmask,
            &[libc::SIG_UNBLOCK as u64, set, old, 8]
        ),
        Outcome::Switched
    );
    entered(&h, libc::SIGUSR1);
}

#[test]
fn ignored_signals_vanish_and_fatal_ones_end_the_sandbox() {
    let mut h = harness();
    let act = h.at(0x100);
    h.poke(
        act,
        &[libc::SIG_IGN as u64, 0, 0, 0]
            .map(u64::to_le_bytes)
            .concat(),
    );
    assert_eq!(
        h.sys(libc::SYS_rt_sigaction, &[libc::SIGTERM as u64, act, 0, 8]),
        0
    );
    assert_eq!(h.sys(libc::SYS_kill, &[1, libc::SIGTERM as u64]), 0);
    assert_eq!(h.sys(libc::SYS_kill, &[1, libc::SIGCHLD as u64]), 0);
    assert_eq!(
        h.call(libc::SYS_kill, &[1, libc::SIGINT as u64]),
        Outcome::Exit(ExitReason::Signaled(libc::SIGINT))
    );
}

#[test]
fn reset_hand_restores_the_default_and_the_alternate_stack_is_used() {
    let mut h = harness();
    let alt = h.mmap_anon(4 * PAGE) as u64;
    let ss = h.at(0x300);
    h.poke(
        ss,
        &[
            alt.to_le_bytes(),
            0u64.to_le_bytes(),
            (4 * PAGE).to_le_bytes(),
        ]
        .concat(),
    );
    assert_eq!(h.sys(libc::SYS_sigaltstack, &[ss, 0]), 0);
    // Too small a stack is refused.
    h.poke(ss + 16, &2048u64.to_le_bytes());
    assert_eq!(h.sys(libc::SYS_sigaltstack, &[ss, 0]), err(libc::ENOMEM));
    handle(&mut h, libc::SIGSEGV, SA_ONSTACK | SA_RESETHAND, 0);
    assert_eq!(
        h.call(libc::SYS_tgkill, &[1, 1, libc::SIGSEGV as u64]),
        Outcome::Switched
    );
    let frame = entered(&h, libc::SIGSEGV);
    assert!(
        (alt..alt + 4 * PAGE).contains(&frame),
        "on the alternate stack"
    );
    // uc_stack says so.
    let flags = i32::from_le_bytes(h.peek(frame + 8 + 24, 4).try_into().unwrap());
    assert_eq!(flags, 0, "the stack the frame records is the one set");
    assert_eq!(sigreturn(&mut h), Outcome::Switched);
    // The handler was reset: the next one is fatal.
    assert_eq!(
        h.call(libc::SYS_tgkill, &[1, 1, libc::SIGSEGV as u64]),
        Outcome::Exit(ExitReason::Signaled(libc::SIGSEGV))
    );
}

#[test]
fn a_signal_interrupts_a_wait_with_eintr_or_restarts_it_with_sa_restart() {
    for (flags, restarted) in [(0, false), (SA_RESTART, true)] {
        let mut h = harness();
        handle(&mut h, libc::SIGALRM, flags, 0);
        let fds = h.at(0x400);
        assert_eq!(h.sys(libc::SYS_pipe2, &[fds, 0]), 0);
        let read_fd = u64::from(u32::from_le_bytes(h.peek(fds, 4).try_into().unwrap()));
        // An interval timer fires while the only thread waits on an empty pipe.
        let itv = h.at(0x500);
        h.poke(itv, &[0u64, 0, 0, 1000].map(u64::to_le_bytes).concat());
        assert_eq!(h.sys(libc::SYS_setitimer, &[0, itv, 0]), 0);
        let buf = h.at(0x600);
        let Outcome::Idle(until) = h.call(libc::SYS_read, &[read_fd, buf, 8]) else {
            panic!("the read waits for the timer");
        };
        while forkvm_kernel::threads::monotonic_ns() < until {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert_eq!(h.process.resume(&mut h.ctx, &mut h.fpu), Outcome::Switched);
        let frame = entered(&h, libc::SIGALRM);
        let saved_rax = h.peek_u64(frame + 8 + 40 + 104);
        let saved_rip = h.peek_u64(frame + 8 + 40 + 128);
        if restarted {
            assert_eq!(saved_rax, libc::SYS_read as u64, "the read is made again");
            assert_eq!(saved_rip, 0x40_0123 - 2);
        } else {
            assert_eq!(saved_rax as i64, err(libc::EINTR));
            assert_eq!(saved_rip, 0x40_0123);
        }
    }
}

#[test]
fn sigtimedwait_takes_a_blocked_pending_signal() {
    let mut h = harness();
    set_mask(&mut h, libc::SIG_BLOCK, bit(libc::SIGUSR2));
    assert_eq!(h.sys(libc::SYS_kill, &[1, libc::SIGUSR2 as u64]), 0);
    let (set, info) = (h.at(0x180), h.at(0x200));
    h.poke(set, &bit(libc::SIGUSR2).to_le_bytes());
    assert_eq!(
        h.sys(libc::SYS_rt_sigtimedwait, &[set, info, 0, 8]),
        libc::SIGUSR2 as i64
    );
    assert_eq!(
        i32::from_le_bytes(h.peek(info, 4).try_into().unwrap()),
        libc::SIGUSR2
    );
    // Nothing left: a zero timeout is EAGAIN.
    let zero = h.at(0x280);
    h.poke(zero, &[0u8; 16]);
    assert_eq!(
        h.sys(libc::SYS_rt_sigtimedwait, &[set, 0, zero, 8]),
        err(libc::EAGAIN)
    );
}

#[test]
fn posix_timers_arm_report_and_delete() {
    let mut h = harness();
    let (event, id_out, spec, out) = (h.at(0x100), h.at(0x140), h.at(0x180), h.at(0x1c0));
    // SIGEV_SIGNAL with SIGUSR1 and a value.
    h.poke(
        event,
        &[
            0x77u64.to_le_bytes().as_slice(),
            &(libc::SIGUSR1 as u32).to_le_bytes(),
            &0u32.to_le_bytes(),
            &[0u8; 4],
        ]
        .concat(),
    );
    assert_eq!(
        h.sys(
            libc::SYS_timer_create,
            &[libc::CLOCK_MONOTONIC as u64, event, id_out]
        ),
        0
    );
    let id = u64::from(u32::from_le_bytes(h.peek(id_out, 4).try_into().unwrap()));
    // 10 s from now, every 1 s.
    h.poke(spec, &[1u64, 0, 10, 0].map(u64::to_le_bytes).concat());
    assert_eq!(h.sys(libc::SYS_timer_settime, &[id, 0, spec, 0]), 0);
    assert_eq!(h.sys(libc::SYS_timer_gettime, &[id, out]), 0);
    assert_eq!(h.peek_u64(out), 1, "interval 1 s");
    let left = h.peek_u64(out + 16);
    assert!((8..=10).contains(&left), "about 10 s left: {left}");
    assert_eq!(h.sys(libc::SYS_timer_getoverrun, &[id]), 0);
    assert_eq!(h.sys(libc::SYS_timer_delete, &[id]), 0);
    assert_eq!(h.sys(libc::SYS_timer_delete, &[id]), err(libc::EINVAL));
    // alarm reports what the previous one had left.
    assert_eq!(h.sys(libc::SYS_alarm, &[30]), 0);
    assert_eq!(h.sys(libc::SYS_alarm, &[0]), 30);
}

#[test]
fn sigsuspend_takes_a_signal_that_was_already_pending() {
    let mut h = harness();
    handle(&mut h, libc::SIGUSR1, SA_SIGINFO, 0);
    set_mask(&mut h, libc::SIG_BLOCK, bit(libc::SIGUSR1));
    assert_eq!(h.sys(libc::SYS_kill, &[1, libc::SIGUSR1 as u64]), 0);
    // The classic race-free wait: block, raise, then suspend with it unblocked.
    let empty = h.at(0x1c0);
    h.poke(empty, &0u64.to_le_bytes());
    assert_eq!(
        h.call(libc::SYS_rt_sigsuspend, &[empty, 8]),
        Outcome::Switched
    );
    entered(&h, libc::SIGUSR1);
    sigreturn(&mut h);
    assert_eq!(h.ctx.regs.rax as i64, err(libc::EINTR));
    assert_eq!(
        set_mask(&mut h, libc::SIG_BLOCK, 0),
        bit(libc::SIGUSR1),
        "the mask from before the suspend is back"
    );
}
