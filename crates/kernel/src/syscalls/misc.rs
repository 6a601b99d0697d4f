//! Entropy: `getrandom` and `/dev/urandom` are answered from the host CSPRNG, so every fork
//! of a snapshot draws fresh randomness.

use super::SysResult;
use crate::process::Process;

/// Largest single `getrandom` answer (Linux caps reads similarly).
const MAX_RANDOM_CHUNK: u64 = 32 * 1024 * 1024;

/// Fills `buf` from the host kernel's CSPRNG.
pub(crate) fn host_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own
        // mutably; getrandom writes at most that many bytes.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("host getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

impl Process {
    pub(crate) fn sys_getrandom(&mut self, buf: u64, len: u64, _flags: u32) -> SysResult {
        let len = len.min(MAX_RANDOM_CHUNK);
        self.check_user(buf, len)?;
        let mut bytes = vec![0u8; len as usize];
        host_random(&mut bytes);
        self.write_user(buf, &bytes)?;
        Ok(len)
    }
}
