//! Read-only access to an image file through one host `mmap`.
//!
//! Opening checks the header and the placement of the tables; every inode and directory entry
//! is then checked when it is read, so a corrupted or hostile image yields [`ImageError`]s and
//! never a panic or a read outside the mapping. Lookups binary-search the sorted entry runs in
//! place: nothing is parsed or indexed at open. The digest is not recomputed at open (hashing
//! hundreds of megabytes per sandbox start would cost more than everything else); call
//! [`Image::verify_digest`] where integrity against tampering matters.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::format::{
    DIGEST_LEN, DIGEST_OFFSET, DIRENT_LEN, DirentRecord, FORMAT_VERSION, HEADER_LEN, Header,
    INODE_LEN, InodeRecord, Kind, NAME_MAX, PAGE_SIZE, Timespec,
};

/// Why opening or reading an image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening or `fstat` of the image file failed.
    #[error("opening image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// Mapping the image file into memory failed.
    #[error("mapping image {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
    /// The file does not start with the image magic.
    #[error("{0} is not a forkvm image")]
    NotAnImage(PathBuf),
    /// The image was written by another format version.
    #[error("image format version {found} is not supported (expected {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    /// The header's sizes or table offsets are inconsistent with the file.
    #[error("corrupt image header: {0}")]
    CorruptHeader(&'static str),
    /// An inode number beyond the inode table.
    #[error("inode {0} does not exist")]
    NoSuchInode(u32),
    /// An inode record with an unknown kind or out-of-bounds data.
    #[error("corrupt inode {ino}: {reason}")]
    CorruptInode { ino: u32, reason: &'static str },
    /// A directory entry with an out-of-bounds name or inode.
    #[error("corrupt entry {index} of directory {dir}: {reason}")]
    CorruptDirent {
        dir: u32,
        index: u64,
        reason: &'static str,
    },
    /// An operation for one kind of inode was asked of another.
    #[error("inode {ino} is a {found:?}, not a {expected:?}")]
    WrongKind {
        ino: u32,
        expected: Kind,
        found: Kind,
    },
    /// The recomputed content digest differs from the header's.
    #[error("image digest mismatch: content was modified")]
    DigestMismatch,
}

/// An inode number: an index into the image's inode table. The root is [`Image::root`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Ino(pub u32);

/// An inode's attributes as stored in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InodeInfo {
    /// This inode's number.
    pub ino: Ino,
    /// File, directory or symlink.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count: links inside the image for files, 2 + subdirectories for directories.
    pub nlink: u32,
    /// Bytes of data for files, target length for symlinks, entry count for directories.
    pub size: u64,
    /// Last modification time.
    pub mtime: Timespec,
}

/// One directory entry, borrowing its name from the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// Entry name: never empty, at most 255 bytes.
    pub name: &'a [u8],
    /// The inode it names.
    pub ino: Ino,
    /// The inode's kind (checked against the inode record).
    pub kind: Kind,
}

