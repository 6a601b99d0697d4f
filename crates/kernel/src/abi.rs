//! Guest ABI structures that more than one syscall file reads or writes, laid out as on
//! x86-64 Linux. Each is `repr(C)` and `ByteValued`, so it crosses to and from program
//! memory whole (`Process::read_obj`/`write_obj`); sizes and notable offsets are checked
//! at compile time. Structures with a single user live next to it.

use std::mem::{offset_of, size_of};

use vm_memory::ByteValued;

// The structures are copied in host byte order: right only because the host, like the
// guest, is little-endian.
const _: () = assert!(cfg!(target_endian = "little"));

const NS_PER_SEC: u64 = 1_000_000_000;

/// A `T` from the leading bytes of `bytes`, zero past their end (or cut to `T`'s size):
/// for structures whose length the program gives, or that are read only in part.
pub(crate) fn from_prefix<T: ByteValued>(bytes: &[u8]) -> T {
    let mut value = T::zeroed();
    let n = bytes.len().min(size_of::<T>());
    value.as_mut_slice()[..n].copy_from_slice(&bytes[..n]);
    value
}

/// `struct timespec`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Timespec {
    pub tv_sec: i64,
    pub tv_nsec: i64,
}

/// `struct timeval`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Timeval {
    pub tv_sec: i64,
    pub tv_usec: i64,
}

/// `struct itimerspec`: the interval comes first.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Itimerspec {
    pub it_interval: Timespec,
    pub it_value: Timespec,
}

/// `struct itimerval`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Itimerval {
    pub it_interval: Timeval,
    pub it_value: Timeval,
}

/// `stack_t` (`sigaltstack`, and the alternate stack a signal frame saves).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StackT {
    pub ss_sp: u64,
    pub ss_flags: i32,
    pub pad: i32,
    pub ss_size: u64,
}

// SAFETY: each is `repr(C)` and made only of `i64`s (or of the two structures above), so
// there is no padding and every byte pattern is a value.
unsafe impl ByteValued for Timespec {}
// SAFETY: as above.
unsafe impl ByteValued for Timeval {}
// SAFETY: as above.
unsafe impl ByteValued for Itimerspec {}
// SAFETY: as above.
unsafe impl ByteValued for Itimerval {}
// SAFETY: `repr(C)` integers with the padding after `ss_flags` made a field (checked
// below): every byte pattern is a value.
unsafe impl ByteValued for StackT {}

const _: () = {
    assert!(size_of::<Timespec>() == 16);
    assert!(size_of::<Timeval>() == 16);
    assert!(size_of::<Itimerspec>() == 32);
    assert!(offset_of!(Itimerspec, it_value) == 16);
    assert!(size_of::<Itimerval>() == 32);
    assert!(offset_of!(Itimerval, it_value) == 16);
    assert!(size_of::<StackT>() == 24);
    assert!(offset_of!(StackT, ss_size) == 16);
};

impl Timespec {
    pub(crate) fn from_ns(ns: u64) -> Timespec {
        Timespec {
            tv_sec: (ns / NS_PER_SEC) as i64,
            tv_nsec: (ns % NS_PER_SEC) as i64,
        }
    }

    /// Nanoseconds, for a valid non-negative value (`None` otherwise).
    pub(crate) fn as_ns(&self) -> Option<u64> {
        if self.tv_sec < 0 || !(0..NS_PER_SEC as i64).contains(&self.tv_nsec) {
            return None;
        }
        (self.tv_sec as u64)
            .checked_mul(NS_PER_SEC)?
            .checked_add(self.tv_nsec as u64)
    }
}

impl Timeval {
    /// The value, rounded down to microseconds.
    pub(crate) fn from_ns(ns: u64) -> Timeval {
        Timeval {
            tv_sec: (ns / NS_PER_SEC) as i64,
            tv_usec: (ns % NS_PER_SEC / 1000) as i64,
        }
    }

    /// Whether the value is non-negative with microseconds in range.
    pub(crate) fn is_valid(&self) -> bool {
        self.tv_sec >= 0 && (0..1_000_000).contains(&self.tv_usec)
    }

    /// Nanoseconds, for a valid value (`None` otherwise, or when it overflows).
    pub(crate) fn as_ns(&self) -> Option<u64> {
        if !self.is_valid() {
            return None;
        }
        (self.tv_sec as u64)
            .checked_mul(NS_PER_SEC)?
            .checked_add(self.tv_usec as u64 * 1000)
    }
}

impl Itimerspec {
    /// A timer's state: `left` until it fires (0: disarmed), then every `interval`.
    pub(crate) fn from_ns(left: u64, interval: u64) -> Itimerspec {
        Itimerspec {
            it_interval: Timespec::from_ns(interval),
            it_value: Timespec::from_ns(left),
        }
    }
}

impl Itimerval {
    /// As `Itimerspec::from_ns`, in microseconds.
    pub(crate) fn from_ns(left: u64, interval: u64) -> Itimerval {
        Itimerval {
            it_interval: Timeval::from_ns(interval),
            it_value: Timeval::from_ns(left),
        }
    }
}
