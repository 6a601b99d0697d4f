//! The state of one sandboxed process: its memory, files, working directory, signal
//! dispositions and counters. The syscall handlers (`syscalls::*`) operate on it.

use std::sync::Arc;

use forkvm_image::{Fs, Image, OverlayState};
use serde::{Deserialize, Serialize};
use syscalls::Errno;
use vm_memory::ByteValued;

use crate::abi::from_prefix;
use crate::console::Console;
use crate::control::{CONTROL_FD, ControlChannel};
use crate::fdtable::FdTable;
use crate::file::{FileObject, OpenFile, Stream};
use crate::loader::{STACK_SIZE, SpawnError};
use crate::mm::{AddressSpace, Layout, Range};
use crate::net::Sockets;
use crate::notify::Notifiers;
use crate::pagetable::PageTables;
use crate::pipe::Pipes;
use crate::procs::{INIT, Procs};
use crate::signals::SignalState;
use crate::stats::SyscallStats;
use crate::threads::{Threads, Tid};
use crate::timers::Timers;
use crate::vdso::VdsoPlacement;
use forkvm_memory::ram::{GuestRam, PAGE_SIZE, page_align_down, page_align_up};

/// Fixed identity the sandbox reports (it is alone in its own "system").
pub mod identity {
    pub const UID: u64 = 0;
    pub const GID: u64 = 0;
    pub const HOSTNAME: &[u8] = b"forkvm";
}

/// The sandbox's host and domain names (`sethostname` changes them for it alone, as in a
/// UTS namespace of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNames {
    pub host: Vec<u8>,
    pub domain: Vec<u8>,
}

impl Default for HostNames {
    fn default() -> Self {
        HostNames {
            host: identity::HOSTNAME.to_vec(),
            domain: b"(none)".to_vec(),
        }
    }
}

/// Limits the syscall layer enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes the program may map (anonymous, file, heap and stack).
    pub memory_bytes: u64,
    /// Open descriptors (`RLIMIT_NOFILE`).
    pub open_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 1 << 30,
            open_files: 1024,
        }
    }
}

/// Everything about a process except its memory contents, vCPU and standard streams: what a
/// snapshot stores and what each fork starts from. Cloning is cheap (the filesystem overlay
/// clones in O(1); the rest is small tables).
#[derive(Clone, Serialize, Deserialize)]
pub struct ProcessState {
    pub(crate) mm: AddressSpace,
    pub(crate) overlay: OverlayState,
    pub(crate) files: FdTable,
    pub(crate) pipes: Pipes,
    pub(crate) sockets: Sockets,
    pub(crate) notifiers: Notifiers,
    pub(crate) control: ControlChannel,
    pub(crate) cwd: Vec<u8>,
    pub(crate) signals: SignalState,
    pub(crate) exe_path: Vec<u8>,
    pub(crate) umask: u32,
    pub(crate) threads: Threads,
    pub(crate) timers: Timers,
    pub(crate) vdso: Option<VdsoPlacement>,
    pub(crate) names: HostNames,
    /// Size of the guest RAM (the program's part ends below it, at the page-table pool).
    pub(crate) ram_size: u64,
    /// The next thread or process id to give out.
    pub(crate) next_id: Tid,
    /// The process table, the other processes and the shared memory segments (shared by
    /// every clone: a fork takes from it only what it needs).
    pub(crate) table: Arc<crate::procs_state::TableState>,
}

impl ProcessState {
    /// Size of the guest RAM this state was taken from (a fork's RAM must match).
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The parts of guest RAM that can hold anything (see `Process::populated_ranges`).
    pub fn populated_ranges(&self) -> Vec<(u64, u64)> {
        populated_ranges(&self.mm, self.ram_size)
    }

    /// Whether the process was parked on its control channel.
    pub fn awaiting_control(&self) -> bool {
        self.control.pending().is_some()
    }

