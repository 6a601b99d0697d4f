//! Paused sessions on disk: written so that a crash at any moment leaves either the last
//! complete pause or nothing, and read back only if it is exactly what was written.
//!
//! `<cache>/sessions/` holds:
//! * `<id>.<generation>/`: one complete pause: `manifest.json` (sealed with the cache's key:
//!   who owns the session, its template's digest, the CPU features it needs, and digests of
//!   everything else), `state.bin` (the vCPU and syscall-layer state) and `memory-<n>` (each
//!   memory file, sparse: the non-zero pages of its ranges).
//! * `.writing-<id>.<generation>/`: a pause being written. Each file is written and
//!   `fsync`ed, then the manifest, then the directory is renamed into place and the parent
//!   `fsync`ed: the rename is the commit. Older generations of the session go after it.
//! * `.deleting-<id>.<generation>/`: a pause being deleted (renamed first, so a crash
//!   never leaves half of one under its own name).
//! * `running/<id>`: a session that is running (not paused) now. After a crash, the
//!   markers with no pause are the sessions the crash lost; `recover` counts them.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use forkvm_protocol::worker::{PausedMemory, PausedSession};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpu::CpuFeatures;
use crate::seal::Sealer;
use crate::snapshot::{StoredMemory, hex, open_memory, write_memory};

/// Version of the paused-session format; others are refused.
pub const PAUSED_FORMAT: u32 = 1;
/// Largest `state.bin` read back (a guard against a corrupt size, not a real limit).
const MAX_STATE_BYTES: u64 = 1 << 30;
/// Largest `manifest.json` read back.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// What a writer's temporary directory is called before its rename.
const WRITING: &str = ".writing-";
/// What a pause being deleted is renamed to first.
const DELETING: &str = ".deleting-";
const RUNNING: &str = "running";

/// Why a paused session could not be stored or brought back.
#[derive(Debug, thiserror::Error)]
pub enum PausedError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the paused session {id} was not found")]
    NotFound { id: String },
    #[error("the paused session's {what} is corrupt ({why}); it cannot be resumed")]
    Corrupt { what: String, why: String },
    #[error(
        "the paused session needs CPU features this host does not offer: {}; resume it on a machine that has them",
        .0.join(", ")
    )]
    CpuMismatch(Vec<String>),
    #[error(
        "the paused session was made from another build of template {template:?} (digest {paused}, now {current}); it cannot be resumed over this one"
    )]
    TemplateChanged {
        template: String,
        paused: String,
        current: String,
    },
    #[error("{0} memory files for {1} described")]
    FileCount(usize, usize),
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> PausedError + '_ {
    move |source| PausedError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(what: &str, why: impl std::fmt::Display) -> PausedError {
    PausedError::Corrupt {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// Who a session belongs to and how it was made: what the server needs to serve it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    /// The API key's name.
    pub owner: String,
    pub template: String,
    pub metadata: BTreeMap<String, String>,
    pub ttl_seconds: u64,
    pub created_unix: u64,
}

/// One stored memory file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPart {
    pub memory: PausedMemory,
    /// `(offset, length)` of the file's data runs; the rest is holes.
    pub extents: Vec<(u64, u64)>,
    pub sha256: String,
}

/// What `manifest.json` says about a pause.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub record: SessionRecord,
    pub paused_unix: u64,
    /// The template build the session's memory is layered over (`SnapshotMeta::digest`).
    pub template_digest: String,
    /// The CPU features its state was captured under.
    pub cpu: CpuFeatures,
    pub mapped_at_start: u64,
    pub parts: Vec<StoredPart>,
    pub state_sha256: String,
    /// Bytes of data stored (what counts against the owner's quota).
    pub stored_bytes: u64,
    /// HMAC-SHA256 of all of the above with the cache's key; empty while it is computed.
    pub seal: String,
}

impl Manifest {
    fn sealed_bytes(&self) -> Vec<u8> {
        let unsealed = Manifest {
            seal: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&unsealed).expect("the manifest serializes")
    }
}

/// A paused session's state and memory files, ready to resume.
pub struct Loaded {
    pub manifest: Manifest,
    pub paused: PausedSession,
    pub files: Vec<File>,
}

