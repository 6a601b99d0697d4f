//! The worker's jail, entered before it touches anything a guest controls.
//!
//! The server starts the worker in new mount, PID, network, IPC and UTS namespaces
//! (`spawn`). Here the worker finishes the job: its root becomes an empty, read-only tmpfs
//! holding only `/dev/kvm` and the files of the one template it serves (bind-mounted
//! read-only at their own paths, so the template's recorded paths still hold), with no
//! `/proc` (its page map is opened before); then it becomes `nobody` with no capability and
//! `no_new_privs`. What stays open is what the sandboxes need: KVM, the page map, the
//! template's memory file and image, and the socket.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use forkvm_template::TemplateStore;

/// Host paths the jail shows, read-only, at the same paths.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub dirs: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
}

impl Paths {
    /// What running a program from `image` needs: the image (and its stamp) and the
    /// cache's sealing key to check it with.
    pub fn for_image(image: &Path, key: &Path) -> Paths {
        let mut files = vec![image.to_owned(), key.to_owned()];
        let stamp = forkvm_template::seal::stamp_path(image);
        if stamp.exists() {
            files.push(stamp);
        }
        Paths {
            dirs: Vec::new(),
            files,
        }
    }

    /// What serving template `name` needs: its directory, its image (and the image's
    /// verification stamp), and the cache's sealing key to check them with.
    pub fn for_template(store: &TemplateStore, name: &str) -> Result<Paths, String> {
        let dir = store.dir(name).map_err(|e| e.to_string())?;
        let meta = forkvm_template::snapshot::read_meta(&dir).map_err(|e| e.to_string())?;
        let sealer = store.sealer().map_err(|e| e.to_string())?;
        let mut files = vec![meta.image_path.clone(), sealer.key_path().to_owned()];
        let stamp = forkvm_template::seal::stamp_path(&meta.image_path);
        if stamp.exists() {
            files.push(stamp);
        }
        Ok(Paths {
            dirs: vec![dir],
            files,
        })
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn check(what: &str, result: libc::c_int) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype = fstype.map(|s| CString::new(s).expect("no NUL"));
    let data = data.map(|s| CString::new(s).expect("no NUL"));
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(&format!("mounting {}", target.display()), result)
}

/// A bind mount of the object `source` (opened `O_PATH`) at `target`, then made read-only
/// (unless `writable_device`) with no set-uid and no execution.
fn bind(source: &File, target: &Path, device: bool) -> io::Result<()> {
    let via = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
    mount(Some(&via), target, None, libc::MS_BIND, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NOEXEC;
    if !device {
        flags |= libc::MS_RDONLY | libc::MS_NODEV;
    }
    mount(None, target, None, flags, None)
}

fn open_path(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Enters the jail: private mounts, the new root, a fresh `/proc`, a hostname of its own.
pub fn enter(paths: &Paths) -> io::Result<()> {
    // The cgroup namespace is entered here, after the server placed us in our cgroup, so
    // /proc/self/cgroup shows the worker's own as its root.
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "no cgroup namespace");
    }
    let name = b"forkvm-worker";
    // SAFETY: the pointer and length describe `name`.
    check("sethostname", unsafe {
        libc::sethostname(name.as_ptr().cast(), name.len())
    })?;
    // Nothing mounted from here on may reach the host's mount table.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    // Everything the jail shows is opened first, so mounting the new root over a
    // directory cannot hide it.
    let kvm = open_path(Path::new("/dev/kvm"))?;
    let dirs: Vec<(File, &PathBuf)> = paths
        .dirs
        .iter()
        .map(|d| Ok((open_path(d)?, d)))
        .collect::<io::Result<_>>()?;
    let files: Vec<(File, &PathBuf)> = paths
        .files
        .iter()
        .map(|f| Ok((open_path(f)?, f)))
        .collect::<io::Result<_>>()?;

    let root = std::env::temp_dir();
    mount(
        Some(Path::new("tmpfs")),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=1m,mode=0755"),
    )?;
    let inside = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let place_file = |path: &Path| -> io::Result<PathBuf> {
        let target = inside(path);
        fs::create_dir_all(target.parent().unwrap_or(&root))?;
        File::create(&target)?;
        Ok(target)
    };
    bind(&kvm, &place_file(Path::new("/dev/kvm"))?, true)?;
    for (source, path) in &dirs {
        let target = inside(path);
        fs::create_dir_all(&target)?;
        bind(source, &target, false)?;
    }
    for (source, path) in &files {
        bind(source, &place_file(path)?, false)?;
    }
    // The one thing the worker reads from /proc; with it open, no /proc is needed (a
    // root-owned /proc/sys is what a process with uid 0 could still write).
    forkvm_memory::backing::open_pagemap()
        .map_err(|e| io::Error::other(format!("opening /proc/self/pagemap: {e}")))?;

    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    // only the new root.
    std::env::set_current_dir(&root)?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: both arguments are NUL-terminated strings.
    check("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int
    })?;
    // SAFETY: as above.
    check("detaching the old root", unsafe {
        libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
    })?;
    std::env::set_current_dir("/")?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )?;

    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The user and group a worker runs as: owner of nothing it can see.
pub const NOBODY: libc::uid_t = 65534;

/// Becomes `nobody` (no supplementary groups) with every capability dropped (bounding,
/// ambient, effective, permitted, inheritable) and `no_new_privs` set, so nothing the
/// worker could still execute would give them back. Everything it needs is open by now.
pub fn drop_privileges() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            // EINVAL: past the last capability this kernel knows.
            break;
        }
    }
    // SAFETY: prctl with integer arguments only.
    check("clearing ambient capabilities", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })?;
    // Changing from uid 0 clears the permitted and effective sets too; the group first,
    // while the right to change it is still there.
    // SAFETY: setgroups with a count of zero reads no list.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: integer arguments only.
    check("setresgid", unsafe {
        libc::setresgid(NOBODY, NOBODY, NOBODY)
    })?;
    // SAFETY: integer arguments only.
    check("setresuid", unsafe {
        libc::setresuid(NOBODY, NOBODY, NOBODY)
    })?;
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: version-3 capset reads one header and two data structs, which these are.
    check("capset", unsafe {
        libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int
    })?;
    // SAFETY: prctl with integer arguments only.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })
}
