//! `/proc` as files, for the programs that read it that way: `ps`, `top`, psutil, `pgrep`,
//! libraries that look up memory or CPU counts.
//!
//! The tree is written into the sandbox's filesystem overlay just before a path under
//! `/proc` is looked up (`refresh_proc`), so every syscall that takes a path (open, stat,
//! readlink, getdents of the directory) sees it as ordinary files, directories and links,
//! current as of that lookup, as a read of Linux's procfs is current as of the read. The
//! files that describe the caller's own memory (`/proc/self/maps` and the like) and its
//! descriptors stay generated on open (`procfs`, `syscalls::fs`).
//!
//! What is written: `meminfo`, `cpuinfo`, `stat`, `uptime`, `loadavg`, `version`, the
//! `self` link, and for each process a directory with `stat`, `status`, `statm`, `cmdline`,
//! `comm`, `environ` (empty), links `exe` and `cwd`, and `fd/` with a link per descriptor.

use std::fmt::Write as _;

use forkvm_image::{FsError, Kind, NodeId};

use crate::process::Process;
use crate::procs::{Entry, Life, Pid};
use crate::threads::monotonic_ns;
use forkvm_memory::ram::PAGE_SIZE;

/// Clock ticks per second (`AT_CLKTCK`, `sysconf(_SC_CLK_TCK)`).
const TICKS: u64 = 100;

/// What a lookup under `/proc` needs written.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// `/proc`'s own files (`/proc/meminfo`).
    Top,
    /// Those and one process's directory (`/proc/7/stat`, `/proc/self/status`).
    Process(Pid),
    /// Everything: `/proc` itself is being listed or entered.
    All,
}

/// What `/proc/[pid]` shows of one process.
struct Described {
    pid: Pid,
    entry: Entry,
    state: char,
    threads: usize,
    mapped: u64,
    resident_pages: u64,
    exe: Vec<u8>,
    cwd: Vec<u8>,
    fds: Vec<(i32, Vec<u8>)>,
}

impl Process {
    /// Writes the `/proc` tree if `path` (as the program gave it) may lead into it. Failures
    /// (the overlay full, say) are logged: the lookup then sees what is there.
    pub(crate) fn refresh_proc(&mut self, path: &[u8]) {
        let under_proc = |p: &[u8]| p == b"/proc" || p.starts_with(b"/proc/");
        if !(under_proc(path) || (!path.starts_with(b"/") && under_proc(&self.cwd))) {
            return;
        }
        let scope = match path.strip_prefix(b"/proc/") {
            _ if !path.starts_with(b"/") => Scope::All,
            Some(rest) => {
                let name = rest.split(|&b| b == b'/').next().unwrap_or_default();
                match name {
                    b"" => Scope::All,
                    b"self" | b"thread-self" => Scope::Process(self.pid()),
                    _ => std::str::from_utf8(name)
                        .ok()
                        .and_then(|n| n.parse::<Pid>().ok())
                        .and_then(|n| Pid::try_from(self.named(i64::from(n))).ok())
                        .map_or(Scope::Top, Scope::Process),
                }
            }
            None => Scope::All,
        };
        if let Err(e) = self.write_proc_tree(scope) {
            tracing::debug!(error = %e, "writing /proc");
        }
    }

