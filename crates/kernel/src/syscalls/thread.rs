//! Threads: `clone`/`clone3` as `pthread_create` makes them, a thread's `exit`, robust futex
//! lists, `sched_yield`, and `tgkill`'s addressing. `clone` of a new process goes to
//! `procs::sys_fork`.

use std::mem::size_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use super::procs::NewProcess;
use super::{ExitReason, Stop, SysResult};
use crate::abi::from_prefix;
use crate::context::{Fpu, UserContext};
use crate::process::Process;
use crate::threads::Tid;

pub(crate) const CLONE_VM: u64 = 0x100;
pub(crate) const CLONE_FS: u64 = 0x200;
pub(crate) const CLONE_FILES: u64 = 0x400;
pub(crate) const CLONE_SIGHAND: u64 = 0x800;
pub(crate) const CLONE_PIDFD: u64 = 0x1000;
pub(crate) const CLONE_VFORK: u64 = 0x4000;
pub(crate) const CLONE_THREAD: u64 = 0x10000;
pub(crate) const CLONE_SYSVSEM: u64 = 0x40000;
pub(crate) const CLONE_SETTLS: u64 = 0x80000;
pub(crate) const CLONE_PARENT_SETTID: u64 = 0x100000;
pub(crate) const CLONE_CHILD_CLEARTID: u64 = 0x200000;
pub(crate) const CLONE_DETACHED: u64 = 0x400000;
pub(crate) const CLONE_CHILD_SETTID: u64 = 0x1000000;

/// What a thread needs: one address space, descriptor table and signal handlers.
const THREAD_FLAGS: u64 = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD;
/// Flags a thread may add.
const THREAD_OPTIONS: u64 = CLONE_SYSVSEM
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID
    | CLONE_DETACHED
    | CLONE_CHILD_SETTID;

/// `struct clone_args` (`clone3`), as far as its first version reaches.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

// SAFETY: `repr(C)` and only `u64`s: no padding, every byte pattern is a value.
unsafe impl ByteValued for CloneArgs {}

const _: () = assert!(size_of::<CloneArgs>() == 64);

/// `struct robust_list_head`: the list pointer, the futex word's offset in an entry, and
/// the entry being added or removed.
const ROBUST_LIST_HEAD_SIZE: u64 = 24;
/// Entries of a robust list walked at most (Linux's `ROBUST_LIST_LIMIT`).
const ROBUST_LIST_LIMIT: usize = 2048;
const FUTEX_WAITERS: u32 = 0x8000_0000;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// A new thread's places: its stack, TLS, and the tid words to set or clear.
struct NewThread {
    flags: u64,
    stack: u64,
    tls: u64,
    parent_tid: u64,
    child_tid: u64,
}

/// Where a `clone` child (thread or process) starts: the caller's registers, `clone`
/// returning 0, on `stack` if one was given, with the TLS base `CLONE_SETTLS` asks for.
pub(crate) fn child_context(ctx: &UserContext, flags: u64, stack: u64, tls: u64) -> UserContext {
    let mut child = *ctx;
    child.regs.rax = 0;
    if stack != 0 {
        child.regs.rsp = stack;
    }
    if flags & CLONE_SETTLS != 0 {
        child.fs_base = tls;
    }
    child
}

impl Process {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sys_clone(
        &mut self,
        flags: u64,
        stack: u64,
        parent_tid: u64,
        child_tid: u64,
        tls: u64,
        ctx: &UserContext,
        fpu: &mut dyn Fpu,
    ) -> SysResult {
        // The low byte is the signal sent to the parent when a child process ends.
        let exit_signal = flags & 0xff;
        let flags = flags & !0xff;
        if flags & CLONE_THREAD != 0 && exit_signal != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & CLONE_THREAD == 0 {
            let new = NewProcess {
                flags,
                exit_signal: exit_signal as i32,
                stack,
                tls,
                parent_tid,
                child_tid,
            };
            return self.sys_fork(new, ctx, fpu);
        }
        self.spawn_thread(
            NewThread {
                flags,
                stack,
                tls,
                parent_tid,
                child_tid,
            },
            ctx,
            fpu,
        )
    }

    pub(crate) fn sys_clone3(
        &mut self,
        args: u64,
        size: u64,
        ctx: &UserContext,
        fpu: &mut dyn Fpu,
    ) -> SysResult {
        let known = size_of::<CloneArgs>() as u64;
        if size < known || size > 4096 {
            return Err(Errno::EINVAL.into());
        }
        let bytes = self.read_user(args, size as usize)?;
        // Fields past the ones we know (set_tid, cgroup, …) must be zero.
        if bytes[known as usize..].iter().any(|&b| b != 0) {
            return Err(Errno::E2BIG.into());
        }
        let parsed: CloneArgs = from_prefix(&bytes);
        if parsed.exit_signal != 0 && parsed.flags & CLONE_THREAD != 0 {
            return Err(Errno::EINVAL.into());
        }
        let stack = match (parsed.stack, parsed.stack_size) {
            (0, 0) => 0,
            (base, size) if base != 0 && size != 0 => {
                base.checked_add(size).ok_or(Errno::EINVAL)?
            }
            _ => return Err(Errno::EINVAL.into()),
        };
        if parsed.flags & CLONE_THREAD == 0 {
            let new = NewProcess {
                flags: parsed.flags,
                exit_signal: i32::try_from(parsed.exit_signal).map_err(|_| Errno::EINVAL)?,
                stack,
                tls: parsed.tls,
                parent_tid: parsed.parent_tid,
                child_tid: parsed.child_tid,
            };
            return self.sys_fork(new, ctx, fpu);
        }
        self.spawn_thread(
            NewThread {
                flags: parsed.flags,
                stack,
                tls: parsed.tls,
                parent_tid: parsed.parent_tid,
                child_tid: parsed.child_tid,
            },
            ctx,
            fpu,
        )
    }