    /// The processes besides the first whose memory a fork must be given (`OtherMemory`).
    pub fn memories(&self) -> Vec<crate::procs::Pid> {
        self.table.memories().collect()
    }

    /// The shared memory segments a fork must be given, as id and size.
    pub fn segments(&self) -> Vec<(u64, u64)> {
        self.table.segments().collect()
    }
}

/// The sandboxed process.
pub struct Process {
    pub(crate) ram: GuestRam,
    pub(crate) mm: AddressSpace,
    pub(crate) fs: Fs,
    pub(crate) files: FdTable,
    pub(crate) pipes: Pipes,
    /// Sockets between the sandbox's threads (`crate::net`).
    pub(crate) sockets: Sockets,
    /// eventfds, timerfds, signalfds and epoll instances.
    pub(crate) notifiers: Notifiers,
    pub(crate) control: ControlChannel,
    pub(crate) cwd: Vec<u8>,
    pub(crate) console: Console,
    pub(crate) signals: SignalState,
    pub(crate) stats: SyscallStats,
    pub(crate) exe_path: Vec<u8>,
    pub(crate) umask: u32,
    /// The threads and which one is on the vCPU.
    pub(crate) threads: Threads,
    /// Timers that raise signals.
    pub(crate) timers: Timers,
    /// Where the vDSO and its clock page are (none for a process that loaded no program).
    pub(crate) vdso: Option<VdsoPlacement>,
    /// The host and domain names `uname` reports (the sandbox's own, settable).
    pub(crate) names: HostNames,
    pub(crate) start_time: std::time::Instant,
    /// Where `--strace` lines go, when tracing.
    pub(crate) strace: Option<Box<dyn std::io::Write + Send>>,
    /// Whether sizable anonymous memory gets huge-page backing (see `syscalls::mem`).
    pub(crate) huge_pages: bool,
    /// Where the guest page tables are (kept in step with `mm` by `sync_page_tables`).
    pub(crate) tables: PageTables,
    /// Unmapped pages KVM may still map, with the entry flags they had (see
    /// `sync_page_tables`). A new VM caches nothing, so this starts empty in every fork.
    pub(crate) stale: rangemap::RangeMap<u64, u64>,
    /// The sandbox's other processes, and which one is current (`procs`).
    pub(crate) procs: Procs,
    /// Memory that processes map shared (`shm`).
    pub(crate) segments: crate::shm::Segments,
    /// Where fresh guest RAM comes from (`execve`); none in tests without a VMM.
    pub(crate) machine: Option<Arc<dyn Machine>>,
}

/// The parts of `ram_size` bytes of guest RAM that can hold anything under `mm` (see
/// `Process::populated_ranges`).
pub(crate) fn populated_ranges(mm: &AddressSpace, ram_size: u64) -> Vec<(u64, u64)> {
    let layout = mm.layout();
    let mut ranges = vec![(0, layout.user_start)];
    ranges.extend(mm.vmas().map(|v| (v.start, v.end)));
    ranges.push((layout.user_end, ram_size));
    ranges
}

/// What the syscall layer needs from the VMM: fresh guest RAM with its system area (page
/// tables, descriptor tables, stubs) in place, for a process that replaces its image.
pub trait Machine: Send + Sync {
    fn fresh_ram(&self, size: u64) -> Result<GuestRam, String>;
}

