//! Memory the program unmaps: given back to the host, or kept and zeroed in place.
//!
//! On this KVM the first touch of a page is the expensive part of memory (a host fault and
//! a shadow-paging fault, tens of microseconds), and programs unmap and map again all the
//! time: glibc trims its heap after a burst of frees and grows it again for the next one,
//! CPython returns empty arenas. Handing those pages back to the host on every unmap makes
//! the next burst fault them all in again (a pandas group-by loop ran 1.8x the host's time
//! for this alone). So pages the program has touched are kept where they are instead,
//! with the host page and KVM's mapping of it, and zeroed when they are mapped again; pages
//! it has not touched are left alone where they already read as zero. The invariant the
//! kernel relies on holds either way: memory reads as zero when it is mapped.
//!
//! What is kept is bounded (`RETAIN_LIMIT` per sandbox, counted over unmapped ranges, and
//! released as soon as it is mapped again); beyond it, unmapped memory goes back to the
//! host as before.

use rangemap::RangeSet;

use crate::ram::{GuestRam, MemoryError, PAGE_SIZE};

/// Unmapped memory a sandbox may keep zeroed in place.
pub const RETAIN_LIMIT: u64 = 128 << 20;

/// A range whose pages are too scattered among ones that must be replaced is replaced
/// whole rather than in more pieces than this.
const MAX_REPLACED_RUNS: usize = 16;

/// `/proc/self/pagemap` flags (see `backing`).
const PM_PRESENT: u64 = 1 << 63;
const PM_FILE: u64 = 1 << 61;

/// What backs guest RAM on the host, as far as releasing memory needs to know.
#[derive(Debug, Default)]
pub(crate) struct HostPages {
    /// Ranges backed by anonymous host memory (never a snapshot or image file): a page there
    /// that is not present reads as zero.
    anonymous: RangeSet<u64>,
    /// Unmapped ranges kept zeroed in place.
    retained: RangeSet<u64>,
}

impl HostPages {
    pub(crate) fn all_anonymous(size: u64) -> HostPages {
        let mut pages = HostPages::default();
        pages.anonymous.insert(0..size);
        pages
    }

    /// `[start, end)` now has fresh anonymous host pages (nothing kept there).
    pub(crate) fn replaced_with_anonymous(&mut self, start: u64, end: u64) {
        self.anonymous.insert(start..end);
        self.retained.remove(start..end);
    }

    /// `[start, end)` is now a private mapping of a file.
    pub(crate) fn replaced_with_file(&mut self, start: u64, end: u64) {
        self.anonymous.remove(start..end);
        self.retained.remove(start..end);
    }

    /// Whether all of `[start, end)` is anonymous.
    /// The ranges backed by anonymous host memory.
    pub(crate) fn anonymous(&self) -> &RangeSet<u64> {
        &self.anonymous
    }

    pub(crate) fn is_anonymous(&self, start: u64, end: u64) -> bool {
        start >= end || self.anonymous.gaps(&(start..end)).next().is_none()
    }

    /// The memory reset restored from a snapshot: nothing is known to be anonymous or kept.
    pub(crate) fn forget(&mut self) {
        *self = HostPages::default();
    }

    fn retained_bytes(&self) -> u64 {
        self.retained.iter().map(|r| r.end - r.start).sum()
    }
}

/// What to do with one page being released.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Disposal {
    /// Touched and private: zero it where it is.
    Zero,
    /// Not touched, on anonymous memory: it reads as zero already.
    Keep,
    /// A file page, or untouched over a file: replace it with a fresh anonymous page.
    Replace,
}

impl GuestRam {
    /// Unmapped memory kept zeroed in place now.
    pub fn retained_bytes(&self) -> u64 {
        self.host_pages
            .lock()
            .expect("host pages lock")
            .retained_bytes()
    }

    /// Makes `[addr, addr+len)` (page aligned), which the program just unmapped, read as
    /// zero: kept and zeroed in place within `RETAIN_LIMIT`, given back to the host beyond.
    pub fn release(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let end = addr
            .checked_add(len)
            .ok_or(MemoryError::BadRange { addr, len })?;
        let within_limit = {
            let pages = self.host_pages.lock().expect("host pages lock");
            pages.retained_bytes().saturating_add(len) <= RETAIN_LIMIT
        };
        if !within_limit {
            return self.discard(addr, len);
        }
        let runs = self.dispositions(addr, end)?;
        let replaced = runs.iter().filter(|r| r.0 == Disposal::Replace).count();
        if replaced > MAX_REPLACED_RUNS {
            return self.discard(addr, len);
        }
        for &(disposal, start, run_end) in &runs {
            match disposal {
                // Zeroed when mapped again (`reuse`): KVM may still map these pages for the
                // program (see `Process::sync_page_tables`), which could write them.
                Disposal::Zero => {}
                Disposal::Keep => {}
                Disposal::Replace => self.discard(start, run_end - start)?,
            }
        }
        self.host_pages
            .lock()
            .expect("host pages lock")
            .retained
            .insert(addr..end);
        Ok(())
    }