/// What a server finds when it starts.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every complete pause, one per session.
    pub paused: Vec<Manifest>,
    /// Sessions that were running when the last server stopped without pausing them.
    pub lost: Vec<String>,
    /// Pauses that exist but cannot be read (deleted, with why).
    pub unreadable: Vec<(String, String)>,
}

/// The paused sessions of one cache directory.
pub struct PausedStore {
    root: PathBuf,
    sealer: Sealer,
    /// The lock a serving store holds (`open_exclusive`), released when it is dropped.
    _lock: Option<File>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `fsync` of a directory: makes the names created or renamed in it durable.
fn sync_dir(path: &Path) -> Result<(), PausedError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_error(path))
}

/// Ids are the server's UUIDs; anything else (a path) is refused before it names a file.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl PausedStore {
    /// The store of `cache_dir` (its `sessions/` directory, created if missing).
    pub fn open(cache_dir: &Path) -> Result<PausedStore, PausedError> {
        let root = cache_dir.join("sessions");
        let running = root.join(RUNNING);
        fs::create_dir_all(&running).map_err(io_error(&running))?;
        // Sessions hold their users' data: the server's alone to read.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_error(&root))?;
        let sealer = Sealer::open(cache_dir).map_err(io_error(cache_dir))?;
        Ok(PausedStore {
            root,
            sealer,
            _lock: None,
        })
    }

    /// The store of `cache_dir` for the one server that serves its sessions: `None` if
    /// another process holds it (two servers recovering and pausing the same sessions
    /// would take each other's).
    pub fn open_exclusive(cache_dir: &Path) -> Result<Option<PausedStore>, PausedError> {
        let mut store = PausedStore::open(cache_dir)?;
        let path = store.root.join(".lock");
        let lock = File::create(&path).map_err(io_error(&path))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; it takes no pointers.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            return Ok(None);
        }
        store._lock = Some(lock);
        Ok(Some(store))
    }

    /// Notes that session `id` runs now (see `recover`). Best effort: a marker that cannot be
    /// written only makes a crash's count of lost sessions low.
    pub fn mark_running(&self, id: &str) {
        if valid_id(id) {
            let _ = File::create(self.root.join(RUNNING).join(id));
        }
    }

    /// Notes that session `id` no longer runs (paused or deleted).
    pub fn unmark_running(&self, id: &str) {
        if valid_id(id) {
            let _ = fs::remove_file(self.root.join(RUNNING).join(id));
        }
    }

    /// Stores a pause of session `record.id` atomically, replacing its earlier pause (if
    /// any) only once this one is complete on disk.
    pub fn write(
        &self,
        record: &SessionRecord,
        template_digest: &str,
        cpu: CpuFeatures,
        paused: &PausedSession,
        files: &[File],
    ) -> Result<Manifest, PausedError> {
        if !valid_id(&record.id) {
            return Err(corrupt(
                "id",
                format!("{:?} is not a session id", record.id),
            ));
        }
        if files.len() != paused.memories.len() {
            return Err(PausedError::FileCount(files.len(), paused.memories.len()));
        }
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("{}.{generation:024}", record.id);
        let staging = self.root.join(format!("{WRITING}{name}"));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir(&staging).map_err(io_error(&staging))?;
        let written = self.fill(&staging, record, template_digest, cpu, paused, files);
        let manifest = match written {
            Ok(manifest) => manifest,
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let dir = self.root.join(&name);
        fs::rename(&staging, &dir).map_err(io_error(&dir))?;
        sync_dir(&self.root)?;
        // Committed: earlier pauses of the session are garbage now.
        self.remove_generations(&record.id, Some(&name));
        Ok(manifest)
    }

    /// Writes every file of a pause into `dir`, then its sealed manifest.
    fn fill(
        &self,
        dir: &Path,
        record: &SessionRecord,
        template_digest: &str,
        cpu: CpuFeatures,
        paused: &PausedSession,
        files: &[File],
    ) -> Result<Manifest, PausedError> {
        let snapshot_error = |e: crate::SnapshotError| corrupt("memory", e);
        let mut parts = Vec::with_capacity(files.len());
        let mut stored_bytes = paused.state.len() as u64;
        for (n, (memory, file)) in paused.memories.iter().zip(files).enumerate() {
            let path = dir.join(format!("memory-{n}"));
            let ranges = page_ranges(&memory.ranges, memory.size);
            let (extents, sha256) = write_memory(&path, memory.size, &ranges, |at, page| {
                read_page(file, at, page).map_err(|e| e.to_string())
            })
            .map_err(snapshot_error)?;
            stored_bytes += extents.iter().map(|e| e.1).sum::<u64>();
            // Verified as it was written: resuming need not hash it again.
            if let Ok(written) = File::open(&path) {
                self.sealer.record_verified(&path, &written);
            }
            parts.push(StoredPart {
                memory: memory.clone(),
                extents,
                sha256,
            });
        }
        let state_path = dir.join("state.bin");
        write_synced(&state_path, &paused.state)?;
        let mut manifest = Manifest {
            format: PAUSED_FORMAT,
            record: record.clone(),
            paused_unix: now_unix(),
            template_digest: template_digest.to_string(),
            cpu,
            mapped_at_start: paused.mapped_at_start,
            parts,
            state_sha256: hex(&Sha256::digest(&paused.state)),
            stored_bytes,
            seal: String::new(),
        };
        manifest.seal = self.sealer.seal(&manifest.sealed_bytes());
        let text = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
        write_synced(&dir.join("manifest.json"), &text)?;
        sync_dir(dir)?;
        Ok(manifest)
    }

    /// The complete pauses of session `id`, newest first.
    fn generations(&self, id: &str) -> Vec<String> {
        let prefix = format!("{id}.");
        let mut names: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        names
    }

    /// Deletes session `id`'s pauses except `keep`.
    ///
    /// Each goes in one step: renamed out of the way (a name recovery discards), the rename
    /// made durable, then removed. A crash halfway through removing files never leaves a
    /// pause that looks complete but is not, or brings back a deleted session.
    fn remove_generations(&self, id: &str, keep: Option<&str>) {
        let mut renamed = Vec::new();
        for name in self.generations(id) {
            if Some(name.as_str()) != keep {
                let doomed = self.root.join(format!("{DELETING}{name}"));
                if fs::rename(self.root.join(&name), &doomed).is_ok() {
                    renamed.push(doomed);
                }
            }
        }
        if renamed.is_empty() {
            return;
        }
        let _ = sync_dir(&self.root);
        for doomed in renamed {
            let _ = fs::remove_dir_all(doomed);
        }
    }

    /// Deletes session `id`'s pauses (it was resumed).
    pub fn remove_pauses(&self, id: &str) {
        if valid_id(id) {
            self.remove_generations(id, None);
        }
    }

    /// Deletes everything stored for session `id`.
    pub fn remove(&self, id: &str) {
        if valid_id(id) {
            self.remove_generations(id, None);
            self.unmark_running(id);
        }
    }

    /// Reads session `id`'s latest pause, verified: sealed by this cache's key, every file
    /// matching its digest, made over template build `template_digest`, and needing no CPU
    /// feature `host` lacks.
    pub fn load(
        &self,
        id: &str,
        template_digest: &str,
        host: &CpuFeatures,
    ) -> Result<Loaded, PausedError> {
        let not_found = || PausedError::NotFound { id: id.to_string() };
        if !valid_id(id) {
            return Err(not_found());
        }
        let name = self
            .generations(id)
            .into_iter()
            .next()
            .ok_or_else(not_found)?;
        let dir = self.root.join(name);
        let manifest = self.manifest(&dir)?;
        if manifest.record.id != id {
            return Err(corrupt("manifest", "it names another session"));
        }
        let missing = manifest.cpu.missing_on(host);
        if !missing.is_empty() {
            return Err(PausedError::CpuMismatch(missing));
        }
        if manifest.template_digest != template_digest {
            return Err(PausedError::TemplateChanged {
                template: manifest.record.template.clone(),
                paused: manifest.template_digest.clone(),
                current: template_digest.to_string(),
            });
        }
        let state_path = dir.join("state.bin");
        let state = read_bounded(&state_path, MAX_STATE_BYTES)?;
        if hex(&Sha256::digest(&state)) != manifest.state_sha256 {
            return Err(corrupt("state", "its digest does not match"));
        }
        let mut files = Vec::with_capacity(manifest.parts.len());
        for (n, part) in manifest.parts.iter().enumerate() {
            let stored = StoredMemory {
                id: n as u64,
                size: part.memory.size,
                extents: part.extents.clone(),
                sha256: part.sha256.clone(),
            };
            let path = dir.join(format!("memory-{n}"));
            files
                .push(open_memory(&path, &stored, &self.sealer).map_err(|e| corrupt("memory", e))?);
        }
        let paused = PausedSession {
            state,
            mapped_at_start: manifest.mapped_at_start,
            memories: manifest.parts.iter().map(|p| p.memory.clone()).collect(),
        };
        Ok(Loaded {
            manifest,
            paused,
            files,
        })
    }

    /// `dir`'s manifest, if it is sealed by this cache's key and of this format.
    fn manifest(&self, dir: &Path) -> Result<Manifest, PausedError> {
        let bytes = read_bounded(&dir.join("manifest.json"), MAX_MANIFEST_BYTES)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| corrupt("manifest", e))?;
        if !self.sealer.check(&manifest.sealed_bytes(), &manifest.seal) {
            return Err(corrupt(
                "manifest",
                "it is not sealed with this cache's key",
            ));
        }
        if manifest.format != PAUSED_FORMAT {
            return Err(corrupt(
                "manifest",
                format!(
                    "format {} (this forkvm reads {PAUSED_FORMAT})",
                    manifest.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// What a starting server serves: the newest complete pause of each session (older
    /// ones and unfinished writes are deleted), and the sessions a crash lost (their
    /// markers are cleared, so each is counted once).
    pub fn recover(&self) -> Recovered {
        let mut recovered = Recovered::default();
        let mut newest: BTreeMap<String, String> = BTreeMap::new();
        for entry in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(WRITING) || name.starts_with(DELETING) {
                let _ = fs::remove_dir_all(entry.path());
                continue;
            }
            let Some((id, _)) = name.split_once('.') else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            let slot = newest.entry(id.to_string()).or_default();
            if name > *slot {
                *slot = name;
            }
        }
        for (id, name) in &newest {
            self.remove_generations(id, Some(name));
            match self.manifest(&self.root.join(name)) {
                Ok(manifest) if manifest.record.id == *id => recovered.paused.push(manifest),
                Ok(_) => {
                    recovered
                        .unreadable
                        .push((id.clone(), "its manifest names another session".into()));
                    self.remove_generations(id, None);
                }
                Err(e) => {
                    recovered.unreadable.push((id.clone(), e.to_string()));
                    self.remove_generations(id, None);
                }
            }
        }
        let running = self.root.join(RUNNING);
        for entry in fs::read_dir(&running).into_iter().flatten().flatten() {
            let Ok(id) = entry.file_name().into_string() else {
                continue;
            };
            if !recovered.paused.iter().any(|m| m.record.id == id) {
                recovered.lost.push(id);
            }
            let _ = fs::remove_file(entry.path());
        }
        recovered
    }

    /// How many paused sessions are made over template `template` (which must then not be
    /// rebuilt under them).
    pub fn sessions_over(&self, template: &str) -> usize {
        let mut ids = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == RUNNING {
                continue;
            }
            if let Ok(manifest) = self.manifest(&entry.path())
                && manifest.record.template == template
            {
                ids.insert(manifest.record.id);
            }
        }
        ids.len()
    }
}

/// `ranges` clipped to `size`, each start page aligned (a segment's last page may be
/// partial; it is read as zeros past the end).
fn page_ranges(ranges: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let page = forkvm_memory::ram::PAGE_SIZE;
    let end = size.next_multiple_of(page);
    ranges
        .iter()
        .map(|&(s, e)| (s / page * page, e.min(end).next_multiple_of(page)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// Reads one page at `at`, zeros past the end of the file.
fn read_page(file: &File, at: u64, page: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < page.len() {
        match file.read_at(&mut page[done..], at + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    page[done..].fill(0);
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), PausedError> {
    let file = File::create(path).map_err(io_error(path))?;
    file.write_all_at(data, 0).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, PausedError> {
    let len = fs::metadata(path).map_err(io_error(path))?.len();
    if len > max {
        return Err(corrupt(
            &path.display().to_string(),
            format!("{len} bytes is implausibly large"),
        ));
    }
    fs::read(path).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_protocol::worker::PausedPart;
    use std::io::Write;

    fn record(id: &str) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            owner: "alice".into(),
            template: "python".into(),
            metadata: BTreeMap::new(),
            ttl_seconds: 60,
            created_unix: 1,
        }
    }

    fn layer(bytes: &[u8]) -> (PausedMemory, File) {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file.set_len(1 << 16).unwrap();
        let memory = PausedMemory {
            part: PausedPart::Main,
            size: 1 << 16,
            ranges: vec![(0, 8192)],
            over_template: true,
        };
        (memory, file)
    }

    fn cpu() -> CpuFeatures {
        CpuFeatures {
            words: vec![(1, 0, 2, 0b11)],
            xcr0: 7,
        }
    }

    fn pause(store: &PausedStore, id: &str, content: &[u8]) -> Manifest {
        let (memory, file) = layer(content);
        let paused = PausedSession {
            state: b"state".to_vec(),
            mapped_at_start: 5,
            memories: vec![memory],
        };
        store
            .write(&record(id), "t1", cpu(), &paused, &[file])
            .unwrap()
    }

    const ID: &str = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn a_pause_reads_back_and_replaces_the_one_before() {
        let tmp = tempfile::tempdir().unwrap();
        let store = PausedStore::open(tmp.path()).unwrap();
        pause(&store, ID, b"first");
        let manifest = pause(&store, ID, b"second");
        assert_eq!(store.generations(ID).len(), 1);
        let loaded = store.load(ID, "t1", &cpu()).unwrap();
        assert_eq!(loaded.paused.state, b"state");
        assert_eq!(loaded.manifest.stored_bytes, manifest.stored_bytes);
        let mut head = [0u8; 6];
        loaded.files[0].read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"second");
        assert_eq!(store.sessions_over("python"), 1);
        store.remove(ID);
        assert!(matches!(
            store.load(ID, "t1", &cpu()),
            Err(PausedError::NotFound { .. })
        ));
    }

    #[test]
    fn a_changed_template_cpu_or_byte_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = PausedStore::open(tmp.path()).unwrap();
        pause(&store, ID, b"data");
        let err = store.load(ID, "t2", &cpu()).err().unwrap();
        assert!(matches!(err, PausedError::TemplateChanged { .. }), "{err}");
        let poorer = CpuFeatures {
            words: vec![(1, 0, 2, 0b01)],
            xcr0: 7,
        };
        let err = store.load(ID, "t1", &poorer).err().unwrap();
        assert!(err.to_string().contains("cpuid"), "{err}");
        // A byte changed in the memory file (its stamp then no longer matches).
        let dir = tmp.path().join("sessions").join(&store.generations(ID)[0]);
        let memory = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("memory-0"))
            .unwrap();
        memory.write_all_at(b"D", 0).unwrap();
        let err = store.load(ID, "t1", &cpu()).err().unwrap();
        assert!(matches!(err, PausedError::Corrupt { .. }), "{err}");
        // A manifest edited by anyone without the key.
        let text = fs::read_to_string(dir.join("manifest.json")).unwrap();
        fs::write(dir.join("manifest.json"), text.replace("alice", "mallory")).unwrap();
        let err = store.load(ID, "t1", &cpu()).err().unwrap();
        assert!(err.to_string().contains("sealed"), "{err}");
    }

    #[test]
    fn recovery_keeps_complete_pauses_and_counts_lost_sessions() {
        let tmp = tempfile::tempdir().unwrap();
        let store = PausedStore::open(tmp.path()).unwrap();
        let lost = "0190a1b2-c3d4-7e5f-8a9b-000000000001";
        pause(&store, ID, b"kept");
        store.mark_running(ID);
        store.mark_running(lost);
        // A pause cut short: its directory was never renamed into place; and a deletion
        // cut short: renamed out of the way, half removed.
        fs::create_dir(tmp.path().join("sessions").join(format!("{WRITING}{ID}.9"))).unwrap();
        let other = "0190a1b2-c3d4-7e5f-8a9b-000000000002";
        fs::create_dir(
            tmp.path()
                .join("sessions")
                .join(format!("{DELETING}{other}.1")),
        )
        .unwrap();
        let recovered = store.recover();
        assert_eq!(recovered.paused.len(), 1);
        assert_eq!(recovered.paused[0].record, record(ID));
        assert_eq!(recovered.lost, [lost]);
        assert!(recovered.unreadable.is_empty());
        assert_eq!(
            fs::read_dir(tmp.path().join("sessions")).unwrap().count(),
            2
        );
        // Counted once.
        assert!(store.recover().lost.is_empty());
    }
}
