//! `--strace` output: one line per syscall with its arguments and result, paths and short
//! buffers shown as strings.

use std::fmt::Write as _;

use syscalls::{Errno, Sysno};

use crate::process::Process;
use crate::syscalls::{ExitReason, Outcome, SyscallArgs, syscall_name};

/// How many bytes of a buffer or string argument to show.
const PREVIEW: usize = 48;

/// Which argument registers hold a path (by syscall).
fn path_args(sysno: Sysno) -> &'static [usize] {
    match sysno {
        Sysno::open
        | Sysno::stat
        | Sysno::lstat
        | Sysno::access
        | Sysno::readlink
        | Sysno::mkdir
        | Sysno::unlink
        | Sysno::rmdir
        | Sysno::chdir
        | Sysno::execve
        | Sysno::truncate
        | Sysno::chmod
        | Sysno::creat
        | Sysno::statfs => &[0],
        Sysno::openat
        | Sysno::newfstatat
        | Sysno::statx
        | Sysno::faccessat
        | Sysno::faccessat2
        | Sysno::readlinkat
        | Sysno::mkdirat
        | Sysno::unlinkat
        | Sysno::fchmodat
        | Sysno::utimensat => &[1],
        Sysno::rename | Sysno::symlink => &[0, 1],
        Sysno::renameat | Sysno::renameat2 => &[1, 3],
        Sysno::symlinkat => &[0, 2],
        _ => &[],
    }
}

fn escape(bytes: &[u8], out: &mut String) {
    out.push('"');
    for &b in bytes.iter().take(PREVIEW) {
        match b {
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('"');
    if bytes.len() > PREVIEW {
        out.push_str("...");
    }
}

impl Process {
    pub(crate) fn trace(&mut self, call: SyscallArgs, outcome: &Outcome) {
        let name = syscall_name(call.nr);
        let sysno = usize::try_from(call.nr).ok().and_then(Sysno::new);
        let mut line = format!("{name}(");
        for (i, &arg) in call.args.iter().enumerate() {
            if i > 0 {
                line.push_str(", ");
            }
            let is_path = sysno.is_some_and(|s| path_args(s).contains(&i));
            let is_out_buffer = matches!(sysno, Some(Sysno::write)) && i == 1;
            if is_path {
                match self.read_cstring(arg, 4096) {
                    Ok(path) => escape(&path, &mut line),
                    Err(_) => {
                        let _ = write!(line, "{arg:#x}");
                    }
                }
            } else if is_out_buffer {
                let len = call.args[2].min(PREVIEW as u64 + 1) as usize;
                match self.read_user(arg, len) {
                    Ok(bytes) => escape(&bytes, &mut line),
                    Err(_) => {
                        let _ = write!(line, "{arg:#x}");
                    }
                }
            } else if arg < 4096 {
                let _ = write!(line, "{}", arg as i64);
            } else {
                let _ = write!(line, "{arg:#x}");
            }
        }
        line.push(')');
        match outcome {
            Outcome::Return(value) => {
                let signed = *value as i64;
                if (-4095..0).contains(&signed) {
                    let errno = Errno::new(-signed as i32);
                    let _ = write!(line, " = -1 {}", errno.name().unwrap_or("E?"));
                } else if (0..1 << 20).contains(&signed) {
                    let _ = write!(line, " = {signed}");
                } else {
                    let _ = write!(line, " = {value:#x}");
                }
            }
            Outcome::AwaitingControl => line.push_str(" = ? (waiting for the VMM)"),
            Outcome::Reschedule => line.push_str(" = ? (another process runs)"),
            Outcome::Switched => {
                let _ = write!(
                    line,
                    " = ? (blocked; thread {} runs)",
                    self.threads.current()
                );
            }
            Outcome::Idle(_) => line.push_str(" = ? (blocked; every thread waits)"),
            Outcome::Exit(ExitReason::Exited(code)) => {
                let _ = write!(line, " = ? (exit {code})");
            }
            Outcome::Exit(reason) => {
                let _ = write!(line, " = ? ({reason:?})");
            }
        }
        line.push('\n');
        if let Some(out) = self.strace.as_mut() {
            let _ = out.write_all(line.as_bytes());
        }
    }
}
