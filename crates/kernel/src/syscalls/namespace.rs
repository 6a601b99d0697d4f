//! Namespace and metadata changes by path: cwd, mkdir, unlink/rmdir, rename, link, symlink,
//! truncate, chmod, utimensat, statfs.

use forkvm_image::{Kind, NodeId, Timespec};
use syscalls::Errno;

use super::SysResult;
use crate::abi;
use crate::errno::from_fs;
use crate::file::FileObject;
use crate::fileinfo;
use crate::process::Process;

const UTIME_NOW: i64 = (1 << 30) - 1;
const UTIME_OMIT: i64 = (1 << 30) - 2;
const RENAME_NOREPLACE: u32 = 1;

impl Process {
    pub(crate) fn sys_getcwd(&mut self, buf: u64, size: u64) -> SysResult {
        let mut cwd = self.cwd.clone();
        cwd.push(0);
        if (size as usize) < cwd.len() {
            return Err(Errno::ERANGE.into());
        }
        self.write_user(buf, &cwd)?;
        Ok(cwd.len() as u64)
    }

    pub(crate) fn sys_chdir(&mut self, path: u64) -> SysResult {
        let path = self.read_path(path)?;
        let resolved = self.resolve_at(libc::AT_FDCWD, &path, true)?;
        if self.fs.kind(resolved.node).map_err(from_fs)? != Kind::Dir {
            return Err(Errno::ENOTDIR.into());
        }
        self.cwd = resolved.path;
        Ok(0)
    }

