//! Putting guest RAM back to exactly its snapshot's contents without unmapping it.
//!
//! A pooled VM is warmed by running a request of our own in it (so KVM's shadow page tables
//! cover the agent's working set), then reset before a user's request arrives. Pages the
//! warm-up *wrote* became private copies: their bytes are copied back from the snapshot
//! file in place, which keeps them mapped (and writable) in the VM, so the next request
//! pays neither the copy-on-write nor the shadow fault. Ranges whose host mapping was
//! replaced (`discard`, `map_file`, `move_pages`) are mapped from the snapshot file again.
//! Every page that differs from the snapshot is one of these two kinds, so the result is
//! byte-for-byte the snapshot (a test compares every page).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// `/proc/self/pagemap` flag: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/self/pagemap` flag: the page is a file page (unmodified, shared with the page
/// cache); a present page without it in a private file mapping is a private copy.
const PM_FILE: u64 = 1 << 61;

fn pagemap() -> Result<&'static File, MemoryError> {
    static PAGEMAP: OnceLock<File> = OnceLock::new();
    if let Some(file) = PAGEMAP.get() {
        return Ok(file);
    }
    let file = File::open("/proc/self/pagemap").map_err(MemoryError::Remap)?;
    Ok(PAGEMAP.get_or_init(|| file))
}

/// What a reset did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Private pages whose snapshot bytes were copied back.
    pub restored_pages: u64,
    /// Bytes of ranges mapped from the snapshot file again.
    pub remapped_bytes: u64,
}

impl GuestRam {
    /// Makes every page in `ranges` (guest addresses) equal to `base` again, `base` being the
    /// file this RAM was mapped from (`GuestRam::private_file`). `ranges` must cover every
    /// page that may have been written: the system area and every mapping the program has
    /// had since the last reset.
    pub fn reset_to(&self, base: &File, ranges: &[(u64, u64)]) -> Result<ResetStats, MemoryError> {
        let mut stats = ResetStats::default();
        let remapped: Vec<(u64, u64)> =
            std::mem::take(&mut *self.remapped.lock().expect("remap log lock"));
        for &(start, end) in &remapped {
            self.remap_from(base, start, end - start)?;
            stats.remapped_bytes += end - start;
        }
        let pagemap = pagemap()?;
        let mut entries = vec![0u8; 512 * 8];
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for &(start, end) in ranges {
            if start >= end || end > self.size() {
                return Err(MemoryError::BadRange {
                    addr: start,
                    len: end.saturating_sub(start),
                });
            }
            let mut addr = start;
            while addr < end {
                let pages = ((end - addr) / PAGE_SIZE).min(512) as usize;
                let host = self.host_base as u64 + addr;
                pagemap
                    .read_exact_at(&mut entries[..pages * 8], host / PAGE_SIZE * 8)
                    .map_err(MemoryError::Remap)?;
                for (i, entry) in entries[..pages * 8].chunks_exact(8).enumerate() {
                    let flags = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
                    if flags & PM_PRESENT != 0 && flags & PM_FILE == 0 {
                        let guest = addr + i as u64 * PAGE_SIZE;
                        base.read_exact_at(&mut page, guest)
                            .map_err(MemoryError::Remap)?;
                        self.write(guest, &page)
                            .map_err(|_| MemoryError::BadRange {
                                addr: guest,
                                len: PAGE_SIZE,
                            })?;
                        stats.restored_pages += 1;
                    }
                }
                addr += pages as u64 * PAGE_SIZE;
            }
        }
        Ok(stats)
    }

    /// Maps `[addr, addr+len)` of `base` at its own offset, copy-on-write.
    fn remap_from(&self, base: &File, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.map_file(addr, len, base, addr)?;
        // `map_file` logs the range as replaced; here it is restored, not replaced.
        self.remapped.lock().expect("remap log lock").pop();
        Ok(())
    }
}
