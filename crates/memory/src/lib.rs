//! Guest RAM as the host holds it. The syscall layer (`forkvm-kernel`) sees it through a
//! narrow interface (map, unmap, protect, read, write, discard); the VMM registers it with
//! KVM, snapshots it and resets it. Which pages a program may touch is not decided here
//! (that is the kernel's address space and the page tables it writes), only what backs
//! them on the host and what they cost.
//!
//! - `ram`: the mapping KVM sees as guest-physical memory, bounds-checked access to it, and
//!   the host operations on ranges of it (discard, protect, map a file, move).
//! - `backing`: what a fork's RAM is a copy-on-write view of (a snapshot's memory file and
//!   fork-of-fork layers), exact resets to it, and the pages that differ.
//! - `freed`: memory the program unmapped, kept zeroed in place for reuse within a bound.
//! - `reach`: which chunks of guest RAM the guest can reach (what KVM's memory slots cover).

pub mod backing;
pub mod freed;
pub mod ram;
pub mod reach;

pub use ram::{GuestRam, MemoryError, OutOfBounds, PAGE_SIZE};
