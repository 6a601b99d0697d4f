//! On-disk layout of a forkvm image: fixed-size little-endian records, encoded and decoded
//! field by field (no casts of mapped memory, so alignment and padding never matter).
//!
//! ```text
//! offset 0            header (HEADER_LEN bytes)
//! inode_table_offset  inode_count records of INODE_LEN bytes, indexed by Ino
//! dirent_table_offset dirent_count records of DIRENT_LEN bytes; each directory owns one
//!                     contiguous run, sorted by name bytes (binary search on lookup)
//! string_table_offset names and symlink targets, deduplicated, not NUL-terminated
//! data_offset         file contents (4096-aligned): small files packed first, then every
//!                     file >= ALIGN_THRESHOLD or starting with "\x7fELF" at a page boundary,
//!                     zero-padded to the next page so a host mmap of its last page never
//!                     reaches past the end of the image
//! ```
//!
//! The header's digest is SHA-256 over the whole file with the digest field read as zeros: it
//! names the image's content (templates record it to refuse a mismatched image).

use serde::{Deserialize, Serialize};

/// First eight bytes of every image.
pub const MAGIC: [u8; 8] = *b"FKVMIMG\0";
/// Bumped on any layout change; part of the rootfs cache key.
pub const FORMAT_VERSION: u32 = 1;
/// Host page size that aligned file data is laid out for.
pub const PAGE_SIZE: u64 = 4096;
/// Files at least this large are page-aligned so the VMM can map them instead of copying.
pub const ALIGN_THRESHOLD: u64 = 16 * 1024;
/// Longest name a directory entry may have (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;

pub(crate) const HEADER_LEN: usize = 128;
pub(crate) const INODE_LEN: usize = 64;
pub(crate) const DIRENT_LEN: usize = 16;
pub(crate) const DIGEST_OFFSET: usize = 88;
pub(crate) const DIGEST_LEN: usize = 32;

/// A point in time as seconds and nanoseconds since the Unix epoch (`struct timespec`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timespec {
    /// Whole seconds; negative before 1970.
    pub sec: i64,
    /// Nanoseconds, always below 1_000_000_000.
    pub nsec: u32,
}

/// What an inode is. Device nodes, FIFOs and sockets are never stored in an image; FIFOs
/// and sockets can be made in the overlay (`mkfifo`, binding a unix socket), as names that
/// hold no data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe (overlay only).
    Fifo,
    /// A unix socket's name (overlay only).
    Socket,
}

impl Kind {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
        }
    }

    pub(crate) fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// The fixed header at offset 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub inode_count: u32,
    pub dirent_count: u32,
    pub inode_table_offset: u64,
    pub dirent_table_offset: u64,
    pub string_table_offset: u64,
    pub string_table_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
    pub file_len: u64,
    pub digest: [u8; DIGEST_LEN],
}

/// One inode table record. The meaning of `size` and `offset` depends on the kind:
/// file: byte length and absolute image offset of the data; symlink: target length and
/// string table offset; directory: entry count and index of its first dirent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InodeRecord {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub offset: u64,
    /// Directory that contains this directory (the root is its own parent); 0 for others.
    pub parent: u32,
}

/// One directory entry record: a name in the string table and the inode it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DirentRecord {
    pub name_offset: u32,
    pub name_len: u16,
    pub kind: Kind,
    pub ino: u32,
}

/// Little-endian field reader over a record; callers pass slices of exactly the record size.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.0[at..at + N]);
        out
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.bytes(at))
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(at))
    }
    fn i64(&self, at: usize) -> i64 {
        i64::from_le_bytes(self.bytes(at))
    }
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    out[at..at + bytes.len()].copy_from_slice(bytes);
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        put(&mut out, 0, &MAGIC);
        put(&mut out, 8, &self.version.to_le_bytes());
        put(&mut out, 12, &self.inode_count.to_le_bytes());
        put(&mut out, 16, &self.dirent_count.to_le_bytes());
        put(&mut out, 24, &self.inode_table_offset.to_le_bytes());
        put(&mut out, 32, &self.dirent_table_offset.to_le_bytes());
        put(&mut out, 40, &self.string_table_offset.to_le_bytes());
        put(&mut out, 48, &self.string_table_len.to_le_bytes());
        put(&mut out, 56, &self.data_offset.to_le_bytes());
        put(&mut out, 64, &self.data_len.to_le_bytes());
        put(&mut out, 72, &self.file_len.to_le_bytes());
        put(&mut out, DIGEST_OFFSET, &self.digest);
        out
    }

    /// Decodes a header; `None` when the magic does not match.
    pub fn decode(raw: &[u8; HEADER_LEN]) -> Option<Header> {
        let f = Fields(raw);
        if f.bytes::<8>(0) != MAGIC {
            return None;
        }
        Some(Header {
            version: f.u32(8),
            inode_count: f.u32(12),
            dirent_count: f.u32(16),
            inode_table_offset: f.u64(24),
            dirent_table_offset: f.u64(32),
            string_table_offset: f.u64(40),
            string_table_len: f.u64(48),
            data_offset: f.u64(56),
            data_len: f.u64(64),
            file_len: f.u64(72),
            digest: f.bytes(DIGEST_OFFSET),
        })
    }
}

