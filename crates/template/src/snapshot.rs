//! The on-disk snapshot of a parked sandbox, and loading it back as a `ForkSource`.
//!
//! A snapshot directory holds:
//! * `memory`: guest RAM as a sparse file of RAM size. Only the non-zero pages of the system
//!   area and of the program's mappings are written; everything else is a hole. Forks map
//!   it `MAP_PRIVATE`, so it is never written after it is made.
//! * `memory-<pid>`: the same for each other process the template's program started, and
//!   `segment-<id>`: the bytes of each shared memory segment (`MAP_SHARED`) they map.
//! * `state.bin`: the vCPU state and the syscall layer's state (bincode), every process's.
//! * `meta.json`: format version, image digest, CPU features, sizes, each memory file's data
//!   extents and SHA-256 digests of all the other files.
//!
//! Loading verifies the digests (integrity), the image digest (the overlay refers to image
//! inodes) and the CPU features (compatibility) before anything is restored.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forkvm_image::Image;
use forkvm_kernel::ProcessState;
use forkvm_memory::backing::Backing;
use forkvm_memory::ram::PAGE_SIZE;
use forkvm_vmm::{ForkSource, OtherSources, Sandbox, VcpuState, Vmm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpu::CpuFeatures;
use crate::lock::Lock;
use crate::runtime::Runtime;
use crate::seal::Sealer;

/// Version of the snapshot format; loading refuses others.
pub const SNAPSHOT_FORMAT: u32 = 11;
/// Largest `state.bin` accepted (a guard against a corrupt length field, not a real limit).
const MAX_STATE_BYTES: u64 = 1 << 30;
/// Bytes written per `pwrite` when saving memory.
const WRITE_CHUNK: usize = 1 << 20;

/// Why a snapshot could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "snapshot format {found} is not supported (this forkvm reads format {SNAPSHOT_FORMAT}): rebuild the template"
    )]
    Format { found: u32 },
    #[error("{path} failed its integrity check (SHA-256 mismatch): the snapshot is corrupt")]
    Corrupt { path: PathBuf },
    #[error(
        "{path} holds data in a hole of the snapshot (at offset {offset:#x}): the snapshot is corrupt"
    )]
    DataInHole { path: PathBuf, offset: u64 },
    #[error(
        "{path} is not sealed with this cache's key ({key}): it was changed, or built elsewhere; rebuild the template"
    )]
    Unsealed { path: PathBuf, key: PathBuf },
    #[error(
        "{path}: the image's content does not match its digest: it was modified; delete it to rebuild it"
    )]
    ImageCorrupt { path: PathBuf },
    #[error("reading the cache's seal key: {0}")]
    Key(std::io::Error),
    #[error(
        "the snapshot was taken over image {expected}, but {path} has digest {found}: rebuild the template"
    )]
    ImageMismatch {
        expected: String,
        found: String,
        path: PathBuf,
    },
    #[error(
        "the snapshot needs CPU features this host does not offer: {}; rebuild the template here",
        .0.join(", ")
    )]
    CpuMismatch(Vec<String>),
    #[error("the sandbox is not parked on its control channel, so it cannot be snapshotted")]
    NotParked,
    #[error("reading the vCPU state: {0}")]
    Vcpu(#[from] forkvm_vmm::SandboxError),
    #[error("opening the image: {0}")]
    Image(#[from] forkvm_image::ImageError),
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `meta.json` says about a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format: u32,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// The image the process ran over, and its content digest (hex).
    pub image_path: PathBuf,
    pub image_digest: String,
    /// The entry program's argv.
    pub entry: Vec<String>,
    /// The runtime of the template's agent (which languages its forks run).
    #[serde(default)]
    pub runtime: Runtime,
    pub ram_bytes: u64,
    /// `(offset, length)` of every data run in `memory`; the rest is holes (zero).
    pub memory_extents: Vec<(u64, u64)>,
    pub memory_sha256: String,
    /// The memory files of the other processes (`memory-<pid>`, RAM size each) and of the
    /// shared memory segments (`segment-<id>`).
    #[serde(default)]
    pub processes: Vec<StoredMemory>,
    #[serde(default)]
    pub segments: Vec<StoredMemory>,
    pub state_sha256: String,
    pub cpu: CpuFeatures,
    /// The packages fetched from PyPI and npm at build time, as resolved (`name==version`,
    /// `name@version`).
    #[serde(default)]
    pub packages: Vec<String>,
    /// The spec the template was built from (`--spec`), as written.
    #[serde(default)]
    pub spec: Option<String>,
    /// SHA-256 of the exec agent the template runs (see `build::agent_digest`): a template
    /// built with another agent speaks another version of it.
    #[serde(default)]
    pub agent_sha256: String,
    /// What pins the template's filesystem: its content digest and the packages as locked
    /// (`lock`); none for templates built before locks.
    #[serde(default)]
    pub lock: Option<Lock>,
    /// HMAC-SHA256 of everything above with the cache's key (see `seal`); empty while it is
    /// computed.
    #[serde(default)]
    pub seal: String,
}

impl SnapshotMeta {
    /// The bytes the seal covers: the metadata with an empty seal.
    fn sealed_bytes(&self) -> Vec<u8> {
        let unsealed = SnapshotMeta {
            seal: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&unsealed).expect("metadata serializes")
    }

    /// Seals the metadata with `sealer`'s key.
    pub fn seal_with(&mut self, sealer: &Sealer) {
        self.seal = sealer.seal(&self.sealed_bytes());
    }

    /// What identifies this build of the template (SHA-256 of its metadata, which holds
    /// the digests of its memory, state and image): what a paused session is layered over.
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.sealed_bytes()))
    }

    /// Whether the metadata carries `sealer`'s seal.
    pub fn sealed_by(&self, sealer: &Sealer) -> bool {
        sealer.check(&self.sealed_bytes(), &self.seal)
    }

    /// Bytes of memory the snapshot actually stores, every process's and segment's.
    pub fn memory_bytes(&self) -> u64 {
        let others = self.processes.iter().chain(&self.segments);
        self.memory_extents.iter().map(|e| e.1).sum::<u64>()
            + others.map(StoredMemory::bytes).sum::<u64>()
    }
}

