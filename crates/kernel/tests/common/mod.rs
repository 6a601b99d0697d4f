//! Shared harness for the syscall-layer tests: a tiny image, a process over it, a scratch
//! mapping the tests put paths and buffers into, and captured standard streams.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use forkvm_image::{Fs, Image, build_image};
use forkvm_kernel::{
    Console, DetachedFpu, Input, Limits, Outcome, Process, SpawnConfig, UserContext,
};
use forkvm_memory::ram::GuestRam;

/// Guest RAM of every test process.
pub const RAM_SIZE: u64 = 64 << 20;
/// First address a test program may map.
pub const USER_START: u64 = 0x10_0000;
/// Size of the anonymous scratch mapping tests write arguments into.
pub const SCRATCH_LEN: u64 = 64 * 1024;
/// Overlay (writable filesystem) cap.
pub const OVERLAY_LIMIT: u64 = 16 << 20;
/// Default per-stream output cap.
pub const OUTPUT_LIMIT: u64 = 1 << 20;

pub const HELLO: &[u8] = b"hello, forkvm\n";
pub const INNER: &[u8] = b"inner file\n";
/// Size of `/data/big.bin`: above the image's alignment threshold and not a page multiple.
pub const BIG_LEN: usize = 20_000;
/// Where `/bin/tiny` is linked and how far its zero-filled data reaches (sets the break).
pub const TINY_BASE: u64 = 0x40_0000;
pub const TINY_MEMSZ: u64 = 0x2345;

/// Byte `i` of `/data/big.bin`: a pattern with no period dividing the page size.
pub fn big_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// `-errno` as a syscall returns it.
pub fn err(errno: i32) -> i64 {
    -i64::from(errno)
}

/// A host writer whose bytes the test can inspect afterwards.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().expect("capture lock").clone()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minimal static x86-64 executable: one read+execute `PT_LOAD` at [`TINY_BASE`] whose
/// memory size reaches past the file (so the loader sets the break after it).
pub fn tiny_elf() -> Vec<u8> {
    let code: &[u8] = &[0xeb, 0xfe]; // jmp . (never run: the tests only load it)
    let file_len = (64 + 56 + code.len()) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(TINY_BASE + 64 + 56).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    for word in [0, TINY_BASE, TINY_BASE, file_len, TINY_MEMSZ, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}

/// Writes the source tree of the test image under `root`.
pub fn write_tree(root: &Path) {
    let dir = |p: &str| std::fs::create_dir_all(root.join(p)).expect("mkdir");
    let file = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).expect("write");
    dir("etc");
    dir("bin/dir");
    dir("data");
    dir("tmp");
    file("etc/hello.txt", HELLO);
    file("bin/dir/inner.txt", INNER);
    file("bin/tiny", &tiny_elf());
    let big: Vec<u8> = (0..BIG_LEN).map(big_byte).collect();
    file("data/big.bin", &big);
    std::os::unix::fs::symlink("hello.txt", root.join("etc/link")).expect("symlink");
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod /tmp");
    std::fs::set_permissions(
        root.join("bin/tiny"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod tiny");
}

/// Builds the test image in `dir` and opens it.
pub fn build_test_image(dir: &Path) -> Arc<Image> {
    let source = dir.join("root");
    std::fs::create_dir(&source).expect("mkdir root");
    write_tree(&source);
    let image_path = dir.join("test.img");
    build_image(&source, &image_path).expect("build image");
    Arc::new(Image::open(&image_path).expect("open image"))
}

/// How a test process is set up.
pub struct Options {
    pub limits: Limits,
    pub output_limit: u64,
    pub stdin: Vec<u8>,
    /// Load `/bin/tiny` (which sets up the break) instead of starting empty.
    pub spawn_tiny: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            output_limit: OUTPUT_LIMIT,
            stdin: Vec::new(),
            spawn_tiny: false,
        }
    }
}

