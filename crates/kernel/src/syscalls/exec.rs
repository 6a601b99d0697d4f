//! `execve`/`execveat`: the current process gets a new image in fresh guest RAM (a new VM:
//! nothing of the old address space survives, as in Linux), keeping its pid, descriptors
//! (but close-on-exec ones), working directory, ignored signals and mask.

use syscalls::Errno;

use super::{ExitReason, Stop, SysResult};
use crate::context::UserContext;
use crate::errno::from_fs;
use crate::mm::AddressSpace;
use crate::pagetable::PageTables;
use crate::process::Process;
use crate::procs::Memory;
use crate::signals::{Disposition, SigAction};
use crate::threads::Threads;
use forkvm_image::Kind;

/// Longest path argument (`PATH_MAX`).
const PATH_MAX: usize = 4096;
/// Longest single argument or environment string (`MAX_ARG_STRLEN`).
const MAX_ARG_STRLEN: usize = 32 * 4096;
/// Room for arguments and environment together (Linux: a quarter of the 8 MiB stack).
const MAX_ARGS_BYTES: usize = 2 << 20;
/// `#!` interpreters that are scripts themselves, at most this deep (Linux allows 4).
const MAX_INTERPRETER_DEPTH: usize = 4;
/// How much of a file's start `#!` is read from (Linux's `BINPRM_BUF_SIZE`).
const SHEBANG_MAX: usize = 256;

/// What to load once the `#!` lines are followed.
struct Image {
    /// The ELF file to load.
    program: Vec<u8>,
    argv: Vec<Vec<u8>>,
}