/// A read-only mapping of a whole file.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and private; it is never written through and is unmapped
// only in Drop, so shared references to its bytes may be used from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above: concurrent reads of immutable memory are sound.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh read-only private mapping chosen by the kernel (addr NULL) of a file
        // we hold open; it aliases no Rust object, and `len` is the non-zero file length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// Locks the mapping's pages in memory (reading them in first).
    fn lock(&self) -> io::Result<()> {
        // SAFETY: `ptr..ptr+len` is our own live mapping; mlock only changes residency.
        if unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` is a live readable mapping until Drop, never written. Images
        // are immutable files (written atomically, never modified in place), so the backing
        // pages cannot shrink under us.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// An opened image: the file (for the VMM's own mappings of aligned file data) and one
/// read-only mapping of it that every accessor reads from without copying.
pub struct Image {
    file: Arc<File>,
    path: PathBuf,
    map: Mapping,
    header: Header,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("len", &self.map.len)
            .field("inodes", &self.header.inode_count)
            .finish()
    }
}

/// `offset..offset+len` as a checked range inside `limit`.
fn range_within(offset: u64, len: u64, limit: u64) -> Option<std::ops::Range<usize>> {
    let end = offset.checked_add(len)?;
    (end <= limit).then_some(offset as usize..end as usize)
}

impl Image {
    /// Keeps the whole image resident. Without this, the host may evict image pages no
    /// sandbox touched for a while, and the next sandbox that imports a module waits for the
    /// disk with its process's address-space lock held, stalling every other sandbox of the
    /// process. Costs the image's size in (shared) page cache; needs `CAP_IPC_LOCK`.
    pub fn lock_in_memory(&self) -> io::Result<()> {
        self.map.lock()
    }

    /// Opens and maps the image at `path`, checking its header and table placement.
    pub fn open(path: impl AsRef<Path>) -> Result<Image, ImageError> {
        let path = path.as_ref().to_owned();
        let open_error = |source| ImageError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_error)?;
        let file_len = file.metadata().map_err(open_error)?.len();
        if file_len < HEADER_LEN as u64 {
            return Err(ImageError::NotAnImage(path));
        }
        let len = usize::try_from(file_len)
            .map_err(|_| ImageError::CorruptHeader("image larger than the address space"))?;
        let map = Mapping::new(&file, len).map_err(|source| ImageError::Map {
            path: path.clone(),
            source,
        })?;
        let header = map
            .bytes()
            .first_chunk::<HEADER_LEN>()
            .and_then(Header::decode)
            .ok_or_else(|| ImageError::NotAnImage(path.clone()))?;
        check_header(&header, file_len)?;
        let image = Image {
            file: Arc::new(file),
            path,
            map,
            header,
        };
        let root = image.inode(image.root())?;
        if root.kind != Kind::Dir {
            return Err(ImageError::CorruptHeader("root inode is not a directory"));
        }
        Ok(image)
    }

    /// The root directory.
    pub fn root(&self) -> Ino {
        Ino(0)
    }

    /// The image file's path as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open image file, for host `mmap` of page-aligned file data by the VMM (shared, so
    /// a mapping can keep a handle to what it maps).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Size of the image file in bytes (always a multiple of [`PAGE_SIZE`]).
    pub fn file_len(&self) -> u64 {
        self.header.file_len
    }

    /// Number of inodes; valid inode numbers are `0..inode_count()`.
    pub fn inode_count(&self) -> u32 {
        self.header.inode_count
    }

    /// SHA-256 of the image (digest field read as zeros), as recorded in the header.
    pub fn digest(&self) -> [u8; DIGEST_LEN] {
        self.header.digest
    }

    /// Recomputes the digest over the mapped file and compares it with the header's.
    pub fn verify_digest(&self) -> Result<(), ImageError> {
        let bytes = self.map.bytes();
        let mut hasher = Sha256::new();
        hasher.update(&bytes[..DIGEST_OFFSET]);
        hasher.update([0u8; DIGEST_LEN]);
        hasher.update(&bytes[DIGEST_OFFSET + DIGEST_LEN..]);
        let digest: [u8; DIGEST_LEN] = hasher.finalize().into();
        if digest == self.header.digest {
            Ok(())
        } else {
            Err(ImageError::DigestMismatch)
        }
    }

    /// The `N` mapped bytes at `at`, or `None` past the end of the file.
    fn chunk<const N: usize>(&self, at: usize) -> Option<&[u8; N]> {
        self.map.bytes().get(at..)?.first_chunk::<N>()
    }

    fn record(&self, ino: Ino) -> Result<InodeRecord, ImageError> {
        if ino.0 >= self.header.inode_count {
            return Err(ImageError::NoSuchInode(ino.0));
        }
        // Open checked that the whole table lies inside the file, so the chunk exists.
        let at = self.header.inode_table_offset as usize + ino.0 as usize * INODE_LEN;
        let corrupt = |reason| ImageError::CorruptInode { ino: ino.0, reason };
        let record = self
            .chunk::<INODE_LEN>(at)
            .and_then(InodeRecord::decode)
            .ok_or(corrupt("unknown kind"))?;
        if record.mtime_nsec >= 1_000_000_000 {
            return Err(corrupt("nanoseconds out of range"));
        }
        let in_bounds = match record.kind {
            Kind::File => {
                record.offset >= self.header.data_offset
                    && range_within(record.offset, record.size, self.header.file_len).is_some()
            }
            Kind::Symlink => {
                range_within(record.offset, record.size, self.header.string_table_len).is_some()
            }
            Kind::Dir => {
                range_within(
                    record.offset,
                    record.size,
                    u64::from(self.header.dirent_count),
                )
                .is_some()
                    && record.parent < self.header.inode_count
            }
            // Images never hold FIFOs or sockets (`from_byte` does not produce them).
            Kind::Fifo | Kind::Socket => false,
        };
        if !in_bounds {
            return Err(corrupt("data out of bounds"));
        }
        Ok(record)
    }

    fn record_of_kind(&self, ino: Ino, expected: Kind) -> Result<InodeRecord, ImageError> {
        let record = self.record(ino)?;
        if record.kind != expected {
            return Err(ImageError::WrongKind {
                ino: ino.0,
                expected,
                found: record.kind,
            });
        }
        Ok(record)
    }

    /// The attributes of inode `ino`.
    pub fn inode(&self, ino: Ino) -> Result<InodeInfo, ImageError> {
        let record = self.record(ino)?;
        Ok(InodeInfo {
            ino,
            kind: record.kind,
            mode: record.mode & 0o7777,
            uid: record.uid,
            gid: record.gid,
            nlink: record.nlink,
            size: record.size,
            mtime: Timespec {
                sec: record.mtime_sec,
                nsec: record.mtime_nsec,
            },
        })
    }

    /// The directory containing directory `dir` (the root is its own parent).
    pub fn parent(&self, dir: Ino) -> Result<Ino, ImageError> {
        Ok(Ino(self.record_of_kind(dir, Kind::Dir)?.parent))
    }

    /// Entry `index` of the dirent table with its name, bounds-checked (not its inode's kind).
    fn dirent(&self, dir: Ino, index: u64) -> Result<(&[u8], DirentRecord), ImageError> {
        let corrupt = |reason| ImageError::CorruptDirent {
            dir: dir.0,
            index,
            reason,
        };
        // Callers pass indexes inside a directory's checked run, so the chunk exists.
        let at = self.header.dirent_table_offset as usize + index as usize * DIRENT_LEN;
        let record = self
            .chunk::<DIRENT_LEN>(at)
            .and_then(DirentRecord::decode)
            .ok_or(corrupt("unknown kind"))?;
        if record.name_len == 0 || usize::from(record.name_len) > NAME_MAX {
            return Err(corrupt("bad name length"));
        }
        if record.ino >= self.header.inode_count {
            return Err(corrupt("inode out of range"));
        }
        let name = range_within(
            u64::from(record.name_offset),
            u64::from(record.name_len),
            self.header.string_table_len,
        )
        .ok_or(corrupt("name out of bounds"))?;
        let base = self.header.string_table_offset as usize;
        Ok((
            &self.map.bytes()[base + name.start..base + name.end],
            record,
        ))
    }

    /// Looks `name` up in directory `dir` by binary search over its sorted entries.
    pub fn lookup(&self, dir: Ino, name: &[u8]) -> Result<Option<Ino>, ImageError> {
        let record = self.record_of_kind(dir, Kind::Dir)?;
        let (mut low, mut high) = (record.offset, record.offset + record.size);
        while low < high {
            let mid = low + (high - low) / 2;
            let (entry_name, entry) = self.dirent(dir, mid)?;
            match entry_name.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(Ino(entry.ino))),
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
            }
        }
        Ok(None)
    }

    /// The entries of directory `dir` in name order (without `.` and `..`), every one checked.
    pub fn read_dir(&self, dir: Ino) -> Result<Vec<DirEntry<'_>>, ImageError> {
        let record = self.record_of_kind(dir, Kind::Dir)?;
        (record.offset..record.offset + record.size)
            .map(|index| {
                let (name, entry) = self.dirent(dir, index)?;
                let ino = Ino(entry.ino);
                if self.record(ino)?.kind != entry.kind {
                    return Err(ImageError::CorruptDirent {
                        dir: dir.0,
                        index,
                        reason: "kind differs from its inode",
                    });
                }
                Ok(DirEntry {
                    name,
                    ino,
                    kind: entry.kind,
                })
            })
            .collect()
    }

    /// The contents of regular file `ino`, borrowed from the mapping.
    pub fn file_bytes(&self, ino: Ino) -> Result<&[u8], ImageError> {
        let record = self.record_of_kind(ino, Kind::File)?;
        let start = record.offset as usize;
        Ok(&self.map.bytes()[start..start + record.size as usize])
    }

    /// The image-file offset of file `ino`'s data when it starts on a page boundary, so the
    /// VMM can `mmap(MAP_PRIVATE)` [`Image::file`] at that offset instead of copying. The
    /// image length is a page multiple, so the last page is always inside the file; bytes past
    /// the file's size in that page are zero for files laid out as mappable (>= 16 KiB or ELF).
    pub fn file_page_offset(&self, ino: Ino) -> Result<Option<u64>, ImageError> {
        let record = self.record_of_kind(ino, Kind::File)?;
        Ok(record
            .offset
            .is_multiple_of(PAGE_SIZE)
            .then_some(record.offset))
    }

    /// The target of symlink `ino`, borrowed from the mapping.
    pub fn read_link(&self, ino: Ino) -> Result<&[u8], ImageError> {
        let record = self.record_of_kind(ino, Kind::Symlink)?;
        let start = (self.header.string_table_offset + record.offset) as usize;
        Ok(&self.map.bytes()[start..start + record.size as usize])
    }
}

/// Checks that the header describes tables and data that lie inside a file of `file_len`.
fn check_header(header: &Header, file_len: u64) -> Result<(), ImageError> {
    use ImageError::CorruptHeader;
    if header.version != FORMAT_VERSION {
        return Err(ImageError::UnsupportedVersion {
            found: header.version,
        });
    }
    if header.file_len != file_len {
        return Err(CorruptHeader("recorded length differs from the file's"));
    }
    if !file_len.is_multiple_of(PAGE_SIZE) || !header.data_offset.is_multiple_of(PAGE_SIZE) {
        return Err(CorruptHeader("length or data offset not page-aligned"));
    }
    if header.inode_count == 0 {
        return Err(CorruptHeader("no root inode"));
    }
    let tables = [
        (
            header.inode_table_offset,
            u64::from(header.inode_count) * INODE_LEN as u64,
        ),
        (
            header.dirent_table_offset,
            u64::from(header.dirent_count) * DIRENT_LEN as u64,
        ),
        (header.string_table_offset, header.string_table_len),
        (header.data_offset, header.data_len),
    ];
    for (offset, len) in tables {
        if offset < HEADER_LEN as u64 || range_within(offset, len, file_len).is_none() {
            return Err(CorruptHeader("table out of bounds"));
        }
    }
    Ok(())
}
