//! The root filesystem of a sandbox: an immutable, indexed image file built once from a
//! directory tree ([`build_image`]) and mapped read-only by every sandbox ([`Image`]), under a
//! per-sandbox writable in-memory overlay that clones in O(1) on fork ([`Fs`]).

mod builder;
mod format;
mod fs;
mod reader;

pub use builder::{BuildError, BuildStats, build_image};
pub use format::{ALIGN_THRESHOLD, FORMAT_VERSION, Kind, NAME_MAX, PAGE_SIZE, Timespec};
pub use fs::{
    DEFAULT_OVERLAY_LIMIT, DirEntryInfo, Fs, FsError, MAX_FILE_SIZE, MAX_SYMLINKS, NodeId,
    OverlayState, PATH_MAX, Parent, Resolved, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Stat,
};
pub use reader::{DirEntry, Image, ImageError, Ino, InodeInfo};
