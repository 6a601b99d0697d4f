//! Entropy: `getrandom` and `/dev/urandom` are answered from the host CSPRNG, so every fork
//! of a snapshot draws fresh randomness.

use super::SysResult;
use crate::entropy::host_random;
use crate::process::Process;

/// Largest single `getrandom` answer (Linux caps reads similarly).
const MAX_RANDOM_CHUNK: u64 = 32 * 1024 * 1024;

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
