//! The system-call dispatcher: one `match` from syscall number to handler.
//!
//! Handlers return `Result<u64, Stop>`: `Ok` is the value for `rax`, `Stop::Errno` becomes
//! `-errno`, and `Stop::Exit` ends the sandbox. Anything not listed is answered `ENOSYS`,
//! counted by name and logged, so the list of what programs still need is always at hand.

pub(crate) mod copy;
pub(crate) mod creds;
pub(crate) mod epoll;
pub(crate) mod exec;
pub(crate) mod fd;
pub(crate) mod fs;
pub(crate) mod futex;
pub(crate) mod io;
pub(crate) mod mem;
pub(crate) mod misc;
pub(crate) mod namespace;
pub(crate) mod notify;
pub(crate) mod pipe;
pub(crate) mod poll;
pub(crate) mod proc;
pub(crate) mod procs;
pub(crate) mod sched;
pub(crate) mod shared;
pub(crate) mod signal;
pub(crate) mod socket;
pub(crate) mod thread;
pub(crate) mod time;
pub(crate) mod timer;

use syscalls::{Errno, Sysno};

use crate::console::OutputLimitReached;
use crate::context::{Fpu, UserContext};
use crate::process::Process;
use crate::threads::{Resume, Wait};
use creds::Ids;

/// Why the program stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// `exit`/`exit_group` with this status.
    Exited(i32),
    /// Killed by a signal it sent itself (`kill(getpid(), SIGTERM)`, `abort()`).
    Signaled(i32),
    /// A stream reached its output cap.
    OutputLimit(OutputLimitReached),
    /// The program waited for something that can never happen (a futex with no other thread).
    Deadlock(String),
    /// A `fork` would have made more processes than the sandbox may have (a fork bomb).
    ProcessLimit(usize),
}

/// What the VMM should do after a syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Resume the same thread; its context's `rax` holds this value.
    Return(u64),
    /// The context and vector state now hold the thread to run next (another one, or the
    /// same one resumed): load them into the vCPU and go on.
    Switched,
    /// No thread can run before this `CLOCK_MONOTONIC` time (nanoseconds): wait until then,
    /// then call `Process::resume`.
    Idle(u64),
    /// The current process changed (another one's thread runs next, or the process has a
    /// new image): call `Process::resume` with the vector state of the vCPU over the new
    /// current RAM (`Process::ram`).
    Reschedule,
    /// End the sandbox.
    Exit(ExitReason),
    /// The program is reading the control channel and nothing is queued: park the vCPU at
    /// this syscall until `Process::complete_control_read` answers it.
    AwaitingControl,
}

/// Early exit from a handler.
#[derive(Debug)]
pub(crate) enum Stop {
    Errno(Errno),
    Exit(ExitReason),
    AwaitingControl,
    /// The calling thread blocks until the wait ends.
    Block(Wait),
    /// The calling thread lets others run first (`sched_yield`).
    Yield,
    /// The calling thread has ended (`exit` of one of several threads).
    ThreadExit,
    /// The syscall replaced the whole context (`rt_sigreturn`): nothing to put in `rax`.
    Replaced,
    /// The process has a new image (`execve`): its one thread is runnable from its entry.
    Exec,
}

impl From<Errno> for Stop {
    fn from(e: Errno) -> Self {
        Stop::Errno(e)
    }
}

pub(crate) type SysResult = Result<u64, Stop>;

/// A syscall's number and its six argument registers (rdi, rsi, rdx, r10, r8, r9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallArgs {
    pub nr: u64,
    pub args: [u64; 6],
}

/// Name of a syscall number, for logs and counters.
pub fn syscall_name(nr: u64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map_or("unknown", |s| s.name())
}