    pub(crate) fn sys_mkdirat(&mut self, dirfd: i32, path: u64, mode: u32) -> SysResult {
        let path = self.read_path(path)?;
        let base = self.base_dir(dirfd, &path)?;
        let parent = match self.fs.resolve_parent(&base, &path) {
            Ok(parent) => parent,
            // `/`, `.` and `..` name directories that exist.
            Err(forkvm_image::FsError::Invalid) if self.fs.resolve(&base, &path, true).is_ok() => {
                return Err(Errno::EEXIST.into());
            }
            Err(e) => return Err(from_fs(e).into()),
        };
        self.fs
            .mkdir(parent.dir.node, &parent.name, mode & !self.umask & 0o7777)
            .map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_unlinkat(&mut self, dirfd: i32, path: u64, flags: i32) -> SysResult {
        if flags & !libc::AT_REMOVEDIR != 0 {
            return Err(Errno::EINVAL.into());
        }
        let path = self.read_path(path)?;
        let base = self.base_dir(dirfd, &path)?;
        let parent = self.fs.resolve_parent(&base, &path).map_err(from_fs)?;
        if flags & libc::AT_REMOVEDIR != 0 {
            self.fs
                .rmdir(parent.dir.node, &parent.name)
                .map_err(from_fs)?;
        } else {
            let target = self
                .fs
                .lookup(parent.dir.node, &parent.name)
                .map_err(from_fs)?;
            let target = target.ok_or(Errno::ENOENT)?;
            if self.fs.kind(target).map_err(from_fs)? == Kind::Dir {
                return Err(Errno::EISDIR.into());
            }
            if parent.trailing_slash {
                return Err(Errno::ENOTDIR.into());
            }
            self.fs
                .unlink(parent.dir.node, &parent.name)
                .map_err(from_fs)?;
        }
        Ok(0)
    }

    pub(crate) fn sys_renameat(
        &mut self,
        old_dirfd: i32,
        old: u64,
        new_dirfd: i32,
        new: u64,
        flags: u32,
    ) -> SysResult {
        if flags & !RENAME_NOREPLACE != 0 {
            return Err(Errno::EINVAL.into());
        }
        let old = self.read_path(old)?;
        let new = self.read_path(new)?;
        let old_base = self.base_dir(old_dirfd, &old)?;
        let new_base = self.base_dir(new_dirfd, &new)?;
        let from = self.fs.resolve_parent(&old_base, &old).map_err(from_fs)?;
        let to = self.fs.resolve_parent(&new_base, &new).map_err(from_fs)?;
        if flags & RENAME_NOREPLACE != 0
            && self
                .fs
                .lookup(to.dir.node, &to.name)
                .map_err(from_fs)?
                .is_some()
        {
            return Err(Errno::EEXIST.into());
        }
        self.fs
            .rename(from.dir.node, &from.name, to.dir.node, &to.name)
            .map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_symlinkat(&mut self, target: u64, dirfd: i32, path: u64) -> SysResult {
        let target = self.read_path(target)?;
        let path = self.read_path(path)?;
        let base = self.base_dir(dirfd, &path)?;
        let parent = self.fs.resolve_parent(&base, &path).map_err(from_fs)?;
        self.fs
            .symlink(parent.dir.node, &parent.name, &target)
            .map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_linkat(
        &mut self,
        old_dirfd: i32,
        old: u64,
        new_dirfd: i32,
        new: u64,
        flags: i32,
    ) -> SysResult {
        if flags & !(libc::AT_SYMLINK_FOLLOW | libc::AT_EMPTY_PATH) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let old = self.read_path(old)?;
        let new = self.read_path(new)?;
        let target = self.resolve_at(old_dirfd, &old, flags & libc::AT_SYMLINK_FOLLOW != 0)?;
        if self.fs.kind(target.node).map_err(from_fs)? == Kind::Dir {
            return Err(Errno::EPERM.into());
        }
        let base = self.base_dir(new_dirfd, &new)?;
        let parent = self.fs.resolve_parent(&base, &new).map_err(from_fs)?;
        self.fs
            .link(target.node, parent.dir.node, &parent.name)
            .map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_truncate(&mut self, path: u64, len: i64) -> SysResult {
        let len = u64::try_from(len).map_err(|_| Errno::EINVAL)?;
        let path = self.read_path(path)?;
        let resolved = self.resolve_at(libc::AT_FDCWD, &path, true)?;
        self.fs.truncate(resolved.node, len).map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_fchmodat(&mut self, dirfd: i32, path: u64, mode: u32) -> SysResult {
        let path = self.read_path(path)?;
        let resolved = self.resolve_at(dirfd, &path, true)?;
        self.fs.set_mode(resolved.node, mode).map_err(from_fs)?;
        Ok(0)
    }

    /// `chown`, `lchown`, `fchownat`: -1 leaves an id as it is.
    pub(crate) fn sys_chown(
        &mut self,
        dirfd: i32,
        path: u64,
        uid: u32,
        gid: u32,
        flags: i32,
    ) -> SysResult {
        if flags & !(libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let path = self.read_cstring(path, 4095)?;
        let node = if path.is_empty() {
            if flags & libc::AT_EMPTY_PATH == 0 {
                return Err(Errno::ENOENT.into());
            }
            return self.sys_fchown(dirfd, uid, gid);
        } else {
            self.refresh_proc(&path);
            let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
            self.resolve_at(dirfd, &path, follow)?.node
        };
        self.change_owner(node, uid, gid)
    }

    pub(crate) fn sys_fchown(&mut self, fd: i32, uid: u32, gid: u32) -> SysResult {
        match self.files.get(fd)?.object {
            FileObject::Node { node, .. } => self.change_owner(node, uid, gid),
            // Pipes, sockets and devices have no owner to keep here.
            _ => Ok(0),
        }
    }

    fn change_owner(&mut self, node: NodeId, uid: u32, gid: u32) -> SysResult {
        let keep = |id: u32| (id != u32::MAX).then_some(id);
        self.fs
            .set_owner(node, keep(uid), keep(gid))
            .map_err(from_fs)?;
        Ok(0)
    }

    /// Extended attributes: the sandbox filesystem has none, and says so as a filesystem
    /// without them does (`EOPNOTSUPP`, which `shutil.copy2` expects) once the file is
    /// known to exist.
    pub(crate) fn sys_xattr_path(&mut self, path: u64, follow: bool) -> SysResult {
        let path = self.read_path(path)?;
        self.resolve_at(libc::AT_FDCWD, &path, follow)?;
        Err(Errno::EOPNOTSUPP.into())
    }

    pub(crate) fn sys_xattr_fd(&mut self, fd: i32) -> SysResult {
        self.files.get(fd)?;
        Err(Errno::EOPNOTSUPP.into())
    }

    /// `mknod`/`mknodat`: regular files, FIFOs and socket names; devices cannot be made
    /// here (`EPERM`, as for a user without the privilege).
    pub(crate) fn sys_mknodat(&mut self, dirfd: i32, path: u64, mode: u32) -> SysResult {
        match mode & libc::S_IFMT {
            0 | libc::S_IFREG => {
                let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC;
                let fd = self.sys_openat(dirfd, path, flags, mode & 0o7777)?;
                self.close_fd(fd as i32)?;
                Ok(0)
            }
            kind @ (libc::S_IFIFO | libc::S_IFSOCK) => {
                let path = self.read_path(path)?;
                let kind = if kind == libc::S_IFIFO {
                    Kind::Fifo
                } else {
                    Kind::Socket
                };
                self.create_special_at(dirfd, &path, kind, mode & 0o7777)?;
                Ok(0)
            }
            libc::S_IFCHR | libc::S_IFBLK => Err(Errno::EPERM.into()),
            _ => Err(Errno::EINVAL.into()),
        }
    }

    /// Makes a FIFO or socket name at `path` (`EEXIST` if the name is taken).
    pub(crate) fn create_special_at(
        &mut self,
        dirfd: i32,
        path: &[u8],
        kind: Kind,
        mode: u32,
    ) -> Result<NodeId, Errno> {
        let base = self.base_dir(dirfd, path)?;
        let parent = match self.fs.resolve_parent(&base, path) {
            Ok(parent) => parent,
            Err(forkvm_image::FsError::Invalid) if self.fs.resolve(&base, path, true).is_ok() => {
                return Err(Errno::EEXIST);
            }
            Err(e) => return Err(from_fs(e)),
        };
        self.fs
            .create_special(parent.dir.node, &parent.name, kind, mode & !self.umask)
            .map_err(from_fs)
    }

    /// Removes the name `path` (undoing a `create_special_at`).
    pub(crate) fn remove_name(&mut self, path: &[u8]) -> Result<(), Errno> {
        let base = self.base_dir(libc::AT_FDCWD, path)?;
        let parent = self.fs.resolve_parent(&base, path).map_err(from_fs)?;
        self.fs
            .unlink(parent.dir.node, &parent.name)
            .map_err(from_fs)
    }

    fn node_for_utimes(&mut self, dirfd: i32, path: u64, flags: i32) -> Result<NodeId, Errno> {
        if path == 0 {
            return match self.files.get(dirfd)?.object {
                FileObject::Node { node, .. } => Ok(node),
                _ => Err(Errno::EPERM),
            };
        }
        let path = self.read_path(path)?;
        Ok(self
            .resolve_at(dirfd, &path, flags & libc::AT_SYMLINK_NOFOLLOW == 0)?
            .node)
    }

    pub(crate) fn sys_utimensat(
        &mut self,
        dirfd: i32,
        path: u64,
        times: u64,
        flags: i32,
    ) -> SysResult {
        let node = self.node_for_utimes(dirfd, path, flags)?;
        let now = {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Timespec {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            }
        };
        let (atime, mtime) = if times == 0 {
            (Some(now), Some(now))
        } else {
            let given = self.read_objs::<abi::Timespec>(times, 2)?;
            let decode = |t: abi::Timespec| -> Result<Option<Timespec>, Errno> {
                match t.tv_nsec {
                    UTIME_NOW => Ok(Some(now)),
                    UTIME_OMIT => Ok(None),
                    n if (0..1_000_000_000).contains(&n) => Ok(Some(Timespec {
                        sec: t.tv_sec,
                        nsec: n as u32,
                    })),
                    _ => Err(Errno::EINVAL),
                }
            };
            (decode(given[0])?, decode(given[1])?)
        };
        self.fs.set_times(node, atime, mtime).map_err(from_fs)?;
        Ok(0)
    }

    pub(crate) fn sys_statfs(&mut self, path: u64, out: u64) -> SysResult {
        let path = self.read_path(path)?;
        self.resolve_at(libc::AT_FDCWD, &path, true)?;
        self.write_obj(
            out,
            &fileinfo::statfs(self.fs.limit(), self.fs.used_bytes()),
        )?;
        Ok(0)
    }
}