impl Process {
    /// A process with nothing loaded yet: standard streams on descriptors 0-2, the stack
    /// mapped at the top of `ram`, working directory `cwd`. `spawn` loads a program into it;
    /// tests and fuzzers drive syscalls on it directly.
    pub fn new(
        ram: GuestRam,
        fs: Fs,
        console: Console,
        cwd: &[u8],
        limits: Limits,
        user_start: u64,
    ) -> Result<Process, SpawnError> {
        let tables = PageTables::for_ram(ram.size());
        if tables.user_end() < user_start + 4 * STACK_SIZE {
            return Err(SpawnError::RamTooSmall(ram.size()));
        }
        tables
            .build_fixed(&ram)
            .map_err(|_| SpawnError::RamTooSmall(ram.size()))?;
        let layout = Layout {
            user_start,
            user_end: tables.user_end(),
            stack_size: STACK_SIZE,
        };
        let mut files = FdTable::new(limits.open_files);
        for (fd, stream, flags, name) in [
            (0, Stream::Stdin, libc::O_RDONLY, "/dev/stdin"),
            (1, Stream::Stdout, libc::O_WRONLY, "/dev/stdout"),
            (2, Stream::Stderr, libc::O_WRONLY, "/dev/stderr"),
        ] {
            let file = OpenFile::new(FileObject::Console(stream), flags, name.as_bytes().to_vec());
            files
                .open_at(fd, file)
                .map_err(|_| SpawnError::TooFewFiles(limits.open_files))?;
        }
        Ok(Process {
            ram,
            mm: AddressSpace::new(layout, limits.memory_bytes),
            fs,
            files,
            pipes: Pipes::default(),
            sockets: Sockets::default(),
            notifiers: Notifiers::default(),
            control: ControlChannel::default(),
            cwd: cwd.to_vec(),
            console,
            signals: SignalState::default(),
            stats: SyscallStats::default(),
            exe_path: Vec::new(),
            umask: 0o022,
            threads: Threads::new(INIT),
            timers: Timers::default(),
            vdso: None,
            names: HostNames::default(),
            start_time: std::time::Instant::now(),
            strace: None,
            huge_pages: true,
            tables,
            stale: rangemap::RangeMap::new(),
            procs: Procs::new(INIT + 1),
            segments: Default::default(),
            machine: None,
        })
    }

    /// Sets where fresh guest RAM comes from (the VMM does, for `execve`).
    pub fn set_machine(&mut self, machine: Arc<dyn Machine>) {
        self.machine = Some(machine);
    }

    /// The state a snapshot keeps (see `ProcessState`).
    pub fn state(&self) -> ProcessState {
        ProcessState {
            mm: self.mm.clone(),
            overlay: self.fs.overlay_state(),
            files: self.files.clone(),
            pipes: self.pipes.clone(),
            sockets: self.sockets.clone(),
            notifiers: self.notifiers.clone(),
            control: self.control.clone(),
            cwd: self.cwd.clone(),
            signals: self.signals.clone(),
            exe_path: self.exe_path.clone(),
            umask: self.umask,
            threads: self.threads.clone(),
            timers: self.timers.clone(),
            vdso: self.vdso,
            names: self.names.clone(),
            ram_size: self.ram.size(),
            next_id: self.procs.next_id(),
            table: Arc::new(self.table_state()),
        }
    }

    /// A process resumed from `state` over `ram` (which holds the matching memory, e.g. a
    /// private mapping of a snapshot) and `image`, with fresh standard streams; the
    /// snapshot's other processes and shared memory come back over `others`.
    pub fn from_state(
        ram: GuestRam,
        image: Arc<Image>,
        state: ProcessState,
        console: Console,
        others: crate::procs_state::OtherMemory,
    ) -> Result<Process, SpawnError> {
        if ram.size() != state.ram_size() {
            return Err(SpawnError::RamMismatch {
                ram: ram.size(),
                state: state.ram_size(),
            });
        }
        let tables = PageTables::for_ram(ram.size());
        let mut process = Process {
            ram,
            mm: state.mm,
            fs: Fs::from_overlay_state(image, state.overlay),
            files: state.files,
            pipes: state.pipes,
            sockets: state.sockets,
            notifiers: state.notifiers,
            control: state.control,
            cwd: state.cwd,
            console,
            signals: state.signals,
            stats: SyscallStats::default(),
            exe_path: state.exe_path,
            umask: state.umask,
            threads: state.threads,
            timers: state.timers,
            vdso: state.vdso,
            names: state.names,
            start_time: std::time::Instant::now(),
            strace: None,
            huge_pages: true,
            tables,
            stale: rangemap::RangeMap::new(),
            procs: Procs::new(state.next_id),
            segments: Default::default(),
            machine: None,
        };
        process.restore_table(&state.table, others)?;
        process.wipe_for_fork()?;
        Ok(process)
    }

