//! Guest RAM: one host mapping that KVM sees as guest-physical memory starting at 0.
//!
//! Guest-virtual equals guest-physical, so a guest pointer is an offset into this mapping.
//! Every access is bounds-checked here; whether the guest may touch an address at all (is it
//! mapped by the program?) is the address space's job (`mm`), which the page tables enforce
//! (`pagetable`).
//!
//! Invariant the rest of the kernel relies on: a page reads as zero when the program maps it.
//! `discard` replaces host pages with fresh anonymous ones, and pages kept for reuse are
//! zeroed when mapped again (`freed`), so a new anonymous `mmap` costs no host memory until
//! touched.
//!
//! The mapping starts on a 2 MiB boundary, so a 2 MiB-aligned guest range is a 2 MiB-aligned
//! host range: where the host backs one with a transparent huge page and the guest's tables
//! map it with one 2 MiB entry, KVM maps it with one large shadow page, and the guest's first
//! touch of 2 MiB costs one fault instead of 512 (`back_with_huge_pages`).

use rangemap::{RangeMap, RangeSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::freed::HostPages;

/// Host page size; guest pages are the same size.
pub const PAGE_SIZE: u64 = 4096;

/// Size of a huge page on x86-64 (a page-directory entry's reach).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Rounds `value` up to a multiple of the page size (None on overflow).
pub fn page_align_up(value: u64) -> Option<u64> {
    value
        .checked_add(PAGE_SIZE - 1)
        .map(|v| v & !(PAGE_SIZE - 1))
}

/// Rounds `value` down to a multiple of the page size.
pub fn page_align_down(value: u64) -> u64 {
    value & !(PAGE_SIZE - 1)
}

/// Errors from creating or remapping guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("guest RAM size {0:#x} is not a non-zero multiple of the page size")]
    BadSize(u64),
    #[error("mapping guest RAM: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    #[error("registering guest RAM: {0}")]
    Region(String),
    #[error("range {addr:#x}+{len:#x} is outside guest RAM or not page-aligned")]
    BadRange { addr: u64, len: u64 },
    #[error("host mmap over guest RAM failed: {0}")]
    Remap(std::io::Error),
}

/// A new anonymous memory file (`memfd`) of `size` bytes, all zero: a layer of a snapshot,
/// or memory several processes map at once.
pub fn memory_file(name: &std::ffi::CStr, size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create returns a new
    // descriptor we take ownership of below (or -1).
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Remap(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Remap)?;
    Ok(file)
}

/// A new memory file holding a copy of the first `size` bytes of `source` (pages of zeros
/// stay holes): a shared memory segment's bytes for a fork of its own.
pub fn copy_memory_file(
    name: &std::ffi::CStr,
    source: &File,
    size: u64,
) -> Result<File, MemoryError> {
    use std::os::unix::fs::FileExt;
    let copy = memory_file(name, size)?;
    let mut chunk = vec![0u8; size.min(1 << 20) as usize];
    let mut at = 0u64;
    while at < size {
        let len = ((size - at) as usize).min(chunk.len());
        let data = &mut chunk[..len];
        source.read_exact_at(data, at).map_err(MemoryError::Remap)?;
        for (i, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                let offset = at + (i as u64) * PAGE_SIZE;
                copy.write_all_at(page, offset)
                    .map_err(MemoryError::Remap)?;
            }
        }
        at += len as u64;
    }
    Ok(copy)
}

/// Host protection of guest RAM.
const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// An access outside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("guest access {addr:#x}+{len:#x} is outside guest RAM")]
pub struct OutOfBounds {
    pub addr: u64,
    pub len: u64,
}

/// Guest-physical RAM backed by a private host mapping that this value owns (and unmaps on
/// drop); `vm-memory` provides the bounds-checked access on top of it.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    pub(crate) host_base: *mut u8,
    size: u64,
    /// Ranges whose host pages were replaced since the mapping was made (discarded, mapped
    /// from an image file, moved): what `reset_to` must map back from the base file.
    pub(crate) remapped: Mutex<Vec<(u64, u64)>>,
    /// Ranges whose host pages were replaced since the page tables last looked: KVM has
    /// already dropped what it cached of them (see `pagetable`).
    replaced: Mutex<RangeSet<u64>>,
    /// Which ranges are host-anonymous, and which unmapped ones are kept zeroed (`freed`).
    pub(crate) host_pages: Mutex<HostPages>,
    /// The snapshot this RAM is a copy-on-write view of (`from_backing`), for `duplicate`.
    pub(crate) origin: Option<crate::backing::Backing>,
    /// Ranges that map a file copy-on-write (`map_file`) and still do, for `duplicate`.
    pub(crate) file_maps: Mutex<RangeMap<u64, FileMap>>,
    /// The chunks the guest can reach, for KVM's memory slots.
    reach: crate::reach::Reach,
}

