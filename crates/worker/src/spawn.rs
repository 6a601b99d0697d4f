//! Starting a worker process in namespaces of its own.
//!
//! `std::process::Command` cannot create a PID namespace the child itself lives in, so the
//! worker is started with a raw `clone` carrying the namespace flags (fork semantics: no
//! new stack), which then only moves its socket to descriptor 3 and `execv`s the forkvm
//! binary. Between the clone and the exec, the child runs async-signal-safe calls only,
//! on values prepared before the clone, as after any fork of a threaded process.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The running forkvm binary, as a worker is started from it: this path names the binary
/// the process runs even after the file on disk was replaced (an upgrade, a rebuild),
/// which the path `current_exe` returns would not.
pub const OWN_BINARY: &str = "/proc/self/exe";

/// The descriptor a worker finds its socket on.
pub const WORKER_FD: i32 = 3;

/// The namespaces every worker gets: its own mounts, PIDs (it is PID 1), network (only a
/// down loopback), IPC and hostname. The cgroup namespace is entered by the worker once
/// the server has placed it in its cgroup.
const NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// A started worker: its host PID and the server's end of its socket.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub socket: UnixStream,
}

/// Starts `exe worker` in new namespaces. Call it from a thread that lives as long as the
/// worker should: the worker is killed when that thread ends (`PR_SET_PDEATHSIG`), so a
/// dying server never leaves workers behind.
pub fn spawn(exe: &Path) -> io::Result<Spawned> {
    let (ours, theirs) = UnixStream::pair()?;
    let exe = CString::new(exe.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the binary's path"))?;
    let arg0 = CString::new("forkvm").expect("no NUL");
    let arg1 = CString::new("worker").expect("no NUL");
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let fd = theirs.as_raw_fd();
    // SAFETY: clone with a null stack behaves as fork. The child touches only the values
    // prepared above (no allocation, no locks) and calls async-signal-safe functions
    // (prctl, fcntl, dup2, execv, _exit) before it replaces itself.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (NAMESPACES | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        // SAFETY: see above; this is the child, which never returns from this block.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if fd == WORKER_FD {
                libc::fcntl(fd, libc::F_SETFD, 0);
            } else {
                libc::dup2(fd, WORKER_FD);
            }
            libc::execv(exe.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(theirs);
    Ok(Spawned {
        pid: pid as libc::pid_t,
        socket: ours,
    })
}

/// The worker's end of its socket (in `forkvm worker`).
pub fn inherited_socket() -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only reads descriptor flags.
    if unsafe { libc::fcntl(WORKER_FD, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(
            "no socket on descriptor 3: `forkvm worker` is started by `forkvm serve`",
        ));
    }
    // SAFETY: descriptor 3 is open (checked above) and nothing else in this process owns
    // it: the server put the worker's socket there before exec.
    let socket = unsafe { UnixStream::from_raw_fd(WORKER_FD) };
    // Make sure it is a Unix socket, not some other inherited descriptor.
    socket.peer_addr()?;
    // SAFETY: setting close-on-exec on a descriptor we own.
    unsafe { libc::fcntl(WORKER_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(socket)
}