/// One more memory file of a snapshot: which process (pid) or segment (id) it holds, its
/// size, its data extents and their digest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMemory {
    pub id: u64,
    pub size: u64,
    pub extents: Vec<(u64, u64)>,
    pub sha256: String,
}

impl StoredMemory {
    fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }
}

fn process_memory_name(pid: u64) -> String {
    format!("memory-{pid}")
}

fn segment_name(id: u64) -> String {
    format!("segment-{id}")
}

#[derive(Serialize, Deserialize)]
struct SnapshotState {
    vcpu: VcpuState,
    process: ProcessState,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a memory file of `size` bytes: the non-zero pages of `ranges` at their own
/// offsets, each read with `read(offset, page)`.
pub(crate) fn write_memory(
    path: &Path,
    size: u64,
    ranges: &[(u64, u64)],
    read: impl Fn(u64, &mut [u8]) -> Result<(), String>,
) -> Result<(Vec<(u64, u64)>, String), SnapshotError> {
    let file = File::create(path).map_err(io_error(path))?;
    file.set_len(size).map_err(io_error(path))?;
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut hasher = Sha256::new();
    let mut run: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
    let mut run_start = 0u64;
    let mut flush = |run: &mut Vec<u8>, start: u64| -> Result<(), SnapshotError> {
        if run.is_empty() {
            return Ok(());
        }
        file.write_all_at(run, start).map_err(io_error(path))?;
        hasher.update(start.to_le_bytes());
        hasher.update((run.len() as u64).to_le_bytes());
        hasher.update(&run[..]);
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += run.len() as u64,
            _ => extents.push((start, run.len() as u64)),
        }
        run.clear();
        Ok(())
    };
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for &(start, end) in ranges {
        let mut addr = start;
        while addr < end {
            read(addr, &mut page).map_err(|reason| SnapshotError::Malformed {
                path: path.to_owned(),
                reason,
            })?;
            let zero = page.iter().all(|&b| b == 0);
            let contiguous = run_start + run.len() as u64 == addr;
            if zero || !contiguous || run.len() >= WRITE_CHUNK {
                flush(&mut run, run_start)?;
            }
            if !zero {
                if run.is_empty() {
                    run_start = addr;
                }
                run.extend_from_slice(&page);
            }
            addr += PAGE_SIZE;
        }
    }
    flush(&mut run, run_start)?;
    file.sync_all().map_err(io_error(path))?;
    Ok((extents, hex(&hasher.finalize())))
}

