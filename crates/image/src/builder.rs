//! Packs a host directory tree into an image file (layout in [`crate::format`]).
//!
//! Deterministic: directories are walked breadth-first with entries sorted by name bytes, so the
//! same tree always gives the same bytes and digest. Hard links inside the tree (same device and
//! inode) become one image inode named by several directory entries, with its data stored once
//! and `nlink` counting the links inside the tree. Device nodes, fifos and sockets are skipped
//! and counted. The output appears atomically: written to a temporary file beside it, synced,
//! then renamed.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::format::{
    ALIGN_THRESHOLD, DIGEST_LEN, DIRENT_LEN, DirentRecord, FORMAT_VERSION, HEADER_LEN, Header,
    INODE_LEN, InodeRecord, Kind, NAME_MAX, page_align,
};

/// Why building an image failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The source path is not a directory.
    #[error("image source {0} is not a directory")]
    SourceNotDir(PathBuf),
    /// Reading a source directory failed.
    #[error("reading directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    /// `lstat` of a source entry failed.
    #[error("stat {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
    /// Reading a symlink target failed.
    #[error("readlink {path}: {source}")]
    ReadLink { path: PathBuf, source: io::Error },
    /// Opening or reading a source file failed.
    #[error("reading {path}: {source}")]
    ReadFile { path: PathBuf, source: io::Error },
    /// A source file's size changed while the image was being built.
    #[error("{0} changed while the image was being built")]
    SourceChanged(PathBuf),
    /// A name longer than 255 bytes (impossible on Linux file systems, checked anyway).
    #[error("name too long: {0}")]
    NameTooLong(PathBuf),
    /// More inodes, entries or string bytes than the format's 32-bit indexes can hold.
    #[error("source tree too large for the image format")]
    TooLarge,
    /// Creating, writing or syncing the temporary output file failed.
    #[error("writing image {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// Renaming the finished temporary file onto the output path failed.
    #[error("renaming {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

/// What a build packed: counts for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStats {
    /// Regular-file inodes (hard links counted once).
    pub files: u64,
    /// Directories, including the root.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Directory entries that name an already-packed file (extra hard links).
    pub hard_links: u64,
    /// Device nodes, fifos and sockets left out.
    pub skipped: u64,
    /// Files whose data starts on a page boundary (mappable by the VMM).
    pub aligned_files: u64,
    /// Total file content bytes.
    pub data_bytes: u64,
    /// Size of the image file.
    pub image_len: u64,
    /// SHA-256 content digest written into the header.
    pub digest: [u8; DIGEST_LEN],
}

/// An inode collected from the tree, before layout.
struct PendingInode {
    record: InodeRecord,
    source: Source,
}

enum Source {
    File { path: PathBuf, aligned: bool },
    Dir,
    Symlink,
}

/// Everything learned from walking the tree.
struct Tree {
    inodes: Vec<PendingInode>,
    dirents: Vec<DirentRecord>,
    strings: Vec<u8>,
    stats: BuildStats,
}

/// Packs the tree at `source` into an image at `output`, replacing any file there atomically.
pub fn build_image(source: &Path, output: &Path) -> Result<BuildStats, BuildError> {
    let mut tree = walk(source)?;
    let header = layout(&mut tree)?;
    let temp = TempOutput::create(output)?;
    let digest = write_image(&tree, &header, &temp).map_err(|error| match error {
        WriteError::Io(source) => BuildError::Write {
            path: temp.path.clone(),
            source,
        },
        WriteError::Build(build) => build,
    })?;
    temp.persist(output)?;
    tree.stats.image_len = header.file_len;
    tree.stats.digest = digest;
    Ok(tree.stats)
}