    /// Whether the page at `addr` is unmapped and kept for reuse (zeroed when mapped again).
    pub fn is_retained(&self, addr: u64) -> bool {
        self.host_pages
            .lock()
            .expect("host pages lock")
            .retained
            .contains(&addr)
    }

    /// `[addr, addr+len)` is mapped again: whatever was kept there is in use, not retained.
    /// Kept pages still hold what they held (see `release`): the ones the program touched
    /// are zeroed now, before the new mapping is filled.
    pub fn reuse(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let Some(end) = addr.checked_add(len).filter(|&end| end > addr) else {
            return Ok(());
        };
        let kept: Vec<std::ops::Range<u64>> = self
            .host_pages
            .lock()
            .expect("host pages lock")
            .retained
            .overlapping(&(addr..end))
            .map(|r| r.start.max(addr)..r.end.min(end))
            .collect();
        for range in kept {
            let mut touched: Vec<(u64, u64)> = Vec::new();
            self.walk_pagemap(range.start, range.end, |page, flags| {
                if flags & PM_PRESENT != 0 && flags & PM_FILE == 0 {
                    match touched.last_mut() {
                        Some(run) if run.1 == page => run.1 = page + PAGE_SIZE,
                        _ => touched.push((page, page + PAGE_SIZE)),
                    }
                }
            })?;
            for (start, run_end) in touched {
                self.zero_in_place(start, run_end - start)?;
            }
        }
        self.host_pages
            .lock()
            .expect("host pages lock")
            .retained
            .remove(addr..end);
        Ok(())
    }

    /// Runs of pages of `[start, end)` with the same disposal, in order.
    fn dispositions(&self, start: u64, end: u64) -> Result<Vec<(Disposal, u64, u64)>, MemoryError> {
        let pages = self.host_pages.lock().expect("host pages lock");
        let mut runs: Vec<(Disposal, u64, u64)> = Vec::new();
        self.walk_pagemap(start, end, |page, flags| {
            let disposal = if flags & PM_PRESENT != 0 {
                if flags & PM_FILE == 0 {
                    Disposal::Zero
                } else {
                    Disposal::Replace
                }
            } else if pages.is_anonymous(page, page + PAGE_SIZE) {
                Disposal::Keep
            } else {
                Disposal::Replace
            };
            match runs.last_mut() {
                Some(run) if run.0 == disposal && run.2 == page => run.2 = page + PAGE_SIZE,
                _ => runs.push((disposal, page, page + PAGE_SIZE)),
            }
        })?;
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_memory_reads_zero_when_reused_and_touched_pages_stay_resident() {
        let ram = GuestRam::anonymous(64 * PAGE_SIZE).unwrap();
        for page in 0..8 {
            ram.write(page * PAGE_SIZE + 9, b"data").unwrap();
        }
        ram.release(0, 16 * PAGE_SIZE).unwrap();
        assert_eq!(ram.residency(0, 16 * PAGE_SIZE).unwrap().resident_pages, 8);
        assert_eq!(ram.retained_bytes(), 16 * PAGE_SIZE);
        ram.reuse(0, 4 * PAGE_SIZE).unwrap();
        assert_eq!(ram.retained_bytes(), 12 * PAGE_SIZE);
        let mut buf = [1u8; 4];
        ram.read(3 * PAGE_SIZE + 9, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
        // Untouched pages were not faulted in by the zeroing.
        assert_eq!(ram.residency(0, 16 * PAGE_SIZE).unwrap().resident_pages, 8);
    }

    #[test]
    fn file_pages_are_replaced_and_the_limit_gives_memory_back() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(64 * PAGE_SIZE).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], 2 * PAGE_SIZE).unwrap();
        let ram = GuestRam::private_file(&file, 64 * PAGE_SIZE).unwrap();
        // Untouched file pages, a read (shared) page, and a written (private) one.
        let mut buf = [0u8; 1];
        ram.read(2 * PAGE_SIZE, &mut buf).unwrap();
        assert_eq!(buf, [7]);
        ram.write(5 * PAGE_SIZE, b"x").unwrap();
        ram.release(0, 8 * PAGE_SIZE).unwrap();
        ram.reuse(0, 8 * PAGE_SIZE).unwrap();
        for page in 0..8 {
            ram.read(page * PAGE_SIZE, &mut buf).unwrap();
            assert_eq!(buf, [0], "page {page}");
        }
        // Past the limit, released memory goes back to the host.
        let big = GuestRam::anonymous(RETAIN_LIMIT + 2 * PAGE_SIZE).unwrap();
        big.write(0, b"x").unwrap();
        big.release(0, RETAIN_LIMIT + PAGE_SIZE).unwrap();
        assert_eq!(big.retained_bytes(), 0);
        assert_eq!(big.residency(0, PAGE_SIZE).unwrap().resident_pages, 0);
    }
}