/// Opens the memory file at `path` and checks it is what `stored` says: its size, and (once
/// after each change: see `seal`) the digest of its extents and nothing outside them.
pub(crate) fn open_memory(
    path: &Path,
    stored: &StoredMemory,
    sealer: &Sealer,
) -> Result<File, SnapshotError> {
    let memory = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(io_error(path))?;
    let len = memory.metadata().map_err(io_error(path))?.len();
    if len != stored.size {
        return Err(SnapshotError::Malformed {
            path: path.to_owned(),
            reason: format!("{len} bytes where {} were written", stored.size),
        });
    }
    if !sealer.is_verified(path, &memory) {
        if memory_digest(&memory, path, &stored.extents)? != stored.sha256 {
            return Err(SnapshotError::Corrupt {
                path: path.to_owned(),
            });
        }
        check_holes(&memory, path, &stored.extents)?;
        sealer.record_verified(path, &memory);
    }
    Ok(memory)
}

/// Digest of the memory file's extents, computed the way `write_memory` computed it.
fn memory_digest(
    file: &File,
    path: &Path,
    extents: &[(u64, u64)],
) -> Result<String, SnapshotError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_CHUNK];
    for &(start, len) in extents {
        let mut done = 0u64;
        while done < len {
            let n = ((len - done) as usize).min(WRITE_CHUNK);
            file.read_exact_at(&mut buf[..n], start + done)
                .map_err(io_error(path))?;
            hasher.update((start + done).to_le_bytes());
            hasher.update((n as u64).to_le_bytes());
            hasher.update(&buf[..n]);
            done += n as u64;
        }
    }
    Ok(hex(&hasher.finalize()))
}

