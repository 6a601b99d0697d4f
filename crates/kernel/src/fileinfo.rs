//! File attributes in the binary layouts the program reads: `struct stat`, `struct statx`,
//! `struct statfs`, and `linux_dirent64` records.

use std::mem::offset_of;

use forkvm_image::{Kind, Stat as NodeStat, Timespec};
use vm_memory::ByteValued;

use crate::abi;
use crate::file::DirEntry;

/// Device number reported for the sandbox filesystem.
pub(crate) const FS_DEV: u64 = 0x2a;
/// `st_dev` of the synthetic device files.
const DEVTMPFS_DEV: u64 = 0x5;
/// `st_dev` of generated `/proc` files.
const PROC_DEV: u64 = 0x16;

/// File attributes, whatever the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

impl From<NodeStat> for FileStat {
    fn from(s: NodeStat) -> Self {
        Self {
            dev: FS_DEV,
            ino: s.ino,
            mode: s.mode,
            nlink: u64::from(s.nlink),
            uid: s.uid,
            gid: s.gid,
            rdev: 0,
            size: s.size,
            blksize: u64::from(s.blksize),
            blocks: s.blocks,
            atime: s.atime,
            mtime: s.mtime,
            ctime: s.ctime,
        }
    }
}

impl FileStat {
    /// A character device (the `/dev` files and the standard streams).
    pub fn device(mode: u32, rdev: (u32, u32), ino: u64) -> Self {
        let epoch = Timespec { sec: 0, nsec: 0 };
        Self {
            dev: DEVTMPFS_DEV,
            ino,
            mode,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: encode_dev(rdev.0, rdev.1),
            size: 0,
            blksize: 4096,
            blocks: 0,
            atime: epoch,
            mtime: epoch,
            ctime: epoch,
        }
    }

    /// A generated `/proc` file: a regular file of size 0, as procfs reports them (readers
    /// read until end-of-file rather than trusting the size).
    pub fn proc_file() -> Self {
        Self {
            dev: PROC_DEV,
            mode: libc::S_IFREG | 0o444,
            rdev: 0,
            ..Self::device(libc::S_IFREG | 0o444, (0, 0), 0x1000)
        }
    }

    /// `struct stat`.
    pub(crate) fn to_stat(self) -> Stat {
        let time = |t: Timespec| abi::Timespec {
            tv_sec: t.sec,
            tv_nsec: i64::from(t.nsec),
        };
        Stat {
            st_dev: self.dev,
            st_ino: self.ino,
            st_nlink: self.nlink,
            st_mode: self.mode,
            st_uid: self.uid,
            st_gid: self.gid,
            st_rdev: self.rdev,
            st_size: self.size,
            st_blksize: self.blksize,
            st_blocks: self.blocks,
            st_atim: time(self.atime),
            st_mtim: time(self.mtime),
            st_ctim: time(self.ctime),
            ..Stat::default()
        }
    }

    /// `struct statx` with every basic field valid (the birth time is the change time).
    pub(crate) fn to_statx(self) -> Statx {
        const STATX_BASIC_STATS: u32 = 0x7ff;
        let time = |t: Timespec| StatxTimestamp {
            tv_sec: t.sec,
            tv_nsec: t.nsec,
            reserved: 0,
        };
        let (rdev_major, rdev_minor) = decode_dev(self.rdev);
        let (dev_major, dev_minor) = decode_dev(self.dev);
        Statx {
            stx_mask: STATX_BASIC_STATS,
            stx_blksize: self.blksize as u32,
            stx_nlink: self.nlink as u32,
            stx_uid: self.uid,
            stx_gid: self.gid,
            stx_mode: self.mode as u16,
            stx_ino: self.ino,
            stx_size: self.size,
            stx_blocks: self.blocks,
            stx_atime: time(self.atime),
            stx_btime: time(self.ctime),
            stx_ctime: time(self.ctime),
            stx_mtime: time(self.mtime),
            stx_rdev_major: rdev_major,
            stx_rdev_minor: rdev_minor,
            stx_dev_major: dev_major,
            stx_dev_minor: dev_minor,
            ..Statx::default()
        }
    }
}

/// `struct stat` (x86-64), its padding made fields.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stat {
    st_dev: u64,
    st_ino: u64,
    st_nlink: u64,
    st_mode: u32,
    st_uid: u32,
    st_gid: u32,
    pad0: u32,
    st_rdev: u64,
    st_size: u64,
    st_blksize: u64,
    st_blocks: u64,
    st_atim: abi::Timespec,
    st_mtim: abi::Timespec,
    st_ctim: abi::Timespec,
    unused: [u64; 3],
}

/// `struct statx_timestamp`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct StatxTimestamp {
    tv_sec: i64,
    tv_nsec: u32,
    reserved: i32,
}

/// `struct statx`, the reserved space after the device numbers included.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Statx {
    stx_mask: u32,
    stx_blksize: u32,
    stx_attributes: u64,
    stx_nlink: u32,
    stx_uid: u32,
    stx_gid: u32,
    stx_mode: u16,
    spare0: u16,
    stx_ino: u64,
    stx_size: u64,
    stx_blocks: u64,
    stx_attributes_mask: u64,
    stx_atime: StatxTimestamp,
    stx_btime: StatxTimestamp,
    stx_ctime: StatxTimestamp,
    stx_mtime: StatxTimestamp,
    stx_rdev_major: u32,
    stx_rdev_minor: u32,
    stx_dev_major: u32,
    stx_dev_minor: u32,
    spare: [u64; 14],
}

