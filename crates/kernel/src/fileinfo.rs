//! File attributes in the binary layouts the program reads: `struct stat`, `struct statx`,
//! `struct statfs`, and `linux_dirent64` records.

use forkvm_image::{Kind, Stat, Timespec};

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

impl From<Stat> for FileStat {
    fn from(s: Stat) -> Self {
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

    /// `struct stat` (x86-64, 144 bytes).
    pub fn to_stat_bytes(&self) -> [u8; 144] {
        let mut b = [0u8; 144];
        put(&mut b, 0, self.dev);
        put(&mut b, 8, self.ino);
        put(&mut b, 16, self.nlink);
        b[24..28].copy_from_slice(&self.mode.to_le_bytes());
        b[28..32].copy_from_slice(&self.uid.to_le_bytes());
        b[32..36].copy_from_slice(&self.gid.to_le_bytes());
        put(&mut b, 40, self.rdev);
        put(&mut b, 48, self.size);
        put(&mut b, 56, self.blksize);
        put(&mut b, 64, self.blocks);
        for (at, t) in [(72, self.atime), (88, self.mtime), (104, self.ctime)] {
            put(&mut b, at, t.sec as u64);
            put(&mut b, at + 8, u64::from(t.nsec));
        }
        b
    }

    /// `struct statx` (256 bytes) with every basic field valid.
    pub fn to_statx_bytes(&self) -> [u8; 256] {
        const STATX_BASIC_STATS: u32 = 0x7ff;
        let mut b = [0u8; 256];
        b[0..4].copy_from_slice(&STATX_BASIC_STATS.to_le_bytes());
        b[4..8].copy_from_slice(&(self.blksize as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(self.nlink as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.uid.to_le_bytes());
        b[24..28].copy_from_slice(&self.gid.to_le_bytes());
        b[28..30].copy_from_slice(&(self.mode as u16).to_le_bytes());
        put(&mut b, 32, self.ino);
        put(&mut b, 40, self.size);
        put(&mut b, 48, self.blocks);
        for (at, t) in [
            (64, self.atime),
            (80, self.ctime),
            (96, self.ctime),
            (112, self.mtime),
        ] {
            put(&mut b, at, t.sec as u64);
            b[at + 8..at + 12].copy_from_slice(&t.nsec.to_le_bytes());
        }
        let (rmaj, rmin) = decode_dev(self.rdev);
        let (dmaj, dmin) = decode_dev(self.dev);
        for (at, v) in [(128, rmaj), (132, rmin), (136, dmaj), (140, dmin)] {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

fn put(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn encode_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}

fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// `struct statfs` (x86-64, 120 bytes) describing the sandbox filesystem: a tmpfs-like
/// volume whose size is the overlay limit.
pub fn statfs_bytes(limit: u64, used: u64) -> [u8; 120] {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    let blocks = limit / 4096;
    let free = limit.saturating_sub(used) / 4096;
    let mut b = [0u8; 120];
    put(&mut b, 0, TMPFS_MAGIC);
    put(&mut b, 8, 4096);
    put(&mut b, 16, blocks);
    put(&mut b, 24, free);
    put(&mut b, 32, free);
    put(&mut b, 40, 1 << 20);
    put(&mut b, 48, 1 << 20);
    put(&mut b, 64, 255);
    put(&mut b, 72, 4096);
    b
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
        let reclen = (19 + entry.name.len() + 1).next_multiple_of(8);
        if out.len() + reclen > capacity {
            break;
        }
        let at = out.len();
        out.resize(at + reclen, 0);
        put(&mut out, at, entry.ino);
        put(&mut out, at + 8, (index + 1) as u64);
        out[at + 16..at + 18].copy_from_slice(&(reclen as u16).to_le_bytes());
        out[at + 18] = entry.kind;
        out[at + 19..at + 19 + entry.name.len()].copy_from_slice(&entry.name);
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