    /// A snapshot's fork is a fork: every process's `MADV_WIPEONFORK` memory reads as zero.
    fn wipe_for_fork(&self) -> Result<(), SpawnError> {
        let parked = self.procs.parked.values().filter_map(|p| p.memory.as_ref());
        let memories =
            std::iter::once((&self.ram, &self.mm)).chain(parked.map(|m| (&m.ram, &m.mm)));
        for (ram, mm) in memories {
            for (start, end) in mm.advised_for_fork(|f| f.wipe) {
                ram.discard(start, end - start).map_err(|e| {
                    SpawnError::Restore(format!("wiping {start:#x}..{end:#x} for the fork: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// The parts of guest RAM that can hold anything: the system area below the program,
    /// the program's mappings, and the page-table pool above them. The rest is zero, so a
    /// snapshot or a layer keeps only these.
    pub fn populated_ranges(&self) -> Vec<(u64, u64)> {
        populated_ranges(&self.mm, self.ram.size())
    }

    /// Brings the guest page tables up to date with the mappings changed since the last
    /// call, and makes sure KVM allows no page more than they do (see `pagetable`). A
    /// failure here would leave the program more rights than it has: the caller ends the
    /// sandbox.
    ///
    /// KVM forgets what it cached of a page when the page's host mapping changes. So a page
    /// that lost a right needs nothing more if its host page was replaced (unmapped memory
    /// given back, a new file mapping over it); otherwise its host protection is toggled (`GuestRam::invalidate`), except for unmapped
    /// pages kept zeroed in place for reuse (`freed`): dropping KVM's mapping of those would
    /// cost the refault their reuse exists to avoid. They stay reachable to the program,
    /// owned by the sandbox and counted in no limit, until mapped again: then they are
    /// zeroed (`GuestRam::reuse`) and toggled if the new mapping allows less.
    pub(crate) fn sync_page_tables(&mut self) -> Result<(), forkvm_memory::ram::MemoryError> {
        let mut ranges = self.mm.take_changes();
        if ranges.is_empty() {
            return Ok(());
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some((_, e)) if start <= *e => *e = (*e).max(end),
                _ => merged.push((start, end)),
            }
        }
        // KVM's memory slots must cover whatever the guest can now reach (`reach`). The
        // high window's backing and tables are hidden mappings in low RAM: mapping them
        // logged their low ranges here too.
        for &(start, end) in &merged {
            if !crate::high::in_window(start) {
                self.ram.note_reachable(start, end);
            }
        }
        let replaced = self.ram.take_replaced();
        for range in replaced.iter() {
            self.stale.remove(range.clone());
        }
        // The high window's tables are rewritten whole, once; pages there that lost a right
        // were handled with the change (`HighChange`).
        let (high, merged): (Vec<_>, Vec<_>) = merged
            .into_iter()
            .partition(|&(start, _)| crate::high::in_window(start));
        if let Some(&(start, end)) = high.first() {
            self.tables.sync_high(&self.ram, &self.mm).map_err(|_| {
                forkvm_memory::ram::MemoryError::BadRange {
                    addr: start,
                    len: end - start,
                }
            })?;
        }
        for (start, end) in merged {
            let changes = self
                .tables
                .sync(&self.ram, &self.mm, start, end)
                .map_err(|_| forkvm_memory::ram::MemoryError::BadRange {
                    addr: start,
                    len: end - start,
                })?;
            for lost in changes.lost {
                for gap in replaced.gaps(&(lost.start..lost.end)) {
                    if lost.unmapped && self.ram.is_retained(gap.start) {
                        self.stale.insert(gap, lost.before);
                    } else {
                        self.ram.invalidate(gap.start, gap.end - gap.start)?;
                    }
                }
            }
            for (from, to, now) in changes.mapped {
                let stale: Vec<_> = self
                    .stale
                    .overlapping(from..to)
                    .map(|(r, &before)| (r.start.max(from)..r.end.min(to), before))
                    .collect();
                for (range, before) in stale {
                    self.stale.remove(range.clone());
                    if crate::pagetable::loses_rights(before, now) {
                        self.ram.invalidate(range.start, range.end - range.start)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Something happened to a descriptor (data moved, an end closed, a timer fired): every
    /// thread waiting for I/O looks again, and edge-triggered epoll interests may report.
    pub(crate) fn io_event(&mut self) {
        self.notifiers.generation += 1;
        self.threads.wake_io();
        // Pipes and sockets join processes: their waiters look again too.
        for parked in self.procs.parked.values_mut() {
            parked.own.threads.wake_io();
        }
    }

    /// Opens the control channel on descriptor 3 (for a template's agent).
    pub fn open_control_channel(&mut self) -> Result<(), SpawnError> {
        let file = OpenFile::new(
            FileObject::Control,
            libc::O_RDWR,
            b"forkvm:[control]".to_vec(),
        );
        self.files
            .open_at(CONTROL_FD, file)
            .map_err(|_| SpawnError::TooFewFiles(self.files.max_fds()))
    }

    /// True while the program is parked in a read of the control channel.
    pub fn awaiting_control(&self) -> bool {
        self.control.pending().is_some()
    }

    /// Completes the parked control-channel read with `data` (bytes beyond the read's length
    /// stay queued for the next read). Returns the read's result for `rax`.
    pub fn complete_control_read(&mut self, data: &[u8]) -> Result<u64, Errno> {
        let pending = self.control.take_pending().ok_or(Errno::EINVAL)?;
        self.control.push_inbound(data);
        let bytes = self.control.take_inbound(pending.len as usize);
        self.write_user(pending.buf, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// What the program wrote to the control channel since the last call.
    pub fn take_control_output(&mut self) -> Vec<u8> {
        self.control.take_outbound()
    }

    /// Turns huge-page backing of new anonymous memory on or off. A warm pool's warm-up
    /// runs with it off: the small pages the warm-up touches survive the reset to the
    /// snapshot (they are copied back in place), and the request after it finds exactly
    /// those pages already mapped, where a huge page would have been dropped by the reset
    /// and faulted in again (a fresh 2 MiB costs 0.3-4 ms here, a few 4 KiB pages far less).
    pub fn set_huge_pages(&mut self, enabled: bool) {
        self.huge_pages = enabled;
    }

    /// Sends a line per syscall to `out` (the `--strace` option).
    pub fn set_strace(&mut self, out: Option<Box<dyn std::io::Write + Send>>) {
        self.strace = out;
    }

    /// Guest RAM (the VMM registers it with KVM).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Ends the process, keeping its guest RAM (to reset it and use it again).
    pub fn into_ram(self) -> GuestRam {
        self.ram
    }

    /// The image under the process's filesystem.
    pub fn image(&self) -> &Arc<Image> {
        self.fs.image()
    }

    /// The address space (for diagnostics and tests).
    pub fn address_space(&self) -> &AddressSpace {
        &self.mm
    }

    /// Per-syscall counters, including unsupported ones by name.
    pub fn stats(&self) -> &SyscallStats {
        &self.stats
    }

    /// The standard streams.
    pub fn console_mut(&mut self) -> &mut Console {
        &mut self.console
    }

    /// Reads `len` bytes of program memory, failing with EFAULT unless all of it is mapped.
    pub(crate) fn read_user(&self, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; len];
        self.read_user_into(addr, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from program memory at `addr`: EFAULT unless all of it is mapped (in
    /// the high window: readable, through its backing).
    fn read_user_into(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if crate::high::in_window(addr) {
            for (physical, part) in self.high_pieces(addr, buf.len(), false)? {
                self.ram
                    .read(physical, &mut buf[part])
                    .map_err(|_| Errno::EFAULT)?;
            }
            return Ok(());
        }
        self.check_user(addr, buf.len() as u64)?;
        self.ram.read(addr, buf).map_err(|_| Errno::EFAULT)
    }

    /// Where `len` bytes at high-window address `addr` are: each piece's guest-physical
    /// address and its part of the caller's buffer. EFAULT unless all of it is mapped with
    /// the access asked for.
    fn high_pieces(
        &self,
        addr: u64,
        len: usize,
        write: bool,
    ) -> Result<Vec<(u64, std::ops::Range<usize>)>, Errno> {
        let pieces = self
            .mm
            .translate_high(addr, len as u64, write)
            .ok_or(Errno::EFAULT)?;
        let mut done = 0;
        Ok(pieces
            .into_iter()
            .map(|(physical, n)| {
                let part = done..done + n as usize;
                done = part.end;
                (physical, part)
            })
            .collect())
    }

    /// Writes `data` into program memory, failing with EFAULT unless all of it is mapped
    /// writable.
    pub(crate) fn write_user(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        if crate::high::in_window(addr) {
            for (physical, part) in self.high_pieces(addr, data.len(), true)? {
                self.ram
                    .write(physical, &data[part])
                    .map_err(|_| Errno::EFAULT)?;
            }
            return Ok(());
        }
        self.check_user_writable(addr, data.len() as u64)?;
        self.ram.write(addr, data).map_err(|_| Errno::EFAULT)
    }

    /// Reads a guest structure, failing with EFAULT unless all of it is mapped.
    pub(crate) fn read_obj<T: ByteValued>(&self, addr: u64) -> Result<T, Errno> {
        let mut value = T::zeroed();
        self.read_user_into(addr, value.as_mut_slice())?;
        Ok(value)
    }

    /// Writes a guest structure, failing with EFAULT unless all of it is mapped.
    pub(crate) fn write_obj<T: ByteValued>(&self, addr: u64, value: &T) -> Result<(), Errno> {
        self.write_user(addr, value.as_slice())
    }

    /// Reads an array of `count` guest structures (EFAULT unless all of it is mapped).
    pub(crate) fn read_objs<T: ByteValued>(
        &self,
        addr: u64,
        count: usize,
    ) -> Result<Vec<T>, Errno> {
        let size = size_of::<T>();
        let bytes = self.read_user(addr, count.checked_mul(size).ok_or(Errno::EFAULT)?)?;
        Ok(bytes.chunks_exact(size).map(from_prefix).collect())
    }

    /// Writes an array of guest structures (EFAULT unless all of it is mapped).
    pub(crate) fn write_objs<T: ByteValued>(&self, addr: u64, values: &[T]) -> Result<(), Errno> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.as_slice()).copied().collect();
        self.write_user(addr, &bytes)
    }

    pub(crate) fn check_user(&self, addr: u64, len: u64) -> Result<(), Errno> {
        if self.mm.is_mapped(addr, len) {
            Ok(())
        } else {
            Err(Errno::EFAULT)
        }
    }

    pub(crate) fn check_user_writable(&self, addr: u64, len: u64) -> Result<(), Errno> {
        if self.mm.is_writable(addr, len) {
            Ok(())
        } else {
            Err(Errno::EFAULT)
        }
    }

    pub(crate) fn read_u64(&self, addr: u64) -> Result<u64, Errno> {
        self.read_obj(addr)
    }

    pub(crate) fn write_u64(&self, addr: u64, value: u64) -> Result<(), Errno> {
        self.write_obj(addr, &value)
    }

    /// Reads a NUL-terminated string of at most `max` bytes (ENAMETOOLONG beyond).
    pub(crate) fn read_cstring(&self, addr: u64, max: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut cursor = addr;
        loop {
            // Read up to the end of the current page, so a string ending just before an
            // unmapped page is still read.
            let page_end = page_align_down(cursor)
                .checked_add(PAGE_SIZE)
                .ok_or(Errno::EFAULT)?;
            let chunk = (page_end - cursor) as usize;
            let bytes = self.read_user(cursor, chunk)?;
            if let Some(nul) = bytes.iter().position(|&b| b == 0) {
                out.extend_from_slice(&bytes[..nul]);
                if out.len() > max {
                    return Err(Errno::ENAMETOOLONG);
                }
                return Ok(out);
            }
            out.extend_from_slice(&bytes);
            if out.len() > max {
                return Err(Errno::ENAMETOOLONG);
            }
            cursor = page_end;
        }
    }

    /// Zeroes the pages of `ranges` (after unmapping or replacing them).
    /// Makes `ranges`, which the program just unmapped, read as zero (see `freed`: touched
    /// pages are kept zeroed, within a limit).
    pub(crate) fn release_unmapped(&self, ranges: &[Range]) -> Result<(), Errno> {
        for &(start, end) in ranges {
            self.ram.release(start, end - start).map_err(|e| {
                tracing::error!(error = %e, "releasing guest pages failed");
                Errno::ENOMEM
            })?;
        }
        Ok(())
    }

    /// `GuestRam::reuse`, failing as `ENOMEM` (logged).
    pub(crate) fn reuse(&self, addr: u64, len: u64) -> Result<(), Errno> {
        self.ram.reuse(addr, len).map_err(|e| {
            tracing::error!(error = %e, "zeroing reused guest pages failed");
            Errno::ENOMEM
        })
    }

    pub(crate) fn discard(&self, ranges: &[Range]) -> Result<(), Errno> {
        for &(start, end) in ranges {
            self.ram.discard(start, end - start).map_err(|e| {
                tracing::error!(error = %e, "discarding guest pages failed");
                Errno::ENOMEM
            })?;
        }
        Ok(())
    }

    /// Fills `[addr, addr+len)` (page-aligned, already mapped and zero) with the file's bytes
    /// from `offset`, sharing page-aligned image pages with the host page cache where it can.
    pub(crate) fn populate_from_file(
        &self,
        node: forkvm_image::NodeId,
        addr: u64,
        len: u64,
        offset: u64,
    ) -> Result<(), Errno> {
        let size = self.fs.stat(node).map_err(crate::errno::from_fs)?.size;
        let available = size.saturating_sub(offset).min(len);
        if available == 0 {
            return Ok(());
        }
        let whole_pages = page_align_down(available);
        let mut copied_from = 0;
        let backing = self.fs.image_backing(node).map_err(crate::errno::from_fs)?;
        if whole_pages > 0
            && let Some((file_offset, _)) = backing
            && (file_offset + offset).is_multiple_of(PAGE_SIZE)
        {
            self.ram
                .map_file(
                    addr,
                    whole_pages,
                    self.fs.image().file(),
                    file_offset + offset,
                )
                .map_err(|e| {
                    tracing::error!(error = %e, "mapping image pages failed");
                    Errno::ENOMEM
                })?;
            copied_from = whole_pages;
        }
        let mut buf = vec![0u8; (available - copied_from).min(1 << 20) as usize];
        let mut done = copied_from;
        while done < available {
            let want = ((available - done) as usize).min(buf.len());
            let n = self
                .fs
                .read_at(node, offset + done, &mut buf[..want])
                .map_err(crate::errno::from_fs)?;
            if n == 0 {
                break;
            }
            self.ram
                .write(addr + done, &buf[..n])
                .map_err(|_| Errno::EFAULT)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Page-aligned length for a mapping request (EINVAL for 0 or overflow).
    pub(crate) fn mapping_len(len: u64) -> Result<u64, Errno> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        page_align_up(len).ok_or(Errno::ENOMEM)
    }
}