    /// Writes `/proc`'s own files, and the process directories `scope` reaches (a lookup of
    /// `/proc/7/stat` needs process 7's alone: `ps` opens a few files per process).
    fn write_proc_tree(&mut self, scope: Scope) -> Result<(), FsError> {
        let root = self.fs.root();
        let proc_dir = self.dir_in(root, b"proc")?;
        self.write_top_files(proc_dir)?;
        let pids: Vec<Pid> = match scope {
            Scope::Top => return Ok(()),
            Scope::Process(pid) => vec![pid],
            Scope::All => {
                // Directories of processes that are gone go.
                let listed: Vec<Vec<u8>> = self
                    .fs
                    .read_dir(proc_dir)?
                    .into_iter()
                    .map(|e| e.name)
                    .filter(|name| name.iter().all(u8::is_ascii_digit))
                    .collect();
                for name in listed {
                    let gone = std::str::from_utf8(&name)
                        .ok()
                        .and_then(|n| n.parse::<Pid>().ok())
                        .is_none_or(|pid| {
                            !self.procs.entries.keys().any(|&p| self.shown(p) == pid)
                        });
                    if gone {
                        self.remove_tree(proc_dir, &name)?;
                    }
                }
                self.procs.entries.keys().copied().collect()
            }
        };
        for pid in pids {
            if self.procs.entries.contains_key(&pid) {
                let described = self.describe(pid);
                self.write_process_dir(proc_dir, &described)?;
            } else {
                self.remove_tree(proc_dir, self.shown(pid).to_string().as_bytes())?;
            }
        }
        Ok(())
    }

    /// `meminfo`, `cpuinfo`, `uptime`, `loadavg`, `stat`, `version` and the `self` link.
    fn write_top_files(&mut self, proc_dir: NodeId) -> Result<(), FsError> {
        let total = self.procs.entries.len();
        let running = 1 + self
            .procs
            .parked
            .values()
            .filter(|p| p.own.threads.has_runnable())
            .count();
        let last = self.procs.entries.keys().max().copied().unwrap_or(1);
        let now = monotonic_ns();
        let uptime = now.saturating_sub(self.procs.boot_ns);
        self.put(proc_dir, b"meminfo", self.meminfo().as_bytes())?;
        self.put(proc_dir, b"cpuinfo", cpuinfo().as_bytes())?;
        self.put(
            proc_dir,
            b"uptime",
            format!(
                "{0}.{1:02} {0}.{1:02}\n",
                uptime / 1_000_000_000,
                uptime / 10_000_000 % 100
            )
            .as_bytes(),
        )?;
        self.put(
            proc_dir,
            b"loadavg",
            format!("0.00 0.00 0.00 {running}/{total} {last}\n").as_bytes(),
        )?;
        let boot_epoch =
            crate::vdso::host_ns(libc::CLOCK_REALTIME).saturating_sub(uptime) / 1_000_000_000;
        let ticks = uptime / (1_000_000_000 / TICKS);
        self.put(
            proc_dir,
            b"stat",
            format!(
                "cpu  {ticks} 0 0 0 0 0 0 0 0 0\ncpu0 {ticks} 0 0 0 0 0 0 0 0 0\nintr 0\nctxt 0\n\
                 btime {boot_epoch}\nprocesses {last}\nprocs_running {running}\nprocs_blocked 0\n"
            )
            .as_bytes(),
        )?;
        self.put(
            proc_dir,
            b"version",
            b"Linux version 6.1.0-forkvm (forkvm) #1 SMP PREEMPT_DYNAMIC forkvm\n",
        )?;
        self.put_link(
            proc_dir,
            b"self",
            self.shown(self.pid()).to_string().as_bytes(),
        )
    }

    fn describe(&mut self, pid: Pid) -> Described {
        let entry = self.procs.entries[&pid].clone();
        let current = self.pid();
        let blank = |state| Described {
            pid,
            entry: entry.clone(),
            state,
            threads: 0,
            mapped: 0,
            resident_pages: 0,
            exe: Vec::new(),
            cwd: Vec::new(),
            fds: Vec::new(),
        };
        if entry.life != Life::Alive {
            return blank('Z');
        }
        let look = |p: &mut Process| {
            let runnable = p.threads.has_runnable() || p.threads.current_is_running();
            let resident_pages =
                p.mm.vmas()
                    .filter_map(|v| p.ram.residency(v.start, v.end).ok())
                    .map(|r| r.resident_pages)
                    .sum();
            Described {
                pid,
                entry: entry.clone(),
                state: if pid == current || runnable { 'R' } else { 'S' },
                threads: p.threads.count(),
                mapped: p.mm.mapped_bytes(),
                resident_pages,
                exe: p.exe_path.clone(),
                cwd: p.cwd.clone(),
                fds: p
                    .files
                    .fds()
                    .filter_map(|fd| p.files.get(fd).ok().map(|f| (fd, f.path.clone())))
                    .collect(),
            }
        };
        if pid == current {
            look(self)
        } else {
            self.with_process(pid, look)
        }
    }