/// A file mapped over guest RAM: which file, and its offset minus the guest address (the
/// same for every page of one mapping, so neighbours of one mapping merge).
#[derive(Debug, Clone)]
pub(crate) struct FileMap {
    pub file: Arc<File>,
    pub delta: i128,
}

impl PartialEq for FileMap {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.file, &other.file) && self.delta == other.delta
    }
}

impl Eq for FileMap {}

// SAFETY: the mapping is owned by `self` and lives until Drop; the raw base pointer is only
// used for mmap/mremap/munmap calls on ranges checked to lie inside it. The guest only runs
// while the owning thread is inside KVM_RUN, never concurrently with kernel code.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Creates `size` bytes of sparse, zero-filled RAM (`MAP_NORESERVE`: untouched pages cost
    /// nothing).
    pub fn anonymous(size: u64) -> Result<Self, MemoryError> {
        Self::build(None, size)
    }

    /// Maps `size` bytes of `file` copy-on-write (`MAP_PRIVATE`): a fork of a snapshot sees the
    /// snapshot's contents and pays only for the pages it writes. The mapping keeps the file
    /// alive by itself, so no descriptor is held per sandbox.
    pub fn private_file(file: &File, size: u64) -> Result<Self, MemoryError> {
        Self::build(Some(file), size)
    }

    fn build(file: Option<&File>, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || usize::try_from(size).is_err() {
            return Err(MemoryError::BadSize(size));
        }
        let (flags, fd) = match file {
            Some(f) => (libc::MAP_PRIVATE | libc::MAP_NORESERVE, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_ANONYMOUS,
                -1,
            ),
        };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let base = map_huge_aligned(size as usize, prot, flags, fd)?;
        let host_base = base.cast::<u8>();
        // From here on `unmap_on_error` owns the mapping until `Self` does.
        let unmap_on_error = |error: MemoryError| {
            // SAFETY: `base` is the mapping created above, not yet shared with anything.
            unsafe { libc::munmap(base, size as usize) };
            error
        };
        // SAFETY: `host_base..host_base+size` is the live mapping just created, with exactly
        // these protections and flags; it is unmapped only by our Drop, after `memory`.
        let region = unsafe { MmapRegion::build_raw(host_base, size as usize, prot, flags) }
            .map_err(|e| unmap_on_error(MemoryError::Map(e)))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| {
            unmap_on_error(MemoryError::Region(
                "region does not fit the address space".into(),
            ))
        })?;
        let memory = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| unmap_on_error(MemoryError::Region(e.to_string())))?;
        let host_pages = match file {
            Some(_) => HostPages::default(),
            None => HostPages::all_anonymous(size),
        };
        Ok(Self {
            memory,
            host_base,
            size,
            remapped: Mutex::new(Vec::new()),
            replaced: Mutex::new(RangeSet::new()),
            host_pages: Mutex::new(host_pages),
            origin: None,
            file_maps: Mutex::new(RangeMap::new()),
            reach: crate::reach::Reach::default(),
        })
    }

    fn record_remap(&self, addr: u64, len: u64) {
        self.remapped
            .lock()
            .expect("remap log lock")
            .push((addr, addr + len));
        if len > 0 {
            self.replaced
                .lock()
                .expect("replaced lock")
                .insert(addr..addr + len);
            self.file_maps
                .lock()
                .expect("file maps lock")
                .remove(addr..addr + len);
        }
    }

    /// The ranges whose host pages were replaced since the last call.
    pub fn take_replaced(&self) -> RangeSet<u64> {
        std::mem::take(&mut *self.replaced.lock().expect("replaced lock"))
    }

    /// The chunks of this RAM the guest can reach (see `reach`).
    pub fn reach(&self) -> &crate::reach::Reach {
        &self.reach
    }

    /// Notes that the guest can reach `[start, end)`, clipped to RAM (a program may name
    /// any range; only RAM can hold anything).
    pub fn note_reachable(&self, start: u64, end: u64) {
        self.reach.note(start.min(self.size), end.min(self.size));
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical 0, for `KVM_SET_USER_MEMORY_REGION`.
    pub fn host_base(&self) -> u64 {
        self.host_base as u64
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), OutOfBounds> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(OutOfBounds { addr, len }),
        }
    }

    /// Copies guest bytes at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(addr, buf.len() as u64)?;
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| OutOfBounds {
                addr,
                len: buf.len() as u64,
            })
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), OutOfBounds> {
        self.check(addr, data.len() as u64)?;
        self.memory
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| OutOfBounds {
                addr,
                len: data.len() as u64,
            })
    }

    /// Sets `len` guest bytes at `addr` to zero by writing (use for small, partial-page ranges;
    /// `discard` is the cheap way for whole pages).
    pub fn fill_zero(&self, addr: u64, len: u64) -> Result<(), OutOfBounds> {
        self.check(addr, len)?;
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            self.write(addr + done, &ZEROS[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    fn check_pages(&self, addr: u64, len: u64) -> Result<*mut libc::c_void, MemoryError> {
        let aligned = addr.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE);
        if !aligned || self.check(addr, len).is_err() {
            return Err(MemoryError::BadRange { addr, len });
        }
        // `addr` is inside the mapping (checked above), so the offset stays in bounds.
        Ok(self.host_base.wrapping_add(addr as usize).cast())
    }

    /// Replaces the pages of `[addr, addr+len)` with fresh zero pages and returns their host
    /// memory (whatever backed them: anonymous, snapshot file or image file pages).
    pub fn discard(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let host = self.check_pages(addr, len)?;
        self.record_remap(addr, len);
        // SAFETY: `host..host+len` lies inside our own mapping (checked), so MAP_FIXED replaces
        // only guest RAM pages; no Rust reference into guest RAM is held across this call.
        let ret = unsafe {
            libc::mmap(
                host,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(MemoryError::Remap(std::io::Error::last_os_error()));
        }
        self.host_pages
            .lock()
            .expect("host pages lock")
            .replaced_with_anonymous(addr, addr + len);
        Ok(())
    }

    /// Makes KVM drop what it cached of `[addr, addr+len)` (page aligned), keeping the
    /// contents: the host protection is lowered and restored, and the MMU notifier that
    /// fires zaps KVM's shadow entries for those pages, so its next access reads the guest
    /// page tables again (see `pagetable`).
    pub fn invalidate(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let host = self.check_pages(addr, len)?;
        for prot in [libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE] {
            // SAFETY: `host..host+len` lies inside our own mapping (checked). No other thread
            // writes guest RAM while the vCPU thread serves a syscall, and the protection is
            // back to read-write before this returns.
            if unsafe { libc::mprotect(host, len as usize, prot) } != 0 {
                return Err(MemoryError::Remap(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Zeroes `[addr, addr+len)` (page aligned) by writing, keeping its host pages (and KVM's
    /// mappings of them): for pages the program touched and will likely touch again.
    pub(crate) fn zero_in_place(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.check_pages(addr, len)?;
        self.fill_zero(addr, len)
            .map_err(|_| MemoryError::BadRange { addr, len })
    }

    /// `discard` for a 2 MiB-aligned range, asking the host to back it with transparent huge
    /// pages (`MADV_HUGEPAGE`; the hosts we run on set THP to `madvise`). Each 2 MiB the guest
    /// then touches first costs one host fault and one KVM fault instead of 512 of each.
    /// Where the host has no huge pages to give, this is exactly `discard`: 4 KiB pages.
    pub fn back_with_huge_pages(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if !addr.is_multiple_of(HUGE_PAGE_SIZE) || !len.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MemoryError::BadRange { addr, len });
        }
        self.discard(addr, len)?;
        let host = self.check_pages(addr, len)?;
        // SAFETY: advice on a range inside our own mapping (checked); it changes how the host
        // backs the pages, never their contents.
        if unsafe { libc::madvise(host, len as usize, libc::MADV_HUGEPAGE) } != 0 {
            // A kernel built without THP: the range stays on 4 KiB pages, which is correct.
            tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_HUGEPAGE refused");
        }
        Ok(())
    }

    /// Faults in `[addr, addr+len)` (page aligned) on the host, writable, as a first write
    /// by the guest would (`MADV_POPULATE_WRITE`), in one call. Best effort: a host that
    /// cannot (Linux before 5.14, memory pressure) leaves the pages to fault on first touch.
    pub fn populate(&self, addr: u64, len: u64) {
        /// `MADV_POPULATE_WRITE` (Linux 5.14), not yet in the `libc` crate.
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        let Ok(host) = self.check_pages(addr, len) else {
            return;
        };
        if len == 0 {
            return;
        }
        // SAFETY: advice on a range inside our own mapping (checked); populating writes no
        // byte the guest can see (anonymous pages are zero, private file pages are copied).
        if unsafe { libc::madvise(host, len as usize, MADV_POPULATE_WRITE) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE refused");
        }
    }

    /// Maps `len` bytes of `file` at `offset` copy-on-write over `[addr, addr+len)`: file pages
    /// are shared with the host page cache (and every other sandbox) until written.
    pub fn map_file(
        &self,
        addr: u64,
        len: u64,
        file: &Arc<File>,
        offset: u64,
    ) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        self.map_with(addr, len, file, offset, libc::MAP_PRIVATE, RW)?;
        self.record_remap(addr, len);
        self.file_maps.lock().expect("file maps lock").insert(
            addr..addr + len,
            FileMap {
                file: file.clone(),
                delta: i128::from(offset) - i128::from(addr),
            },
        );
        Ok(())
    }

    /// Maps `len` bytes of `file` at `offset` over `[addr, addr+len)`, shared: every other
    /// mapping of those bytes (another process's RAM) sees what the guest writes here.
    /// Without `writable`, the host maps it read-only: nothing, not even a bug on our side,
    /// can write through it.
    pub fn map_shared(
        &self,
        addr: u64,
        len: u64,
        file: &File,
        offset: u64,
        writable: bool,
    ) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        self.map_with(addr, len, file, offset, libc::MAP_SHARED, prot)?;
        self.record_remap(addr, len);
        Ok(())
    }

    /// Maps `[addr, addr+len)` of a backing file (a snapshot or one of its layers) at its own
    /// offset: restoring what the RAM is a view of, so not logged as a replacement.
    pub(crate) fn map_backing(&self, addr: u64, len: u64, file: &File) -> Result<(), MemoryError> {
        self.map_with(addr, len, file, addr, libc::MAP_PRIVATE, RW)
    }

    /// Maps `file` at `offset` over `[addr, addr+len)` with `kind` (`MAP_PRIVATE` or
    /// `MAP_SHARED`) and host protection `prot`.
    fn map_with(
        &self,
        addr: u64,
        len: u64,
        file: &File,
        offset: u64,
        kind: libc::c_int,
        prot: libc::c_int,
    ) -> Result<(), MemoryError> {
        let host = self.check_pages(addr, len)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadRange { addr: offset, len });
        }
        // SAFETY: as in `discard`: the target range is inside our own mapping. A private file
        // mapping never writes the file; a shared one is a memory file made to be shared.
        let ret = unsafe {
            libc::mmap(
                host,
                len as usize,
                prot,
                kind | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(MemoryError::Remap(std::io::Error::last_os_error()));
        }
        self.host_pages
            .lock()
            .expect("host pages lock")
            .replaced_with_file(addr, addr + len);
        Ok(())
    }

    /// Moves the pages of `[from, from+len)` to `[to, to+len)` without copying, leaving zero
    /// pages behind (the backing for `mremap` that has to move).
    pub fn move_pages(&self, from: u64, to: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 || from == to {
            return Ok(());
        }
        let src = self.check_pages(from, len)?;
        let dst = self.check_pages(to, len)?;
        self.record_remap(to, len);
        if from < to.saturating_add(len) && to < from.saturating_add(len) {
            return Err(MemoryError::BadRange { addr: to, len });
        }
        // SAFETY: both ranges are disjoint and inside our own mapping (checked above);
        // MREMAP_FIXED moves the source pages onto the destination range, after which the
        // source range is unmapped and refilled with zero pages by `discard`.
        let ret = unsafe {
            libc::mremap(
                src,
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst,
            )
        };
        if ret == libc::MAP_FAILED {
            return Err(MemoryError::Remap(std::io::Error::last_os_error()));
        }
        {
            let mut pages = self.host_pages.lock().expect("host pages lock");
            if pages.is_anonymous(from, from + len) {
                pages.replaced_with_anonymous(to, to + len);
            } else {
                pages.replaced_with_file(to, to + len);
            }
        }
        self.discard(from, len)
    }

    /// Copies guest bytes at `addr` directly to a host writer without an intermediate buffer
    /// larger than one chunk.
    pub fn copy_to_host(
        &self,
        addr: u64,
        len: u64,
        out: &mut dyn FnMut(&[u8]),
    ) -> Result<(), OutOfBounds> {
        self.check(addr, len)?;
        let mut chunk = vec![0u8; len.min(64 * 1024) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.read(addr + done, &mut chunk[..n])?;
            out(&chunk[..n]);
            done += n as u64;
        }
        Ok(())
    }
}

/// Creates a `len`-byte mapping (of `fd`, or anonymous when `fd` is -1) that starts on a
/// [`HUGE_PAGE_SIZE`] boundary: KVM maps a guest huge page with one large shadow page only if
/// the host address is aligned like the guest-physical one. It reserves `len` plus one huge
/// page of address space, maps over the first aligned address inside, and returns the rest.
fn map_huge_aligned(
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
) -> Result<*mut libc::c_void, MemoryError> {
    let align = HUGE_PAGE_SIZE as usize;
    let reserved_len = len
        .checked_add(align)
        .ok_or(MemoryError::BadSize(len as u64))?;
    let reserve_flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh inaccessible reservation at an address the kernel chooses; it aliases
    // nothing.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserved_len,
            libc::PROT_NONE,
            reserve_flags,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(MemoryError::Remap(std::io::Error::last_os_error()));
    }
    let start = reserved as usize;
    let aligned = start.next_multiple_of(align);
    // SAFETY: `aligned..aligned+len` lies inside the reservation made above (it has `align`
    // spare bytes), which nothing else refers to, so MAP_FIXED replaces only our own pages.
    let base = unsafe { libc::mmap(aligned as *mut _, len, prot, flags | libc::MAP_FIXED, fd, 0) };
    let error = (base == libc::MAP_FAILED).then(std::io::Error::last_os_error);
    let (head, tail) = (aligned - start, start + reserved_len - (aligned + len));
    // SAFETY: the head and tail are the parts of our reservation outside the real mapping
    // (on failure, the whole reservation); unmapping them touches nothing else.
    unsafe {
        match error {
            Some(_) => libc::munmap(reserved, reserved_len),
            None => {
                if head > 0 {
                    libc::munmap(reserved, head);
                }
                if tail > 0 {
                    libc::munmap((aligned + len) as *mut _, tail);
                }
                0
            }
        };
    }
    match error {
        Some(error) => Err(MemoryError::Remap(error)),
        None => Ok(base),
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `build` and is owned by `self`; `vm-memory`'s
        // raw region does not unmap it, and no reference into it outlives `self`.
        unsafe { libc::munmap(self.host_base.cast(), self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds() {
        let ram = GuestRam::anonymous(16 * PAGE_SIZE).unwrap();
        ram.write(100, b"hello").unwrap();
        let mut buf = [0u8; 5];
        ram.read(100, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(ram.write(16 * PAGE_SIZE - 2, b"abc").is_err());
        assert!(ram.read(u64::MAX - 1, &mut buf).is_err());
    }

    #[test]
    fn discard_zeroes_pages() {
        let ram = GuestRam::anonymous(16 * PAGE_SIZE).unwrap();
        ram.write(PAGE_SIZE + 7, b"x").unwrap();
        ram.discard(PAGE_SIZE, PAGE_SIZE).unwrap();
        let mut b = [1u8; 1];
        ram.read(PAGE_SIZE + 7, &mut b).unwrap();
        assert_eq!(b[0], 0);
        assert!(ram.discard(1, PAGE_SIZE).is_err());
        assert!(ram.discard(15 * PAGE_SIZE, 2 * PAGE_SIZE).is_err());
    }

    #[test]
    fn host_mapping_is_huge_page_aligned() {
        for size in [16 * PAGE_SIZE, 3 * HUGE_PAGE_SIZE] {
            let ram = GuestRam::anonymous(size).unwrap();
            assert!(ram.host_base().is_multiple_of(HUGE_PAGE_SIZE));
        }
    }

    #[test]
    fn huge_backing_zeroes_and_checks_alignment() {
        let ram = GuestRam::anonymous(4 * HUGE_PAGE_SIZE).unwrap();
        ram.write(HUGE_PAGE_SIZE + 5, b"x").unwrap();
        ram.back_with_huge_pages(HUGE_PAGE_SIZE, 2 * HUGE_PAGE_SIZE)
            .unwrap();
        let mut b = [1u8; 1];
        ram.read(HUGE_PAGE_SIZE + 5, &mut b).unwrap();
        assert_eq!(b[0], 0);
        ram.write(2 * HUGE_PAGE_SIZE, b"y").unwrap();
        assert!(ram.back_with_huge_pages(PAGE_SIZE, HUGE_PAGE_SIZE).is_err());
        assert!(ram.back_with_huge_pages(HUGE_PAGE_SIZE, PAGE_SIZE).is_err());
    }

    #[test]
    fn move_pages_moves_content() {
        let ram = GuestRam::anonymous(16 * PAGE_SIZE).unwrap();
        ram.write(2 * PAGE_SIZE, b"moved").unwrap();
        ram.move_pages(2 * PAGE_SIZE, 8 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        let mut b = [0u8; 5];
        ram.read(8 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(&b, b"moved");
        ram.read(2 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
    }
}
