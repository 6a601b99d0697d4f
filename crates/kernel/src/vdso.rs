//! The vDSO every sandboxed program gets: `clock_gettime`, `gettimeofday` and `time` in guest
//! user mode, so reading the clock costs nanoseconds instead of an exit to the VMM (tens of
//! microseconds on kvm_pvm; `tqdm`, `logging` and event loops read it constantly).
//!
//! The vDSO (`vdso/vdso.c`, built by `build.rs`) is mapped like Linux's, as `[vdso]` with a
//! read-only `[vvar]` page below it, and announced with `AT_SYSINFO_EHDR`; glibc finds it
//! there. The `[vvar]` page holds a reference point: a TSC value and what each clock read
//! at that moment. The guest extrapolates from it with `rdtsc`, which it executes natively,
//! and which reads the host's TSC because the VMM pins every vCPU's TSC offset to zero.
//! The VMM refreshes the page before the program first runs and at every request, so a
//! fork of an old snapshot reads the true time and drift between the TSC and the host's
//! NTP-disciplined clocks never accumulates beyond one request. Where the TSC cannot be
//! trusted, the page says so and each call falls back to the syscall.

use std::mem::{offset_of, size_of};

use serde::{Deserialize, Serialize};
use syscalls::Errno;
use vm_memory::ByteValued;

use crate::mm::{Vma, VmaKind};
use crate::process::Process;
use forkvm_memory::ram::{PAGE_SIZE, page_align_up};

/// The vDSO shared object (linked at 0, no relocations).
pub const IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vdso.so"));

/// The guest's TSC as the VMM set it up: equal to the host's, ticking at `khz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestTsc {
    pub khz: u32,
}

/// Where the vDSO is in a process (kept in snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdsoPlacement {
    /// The `[vvar]` clock page.
    pub clock_page: u64,
    /// The vDSO's ELF header (`AT_SYSINFO_EHDR`).
    pub image: u64,
}

/// The `[vvar]` page as the vDSO reads it (`struct clock_page` in `vdso/vdso.c`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ClockPage {
    /// Odd while the page is being rewritten (a seqlock, for vCPUs that read concurrently).
    seq: u32,
    /// 0: every call is a syscall.
    enabled: u32,
    /// The reference TSC value.
    tsc: u64,
    /// Nanoseconds per TSC tick, 32.32 fixed point.
    mult: u64,
    realtime_ns: u64,
    monotonic_ns: u64,
    monotonic_raw_ns: u64,
    boottime_ns: u64,
    tai_ns: u64,
}

// SAFETY: `ClockPage` is `repr(C)`, made of integers only, with no padding (checked below),
// so every byte pattern is a valid value.
unsafe impl ByteValued for ClockPage {}

const _: () = {
    assert!(size_of::<ClockPage>() == 64);
    assert!(offset_of!(ClockPage, tsc) == 8);
    assert!(offset_of!(ClockPage, realtime_ns) == 24);
    assert!(offset_of!(ClockPage, tai_ns) == 56);
};

/// How far a clock the guest has already seen may run ahead of the host's and still be
/// carried over (beyond that the page is not trusted: the guest can write its own memory).
const MAX_CARRY_NS: u64 = 1_000_000_000;

/// Reads a host clock in nanoseconds.
pub(crate) fn host_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn host_tsc() -> u64 {
    // SAFETY: `rdtsc` has no preconditions on x86-64; it only reads the counter.
    unsafe { std::arch::x86_64::_rdtsc() }
}

impl ClockPage {
    /// Nanoseconds `page` extrapolates for `clock_ns` at TSC value `tsc` (None if the page
    /// was not enabled or the arithmetic overflows).
    fn extrapolate(&self, base_ns: u64, tsc: u64) -> Option<u64> {
        if self.enabled == 0 {
            return None;
        }
        let ticks = tsc.checked_sub(self.tsc)?;
        let ns = (u128::from(ticks) * u128::from(self.mult)) >> 32;
        base_ns.checked_add(u64::try_from(ns).ok()?)
    }

    /// A page with the host's clocks now, never behind what `previous` lets the guest read
    /// for the clocks that must not go backwards.
    fn now(tsc: GuestTsc, previous: &ClockPage) -> ClockPage {
        let before = host_tsc();
        let mut page = ClockPage {
            seq: 0,
            enabled: 1,
            tsc: 0,
            mult: ((1_000_000u128 << 32) / u128::from(tsc.khz.max(1))) as u64,
            realtime_ns: host_ns(libc::CLOCK_REALTIME),
            monotonic_ns: host_ns(libc::CLOCK_MONOTONIC),
            monotonic_raw_ns: host_ns(libc::CLOCK_MONOTONIC_RAW),
            boottime_ns: host_ns(libc::CLOCK_BOOTTIME),
            tai_ns: host_ns(libc::CLOCK_TAI),
        };
        let after = host_tsc();
        page.tsc = before + (after.saturating_sub(before)) / 2;
        let carry = |host: u64, seen: Option<u64>| match seen {
            Some(seen) if seen > host && seen - host < MAX_CARRY_NS => seen,
            _ => host,
        };
        page.monotonic_ns = carry(
            page.monotonic_ns,
            previous.extrapolate(previous.monotonic_ns, page.tsc),
        );
        page.monotonic_raw_ns = carry(
            page.monotonic_raw_ns,
            previous.extrapolate(previous.monotonic_raw_ns, page.tsc),
        );
        page.boottime_ns = carry(
            page.boottime_ns,
            previous.extrapolate(previous.boottime_ns, page.tsc),
        );
        page
    }
}

