//! Path-based syscalls: open, stat, access, readlink, directory and namespace changes.
//!
//! Paths resolve inside the sandbox filesystem only (`forkvm_image::Fs`): no host path is
//! ever touched. A few device and `/proc` paths are synthesized here.

use forkvm_image::{Kind, Resolved};
use syscalls::Errno;

use super::{Stop, SysResult};
use crate::errno::from_fs;
use crate::file::{FileObject, OpenFile, Stream};
use crate::fileinfo::FileStat;
use crate::pipe::PipeEnd;
use crate::process::Process;
use crate::procfs::{ProcFile, proc_self_entry};

/// Longest path argument (`PATH_MAX`).
const PATH_MAX: usize = 4096;

/// Paths the sandbox synthesizes instead of looking up in the image.
enum Special {
    Device(FileObject),
    /// A symlink-like entry (`/proc/self/exe`, `/proc/self/fd/N`, `/dev/stdout` …).
    Link(Vec<u8>),
    /// A file generated when opened (`/proc/self/maps` …).
    Proc(ProcFile),
}

/// Lexically normalizes an absolute path (`.`, `..`, repeated slashes); good enough to
/// recognize the synthetic paths, which contain no symlinks of their own.
fn normalize(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for p in parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

impl Process {
    pub(crate) fn read_path(&mut self, addr: u64) -> Result<Vec<u8>, Errno> {
        let path = self.read_cstring(addr, PATH_MAX - 1)?;
        if path.is_empty() {
            return Err(Errno::ENOENT);
        }
        self.refresh_proc(&path);
        Ok(path)
    }

    /// The directory relative paths start from: the cwd or `dirfd`'s directory.
    pub(crate) fn base_dir(&self, dirfd: i32, path: &[u8]) -> Result<Vec<u8>, Errno> {
        if path.starts_with(b"/") || dirfd == libc::AT_FDCWD {
            return Ok(self.cwd.clone());
        }
        match self.files.get(dirfd)?.object {
            FileObject::Node { node, .. } => {
                if self.fs.kind(node).map_err(from_fs)? != Kind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                self.fs.canonical_path(node).map_err(from_fs)
            }
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn absolute(&self, base: &[u8], path: &[u8]) -> Vec<u8> {
        if path.starts_with(b"/") {
            normalize(path)
        } else {
            let mut joined = base.to_vec();
            joined.push(b'/');
            joined.extend_from_slice(path);
            normalize(&joined)
        }
    }

    fn special(&self, absolute: &[u8]) -> Option<Special> {
        let fd_link = |fd: &[u8]| -> Option<Special> {
            let fd: i32 = std::str::from_utf8(fd).ok()?.parse().ok()?;
            let file = self.files.get(fd).ok()?;
            Some(Special::Link(file.path.clone()))
        };
        Some(match absolute {
            b"/dev/null" => Special::Device(FileObject::Null),
            b"/dev/zero" => Special::Device(FileObject::Zero),
            b"/dev/random" | b"/dev/urandom" => Special::Device(FileObject::Random),
            b"/dev/stdin" => Special::Link(b"/proc/self/fd/0".to_vec()),
            b"/dev/stdout" => Special::Link(b"/proc/self/fd/1".to_vec()),
            b"/dev/stderr" => Special::Link(b"/proc/self/fd/2".to_vec()),
            p if p.starts_with(b"/dev/fd/") => return fd_link(&p[8..]),
            p => {
                if let Some(file) = ProcFile::from_path(p, self.pid()) {
                    return Some(Special::Proc(file));
                }
                match proc_self_entry(p, self.pid())? {
                    b"exe" => Special::Link(self.exe_path.clone()),
                    b"cwd" => Special::Link(self.cwd.clone()),
                    entry => return fd_link(entry.strip_prefix(b"fd/")?),
                }
            }
        })
    }

    /// Resolves a path argument relative to `dirfd`.
    pub(crate) fn resolve_at(
        &self,
        dirfd: i32,
        path: &[u8],
        follow: bool,
    ) -> Result<Resolved, Errno> {
        let base = self.base_dir(dirfd, path)?;
        self.fs.resolve(&base, path, follow).map_err(from_fs)
    }

    pub(crate) fn sys_openat(&mut self, dirfd: i32, path: u64, flags: i32, mode: u32) -> SysResult {
        let path = self.read_path(path)?;
        let base = self.base_dir(dirfd, &path)?;
        let cloexec = flags & libc::O_CLOEXEC != 0;
        let status = flags
            & !(libc::O_CLOEXEC | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY);
        let absolute = self.absolute(&base, &path);
        match self.special(&absolute) {
            Some(Special::Device(object)) => {
                let file = OpenFile::new(object, status, absolute);
                return Ok(self.files.open(file, cloexec)? as u64);
            }
            Some(Special::Link(target)) => {
                return self.open_link_target(&target, status, cloexec);
            }
            Some(Special::Proc(file)) => {
                if flags & libc::O_ACCMODE != libc::O_RDONLY {
                    return Err(Errno::EACCES.into());
                }
                let object = FileObject::Generated(self.proc_file(file).into());
                let file = OpenFile::new(object, status, absolute);
                return Ok(self.files.open(file, cloexec)? as u64);
            }
            None => {}
        }
        if flags & libc::O_TMPFILE == libc::O_TMPFILE {
            return Err(Errno::EOPNOTSUPP.into());
        }
        let writable = matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR);
        let resolved = if flags & libc::O_CREAT != 0 {
            self.open_or_create(&base, &path, flags, mode)?
        } else {
            let follow = flags & libc::O_NOFOLLOW == 0;
            let r = self.fs.resolve(&base, &path, follow).map_err(from_fs)?;
            if !follow
                && flags & libc::O_PATH == 0
                && self.fs.kind(r.node).map_err(from_fs)? == Kind::Symlink
            {
                return Err(Errno::ELOOP.into());
            }
            r
        };
        let kind = self.fs.kind(resolved.node).map_err(from_fs)?;
        if flags & libc::O_DIRECTORY != 0 && kind != Kind::Dir {
            return Err(Errno::ENOTDIR.into());
        }
        if kind == Kind::Dir && writable {
            return Err(Errno::EISDIR.into());
        }
        if flags & libc::O_TRUNC != 0 && writable && kind == Kind::File {
            self.fs.truncate(resolved.node, 0).map_err(from_fs)?;
        }
        match kind {
            _ if flags & libc::O_PATH != 0 => {}
            Kind::Socket => return Err(Errno::ENXIO.into()),
            Kind::Fifo => return self.open_fifo(resolved, status, cloexec),
            _ => {}
        }
        self.open_node(resolved, status, cloexec)
    }

    /// Opens FIFO `resolved`: an end of the pipe every opener of that FIFO shares. A writer
    /// with no reader waits for one (`ENXIO` when nonblocking), as on Linux.
    fn open_fifo(&mut self, resolved: Resolved, status: i32, cloexec: bool) -> SysResult {
        let id = self.pipes.fifo(resolved.node);
        let end = match status & libc::O_ACCMODE {
            libc::O_RDONLY => PipeEnd::Read,
            libc::O_WRONLY => PipeEnd::Write,
            _ => PipeEnd::Both,
        };
        if end == PipeEnd::Write && self.pipes.get(id).is_some_and(|p| p.readers == 0) {
            self.pipes.drop_if_unused(id);
            return Err(if status & libc::O_NONBLOCK != 0 {
                Errno::ENXIO.into()
            } else {
                Stop::Block(Self::io_wait())
            });
        }
        self.pipes.retain(id, end);
        let file = OpenFile::new(FileObject::Pipe { id, end }, status, resolved.path);
        match self.files.open(file, cloexec) {
            Ok(fd) => {
                self.io_event();
                Ok(fd as u64)
            }
            Err(e) => {
                self.pipes.release(id, end);
                Err(e.into())
            }
        }
    }

    /// Installs a descriptor for a resolved node, holding it open in the filesystem.
    fn open_node(&mut self, resolved: Resolved, status: i32, cloexec: bool) -> SysResult {
        let object = FileObject::Node {
            node: resolved.node,
            listing: None,
        };
        let fd = self
            .files
            .open(OpenFile::new(object, status, resolved.path), cloexec)?;
        self.fs.open_ref(resolved.node);
        Ok(fd as u64)
    }

    /// `open(O_CREAT)`: the existing file (unless `O_EXCL`) or a new one.
    fn open_or_create(
        &mut self,
        base: &[u8],
        path: &[u8],
        flags: i32,
        mode: u32,
    ) -> Result<Resolved, Errno> {
        let parent = self.fs.resolve_parent(base, path).map_err(from_fs)?;
        match self
            .fs
            .lookup(parent.dir.node, &parent.name)
            .map_err(from_fs)?
        {
            Some(_) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Some(_) => self
                .fs
                .resolve(base, path, flags & libc::O_NOFOLLOW == 0)
                .map_err(from_fs),
            None => {
                if parent.trailing_slash {
                    return Err(Errno::EISDIR);
                }
                let node = self
                    .fs
                    .create_file(parent.dir.node, &parent.name, mode & !self.umask & 0o7777)
                    .map_err(from_fs)?;
                Ok(Resolved {
                    node,
                    path: parent.child_path(),
                })
            }
        }
    }

    /// Opening `/proc/self/fd/N` or `/dev/stdout`: a new description of what it names.
    fn open_link_target(&mut self, target: &[u8], status: i32, cloexec: bool) -> SysResult {
        let stream = match target {
            b"/dev/stdin" | b"/proc/self/fd/0" => Some(Stream::Stdin),
            b"/dev/stdout" | b"/proc/self/fd/1" => Some(Stream::Stdout),
            b"/dev/stderr" | b"/proc/self/fd/2" => Some(Stream::Stderr),
            _ => None,
        };
        if let Some(stream) = stream {
            let file = OpenFile::new(FileObject::Console(stream), status, target.to_vec());
            return Ok(self.files.open(file, cloexec)? as u64);
        }
        let resolved = self.fs.resolve(b"/", target, true).map_err(from_fs)?;
        self.open_node(resolved, status, cloexec)
    }

    /// Attributes of a path (following a final symlink when `follow`).
    fn path_stat(&self, dirfd: i32, path: &[u8], follow: bool) -> Result<FileStat, Errno> {
        let base = self.base_dir(dirfd, path)?;
        let absolute = self.absolute(&base, path);
        match self.special(&absolute) {
            Some(Special::Device(FileObject::Null)) => {
                return Ok(FileStat::device(libc::S_IFCHR | 0o666, (1, 3), 1));
            }
            Some(Special::Device(FileObject::Zero)) => {
                return Ok(FileStat::device(libc::S_IFCHR | 0o666, (1, 5), 2));
            }
            Some(Special::Device(_)) => {
                return Ok(FileStat::device(libc::S_IFCHR | 0o666, (1, 9), 3));
            }
            Some(Special::Link(target)) if follow => {
                if let Some(fd) = target.strip_prefix(b"/proc/self/fd/") {
                    let fd: i32 = std::str::from_utf8(fd)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or(Errno::ENOENT)?;
                    return self.fd_stat(fd);
                }
                // Follow the synthetic link once, into the real tree: its target is a
                // canonical path (cwd, executable), never another synthetic name.
                let resolved = self.fs.resolve(b"/", &target, true).map_err(from_fs)?;
                return Ok(self.fs.stat(resolved.node).map_err(from_fs)?.into());
            }
            Some(Special::Link(target)) => {
                let mut stat = FileStat::device(libc::S_IFLNK | 0o777, (0, 0), 4);
                stat.size = target.len() as u64;
                return Ok(stat);
            }
            Some(Special::Proc(_)) => return Ok(FileStat::proc_file()),
            None => {}
        }
        let resolved = self.fs.resolve(&base, path, follow).map_err(from_fs)?;
        Ok(self.fs.stat(resolved.node).map_err(from_fs)?.into())
    }

    fn stat_target(&mut self, dirfd: i32, path: u64, flags: i32) -> Result<FileStat, Errno> {
        if flags
            & !(libc::AT_SYMLINK_NOFOLLOW
                | libc::AT_EMPTY_PATH
                | libc::AT_NO_AUTOMOUNT
                | libc::AT_STATX_SYNC_TYPE)
            != 0
        {
            return Err(Errno::EINVAL);
        }
        let raw = self.read_cstring(path, PATH_MAX - 1)?;
        if raw.is_empty() {
            if flags & libc::AT_EMPTY_PATH == 0 {
                return Err(Errno::ENOENT);
            }
            if dirfd == libc::AT_FDCWD {
                return self.path_stat(libc::AT_FDCWD, b".", true);
            }
            return self.fd_stat(dirfd);
        }
        self.refresh_proc(&raw);
        self.path_stat(dirfd, &raw, flags & libc::AT_SYMLINK_NOFOLLOW == 0)
    }

    pub(crate) fn sys_newfstatat(
        &mut self,
        dirfd: i32,
        path: u64,
        out: u64,
        flags: i32,
    ) -> SysResult {
        let stat = self.stat_target(dirfd, path, flags)?;
        self.write_obj(out, &stat.to_stat())?;
        Ok(0)
    }

    pub(crate) fn sys_statx(&mut self, dirfd: i32, path: u64, flags: i32, out: u64) -> SysResult {
        let stat = self.stat_target(dirfd, path, flags)?;
        self.write_obj(out, &stat.to_statx())?;
        Ok(0)
    }

    pub(crate) fn sys_faccessat(
        &mut self,
        dirfd: i32,
        path: u64,
        mode: i32,
        flags: i32,
    ) -> SysResult {
        if mode & !(libc::R_OK | libc::W_OK | libc::X_OK) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let path = self.read_path(path)?;
        let stat = self.path_stat(dirfd, &path, flags & libc::AT_SYMLINK_NOFOLLOW == 0)?;
        // The sandbox runs as root: everything is readable and writable; execute needs at
        // least one execute bit on non-directories, as for Linux's root.
        let is_dir = stat.mode & libc::S_IFMT == libc::S_IFDIR;
        if mode & libc::X_OK != 0 && !is_dir && stat.mode & 0o111 == 0 {
            return Err(Errno::EACCES.into());
        }
        Ok(0)
    }

    pub(crate) fn sys_readlinkat(
        &mut self,
        dirfd: i32,
        path: u64,
        buf: u64,
        size: u64,
    ) -> SysResult {
        if size == 0 || size > i32::MAX as u64 {
            return Err(Errno::EINVAL.into());
        }
        let path = self.read_path(path)?;
        let base = self.base_dir(dirfd, &path)?;
        let absolute = self.absolute(&base, &path);
        let target = match self.special(&absolute) {
            Some(Special::Link(target)) => target,
            Some(Special::Device(_) | Special::Proc(_)) => return Err(Errno::EINVAL.into()),
            None => {
                let resolved = self.fs.resolve(&base, &path, false).map_err(from_fs)?;
                if self.fs.kind(resolved.node).map_err(from_fs)? != Kind::Symlink {
                    return Err(Errno::EINVAL.into());
                }
                self.fs.read_link(resolved.node).map_err(from_fs)?.to_vec()
            }
        };
        let n = target.len().min(size as usize);
        self.write_user(buf, &target[..n])?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalizes_lexically() {
        assert_eq!(normalize(b"/dev/../dev//null"), b"/dev/null");
        assert_eq!(normalize(b"/../.."), b"/");
        assert_eq!(normalize(b"/proc/self/fd/3/"), b"/proc/self/fd/3");
    }
}