impl Process {
    /// Serves the syscall the current thread is making: `ctx` is its user context (the
    /// number in `rax`, `rip` the return address), and `fpu` the vCPU's vector state. The
    /// result goes into `ctx`'s `rax`; when the thread blocks, yields or ends, `ctx` and
    /// `fpu` are switched to the next thread's (`Outcome::Switched`).
    pub fn handle_syscall(&mut self, ctx: &mut UserContext, fpu: &mut dyn Fpu) -> Outcome {
        let call = ctx.syscall();
        let name = syscall_name(call.nr);
        self.stats.record(name);
        self.enforce_memory_budget();
        let mut result = self.dispatch(call, ctx, fpu);
        if let Err(e) = self.sync_page_tables() {
            tracing::error!(error = %e, "updating the page tables");
            result = Err(Stop::Exit(ExitReason::Signaled(libc::SIGKILL)));
        }
        if !matches!(result, Err(Stop::Block(_))) {
            self.threads.clear_restart_deadline();
        }
        let outcome = match result {
            Ok(value) => {
                ctx.regs.rax = value;
                self.back_to_user(ctx, fpu, Outcome::Return(value), None)
            }
            Err(Stop::Errno(e)) => {
                let value = (-i64::from(e.into_raw())) as u64;
                ctx.regs.rax = value;
                self.back_to_user(ctx, fpu, Outcome::Return(value), None)
            }
            Err(Stop::Replaced) => self.back_to_user(ctx, fpu, Outcome::Switched, None),
            Err(Stop::Exit(reason)) => Outcome::Exit(reason),
            Err(Stop::AwaitingControl) => {
                self.between_requests_over();
                Outcome::AwaitingControl
            }
            Err(Stop::Block(wait)) => {
                self.threads.block_current(wait, self.signals.pending.set());
                self.reschedule(ctx, fpu)
            }
            Err(Stop::Yield) => {
                self.threads.requeue_current(Resume::Return(0));
                self.reschedule(ctx, fpu)
            }
            Err(Stop::ThreadExit) => self.reschedule(ctx, fpu),
            Err(Stop::Exec) => Outcome::Reschedule,
        };
        let outcome = self.settle(outcome);
        if self.strace.is_some() {
            self.trace(call, &outcome);
        }
        outcome
    }