impl Process {
    /// Maps the `[vvar]` page and the `[vdso]` image below the other mappings and returns
    /// where they are.
    pub(crate) fn map_vdso(&mut self) -> Result<VdsoPlacement, Errno> {
        let image_len = page_align_up(IMAGE.len() as u64).ok_or(Errno::ENOMEM)?;
        let start = self.mm.find_free(PAGE_SIZE + image_len, 0)?;
        let placement = VdsoPlacement {
            clock_page: start,
            image: start + PAGE_SIZE,
        };
        let read = libc::PROT_READ as u32;
        let read_exec = (libc::PROT_READ | libc::PROT_EXEC) as u32;
        for vma in [
            Vma::anonymous(start, placement.image, read, VmaKind::Vvar),
            Vma::anonymous(
                placement.image,
                placement.image + image_len,
                read_exec,
                VmaKind::Vdso,
            ),
        ] {
            let replaced = self.mm.map_fixed(vma)?;
            self.discard(&replaced)?;
        }
        self.ram
            .write(placement.image, IMAGE)
            .map_err(|_| Errno::EFAULT)?;
        self.vdso = Some(placement);
        Ok(placement)
    }

    /// Rewrites the clock page from the host's clocks (`tsc`), or disables it (`None`: every
    /// clock call becomes a syscall). The VMM calls this while the program is stopped: before
    /// it first runs and whenever it delivers a request.
    pub fn refresh_clock(&mut self, tsc: Option<GuestTsc>) {
        let Some(placement) = self.vdso else {
            return;
        };
        let addr = placement.clock_page;
        let mut previous = ClockPage::default();
        if self.ram.read(addr, previous.as_mut_slice()).is_err() {
            return;
        }
        let mut page = match tsc {
            Some(tsc) => ClockPage::now(tsc, &previous),
            None => ClockPage::default(),
        };
        // Odd while writing, then the next even value: a reader on another vCPU retries.
        let seq = previous.seq | 1;
        page.seq = seq.wrapping_add(1);
        let writes = [
            self.ram.write(addr, &seq.to_le_bytes()),
            self.ram.write(addr + 4, &page.as_slice()[4..]),
            self.ram.write(addr, &page.seq.to_le_bytes()),
        ];
        if writes.iter().any(Result::is_err) {
            tracing::error!("writing the clock page failed");
        }
    }

    /// Where the vDSO is mapped, if it is.
    pub fn vdso(&self) -> Option<VdsoPlacement> {
        self.vdso
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_tracks_the_host_clock_and_monotonic_never_goes_back() {
        let tsc = GuestTsc { khz: 1_000_000 };
        let first = ClockPage::now(tsc, &ClockPage::default());
        assert_eq!(first.enabled, 1);
        assert_eq!(first.mult, 1 << 32, "1 GHz: one nanosecond per tick");
        let wall = host_ns(libc::CLOCK_REALTIME);
        assert!(wall.abs_diff(first.realtime_ns) < 1_000_000_000);
        // A previous page that ran ahead (within the carry bound) is carried over.
        let ahead = ClockPage {
            monotonic_ns: first.monotonic_ns + 500_000_000,
            ..first
        };
        let next = ClockPage::now(tsc, &ahead);
        assert!(next.monotonic_ns >= ahead.monotonic_ns);
        // One that claims to be far ahead (a guest scribbling on its page) is not.
        let bogus = ClockPage {
            monotonic_ns: u64::MAX / 2,
            ..first
        };
        let next = ClockPage::now(tsc, &bogus);
        assert!(next.monotonic_ns < first.monotonic_ns + 60_000_000_000);
    }

    #[test]
    fn extrapolation_refuses_disabled_pages_and_overflow() {
        let page = ClockPage {
            enabled: 1,
            tsc: 100,
            mult: 1 << 32,
            ..ClockPage::default()
        };
        assert_eq!(page.extrapolate(5, 150), Some(55));
        assert_eq!(page.extrapolate(5, 50), None);
        assert_eq!(page.extrapolate(u64::MAX, 150), None);
        assert_eq!(ClockPage::default().extrapolate(5, 150), None);
    }
}