impl InodeRecord {
    pub fn encode(&self) -> [u8; INODE_LEN] {
        let mut out = [0u8; INODE_LEN];
        out[0] = self.kind.to_byte();
        put(&mut out, 4, &self.mode.to_le_bytes());
        put(&mut out, 8, &self.uid.to_le_bytes());
        put(&mut out, 12, &self.gid.to_le_bytes());
        put(&mut out, 16, &self.nlink.to_le_bytes());
        put(&mut out, 20, &self.mtime_nsec.to_le_bytes());
        put(&mut out, 24, &self.mtime_sec.to_le_bytes());
        put(&mut out, 32, &self.size.to_le_bytes());
        put(&mut out, 40, &self.offset.to_le_bytes());
        put(&mut out, 48, &self.parent.to_le_bytes());
        out
    }

    /// Decodes a record; `None` when its kind byte is unknown.
    pub fn decode(raw: &[u8; INODE_LEN]) -> Option<InodeRecord> {
        let f = Fields(raw);
        Some(InodeRecord {
            kind: Kind::from_byte(raw[0])?,
            mode: f.u32(4),
            uid: f.u32(8),
            gid: f.u32(12),
            nlink: f.u32(16),
            mtime_nsec: f.u32(20),
            mtime_sec: f.i64(24),
            size: f.u64(32),
            offset: f.u64(40),
            parent: f.u32(48),
        })
    }
}

impl DirentRecord {
    pub fn encode(&self) -> [u8; DIRENT_LEN] {
        let mut out = [0u8; DIRENT_LEN];
        put(&mut out, 0, &self.name_offset.to_le_bytes());
        put(&mut out, 4, &self.name_len.to_le_bytes());
        out[6] = self.kind.to_byte();
        put(&mut out, 8, &self.ino.to_le_bytes());
        out
    }

    /// Decodes a record; `None` when its kind byte is unknown.
    pub fn decode(raw: &[u8; DIRENT_LEN]) -> Option<DirentRecord> {
        let f = Fields(raw);
        Some(DirentRecord {
            name_offset: f.u32(0),
            name_len: f.u16(4),
            kind: Kind::from_byte(raw[6])?,
            ino: f.u32(8),
        })
    }
}

/// Rounds `value` up to a multiple of [`PAGE_SIZE`].
pub(crate) fn page_align(value: u64) -> u64 {
    value.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let header = Header {
            version: FORMAT_VERSION,
            inode_count: 7,
            dirent_count: 6,
            inode_table_offset: 128,
            dirent_table_offset: 576,
            string_table_offset: 672,
            string_table_len: 40,
            data_offset: 4096,
            data_len: 8192,
            file_len: 12288,
            digest: [9; DIGEST_LEN],
        };
        assert_eq!(Header::decode(&header.encode()), Some(header));
        let inode = InodeRecord {
            kind: Kind::Symlink,
            mode: 0o4755,
            uid: 1,
            gid: 2,
            nlink: 3,
            mtime_sec: -5,
            mtime_nsec: 999_999_999,
            size: 10,
            offset: 11,
            parent: 0,
        };
        assert_eq!(InodeRecord::decode(&inode.encode()), Some(inode));
        let dirent = DirentRecord {
            name_offset: 3,
            name_len: 255,
            kind: Kind::Dir,
            ino: 42,
        };
        assert_eq!(DirentRecord::decode(&dirent.encode()), Some(dirent));
    }

    #[test]
    fn unknown_magic_and_kind_are_rejected() {
        assert_eq!(Header::decode(&[0; HEADER_LEN]), None);
        assert_eq!(InodeRecord::decode(&[0; INODE_LEN]), None);
        assert_eq!(DirentRecord::decode(&[0; DIRENT_LEN]), None);
    }
}