    fn dispatch(
        &mut self,
        call: SyscallArgs,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
    ) -> SysResult {
        let a = call.args;
        let Some(sysno) = usize::try_from(call.nr).ok().and_then(Sysno::new) else {
            return self.unsupported("unknown");
        };
        match sysno {
            // Memory.
            Sysno::brk => self.sys_brk(a[0]),
            Sysno::mmap => self.sys_mmap(a[0], a[1], a[2] as i32, a[3] as i32, a[4] as i32, a[5]),
            Sysno::munmap => self.sys_munmap(a[0], a[1]),
            Sysno::mprotect => self.sys_mprotect(a[0], a[1], a[2]),
            Sysno::mremap => self.sys_mremap(a[0], a[1], a[2], a[3] as i32),
            Sysno::madvise => self.sys_madvise(a[0], a[1], a[2] as i32),
            Sysno::mlock | Sysno::munlock | Sysno::mlockall | Sysno::munlockall => Ok(0),
            Sysno::msync => self.sys_msync(a[0], a[1], a[2] as i32),

            // Descriptors and I/O.
            Sysno::read => self.sys_read(a[0] as i32, a[1], a[2]),
            Sysno::write => self.sys_write(a[0] as i32, a[1], a[2]),
            Sysno::pread64 => self.sys_pread(a[0] as i32, a[1], a[2], a[3] as i64),
            Sysno::pwrite64 => self.sys_pwrite(a[0] as i32, a[1], a[2], a[3] as i64),
            Sysno::readv => self.sys_readv(a[0] as i32, a[1], a[2], None),
            Sysno::writev => self.sys_writev(a[0] as i32, a[1], a[2], None),
            Sysno::preadv => self.sys_readv(a[0] as i32, a[1], a[2], Some(a[3] as i64)),
            Sysno::pwritev => self.sys_writev(a[0] as i32, a[1], a[2], Some(a[3] as i64)),
            Sysno::close => self.sys_close(a[0] as i32),
            Sysno::close_range => self.sys_close_range(a[0] as u32, a[1] as u32, a[2] as u32),
            Sysno::lseek => self.sys_lseek(a[0] as i32, a[1] as i64, a[2] as i32),
            Sysno::dup => self.sys_dup(a[0] as i32),
            Sysno::dup2 => self.sys_dup2(a[0] as i32, a[1] as i32),
            Sysno::dup3 => self.sys_dup3(a[0] as i32, a[1] as i32, a[2] as i32),
            Sysno::fcntl => self.sys_fcntl(a[0] as i32, a[1] as i32, a[2]),
            Sysno::ioctl => self.sys_ioctl(a[0] as i32, a[1], a[2]),
            Sysno::fstat => self.sys_fstat(a[0] as i32, a[1]),
            Sysno::getdents64 => self.sys_getdents64(a[0] as i32, a[1], a[2]),
            Sysno::ftruncate => self.sys_ftruncate(a[0] as i32, a[1] as i64),
            Sysno::fsync | Sysno::fdatasync | Sysno::syncfs => self.sys_fsync(a[0] as i32),
            Sysno::sync => Ok(0),
            Sysno::fadvise64 => self.files.get(a[0] as i32).map(|_| 0).map_err(Stop::from),
            Sysno::flock => self.files.get(a[0] as i32).map(|_| 0).map_err(Stop::from),
            Sysno::fchmod => self.sys_fchmod(a[0] as i32, a[1] as u32),
            Sysno::fchown => self.sys_fchown(a[0] as i32, a[1] as u32, a[2] as u32),
            Sysno::fallocate => {
                self.sys_fallocate(a[0] as i32, a[1] as i32, a[2] as i64, a[3] as i64)
            }
            Sysno::fchdir => self.sys_fchdir(a[0] as i32),
            Sysno::fstatfs => self.sys_fstatfs(a[0] as i32, a[1]),
            Sysno::sendfile => self.sys_sendfile(a[0] as i32, a[1] as i32, a[2], a[3]),
            Sysno::splice => {
                self.sys_splice(a[0] as i32, a[1], a[2] as i32, a[3], a[4], a[5] as u32)
            }
            Sysno::tee => self.sys_tee(a[0] as i32, a[1] as i32, a[2], a[3] as u32),
            Sysno::vmsplice => self.sys_vmsplice(a[0] as i32, a[1], a[2], a[3] as u32),
            Sysno::copy_file_range => {
                self.sys_copy_file_range(a[0] as i32, a[1], a[2] as i32, a[3], a[4], a[5] as u32)
            }
            Sysno::poll => self.sys_poll(a[0], a[1], a[2] as i32),
            Sysno::ppoll => self.sys_ppoll(a[0], a[1], a[2], a[3], a[4]),
            Sysno::select => self.sys_select(a[0] as i32, a[1], a[2], a[3], a[4]),
            Sysno::pselect6 => self.sys_pselect6(a[0] as i32, [a[1], a[2], a[3]], a[4], a[5]),

            // Event notification.
            Sysno::epoll_create => self.sys_epoll_create(a[0] as i32),
            Sysno::epoll_create1 => self.sys_epoll_create1(a[0] as i32),
            Sysno::epoll_ctl => self.sys_epoll_ctl(a[0] as i32, a[1] as i32, a[2] as i32, a[3]),
            Sysno::epoll_wait => self.sys_epoll_wait(a[0] as i32, a[1], a[2] as i32, a[3] as i32),
            Sysno::epoll_pwait => {
                self.sys_epoll_pwait(a[0] as i32, a[1], a[2] as i32, a[3] as i32, a[4], a[5])
            }
            Sysno::epoll_pwait2 => {
                self.sys_epoll_pwait2(a[0] as i32, a[1], a[2] as i32, a[3], a[4], a[5])
            }
            Sysno::eventfd => self.sys_eventfd2(a[0] as u32, 0),
            Sysno::eventfd2 => self.sys_eventfd2(a[0] as u32, a[1] as i32),
            Sysno::timerfd_create => self.sys_timerfd_create(a[0] as i32, a[1] as i32),
            Sysno::timerfd_settime => {
                self.sys_timerfd_settime(a[0] as i32, a[1] as i32, a[2], a[3])
            }
            Sysno::timerfd_gettime => self.sys_timerfd_gettime(a[0] as i32, a[1]),
            Sysno::signalfd => self.sys_signalfd4(a[0] as i32, a[1], a[2], 0),
            Sysno::signalfd4 => self.sys_signalfd4(a[0] as i32, a[1], a[2], a[3] as i32),

            // Sockets (between the sandbox's own threads; see `crate::net`).
            Sysno::socket => self.sys_socket(a[0] as i32, a[1] as i32, a[2] as i32),
            Sysno::socketpair => self.sys_socketpair(a[0] as i32, a[1] as i32, a[2] as i32, a[3]),
            Sysno::bind => self.sys_bind(a[0] as i32, a[1], a[2] as u32),
            Sysno::listen => self.sys_listen(a[0] as i32, a[1] as i32),
            Sysno::connect => self.sys_connect(a[0] as i32, a[1], a[2] as u32),
            Sysno::accept => self.sys_accept4(a[0] as i32, a[1], a[2], 0),
            Sysno::accept4 => self.sys_accept4(a[0] as i32, a[1], a[2], a[3] as i32),
            Sysno::getsockname => self.sys_getsockname(a[0] as i32, a[1], a[2]),
            Sysno::getpeername => self.sys_getpeername(a[0] as i32, a[1], a[2]),
            Sysno::shutdown => self.sys_shutdown(a[0] as i32, a[1] as i32),
            Sysno::sendto => {
                self.sys_sendto(a[0] as i32, a[1], a[2], a[3] as i32, a[4], a[5] as u32)
            }
            Sysno::recvfrom => self.sys_recvfrom(a[0] as i32, a[1], a[2], a[3] as i32, a[4], a[5]),
            Sysno::sendmsg => self.sys_sendmsg(a[0] as i32, a[1], a[2] as i32),
            Sysno::recvmsg => self.sys_recvmsg(a[0] as i32, a[1], a[2] as i32),
            Sysno::sendmmsg => self.sys_sendmmsg(a[0] as i32, a[1], a[2] as u32, a[3] as i32),
            Sysno::recvmmsg => self.sys_recvmmsg(a[0] as i32, a[1], a[2] as u32, a[3] as i32),
            Sysno::setsockopt => {
                self.sys_setsockopt(a[0] as i32, a[1] as i32, a[2] as i32, a[3], a[4] as u32)
            }
            Sysno::getsockopt => {
                self.sys_getsockopt(a[0] as i32, a[1] as i32, a[2] as i32, a[3], a[4])
            }

            // Paths.
            Sysno::open => self.sys_openat(libc::AT_FDCWD, a[0], a[1] as i32, a[2] as u32),
            Sysno::openat => self.sys_openat(a[0] as i32, a[1], a[2] as i32, a[3] as u32),
            Sysno::creat => self.sys_openat(
                libc::AT_FDCWD,
                a[0],
                libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
                a[1] as u32,
            ),
            Sysno::stat => self.sys_newfstatat(libc::AT_FDCWD, a[0], a[1], 0),
            Sysno::lstat => {
                self.sys_newfstatat(libc::AT_FDCWD, a[0], a[1], libc::AT_SYMLINK_NOFOLLOW)
            }
            Sysno::newfstatat => self.sys_newfstatat(a[0] as i32, a[1], a[2], a[3] as i32),
            Sysno::statx => self.sys_statx(a[0] as i32, a[1], a[2] as i32, a[4]),
            Sysno::access => self.sys_faccessat(libc::AT_FDCWD, a[0], a[1] as i32, 0),
            Sysno::faccessat => self.sys_faccessat(a[0] as i32, a[1], a[2] as i32, 0),
            Sysno::faccessat2 => self.sys_faccessat(a[0] as i32, a[1], a[2] as i32, a[3] as i32),
            Sysno::readlink => self.sys_readlinkat(libc::AT_FDCWD, a[0], a[1], a[2]),
            Sysno::readlinkat => self.sys_readlinkat(a[0] as i32, a[1], a[2], a[3]),
            Sysno::getcwd => self.sys_getcwd(a[0], a[1]),
            Sysno::chdir => self.sys_chdir(a[0]),
            Sysno::mkdir => self.sys_mkdirat(libc::AT_FDCWD, a[0], a[1] as u32),
            Sysno::mkdirat => self.sys_mkdirat(a[0] as i32, a[1], a[2] as u32),
            Sysno::unlink => self.sys_unlinkat(libc::AT_FDCWD, a[0], 0),
            Sysno::unlinkat => self.sys_unlinkat(a[0] as i32, a[1], a[2] as i32),
            Sysno::rmdir => self.sys_unlinkat(libc::AT_FDCWD, a[0], libc::AT_REMOVEDIR),
            Sysno::rename => self.sys_renameat(libc::AT_FDCWD, a[0], libc::AT_FDCWD, a[1], 0),
            Sysno::renameat => self.sys_renameat(a[0] as i32, a[1], a[2] as i32, a[3], 0),
            Sysno::renameat2 => {
                self.sys_renameat(a[0] as i32, a[1], a[2] as i32, a[3], a[4] as u32)
            }
            Sysno::symlink => self.sys_symlinkat(a[0], libc::AT_FDCWD, a[1]),
            Sysno::symlinkat => self.sys_symlinkat(a[0], a[1] as i32, a[2]),
            Sysno::link => self.sys_linkat(libc::AT_FDCWD, a[0], libc::AT_FDCWD, a[1], 0),
            Sysno::linkat => self.sys_linkat(a[0] as i32, a[1], a[2] as i32, a[3], a[4] as i32),
            Sysno::truncate => self.sys_truncate(a[0], a[1] as i64),
            Sysno::chmod => self.sys_fchmodat(libc::AT_FDCWD, a[0], a[1] as u32),
            Sysno::fchmodat => self.sys_fchmodat(a[0] as i32, a[1], a[2] as u32),
            Sysno::chown => self.sys_chown(libc::AT_FDCWD, a[0], a[1] as u32, a[2] as u32, 0),
            Sysno::lchown => self.sys_chown(
                libc::AT_FDCWD,
                a[0],
                a[1] as u32,
                a[2] as u32,
                libc::AT_SYMLINK_NOFOLLOW,
            ),
            Sysno::fchownat => {
                self.sys_chown(a[0] as i32, a[1], a[2] as u32, a[3] as u32, a[4] as i32)
            }
            Sysno::utimensat => self.sys_utimensat(a[0] as i32, a[1], a[2], a[3] as i32),
            Sysno::statfs => self.sys_statfs(a[0], a[1]),
            Sysno::mknod => self.sys_mknodat(libc::AT_FDCWD, a[0], a[1] as u32),
            Sysno::mknodat => self.sys_mknodat(a[0] as i32, a[1], a[2] as u32),
            Sysno::getxattr | Sysno::setxattr | Sysno::listxattr | Sysno::removexattr => {
                self.sys_xattr_path(a[0], true)
            }
            Sysno::lgetxattr | Sysno::lsetxattr | Sysno::llistxattr | Sysno::lremovexattr => {
                self.sys_xattr_path(a[0], false)
            }
            Sysno::fgetxattr | Sysno::fsetxattr | Sysno::flistxattr | Sysno::fremovexattr => {
                self.sys_xattr_fd(a[0] as i32)
            }
            Sysno::umask => Ok(u64::from(std::mem::replace(
                &mut self.umask,
                a[0] as u32 & 0o777,
            ))),

            // Process.
            Sysno::exit => self.sys_exit(a[0] as i32),
            Sysno::exit_group => Err(Stop::Exit(ExitReason::Exited(a[0] as i32))),
            Sysno::arch_prctl => self.sys_arch_prctl(a[0] as i32, a[1], ctx),
            Sysno::set_tid_address => {
                self.threads.set_clear_child_tid(a[0]);
                Ok(u64::from(self.shown(self.threads.current())))
            }
            Sysno::set_robust_list => self.sys_set_robust_list(a[0], a[1]),
            Sysno::get_robust_list => {
                let tid = self.named(i64::from(a[0] as i32)) as i32;
                self.sys_get_robust_list(tid, a[1], a[2])
            }
            Sysno::rseq => Err(Errno::ENOSYS.into()),
            Sysno::clone => self.sys_clone(a[0], a[1], a[2], a[3], a[4], ctx, fpu),
            Sysno::clone3 => self.sys_clone3(a[0], a[1], ctx, fpu),
            // Ids cross here in both directions: `shown` for what a program is told,
            // `named` for what it passes (the first process's id differs per fork).
            Sysno::getpid => Ok(u64::from(self.shown(self.pid()))),
            Sysno::gettid => Ok(u64::from(self.shown(self.threads.current()))),
            Sysno::getppid => self.sys_getppid().map(|p| self.shown_u64(p)),
            Sysno::getpgrp => self.sys_getpgid(0).map(|p| self.shown_u64(p)),
            Sysno::getpgid => self
                .sys_getpgid(self.named(i64::from(a[0] as i32)))
                .map(|p| self.shown_u64(p)),
            Sysno::getsid => self
                .sys_getsid(self.named(i64::from(a[0] as i32)))
                .map(|p| self.shown_u64(p)),
            Sysno::setpgid => self.sys_setpgid(
                self.named(i64::from(a[0] as i32)),
                self.named(i64::from(a[1] as i32)),
            ),
            Sysno::setsid => self.sys_setsid(),
            Sysno::fork => self.sys_fork(procs::NewProcess::plain(0), ctx, fpu),
            Sysno::vfork => self.sys_fork(
                procs::NewProcess::plain(thread::CLONE_VM | thread::CLONE_VFORK),
                ctx,
                fpu,
            ),
            Sysno::execve => self.sys_execve(libc::AT_FDCWD, a[0], a[1], a[2], 0),
            Sysno::execveat => self.sys_execve(a[0] as i32, a[1], a[2], a[3], a[4] as i32),
            Sysno::getuid => self.sys_getid(Ids::User, 0),
            Sysno::geteuid => self.sys_getid(Ids::User, 1),
            Sysno::getgid => self.sys_getid(Ids::Group, 0),
            Sysno::getegid => self.sys_getid(Ids::Group, 1),
            Sysno::getresuid => self.sys_getresid(Ids::User, [a[0], a[1], a[2]]),
            Sysno::getresgid => self.sys_getresid(Ids::Group, [a[0], a[1], a[2]]),
            Sysno::getgroups => self.sys_getgroups(a[0] as i32, a[1]),
            Sysno::setgroups => self.sys_setgroups(a[0], a[1]),
            Sysno::setuid => self.sys_setid(Ids::User, a[0] as u32),
            Sysno::setgid => self.sys_setid(Ids::Group, a[0] as u32),
            Sysno::setreuid => self.sys_setreid(Ids::User, a[0] as u32, a[1] as u32),
            Sysno::setregid => self.sys_setreid(Ids::Group, a[0] as u32, a[1] as u32),
            Sysno::setresuid => {
                self.sys_setresid(Ids::User, [a[0] as u32, a[1] as u32, a[2] as u32])
            }
            Sysno::setresgid => {
                self.sys_setresid(Ids::Group, [a[0] as u32, a[1] as u32, a[2] as u32])
            }
            Sysno::setfsuid => self.sys_setfsid(Ids::User),
            Sysno::setfsgid => self.sys_setfsid(Ids::Group),
            Sysno::uname => self.sys_uname(a[0]),
            Sysno::sethostname => self.sys_set_name(a[0], a[1], false),
            Sysno::setdomainname => self.sys_set_name(a[0], a[1], true),
            Sysno::sysinfo => self.sys_sysinfo(a[0]),
            Sysno::prlimit64 => {
                let pid = self.named(i64::from(a[0] as i32)) as i32;
                self.sys_prlimit64(pid, a[1] as u32, a[2], a[3])
            }
            Sysno::getrlimit => self.sys_prlimit64(0, a[0] as u32, 0, a[1]),
            Sysno::setrlimit => self.sys_prlimit64(0, a[0] as u32, a[1], 0),
            Sysno::getrusage => self.sys_getrusage(a[0] as i32, a[1]),
            Sysno::times => self.sys_times(a[0]),
            Sysno::sched_getaffinity => {
                let pid = self.named(i64::from(a[0] as i32)) as i32;
                self.sys_sched_getaffinity(pid, a[1], a[2])
            }
            Sysno::sched_setaffinity => {
                self.sys_sched_setaffinity(self.named(i64::from(a[0] as i32)), a[1], a[2])
            }
            Sysno::sched_yield => self.sys_sched_yield(),
            Sysno::sched_getscheduler => {
                self.sys_sched_getscheduler(self.named(i64::from(a[0] as i32)))
            }
            Sysno::sched_setscheduler => self.sys_sched_setscheduler(
                self.named(i64::from(a[0] as i32)),
                Some(a[1] as i32),
                a[2],
            ),
            Sysno::sched_setparam => {
                self.sys_sched_setscheduler(self.named(i64::from(a[0] as i32)), None, a[1])
            }
            Sysno::sched_getparam => {
                self.sys_sched_getparam(self.named(i64::from(a[0] as i32)), a[1])
            }
            Sysno::sched_get_priority_max => self.sys_sched_priority(a[0] as i32, true),
            Sysno::sched_get_priority_min => self.sys_sched_priority(a[0] as i32, false),
            Sysno::sched_rr_get_interval => {
                self.sys_sched_rr_get_interval(self.named(i64::from(a[0] as i32)), a[1])
            }
            Sysno::getpriority => self.sys_getpriority(a[0] as i32, a[1] as u32),
            Sysno::setpriority => self.sys_setpriority(a[0] as i32, a[1] as u32, a[2] as i32),
            Sysno::getcpu => self.sys_getcpu(a[0], a[1]),
            Sysno::prctl => self.sys_prctl(a[0] as i32, a[1]),
            Sysno::capget => self.sys_capget(a[1]),
            Sysno::futex => self.sys_futex(a[0], a[1] as i32, a[2] as u32, a[3], a[4], a[5] as u32),
            Sysno::wait4 => {
                let pid = self.named(i64::from(a[0] as i32));
                self.sys_wait4(pid, a[1], a[2] as i32, a[3])
            }
            Sysno::waitid => {
                // P_PID and P_PGID name a process or group; P_ALL and P_PIDFD do not.
                let id = match a[0] as u32 {
                    libc::P_PID | libc::P_PGID => self.named(a[1] as i64) as u64,
                    _ => a[1],
                };
                self.sys_waitid(a[0] as i32, id, a[2], a[3] as i32, a[4])
            }
            Sysno::kill => self.sys_kill(self.named(i64::from(a[0] as i32)), a[1] as i32),
            Sysno::tgkill => {
                let (tgid, tid) = (self.named(a[0] as i64), self.named(a[1] as i64));
                self.sys_tgkill(tgid, tid, a[2] as i32)
            }
            Sysno::tkill => {
                let tid = self.named(a[0] as i64);
                self.sys_tgkill(i64::from(self.pid()), tid, a[1] as i32)
            }

            // Signals.
            Sysno::rt_sigaction => self.sys_rt_sigaction(a[0] as i32, a[1], a[2], a[3]),
            Sysno::rt_sigprocmask => self.sys_rt_sigprocmask(a[0] as i32, a[1], a[2], a[3]),
            Sysno::sigaltstack => self.sys_sigaltstack(a[0], a[1], ctx.regs.rsp),
            Sysno::rt_sigpending => self.sys_rt_sigpending(a[0], a[1]),
            Sysno::rt_sigsuspend => self.sys_rt_sigsuspend(a[0], a[1]),
            Sysno::pause => self.sys_pause(),
            Sysno::rt_sigtimedwait => self.sys_rt_sigtimedwait(a[0], a[1], a[2], a[3]),
            Sysno::rt_sigqueueinfo => {
                self.sys_rt_sigqueueinfo(self.named(a[0] as i64), None, a[1] as i32, a[2])
            }
            Sysno::rt_tgsigqueueinfo => {
                let (tgid, tid) = (self.named(a[0] as i64), self.named(a[1] as i64));
                self.sys_rt_sigqueueinfo(tgid, Some(tid), a[2] as i32, a[3])
            }
            Sysno::alarm => self.sys_alarm(a[0] as u32),
            Sysno::setitimer => self.sys_setitimer(a[0] as i32, a[1], a[2]),
            Sysno::getitimer => self.sys_getitimer(a[0] as i32, a[1]),
            Sysno::timer_create => self.sys_timer_create(a[0] as i32, a[1], a[2]),
            Sysno::timer_settime => {
                self.sys_timer_settime(a[0] as i32 as i64, a[1] as i32, a[2], a[3])
            }
            Sysno::timer_gettime => self.sys_timer_gettime(a[0] as i32 as i64, a[1]),
            Sysno::timer_getoverrun => self.sys_timer_getoverrun(a[0] as i32 as i64),
            Sysno::timer_delete => self.sys_timer_delete(a[0] as i32 as i64),
            Sysno::rt_sigreturn => match self.sys_rt_sigreturn(ctx, fpu) {
                Ok(()) => Err(Stop::Replaced),
                Err(reason) => Err(Stop::Exit(reason)),
            },

            // Time.
            Sysno::clock_gettime => self.sys_clock_gettime(a[0] as i32, a[1]),
            Sysno::clock_getres => self.sys_clock_getres(a[0] as i32, a[1]),
            Sysno::gettimeofday => self.sys_gettimeofday(a[0]),
            Sysno::time => self.sys_time(a[0]),
            Sysno::nanosleep => self.sys_nanosleep(a[0], a[1]),
            Sysno::clock_nanosleep => {
                self.sys_clock_nanosleep(a[0] as i32, a[1] as i32, a[2], a[3])
            }

            // Entropy.
            Sysno::getrandom => self.sys_getrandom(a[0], a[1], a[2] as u32),

            Sysno::pipe => self.sys_pipe2(a[0], 0),
            Sysno::pipe2 => self.sys_pipe2(a[0], a[1] as i32),

            other => self.unsupported(other.name()),
        }
    }

    /// The current thread is returning to user mode with `ctx`: its pending signals are
    /// delivered first (a handler's frame replaces `ctx`: `Switched`).
    pub(crate) fn back_to_user(
        &mut self,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
        outcome: Outcome,
        interrupted: Option<crate::threads::SignalWake>,
    ) -> Outcome {
        match self.deliver_signals(ctx, fpu, interrupted) {
            Ok(true) => Outcome::Switched,
            Ok(false) => outcome,
            Err(reason) => Outcome::Exit(reason),
        }
    }

    /// A known syscall we deliberately refuse: counted like unsupported ones.
    fn refuse(&mut self, name: &'static str, errno: Errno) -> SysResult {
        self.stats.record_unsupported(name);
        tracing::debug!(syscall = name, errno = ?errno, "syscall refused in the sandbox");
        Err(errno.into())
    }

    fn unsupported(&mut self, name: &'static str) -> SysResult {
        self.stats.record_unsupported(name);
        tracing::debug!(syscall = name, "unsupported syscall");
        Err(Errno::ENOSYS.into())
    }
}
