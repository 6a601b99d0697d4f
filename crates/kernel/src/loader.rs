//! Starting a program: load its ELF image (and its interpreter, `ld-linux-x86-64.so.2`, which
//! then loads glibc and every other shared object itself through our `mmap`), build the
//! initial stack, and open the standard streams.

use forkvm_image::{Fs, FsError, NodeId};
use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{EM_X86_64, ET_DYN, ET_EXEC, Header};
use goblin::elf::program_header::{PF_R, PF_W, PF_X, PT_INTERP, PT_LOAD, PT_PHDR, ProgramHeader};
use syscalls::Errno;
use thiserror::Error;

use crate::console::Console;
use crate::mm::{FileView, Vma, VmaKind};
use crate::process::{Limits, Process, identity};
use crate::stack::{self, StackSpec, auxv};
use forkvm_memory::ram::{GuestRam, PAGE_SIZE, page_align_down, page_align_up};

/// Where a position-independent main program is placed (where non-PIE programs are linked).
const PIE_BASE: u64 = 0x40_0000;
/// Program headers must lie within this many bytes of the file's start for us to read them.
const HEADER_WINDOW: usize = 64 * 1024;
/// Default stack size (Linux's default `RLIMIT_STACK`).
pub const STACK_SIZE: u64 = 8 << 20;

/// What to run and with what.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// Path of the program inside the sandbox filesystem.
    pub program: Vec<u8>,
    pub argv: Vec<Vec<u8>>,
    pub envp: Vec<Vec<u8>>,
    /// Absolute working directory.
    pub cwd: Vec<u8>,
    pub limits: Limits,
    /// First guest address the program may use.
    pub user_start: u64,
}

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rip: u64,
    pub rsp: u64,
}

/// Why a program could not be started.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("{path}: {source}")]
    NotFound { path: String, source: FsError },
    #[error("{path}: not an ELF executable for x86-64 ({reason})")]
    BadElf { path: String, reason: String },
    #[error("{path}: does not fit in guest memory ({errno})")]
    NoMemory { path: String, errno: Errno },
    #[error("the argument and environment strings do not fit the {0}-byte stack")]
    StackTooSmall(u64),
    #[error("guest RAM of {0} bytes is too small for the stack and program")]
    RamTooSmall(u64),
    #[error("an open-file limit of {0} leaves no room for the standard streams")]
    TooFewFiles(usize),
    #[error("guest RAM of {ram} bytes does not match the {state}-byte snapshot")]
    RamMismatch { ram: u64, state: u64 },
    #[error("restoring the snapshot's processes: {0}")]
    Restore(String),
}

struct LoadedObject {
    bias: u64,
    entry: u64,
    phdr: u64,
    phnum: u64,
    end: u64,
    interp: Option<Vec<u8>>,
}