fn walk(source: &Path) -> Result<Tree, BuildError> {
    let stat = |path: &Path| {
        fs::symlink_metadata(path).map_err(|source| BuildError::Stat {
            path: path.to_owned(),
            source,
        })
    };
    let root_meta = fs::metadata(source).map_err(|error| BuildError::Stat {
        path: source.to_owned(),
        source: error,
    })?;
    if !root_meta.is_dir() {
        return Err(BuildError::SourceNotDir(source.to_owned()));
    }
    let mut tree = Tree {
        inodes: vec![PendingInode {
            record: inode_record(Kind::Dir, &root_meta, 0),
            source: Source::Dir,
        }],
        dirents: Vec::new(),
        strings: Vec::new(),
        stats: BuildStats {
            files: 0,
            dirs: 1,
            symlinks: 0,
            hard_links: 0,
            skipped: 0,
            aligned_files: 0,
            data_bytes: 0,
            image_len: 0,
            digest: [0; DIGEST_LEN],
        },
    };
    let mut string_ids: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut hard_linked: HashMap<(u64, u64), u32> = HashMap::new();
    let mut queue = VecDeque::from([(0u32, source.to_owned())]);
    while let Some((dir_ino, dir_path)) = queue.pop_front() {
        let mut names = fs::read_dir(&dir_path)
            .and_then(|entries| {
                entries
                    .map(|entry| entry.map(|e| e.file_name()))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|source| BuildError::ReadDir {
                path: dir_path.clone(),
                source,
            })?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let first = to_u32(tree.dirents.len())?;
        for name in names {
            let path = dir_path.join(&name);
            if name.len() > NAME_MAX {
                return Err(BuildError::NameTooLong(path));
            }
            let meta = stat(&path)?;
            let file_type = meta.file_type();
            let (kind, ino) = if file_type.is_dir() {
                let ino = push_inode(&mut tree.inodes, Kind::Dir, &meta, dir_ino, Source::Dir)?;
                tree.inodes[dir_ino as usize].record.nlink += 1;
                tree.stats.dirs += 1;
                queue.push_back((ino, path));
                (Kind::Dir, ino)
            } else if file_type.is_file() {
                let key = (meta.dev(), meta.ino());
                if let Some(&ino) = hard_linked.get(&key) {
                    tree.inodes[ino as usize].record.nlink += 1;
                    tree.stats.hard_links += 1;
                    (Kind::File, ino)
                } else {
                    let aligned = meta.len() >= ALIGN_THRESHOLD || is_elf(&path)?;
                    tree.stats.files += 1;
                    tree.stats.aligned_files += u64::from(aligned);
                    tree.stats.data_bytes += meta.len();
                    let source = Source::File { path, aligned };
                    let ino = push_inode(&mut tree.inodes, Kind::File, &meta, 0, source)?;
                    if meta.nlink() > 1 {
                        hard_linked.insert(key, ino);
                    }
                    (Kind::File, ino)
                }
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path).map_err(|source| BuildError::ReadLink {
                    path: path.clone(),
                    source,
                })?;
                let target = target.as_os_str().as_bytes();
                let offset = intern(&mut tree.strings, &mut string_ids, target)?;
                let ino = push_inode(&mut tree.inodes, Kind::Symlink, &meta, 0, Source::Symlink)?;
                let record = &mut tree.inodes[ino as usize].record;
                record.size = target.len() as u64;
                record.offset = u64::from(offset);
                tree.stats.symlinks += 1;
                (Kind::Symlink, ino)
            } else {
                tree.stats.skipped += 1;
                continue;
            };
            let name_offset = intern(&mut tree.strings, &mut string_ids, name.as_bytes())?;
            tree.dirents.push(DirentRecord {
                name_offset,
                name_len: name.len() as u16,
                kind,
                ino,
            });
        }
        let record = &mut tree.inodes[dir_ino as usize].record;
        record.offset = u64::from(first);
        record.size = u64::from(to_u32(tree.dirents.len())? - first);
    }
    Ok(tree)
}

fn inode_record(kind: Kind, meta: &fs::Metadata, parent: u32) -> InodeRecord {
    InodeRecord {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        mtime_sec: meta.mtime(),
        // Always within 0..1e9 on Linux.
        mtime_nsec: meta.mtime_nsec() as u32,
        size: 0,
        offset: 0,
        parent,
    }
}

fn push_inode(
    inodes: &mut Vec<PendingInode>,
    kind: Kind,
    meta: &fs::Metadata,
    parent: u32,
    source: Source,
) -> Result<u32, BuildError> {
    let ino = to_u32(inodes.len())?;
    let mut record = inode_record(kind, meta, parent);
    if kind == Kind::File {
        record.size = meta.len();
    }
    inodes.push(PendingInode { record, source });
    Ok(ino)
}

/// Adds `bytes` to the string table once and returns its offset.
fn intern(
    strings: &mut Vec<u8>,
    ids: &mut HashMap<Vec<u8>, u32>,
    bytes: &[u8],
) -> Result<u32, BuildError> {
    if let Some(&offset) = ids.get(bytes) {
        return Ok(offset);
    }
    let offset = to_u32(strings.len())?;
    strings.extend_from_slice(bytes);
    to_u32(strings.len())?;
    ids.insert(bytes.to_vec(), offset);
    Ok(offset)
}

fn to_u32(value: usize) -> Result<u32, BuildError> {
    u32::try_from(value).map_err(|_| BuildError::TooLarge)
}