/// `struct statfs` (x86-64).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Statfs {
    f_type: u64,
    f_bsize: u64,
    f_blocks: u64,
    f_bfree: u64,
    f_bavail: u64,
    f_files: u64,
    f_ffree: u64,
    f_fsid: [u32; 2],
    f_namelen: u64,
    f_frsize: u64,
    f_flags: u64,
    f_spare: [u64; 4],
}

/// The fixed part of a `linux_dirent64` record; the name follows at once, unaligned.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
struct Dirent64 {
    d_ino: u64,
    d_off: u64,
    d_reclen: u16,
    d_type: u8,
}

// SAFETY: each is `repr(C)` (`Dirent64` packed) and made only of integers, integer arrays
// and `abi::Timespec`s, with any padding made a field (sizes and offsets checked below):
// every byte pattern is a value.
unsafe impl ByteValued for Stat {}
// SAFETY: as above.
unsafe impl ByteValued for StatxTimestamp {}
// SAFETY: as above.
unsafe impl ByteValued for Statx {}
// SAFETY: as above.
unsafe impl ByteValued for Statfs {}
// SAFETY: as above.
unsafe impl ByteValued for Dirent64 {}

const _: () = {
    assert!(size_of::<Stat>() == 144);
    assert!(offset_of!(Stat, st_rdev) == 40);
    assert!(offset_of!(Stat, st_atim) == 72);
    assert!(size_of::<StatxTimestamp>() == 16);
    assert!(size_of::<Statx>() == 256);
    assert!(offset_of!(Statx, stx_ino) == 32);
    assert!(offset_of!(Statx, stx_atime) == 64);
    assert!(offset_of!(Statx, stx_rdev_major) == 128);
    assert!(size_of::<Statfs>() == 120);
    assert!(offset_of!(Statfs, f_namelen) == 64);
    assert!(size_of::<Dirent64>() == 19);
};

fn encode_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}

fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// `struct statfs` describing the sandbox filesystem: a tmpfs-like volume whose size is
/// the overlay limit.
pub(crate) fn statfs(limit: u64, used: u64) -> Statfs {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    let free = limit.saturating_sub(used) / 4096;
    Statfs {
        f_type: TMPFS_MAGIC,
        f_bsize: 4096,
        f_blocks: limit / 4096,
        f_bfree: free,
        f_bavail: free,
        f_files: 1 << 20,
        f_ffree: 1 << 20,
        f_namelen: 255,
        f_frsize: 4096,
        ..Statfs::default()
    }
}

/// `DT_*` value for a node kind.
pub fn dirent_type(kind: Kind) -> u8 {
    match kind {
        Kind::File => libc::DT_REG,
        Kind::Dir => libc::DT_DIR,
        Kind::Symlink => libc::DT_LNK,
        Kind::Fifo => libc::DT_FIFO,
        Kind::Socket => libc::DT_SOCK,
    }
}

/// `S_IFMT` bits for a node kind.
pub fn mode_type(kind: Kind) -> u32 {
    match kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
    }
}

/// Encodes entries starting at `start` as `linux_dirent64` records into at most `capacity`
/// bytes; returns the bytes and how many entries fit.
pub fn encode_dirents(entries: &[DirEntry], start: usize, capacity: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut count = 0;
    for (index, entry) in entries.iter().enumerate().skip(start) {
        let header = size_of::<Dirent64>();
        let reclen = (header + entry.name.len() + 1).next_multiple_of(8);
        if out.len() + reclen > capacity {
            break;
        }
        let at = out.len();
        out.resize(at + reclen, 0);
        let record = Dirent64 {
            d_ino: entry.ino,
            d_off: (index + 1) as u64,
            d_reclen: reclen as u16,
            d_type: entry.kind,
        };
        out[at..at + header].copy_from_slice(record.as_slice());
        out[at + header..at + header + entry.name.len()].copy_from_slice(&entry.name);
        count += 1;
    }
    (out, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_round_trip() {
        assert_eq!(decode_dev(encode_dev(1, 3)), (1, 3));
        assert_eq!(decode_dev(encode_dev(4095, 300)), (4095, 300));
    }

    #[test]
    fn dirents_are_aligned_and_bounded() {
        let entries: Vec<DirEntry> = (0..3)
            .map(|i| DirEntry {
                name: format!("file{i}").into_bytes(),
                ino: i + 10,
                kind: libc::DT_REG,
            })
            .collect();
        let (bytes, n) = encode_dirents(&entries, 0, 1024);
        assert_eq!(n, 3);
        assert_eq!(bytes.len() % 8, 0);
        let reclen = u16::from_le_bytes([bytes[16], bytes[17]]) as usize;
        assert_eq!(reclen, 32);
        assert_eq!(&bytes[19..24], b"file0");
        let (_, fit) = encode_dirents(&entries, 1, 40);
        assert_eq!(fit, 1);
    }
}