    /// Creates a thread that resumes from the caller's `clone` with `rax` 0, on `stack`,
    /// with the caller's registers and vector state otherwise.
    fn spawn_thread(&mut self, new: NewThread, ctx: &UserContext, fpu: &mut dyn Fpu) -> SysResult {
        let flags = new.flags;
        if flags & CLONE_VFORK != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & THREAD_FLAGS != THREAD_FLAGS || flags & CLONE_PIDFD != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & !(THREAD_FLAGS | THREAD_OPTIONS) != 0 {
            // Namespaces, ptrace, cgroups: nothing a thread in the sandbox can have.
            return Err(Errno::EPERM.into());
        }
        for (flag, addr) in [
            (CLONE_PARENT_SETTID, new.parent_tid),
            (CLONE_CHILD_SETTID, new.child_tid),
            (CLONE_CHILD_CLEARTID, new.child_tid),
        ] {
            if flags & flag != 0 {
                self.check_user(addr, 4)?;
            }
        }
        let child = child_context(ctx, flags, new.stack, new.tls);
        let clear_child_tid = if flags & CLONE_CHILD_CLEARTID != 0 {
            new.child_tid
        } else {
            0
        };
        if !self.threads.has_room() {
            return Err(Errno::EAGAIN.into());
        }
        let tid = self.procs.alloc_id()?;
        let tid = self
            .threads
            .spawn(tid, child, fpu.save(), clear_child_tid)?;
        for (flag, addr) in [
            (CLONE_PARENT_SETTID, new.parent_tid),
            (CLONE_CHILD_SETTID, new.child_tid),
        ] {
            if flags & flag != 0 {
                self.write_obj(addr, &tid)?;
            }
        }
        Ok(u64::from(tid))
    }

    /// `exit`: ends the calling thread; the last thread's exit ends the process.
    pub(crate) fn sys_exit(&mut self, status: i32) -> SysResult {
        if self.threads.count() <= 1 {
            return Err(Stop::Exit(ExitReason::Exited(status)));
        }
        let tid = self.threads.current();
        self.release_robust_futexes(tid);
        let clear_child_tid = self.threads.remove_current();
        // glibc's `pthread_join` waits on this word: zero it and wake one waiter.
        if clear_child_tid != 0 && self.write_obj(clear_child_tid, &0u32).is_ok() {
            self.threads.futex_wake(clear_child_tid, u32::MAX, 1);
        }
        Err(Stop::ThreadExit)
    }

    pub(crate) fn sys_set_robust_list(&mut self, head: u64, len: u64) -> SysResult {
        if len != ROBUST_LIST_HEAD_SIZE {
            return Err(Errno::EINVAL.into());
        }
        self.threads.set_robust_list(head);
        Ok(0)
    }

    pub(crate) fn sys_get_robust_list(&mut self, tid: i32, head: u64, len: u64) -> SysResult {
        if tid != 0 && tid as u32 != self.threads.current() {
            return Err(if self.threads.exists(tid as Tid) {
                Errno::EPERM
            } else {
                Errno::ESRCH
            }
            .into());
        }
        self.write_u64(head, self.threads.robust_list())?;
        self.write_u64(len, ROBUST_LIST_HEAD_SIZE)?;
        Ok(0)
    }

    /// Marks the robust mutexes thread `tid` still holds as abandoned (`FUTEX_OWNER_DIED`)
    /// and wakes a waiter of each, as Linux does when a thread dies holding them. The list
    /// is the program's own memory: a bad pointer or a loop just ends the walk.
    fn release_robust_futexes(&mut self, tid: Tid) {
        let head = self.threads.robust_list();
        if head == 0 {
            return;
        }
        let read = |process: &Process, addr: u64| process.read_obj::<u64>(addr).ok();
        let Some(offset) = read(self, head.wrapping_add(8)) else {
            return;
        };
        let pending = read(self, head.wrapping_add(16)).unwrap_or(0);
        let mut entries = Vec::new();
        let mut entry = read(self, head).unwrap_or(head);
        while entry != head && entry != 0 && entries.len() < ROBUST_LIST_LIMIT {
            entries.push(entry);
            match read(self, entry) {
                Some(next) => entry = next,
                None => break,
            }
        }
        if pending != 0 {
            entries.push(pending);
        }
        for entry in entries {
            // The low bit marks a priority-inheritance futex, which is never offered here.
            let word_addr = (entry & !1).wrapping_add(offset);
            let Ok(word) = self.read_obj::<u32>(word_addr) else {
                continue;
            };
            if word & FUTEX_TID_MASK != tid {
                continue;
            }
            let released = (word & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
            if self.write_obj(word_addr, &released).is_ok() && word & FUTEX_WAITERS != 0 {
                self.threads.futex_wake(word_addr, u32::MAX, 1);
            }
        }
    }

    pub(crate) fn sys_sched_yield(&mut self) -> SysResult {
        if self.threads.count() > 1 {
            return Err(Stop::Yield);
        }
        Ok(0)
    }
}