    fn write_process_dir(&mut self, proc_dir: NodeId, d: &Described) -> Result<(), FsError> {
        let pid = self.shown(d.pid);
        let (ppid, pgid, sid) = (
            self.shown(d.entry.ppid),
            self.shown(d.entry.pgid),
            self.shown(d.entry.sid),
        );
        let dir = self.dir_in(proc_dir, pid.to_string().as_bytes())?;
        let comm: Vec<u8> = {
            let name = d.exe.rsplit(|&b| b == b'/').next().unwrap_or_default();
            name.iter().take(15).copied().collect()
        };
        let comm_text = String::from_utf8_lossy(&comm).into_owned();
        let e = &d.entry;
        let start_ticks = e.started_ns.saturating_sub(self.procs.boot_ns) / (1_000_000_000 / TICKS);
        let mut stat = format!(
            "{} ({comm_text}) {} {} {} {} 0 -1 4194304 0 0 0 0 0 0 0 0 20 0 {} 0 {start_ticks} {} {} {}",
            pid,
            d.state,
            ppid,
            pgid,
            sid,
            d.threads.max(1),
            d.mapped,
            d.resident_pages,
            u64::MAX,
        );
        // startcode … exit_code: addresses and counters nobody here needs, as zeros.
        for _ in 0..27 {
            stat.push_str(" 0");
        }
        stat.push('\n');
        self.put(dir, b"stat", stat.as_bytes())?;
        let state_name = match d.state {
            'R' => "R (running)",
            'Z' => "Z (zombie)",
            _ => "S (sleeping)",
        };
        let mut status = String::new();
        let _ = write!(
            status,
            "Name:\t{comm_text}\nUmask:\t0022\nState:\t{state_name}\nTgid:\t{0}\nNgid:\t0\nPid:\t{0}\n\
             PPid:\t{1}\nTracerPid:\t0\nUid:\t{2}\t{3}\t{4}\t{3}\nGid:\t{5}\t{6}\t{7}\t{6}\n\
             FDSize:\t64\nGroups:\t\nVmSize:\t{8} kB\nVmRSS:\t{9} kB\nThreads:\t{10}\n\
             SigQ:\t0/0\nCpus_allowed:\t1\nCpus_allowed_list:\t0\n",
            pid,
            ppid,
            e.creds.uid[0],
            e.creds.uid[1],
            e.creds.uid[2],
            e.creds.gid[0],
            e.creds.gid[1],
            e.creds.gid[2],
            d.mapped / 1024,
            d.resident_pages * PAGE_SIZE / 1024,
            d.threads,
        );
        self.put(dir, b"status", status.as_bytes())?;
        self.put(
            dir,
            b"statm",
            format!("{} {} 0 0 0 0 0\n", d.mapped / PAGE_SIZE, d.resident_pages).as_bytes(),
        )?;
        self.put(dir, b"cmdline", &e.cmdline)?;
        let mut comm_line = comm.clone();
        comm_line.push(b'\n');
        self.put(dir, b"comm", &comm_line)?;
        self.put(dir, b"environ", b"")?;
        if d.state == 'Z' {
            return Ok(());
        }
        self.put_link(dir, b"exe", &d.exe)?;
        self.put_link(dir, b"cwd", &d.cwd)?;
        self.remove_tree(dir, b"fd")?;
        let fd_dir = self.dir_in(dir, b"fd")?;
        for (fd, target) in &d.fds {
            self.put_link(fd_dir, fd.to_string().as_bytes(), target)?;
        }
        Ok(())
    }