fn display(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

impl Process {
    /// Loads `config.program` into `ram` and returns the process, ready to run from `Entry`.
    pub fn spawn(
        ram: GuestRam,
        fs: Fs,
        console: Console,
        config: SpawnConfig,
    ) -> Result<(Process, Entry), SpawnError> {
        let mut process = Process::new(
            ram,
            fs,
            console,
            &config.cwd,
            config.limits,
            config.user_start,
        )?;
        let entry =
            process.load_program(&config.program, &config.program, &config.argv, &config.envp)?;
        process.set_cmdline(&config.argv);
        Ok((process, entry))
    }

    /// Loads `program` (with its interpreter) into the current memory, which must hold no
    /// mappings but the stack, and builds its initial stack: what `spawn` and `execve` share.
    /// `execfn` is the path the program was asked for by (`AT_EXECFN`: a `#!` script's own).
    pub(crate) fn load_program(
        &mut self,
        program: &[u8],
        execfn: &[u8],
        argv: &[Vec<u8>],
        envp: &[Vec<u8>],
    ) -> Result<Entry, SpawnError> {
        let (node, canonical) = self.resolve_program(program)?;
        self.exe_path = canonical;
        let main = self.load_object(node, program, true)?;
        self.mm.init_brk(main.end);
        let (entry, interp_base) = match &main.interp {
            Some(interp_path) => {
                let (interp_node, _) = self.resolve_program(interp_path)?;
                let interp = self.load_object(interp_node, interp_path, false)?;
                (interp.entry, interp.bias)
            }
            None => (main.entry, 0),
        };
        let vdso = self.map_vdso().map_err(|errno| SpawnError::NoMemory {
            path: "[vdso]".into(),
            errno,
        })?;

        let mut random = [0u8; 16];
        crate::entropy::host_random(&mut random);
        let aux = [
            (auxv::AT_PHDR, main.phdr),
            (auxv::AT_PHENT, 56),
            (auxv::AT_PHNUM, main.phnum),
            (auxv::AT_PAGESZ, PAGE_SIZE),
            (auxv::AT_BASE, interp_base),
            (auxv::AT_FLAGS, 0),
            (auxv::AT_ENTRY, main.entry),
            (auxv::AT_UID, identity::UID),
            (auxv::AT_EUID, identity::UID),
            (auxv::AT_GID, identity::GID),
            (auxv::AT_EGID, identity::GID),
            (auxv::AT_SECURE, 0),
            (auxv::AT_HWCAP, host_hwcap()),
            (auxv::AT_HWCAP2, 0),
            (auxv::AT_CLKTCK, 100),
            (auxv::AT_SYSINFO_EHDR, vdso.image),
            (auxv::AT_MINSIGSTKSZ, crate::delivery::MIN_SIGNAL_STACK),
        ];
        let spec = StackSpec {
            argv,
            envp,
            auxv: &aux,
            random,
            execfn,
        };
        let image = stack::build(self.mm.layout().user_end, &spec, STACK_SIZE / 4)
            .ok_or(SpawnError::StackTooSmall(STACK_SIZE / 4))?;
        self.ram
            .write(image.base, &image.bytes)
            .map_err(|_| SpawnError::RamTooSmall(self.ram.size()))?;
        self.sync_page_tables()
            .map_err(|_| SpawnError::RamTooSmall(self.ram.size()))?;
        Ok(Entry {
            rip: entry,
            rsp: image.rsp,
        })
    }

    fn resolve_program(&self, path: &[u8]) -> Result<(NodeId, Vec<u8>), SpawnError> {
        let resolved =
            self.fs
                .resolve(&self.cwd, path, true)
                .map_err(|source| SpawnError::NotFound {
                    path: display(path),
                    source,
                })?;
        Ok((resolved.node, resolved.path))
    }

    fn load_object(
        &mut self,
        node: NodeId,
        path: &[u8],
        is_main: bool,
    ) -> Result<LoadedObject, SpawnError> {
        let bad = |reason: &str| SpawnError::BadElf {
            path: display(path),
            reason: reason.to_string(),
        };
        let no_memory = |errno: Errno| SpawnError::NoMemory {
            path: display(path),
            errno,
        };
        let mut head = vec![0u8; HEADER_WINDOW];
        let n = self
            .fs
            .read_at(node, 0, &mut head)
            .map_err(|e| bad(&e.to_string()))?;
        head.truncate(n);
        if head.len() < 64 || &head[..4] != b"\x7fELF" {
            return Err(bad("no ELF magic"));
        }
        let header: Header =
            goblin::elf::Elf::parse_header(&head).map_err(|e| bad(&e.to_string()))?;
        if header.e_machine != EM_X86_64 || header.e_ident[4] != 2 {
            return Err(bad("not a 64-bit x86-64 object"));
        }
        if header.e_type != ET_EXEC && header.e_type != ET_DYN {
            return Err(bad("neither an executable nor a shared object"));
        }
        (header.e_phoff as usize)
            .checked_add(header.e_phnum as usize * 56)
            .filter(|&end| end <= head.len())
            .ok_or_else(|| bad("program headers out of range"))?;
        let ctx = Ctx::new(Container::Big, Endian::Little);
        let phdrs =
            ProgramHeader::parse(&head, header.e_phoff as usize, header.e_phnum as usize, ctx)
                .map_err(|e| bad(&e.to_string()))?;
        let loads: Vec<&ProgramHeader> = phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
        if loads.is_empty() {
            return Err(bad("no loadable segments"));
        }
        let low = page_align_down(loads.iter().map(|p| p.p_vaddr).min().unwrap_or(0));
        let high = loads
            .iter()
            .map(|p| p.p_vaddr.checked_add(p.p_memsz))
            .try_fold(0u64, |acc, end| end.map(|e| acc.max(e)))
            .and_then(page_align_up)
            .ok_or_else(|| bad("segment end overflows"))?;
        let span = high - low;

        let bias = if header.e_type == ET_EXEC {
            0
        } else if is_main {
            PIE_BASE - low.min(PIE_BASE)
        } else {
            self.mm.find_free(span, 0).map_err(no_memory)? - low
        };

        for ph in &loads {
            if ph.p_vaddr % PAGE_SIZE != ph.p_offset % PAGE_SIZE || ph.p_filesz > ph.p_memsz {
                return Err(bad("misaligned or inconsistent segment"));
            }
            let start = page_align_down(bias + ph.p_vaddr);
            let end = page_align_up(bias + ph.p_vaddr + ph.p_memsz)
                .ok_or_else(|| bad("segment end overflows"))?;
            let lead = (bias + ph.p_vaddr) - start;
            let replaced = self
                .mm
                .map_fixed(Vma {
                    start,
                    end,
                    prot: segment_prot(ph.p_flags),
                    kind: VmaKind::File,
                    shared: false,
                    reserved: false,
                    file: Some(FileView {
                        path: path.into(),
                        ino: node.ino(),
                        offset: ph.p_offset - lead,
                        shared_with: None,
                        write_back: false,
                    }),
                    segment: None,
                    on_fork: Default::default(),
                })
                .map_err(no_memory)?;
            self.discard(&replaced).map_err(no_memory)?;
            self.populate_from_file(node, start, ph.p_filesz + lead, ph.p_offset - lead)
                .map_err(no_memory)?;
        }

        let phdr = match phdrs.iter().find(|p| p.p_type == PT_PHDR) {
            Some(p) => bias + p.p_vaddr,
            None => loads
                .iter()
                .find(|p| p.p_offset <= header.e_phoff && header.e_phoff < p.p_offset + p.p_filesz)
                .map(|p| bias + p.p_vaddr + (header.e_phoff - p.p_offset))
                .ok_or_else(|| bad("program headers are not in a loaded segment"))?,
        };

        let interp = match phdrs.iter().find(|p| p.p_type == PT_INTERP) {
            Some(p) if is_main => {
                let start = p.p_offset as usize;
                let end = start
                    .checked_add(p.p_filesz as usize)
                    .filter(|&e| e <= head.len())
                    .ok_or_else(|| bad("interpreter path out of range"))?;
                let raw = &head[start..end];
                let path: Vec<u8> = raw.iter().take_while(|&&b| b != 0).copied().collect();
                Some(path)
            }
            _ => None,
        };

        Ok(LoadedObject {
            bias,
            entry: bias + header.e_entry,
            phdr,
            phnum: u64::from(header.e_phnum),
            end: bias + high,
            interp,
        })
    }
}

fn segment_prot(flags: u32) -> u32 {
    let mut prot = 0;
    if flags & PF_R != 0 {
        prot |= libc::PROT_READ;
    }
    if flags & PF_W != 0 {
        prot |= libc::PROT_WRITE;
    }
    if flags & PF_X != 0 {
        prot |= libc::PROT_EXEC;
    }
    prot as u32
}

/// CPUID.1:EDX, which Linux passes as AT_HWCAP on x86-64.
fn host_hwcap() -> u64 {
    u64::from(std::arch::x86_64::__cpuid(1).edx)
}