impl Process {
    pub(crate) fn sys_execve(
        &mut self,
        dirfd: i32,
        path: u64,
        argv: u64,
        envp: u64,
        flags: i32,
    ) -> SysResult {
        if flags & !(libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let mut path = self.read_cstring(path, PATH_MAX - 1)?;
        self.refresh_proc(&path);
        if path.is_empty() {
            if flags & libc::AT_EMPTY_PATH == 0 {
                return Err(Errno::ENOENT.into());
            }
            // `fexecve`: the descriptor's file.
            path = self.files.get(dirfd)?.path.clone();
        } else if !path.starts_with(b"/") && dirfd != libc::AT_FDCWD {
            let mut full = self.base_dir(dirfd, &path)?;
            full.push(b'/');
            full.extend_from_slice(&path);
            path = full;
        }
        let mut budget = MAX_ARGS_BYTES;
        let argv = self.read_strings(argv, &mut budget)?;
        let envp = self.read_strings(envp, &mut budget)?;
        let image = self.follow_interpreters(&path, argv, flags)?;

        // The point of no return: from here a failure ends the process, as in Linux.
        let machine = self.machine.clone().ok_or(Errno::ENOSYS)?;
        let ram = machine.fresh_ram(self.ram.size()).map_err(|e| {
            tracing::warn!(error = %e, "fresh guest RAM for execve");
            Errno::ENOMEM
        })?;
        let tables = PageTables::for_ram(ram.size());
        tables.build_fixed(&ram).map_err(|_| Errno::ENOMEM)?;
        let mut memory = Memory {
            mm: AddressSpace::new(self.mm.layout(), self.mm.limit_bytes()),
            tables,
            ram,
            stale: rangemap::RangeMap::new(),
            vdso: None,
        };
        self.exchange_memory(&mut memory);
        self.give_back_or_retire(memory);
        self.forget_unused_segments();
        let entry = match self.load_program(&image.program, &path, &image.argv, &envp) {
            Ok(entry) => entry,
            Err(e) => {
                tracing::debug!(error = %e, "execve failed past its point of no return");
                return Err(Stop::Exit(ExitReason::Signaled(libc::SIGSEGV)));
            }
        };
        let cloexec: Vec<i32> = self
            .files
            .fds()
            .filter(|&fd| self.files.cloexec(fd).unwrap_or(false))
            .collect();
        for fd in cloexec {
            let _ = self.close_fd(fd);
        }
        // Handlers are gone with the old image; ignored signals stay ignored.
        for signal in 1..=self.signals.actions.len() as i32 {
            if matches!(self.signals.disposition(signal), Disposition::Handle(_)) {
                self.signals.actions[signal as usize - 1] = SigAction::default();
            }
        }
        self.timers.posix.clear();
        let pid = self.pid();
        let mask = self.threads.current_mask();
        let mut context = UserContext::default();
        context.regs.rip = entry.rip;
        context.regs.rsp = entry.rsp;
        context.regs.rflags = 0x202;
        // The new image starts on a new vCPU, whose vector state is already the clean one
        // a program starts with: the thread owns it as it is.
        self.threads = Threads::forked(pid, context, Default::default());
        self.threads.set_fpu_owner(pid);
        self.threads.set_current_mask(mask);
        self.set_cmdline(&image.argv);
        if let Some(entry) = self.procs.entries.get_mut(&pid) {
            entry.execed = true;
        }
        Err(Stop::Exec)
    }

    /// The memory the process used before `execve`: a `vfork` child gives it back to its
    /// parent (whose `vfork` then returns); otherwise the VMM retires it.
    fn give_back_or_retire(&mut self, memory: Memory) {
        let pid = self.pid();
        let lender = self
            .procs
            .entries
            .get_mut(&pid)
            .and_then(|e| e.borrows_from.take());
        match lender.and_then(|l| self.procs.parked.get_mut(&l).map(|p| (l, p))) {
            Some((_, parked)) => {
                parked.memory = Some(memory);
                parked.own.threads.vfork_done(pid);
            }
            None => self.procs.retired.push(memory.ram),
        }
    }

    /// Reads a NULL-terminated array of strings (`argv`, `envp`), charging each string and
    /// pointer to `budget` (`E2BIG` when it runs out).
    fn read_strings(&self, addr: u64, budget: &mut usize) -> Result<Vec<Vec<u8>>, Errno> {
        let mut out = Vec::new();
        if addr == 0 {
            return Ok(out);
        }
        for index in 0u64.. {
            let ptr = self.read_u64(addr.checked_add(index * 8).ok_or(Errno::EFAULT)?)?;
            if ptr == 0 {
                break;
            }
            let s = self.read_cstring(ptr, MAX_ARG_STRLEN - 1).map_err(|e| {
                if e == Errno::ENAMETOOLONG {
                    Errno::E2BIG
                } else {
                    e
                }
            })?;
            *budget = budget.checked_sub(s.len() + 1 + 8).ok_or(Errno::E2BIG)?;
            out.push(s);
        }
        Ok(out)
    }

    /// Checks `path` is an executable regular file, and follows `#!` lines to the ELF
    /// file that runs it, with the arguments the interpreters get.
    fn follow_interpreters(
        &self,
        path: &[u8],
        mut argv: Vec<Vec<u8>>,
        flags: i32,
    ) -> Result<Image, Errno> {
        let mut program = path.to_vec();
        for depth in 0..=MAX_INTERPRETER_DEPTH {
            let follow = depth > 0 || flags & libc::AT_SYMLINK_NOFOLLOW == 0;
            let resolved = self
                .fs
                .resolve(&self.cwd, &program, follow)
                .map_err(from_fs)?;
            let stat = self.fs.stat(resolved.node).map_err(from_fs)?;
            match stat.kind {
                Kind::File if stat.mode & 0o111 != 0 => {}
                Kind::Symlink => return Err(Errno::ELOOP),
                _ => return Err(Errno::EACCES),
            }
            let mut head = [0u8; SHEBANG_MAX];
            let n = self
                .fs
                .read_at(resolved.node, 0, &mut head)
                .map_err(from_fs)?;
            let head = &head[..n];
            if head.starts_with(b"\x7fELF") {
                return Ok(Image { program, argv });
            }
            let Some(line) = head.strip_prefix(b"#!") else {
                return Err(Errno::ENOEXEC);
            };
            let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = line.trim_ascii();
            let split = line
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .unwrap_or(line.len());
            let (interpreter, argument) = (&line[..split], line[split..].trim_ascii());
            if interpreter.is_empty() {
                return Err(Errno::ENOEXEC);
            }
            // The interpreter gets its name, its one argument, the script's path, and the
            // script's arguments after its own name.
            let mut next = vec![interpreter.to_vec()];
            if !argument.is_empty() {
                next.push(argument.to_vec());
            }
            next.push(program.clone());
            next.extend(argv.into_iter().skip(1));
            argv = next;
            program = interpreter.to_vec();
        }
        Err(Errno::ELOOP)
    }
}