/// Checks that the memory file holds nothing outside `extents`: every region the file
/// system reports as data (`SEEK_DATA`/`SEEK_HOLE`) that no extent covers must read as
/// zeros, as a hole does (a file system may store zeros it was never asked to).
fn check_holes(file: &File, path: &Path, extents: &[(u64, u64)]) -> Result<(), SnapshotError> {
    let len = file.metadata().map_err(io_error(path))?.len();
    let mut at = 0u64;
    let mut buf = vec![0u8; WRITE_CHUNK];
    while at < len {
        let Some(start) = seek(file, at, libc::SEEK_DATA).map_err(io_error(path))? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)
            .map_err(io_error(path))?
            .unwrap_or(len);
        for (from, to) in uncovered(start, end, extents) {
            let mut pos = from;
            while pos < to {
                let n = ((to - pos) as usize).min(WRITE_CHUNK);
                file.read_exact_at(&mut buf[..n], pos)
                    .map_err(io_error(path))?;
                if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                    return Err(SnapshotError::DataInHole {
                        path: path.to_owned(),
                        offset: pos + i as u64,
                    });
                }
                pos += n as u64;
            }
        }
        at = end;
    }
    Ok(())
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`; `None` past the last data.
fn seek(file: &File, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own; it only moves the file's offset, which nothing
    // else uses (reads here are positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The parts of `[start, end)` that no extent (sorted, disjoint) covers.
fn uncovered(start: u64, end: u64, extents: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut at = start;
    for &(offset, len) in extents {
        let (e_start, e_end) = (offset, offset + len);
        if e_end <= at || e_start >= end {
            continue;
        }
        if e_start > at {
            gaps.push((at, e_start));
        }
        at = at.max(e_end);
    }
    if at < end {
        gaps.push((at, end));
    }
    gaps
}

/// Opens the image at `path`, hashing it in full unless it is unchanged since it last was.
pub fn open_verified_image(path: &Path, sealer: &Sealer) -> Result<Arc<Image>, SnapshotError> {
    let image = Image::open(path)?;
    let file = File::open(path).map_err(io_error(path))?;
    if !sealer.is_verified(path, &file) {
        image
            .verify_digest()
            .map_err(|_| SnapshotError::ImageCorrupt {
                path: path.to_owned(),
            })?;
        sealer.record_verified(path, &file);
    }
    Ok(Arc::new(image))
}

/// Where a template came from, recorded in its metadata.
pub struct Provenance {
    pub runtime: Runtime,
    pub agent_sha256: String,
    /// Packages fetched from PyPI and npm, as resolved.
    pub packages: Vec<String>,
    /// The spec file's text, for a template built from one.
    pub spec: Option<String>,
    pub lock: Lock,
}

/// Snapshots a sandbox parked on its control channel into `dir` (which must exist and be
/// empty). Returns the metadata written.
pub fn write(
    dir: &Path,
    sandbox: &mut Sandbox,
    vmm: &Vmm,
    entry: Vec<String>,
    provenance: Provenance,
    sealer: &Sealer,
) -> Result<SnapshotMeta, SnapshotError> {
    if sandbox.parked().is_none() {
        return Err(SnapshotError::NotParked);
    }
    let vcpu = sandbox.capture()?;
    let process = sandbox.process();
    let state = SnapshotState {
        vcpu,
        process: process.state(),
    };
    // Everything else in RAM is zero by the kernel's invariant.
    let ranges = process.populated_ranges();
    let memory_path = dir.join("memory");
    let ram_size = process.ram().size();
    let read_ram = |ram: &forkvm_memory::ram::GuestRam, addr: u64, page: &mut [u8]| {
        ram.read(addr, page).map_err(|e| e.to_string())
    };
    let (memory_extents, memory_sha256) =
        write_memory(&memory_path, ram_size, &ranges, |addr, page| {
            read_ram(process.ram(), addr, page)
        })?;
    let mut processes = Vec::new();
    for parked in process.parked_memories() {
        let pid = u64::from(parked.pid);
        let path = dir.join(process_memory_name(pid));
        let (extents, sha256) = write_memory(&path, ram_size, &parked.populated, |addr, page| {
            read_ram(parked.ram, addr, page)
        })?;
        processes.push(StoredMemory {
            id: pid,
            size: ram_size,
            extents,
            sha256,
        });
    }
    let mut segments = Vec::new();
    for (id, file, size, _) in process.segment_files() {
        let path = dir.join(segment_name(id));
        let (extents, sha256) = write_memory(&path, size, &[(0, size)], |at, page| {
            file.read_exact_at(page, at).map_err(|e| e.to_string())
        })?;
        segments.push(StoredMemory {
            id,
            size,
            extents,
            sha256,
        });
    }

    let state_path = dir.join("state.bin");
    let state_bytes = bincode::serialize(&state).map_err(|e| SnapshotError::Malformed {
        path: state_path.clone(),
        reason: e.to_string(),
    })?;
    fs::write(&state_path, &state_bytes).map_err(io_error(&state_path))?;

    let image = process.image();
    let mut meta = SnapshotMeta {
        format: SNAPSHOT_FORMAT,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        image_path: image.path().to_owned(),
        image_digest: hex(&image.digest()),
        entry,
        runtime: provenance.runtime,
        ram_bytes: process.ram().size(),
        memory_extents,
        memory_sha256,
        processes,
        segments,
        state_sha256: hex(&Sha256::digest(&state_bytes)),
        cpu: CpuFeatures::of(vmm.cpu()),
        packages: provenance.packages,
        spec: provenance.spec,
        agent_sha256: provenance.agent_sha256,
        lock: Some(provenance.lock),
        seal: String::new(),
    };
    write_meta(dir, &mut meta, sealer)?;
    Ok(meta)
}

/// Seals `meta` and writes it as `dir/meta.json`.
pub fn write_meta(
    dir: &Path,
    meta: &mut SnapshotMeta,
    sealer: &Sealer,
) -> Result<(), SnapshotError> {
    meta.seal_with(sealer);
    let meta_path = dir.join("meta.json");
    let mut meta_file = File::create(&meta_path).map_err(io_error(&meta_path))?;
    serde_json::to_writer_pretty(&mut meta_file, &meta).map_err(|e| SnapshotError::Malformed {
        path: meta_path.clone(),
        reason: e.to_string(),
    })?;
    meta_file.write_all(b"\n").map_err(io_error(&meta_path))?;
    meta_file.sync_all().map_err(io_error(&meta_path))
}

/// Reads `meta.json` only (for listings).
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let path = dir.join("meta.json");
    let text = fs::read_to_string(&path).map_err(io_error(&path))?;
    let meta: SnapshotMeta = serde_json::from_str(&text).map_err(|e| SnapshotError::Malformed {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if meta.format != SNAPSHOT_FORMAT {
        return Err(SnapshotError::Format { found: meta.format });
    }
    Ok(meta)
}

/// Loads and verifies a snapshot for forking: its metadata must carry `sealer`'s seal, and
/// its files (and its image) must match the digests there. The memory file and the image
/// are hashed in full once after each change (see `seal`).
pub fn load(
    dir: &Path,
    vmm: &Vmm,
    sealer: &Sealer,
) -> Result<(SnapshotMeta, ForkSource), SnapshotError> {
    let Verified {
        meta,
        state,
        memory,
        image,
        others: memories,
        segments,
    } = open_verified(dir, vmm, sealer)?;
    let pinned = |file: File, extents: &[(u64, u64)]| {
        let mut backing = Backing::file(file);
        if let Err(e) = backing.pin(extents) {
            tracing::warn!(error = %e, "could not lock the snapshot in memory; forks may wait for the disk");
        }
        backing
    };
    let mut others = OtherSources::default();
    for (stored, file) in meta.processes.iter().zip(memories) {
        // `open_verified` compared the ids with the state's pids.
        let pid = stored.id.try_into().expect("a pid");
        others.memories.insert(pid, pinned(file, &stored.extents));
    }
    for (stored, file) in meta.segments.iter().zip(segments) {
        others.segments.insert(stored.id, Arc::new(file));
    }
    let source = ForkSource {
        backing: pinned(memory, &meta.memory_extents),
        vcpu: state.vcpu,
        process: state.process,
        image,
        others,
        first_writes: Default::default(),
    };
    Ok((meta, source))
}

/// Verifies a snapshot as `load` does (stamping what it hashed in full), without making it
/// ready to fork: for a process that hands the snapshot to others (jailed workers, which
/// see it read-only and so cannot stamp it themselves).
pub fn verify(dir: &Path, vmm: &Vmm, sealer: &Sealer) -> Result<SnapshotMeta, SnapshotError> {
    Ok(open_verified(dir, vmm, sealer)?.meta)
}

/// The checks of `load`, returning what passed them.
fn open_verified(dir: &Path, vmm: &Vmm, sealer: &Sealer) -> Result<Verified, SnapshotError> {
    let meta = read_meta(dir)?;
    if !meta.sealed_by(sealer) {
        return Err(SnapshotError::Unsealed {
            path: dir.join("meta.json"),
            key: sealer.key_path().to_owned(),
        });
    }
    let missing = meta.cpu.missing_on(&CpuFeatures::of(vmm.cpu()));
    if !missing.is_empty() {
        return Err(SnapshotError::CpuMismatch(missing));
    }

    let state_path = dir.join("state.bin");
    let state_len = fs::metadata(&state_path)
        .map_err(io_error(&state_path))?
        .len();
    if state_len > MAX_STATE_BYTES {
        return Err(SnapshotError::Malformed {
            path: state_path,
            reason: format!("{state_len} bytes is implausibly large"),
        });
    }
    let state_bytes = fs::read(&state_path).map_err(io_error(&state_path))?;
    if hex(&Sha256::digest(&state_bytes)) != meta.state_sha256 {
        return Err(SnapshotError::Corrupt { path: state_path });
    }
    let state: SnapshotState =
        bincode::deserialize(&state_bytes).map_err(|e| SnapshotError::Malformed {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;

    let memory_path = dir.join("memory");
    if state.process.ram_size() != meta.ram_bytes {
        return Err(SnapshotError::Malformed {
            path: state_path,
            reason: format!("state for a {}-byte guest", state.process.ram_size()),
        });
    }
    let init = StoredMemory {
        id: 1,
        size: meta.ram_bytes,
        extents: meta.memory_extents.clone(),
        sha256: meta.memory_sha256.clone(),
    };
    let memory = open_memory(&memory_path, &init, sealer)?;
    for stored in &meta.processes {
        if stored.size != meta.ram_bytes {
            return Err(SnapshotError::Malformed {
                path: dir.join(process_memory_name(stored.id)),
                reason: format!(
                    "{} bytes of memory for a {}-byte guest",
                    stored.size, meta.ram_bytes
                ),
            });
        }
    }
    let stored_pids: Vec<u64> = meta.processes.iter().map(|m| m.id).collect();
    let stored_segments: Vec<(u64, u64)> = meta.segments.iter().map(|m| (m.id, m.size)).collect();
    let state_pids: Vec<u64> = state
        .process
        .memories()
        .into_iter()
        .map(u64::from)
        .collect();
    if stored_pids != state_pids || stored_segments != state.process.segments() {
        return Err(SnapshotError::Malformed {
            path: dir.join("meta.json"),
            reason: "its processes and segments are not the state's".into(),
        });
    }

    let image = open_verified_image(&meta.image_path, sealer)?;
    let digest = hex(&image.digest());
    if digest != meta.image_digest {
        return Err(SnapshotError::ImageMismatch {
            expected: meta.image_digest.clone(),
            found: digest,
            path: meta.image_path.clone(),
        });
    }
    // Every other memory file, verified (and stamped) here too: `verify` must leave
    // nothing for a jailed worker's `load` to hash in full.
    let mut others = Vec::new();
    for stored in &meta.processes {
        let path = dir.join(process_memory_name(stored.id));
        others.push(open_memory(&path, stored, sealer)?);
    }
    let mut segments = Vec::new();
    for stored in &meta.segments {
        segments.push(open_memory(
            &dir.join(segment_name(stored.id)),
            stored,
            sealer,
        )?);
    }
    Ok(Verified {
        meta,
        state,
        memory,
        image,
        others,
        segments,
    })
}

/// A snapshot that passed `open_verified`: its files open, in `meta`'s order.
struct Verified {
    meta: SnapshotMeta,
    state: SnapshotState,
    memory: File,
    image: Arc<Image>,
    others: Vec<File>,
    segments: Vec<File>,
}

#[cfg(test)]
mod tests {
    use super::uncovered;

    #[test]
    fn uncovered_finds_the_gaps_between_extents() {
        let extents = [(4096, 4096), (16384, 8192)];
        assert_eq!(
            uncovered(0, 32768, &extents),
            [(0, 4096), (8192, 16384), (24576, 32768)]
        );
        assert_eq!(uncovered(4096, 8192, &extents), []);
        assert_eq!(uncovered(6000, 20000, &extents), [(8192, 16384)]);
    }
}