/// A process over the test image plus what the tests need to drive it.
pub struct Harness {
    pub process: Process,
    /// The vCPU: the context of the thread that makes the next syscall.
    pub ctx: UserContext,
    pub fpu: DetachedFpu,
    /// Base of the anonymous read-write scratch mapping.
    pub scratch: u64,
    pub stdout: Captured,
    pub stderr: Captured,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(Options::default())
    }

    pub fn with(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = build_test_image(dir.path());
        let fs = Fs::with_limit(image, OVERLAY_LIMIT);
        let ram = GuestRam::anonymous(RAM_SIZE).expect("guest RAM");
        let stdout = Captured::default();
        let stderr = Captured::default();
        let stdin = if options.stdin.is_empty() {
            Input::Empty
        } else {
            Input::Bytes {
                data: options.stdin,
                pos: 0,
            }
        };
        let console = Console::new(
            stdin,
            Box::new(stdout.clone()),
            Box::new(stderr.clone()),
            options.output_limit,
        );
        let process = if options.spawn_tiny {
            let config = SpawnConfig {
                program: b"/bin/tiny".to_vec(),
                argv: vec![b"tiny".to_vec()],
                envp: Vec::new(),
                cwd: b"/".to_vec(),
                limits: options.limits,
                user_start: USER_START,
            };
            Process::spawn(ram, fs, console, config).expect("spawn").0
        } else {
            Process::new(ram, fs, console, b"/", options.limits, USER_START).expect("process")
        };
        let mut harness = Self {
            process,
            ctx: UserContext::default(),
            fpu: DetachedFpu::default(),
            scratch: 0,
            stdout,
            stderr,
            _dir: dir,
        };
        let scratch = harness.sys(
            libc::SYS_mmap,
            &[
                0,
                SCRATCH_LEN,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        );
        assert!(scratch > 0, "scratch mmap failed: {scratch}");
        harness.scratch = scratch as u64;
        harness
    }

    /// Runs one syscall, as the thread whose context `ctx` holds, and returns what the VMM
    /// would do (after a switch, `ctx` holds the next thread's context).
    pub fn call(&mut self, nr: i64, args: &[u64]) -> Outcome {
        let mut all = [0u64; 6];
        all[..args.len()].copy_from_slice(args);
        let r = &mut self.ctx.regs;
        r.rax = nr as u64;
        [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9] = all;
        self.process.handle_syscall(&mut self.ctx, &mut self.fpu)
    }

    /// Runs one syscall that must return (not end the process); negative is `-errno`.
    pub fn sys(&mut self, nr: i64, args: &[u64]) -> i64 {
        match self.call(nr, args) {
            Outcome::Return(value) => value as i64,
            Outcome::Exit(reason) => panic!("syscall {nr} ended the process: {reason:?}"),
            Outcome::AwaitingControl => panic!("syscall {nr} parked on the control channel"),
            other => panic!("syscall {nr} blocked its thread: {other:?}"),
        }
    }

    /// Address `offset` bytes into the scratch mapping.
    pub fn at(&self, offset: u64) -> u64 {
        assert!(offset < SCRATCH_LEN);
        self.scratch + offset
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn poke(&self, addr: u64, data: &[u8]) {
        self.process.ram().write(addr, data).expect("guest write");
    }

    /// Reads `len` guest bytes at `addr`.
    pub fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.process.ram().read(addr, &mut buf).expect("guest read");
        buf
    }

    pub fn peek_u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.peek(addr, 8).try_into().expect("8 bytes"))
    }

    /// Places a NUL-terminated string at scratch `offset` and returns its address.
    pub fn cstr(&self, offset: u64, s: &str) -> u64 {
        let addr = self.at(offset);
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.poke(addr, &bytes);
        addr
    }

    /// `openat(AT_FDCWD, path, flags, mode)` with the path placed at scratch offset 0.
    pub fn open(&mut self, path: &str, flags: i32, mode: u32) -> i64 {
        let p = self.cstr(0, path);
        self.sys(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, p, flags as u64, u64::from(mode)],
        )
    }

    /// `newfstatat(AT_FDCWD, path, buf, flags)`; on success the 144-byte `struct stat`.
    pub fn stat(&mut self, path: &str, flags: i32) -> Result<Stat, i64> {
        let p = self.cstr(0, path);
        let out = self.at(0x8000);
        let rc = self.sys(
            libc::SYS_newfstatat,
            &[libc::AT_FDCWD as u64, p, out, flags as u64],
        );
        if rc != 0 {
            return Err(rc);
        }
        Ok(Stat::parse(&self.peek(out, 144)))
    }

    /// `fstat(fd)`.
    pub fn fstat(&mut self, fd: i64) -> Result<Stat, i64> {
        let out = self.at(0x8000);
        let rc = self.sys(libc::SYS_fstat, &[fd as u64, out]);
        if rc != 0 {
            return Err(rc);
        }
        Ok(Stat::parse(&self.peek(out, 144)))
    }

    /// Reads up to `len` bytes from `fd` through scratch offset 0x4000.
    pub fn read_fd(&mut self, fd: i64, len: usize) -> Result<Vec<u8>, i64> {
        assert!(len <= 0x4000);
        let buf = self.at(0x4000);
        let n = self.sys(libc::SYS_read, &[fd as u64, buf, len as u64]);
        if n < 0 {
            return Err(n);
        }
        Ok(self.peek(buf, n as usize))
    }

    /// Writes `data` to `fd` through scratch offset 0x4000.
    pub fn write_fd(&mut self, fd: i64, data: &[u8]) -> i64 {
        assert!(data.len() <= 0x4000);
        let buf = self.at(0x4000);
        self.poke(buf, data);
        self.sys(libc::SYS_write, &[fd as u64, buf, data.len() as u64])
    }

    /// Anonymous private read-write mapping of `len` bytes; the address or `-errno`.
    pub fn mmap_anon(&mut self, len: u64) -> i64 {
        self.sys(
            libc::SYS_mmap,
            &[
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
    }
}

/// The fields of `struct stat` the tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub ino: u64,
    pub mode: u32,
    pub size: u64,
}

impl Stat {
    fn parse(raw: &[u8]) -> Self {
        let word = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        Self {
            ino: word(8),
            mode: u32::from_le_bytes(raw[24..28].try_into().expect("4 bytes")),
            size: word(48),
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

/// One `linux_dirent64` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub kind: u8,
    pub name: String,
}

/// Parses the records `getdents64` wrote.
pub fn parse_dirents(mut raw: &[u8]) -> Vec<Dirent> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let ino = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let reclen = u16::from_le_bytes([raw[16], raw[17]]) as usize;
        assert!(
            reclen >= 24 && reclen.is_multiple_of(8),
            "bad d_reclen {reclen}"
        );
        let name_field = &raw[19..reclen];
        let len = name_field
            .iter()
            .position(|&b| b == 0)
            .expect("NUL-terminated d_name");
        out.push(Dirent {
            ino,
            kind: raw[18],
            name: String::from_utf8(name_field[..len].to_vec()).expect("utf-8 name"),
        });
        raw = &raw[reclen..];
    }
    out
}