    /// `/proc/meminfo`: the memory the current process may map is its total.
    fn meminfo(&self) -> String {
        let total = self.mm.limit_bytes() / 1024;
        let free = self.mm.limit_bytes().saturating_sub(self.mm.mapped_bytes()) / 1024;
        format!(
            "MemTotal:       {total} kB\nMemFree:        {free} kB\nMemAvailable:   {free} kB\n\
             Buffers:        0 kB\nCached:         0 kB\nSwapCached:     0 kB\nActive:         0 kB\n\
             Inactive:       0 kB\nSwapTotal:      0 kB\nSwapFree:       0 kB\nShmem:          0 kB\n"
        )
    }

    /// The directory `name` in `parent`, made if missing.
    fn dir_in(&mut self, parent: NodeId, name: &[u8]) -> Result<NodeId, FsError> {
        match self.fs.lookup(parent, name)? {
            Some(node) if self.fs.kind(node)? == Kind::Dir => Ok(node),
            Some(_) => {
                self.fs.unlink(parent, name)?;
                self.fs.mkdir(parent, name, 0o555)
            }
            None => self.fs.mkdir(parent, name, 0o555),
        }
    }

    /// Makes `name` in `dir` a read-only file holding `data`.
    fn put(&mut self, dir: NodeId, name: &[u8], data: &[u8]) -> Result<(), FsError> {
        let node = match self.fs.lookup(dir, name)? {
            Some(node) if self.fs.kind(node)? == Kind::File => {
                self.fs.truncate(node, 0)?;
                node
            }
            Some(_) => {
                self.remove_tree(dir, name)?;
                self.fs.create_file(dir, name, 0o444)?
            }
            None => self.fs.create_file(dir, name, 0o444)?,
        };
        self.fs.write_at(node, 0, data)?;
        Ok(())
    }

    /// Makes `name` in `dir` a symbolic link to `target`.
    fn put_link(&mut self, dir: NodeId, name: &[u8], target: &[u8]) -> Result<(), FsError> {
        if target.is_empty() {
            // Nothing to point at (a process that loaded no program).
            return self.remove_tree(dir, name);
        }
        if let Some(node) = self.fs.lookup(dir, name)? {
            if self.fs.kind(node)? == Kind::Symlink && self.fs.read_link(node)? == target {
                return Ok(());
            }
            self.remove_tree(dir, name)?;
        }
        self.fs.symlink(dir, name, target)?;
        Ok(())
    }

    /// Removes `name` from `dir`, with everything under it.
    fn remove_tree(&mut self, dir: NodeId, name: &[u8]) -> Result<(), FsError> {
        let Some(node) = self.fs.lookup(dir, name)? else {
            return Ok(());
        };
        if self.fs.kind(node)? != Kind::Dir {
            return self.fs.unlink(dir, name);
        }
        let children: Vec<Vec<u8>> = self
            .fs
            .read_dir(node)?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n != b"." && n != b"..")
            .collect();
        for child in children {
            self.remove_tree(node, &child)?;
        }
        self.fs.rmdir(dir, name)
    }
}

/// `/proc/cpuinfo` for the one CPU a sandbox has, named as the host's.
fn cpuinfo() -> String {
    let mut brand = Vec::new();
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let r = std::arch::x86_64::__cpuid(leaf);
        for word in [r.eax, r.ebx, r.ecx, r.edx] {
            brand.extend_from_slice(&word.to_le_bytes());
        }
    }
    let brand = String::from_utf8_lossy(&brand)
        .trim_matches(char::from(0))
        .trim()
        .to_string();
    let vendor = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let vendor = String::from_utf8_lossy(&vendor);
    format!(
        "processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: {brand}\ncpu MHz\t\t: 2000.000\n\
         cache size\t: 0 KB\nphysical id\t: 0\nsiblings\t: 1\ncore id\t\t: 0\ncpu cores\t: 1\n\
         flags\t\t: fpu sse sse2 sse4_1 sse4_2 avx avx2\n\n"
    )
}