fn is_elf(path: &Path) -> Result<bool, BuildError> {
    let read_error = |source| BuildError::ReadFile {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    let mut file = File::open(path).map_err(read_error)?;
    let mut filled = 0;
    while filled < magic.len() {
        match file.read(&mut magic[filled..]).map_err(read_error)? {
            0 => return Ok(false),
            n => filled += n,
        }
    }
    Ok(magic == *b"\x7fELF")
}

/// Assigns table offsets and file data offsets; returns the header (digest still zero).
fn layout(tree: &mut Tree) -> Result<Header, BuildError> {
    let inode_table_offset = HEADER_LEN as u64;
    let dirent_table_offset = inode_table_offset + (tree.inodes.len() * INODE_LEN) as u64;
    let string_table_offset = dirent_table_offset + (tree.dirents.len() * DIRENT_LEN) as u64;
    let data_offset = page_align(string_table_offset + tree.strings.len() as u64);
    // Small files packed together first, then the mappable ones each on their own pages.
    let mut cursor = data_offset;
    for pending in &mut tree.inodes {
        if let Source::File { aligned: false, .. } = pending.source {
            pending.record.offset = cursor;
            cursor += pending.record.size;
        }
    }
    cursor = page_align(cursor);
    for pending in &mut tree.inodes {
        if let Source::File { aligned: true, .. } = pending.source {
            pending.record.offset = cursor;
            cursor = page_align(cursor + pending.record.size);
        }
    }
    Ok(Header {
        version: FORMAT_VERSION,
        inode_count: to_u32(tree.inodes.len())?,
        dirent_count: to_u32(tree.dirents.len())?,
        inode_table_offset,
        dirent_table_offset,
        string_table_offset,
        string_table_len: tree.strings.len() as u64,
        data_offset,
        data_len: cursor - data_offset,
        file_len: cursor,
        digest: [0; DIGEST_LEN],
    })
}

enum WriteError {
    Io(io::Error),
    Build(BuildError),
}

impl From<io::Error> for WriteError {
    fn from(error: io::Error) -> Self {
        WriteError::Io(error)
    }
}

/// A writer that hashes and counts everything written through it.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    position: u64,
}

impl HashingWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.inner.write_all(bytes)?;
        self.hasher.update(bytes);
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, offset: u64) -> io::Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.position < offset {
            let n = (offset - self.position).min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }
}

fn write_image(tree: &Tree, header: &Header, temp: &TempOutput) -> Result<[u8; 32], WriteError> {
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, temp.file.try_clone()?),
        hasher: Sha256::new(),
        position: 0,
    };
    out.write(&header.encode())?;
    for pending in &tree.inodes {
        out.write(&pending.record.encode())?;
    }
    for dirent in &tree.dirents {
        out.write(&dirent.encode())?;
    }
    out.write(&tree.strings)?;
    // Inodes were laid out packed-then-aligned; write them in that same order.
    for aligned in [false, true] {
        for pending in &tree.inodes {
            let Source::File { path, aligned: a } = &pending.source else {
                continue;
            };
            if *a != aligned {
                continue;
            }
            out.pad_to(pending.record.offset)?;
            copy_file(path, pending.record.size, &mut out)?;
        }
    }
    out.pad_to(header.file_len)?;
    let digest: [u8; 32] = out.hasher.finalize().into();
    let mut file = out.inner.into_inner().map_err(|e| e.into_error())?;
    let mut final_header = header.clone();
    final_header.digest = digest;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&final_header.encode())?;
    file.sync_all()?;
    Ok(digest)
}

fn copy_file(path: &Path, size: u64, out: &mut HashingWriter) -> Result<(), WriteError> {
    let read_error = |source| {
        WriteError::Build(BuildError::ReadFile {
            path: path.to_owned(),
            source,
        })
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut copied = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        copied += n as u64;
        if copied > size {
            break;
        }
        out.write(&buf[..n])?;
    }
    if copied != size {
        return Err(WriteError::Build(BuildError::SourceChanged(
            path.to_owned(),
        )));
    }
    Ok(())
}

/// The temporary output file; removed on drop unless persisted.
struct TempOutput {
    file: File,
    path: PathBuf,
    persisted: bool,
}

impl TempOutput {
    fn create(output: &Path) -> Result<TempOutput, BuildError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = output.file_name().unwrap_or_default().to_string_lossy();
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = output.with_file_name(format!(".{name}.tmp-{}-{unique}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| BuildError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(TempOutput {
            file,
            path,
            persisted: false,
        })
    }

    fn persist(mut self, output: &Path) -> Result<(), BuildError> {
        fs::rename(&self.path, output).map_err(|source| BuildError::Rename {
            from: self.path.clone(),
            to: output.to_owned(),
            source,
        })?;
        self.persisted = true;
        // Make the rename itself durable; a failure here leaves a complete image in place.
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| BuildError::Write {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the error being reported matters more than a stray temp file.
            let _ = fs::remove_file(&self.path);
        }
    }
}
