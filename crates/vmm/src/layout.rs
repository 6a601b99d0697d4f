//! Where things live in guest-physical (= guest-virtual) memory.
//!
//! The first 64 KiB are unmapped so NULL dereferences fault. The VMM's own structures sit in a
//! system area below 1 MiB that the syscall layer never hands out (see `paging` for what
//! the program can see of it, and why). The program's memory runs from 1 MiB to the pool
//! of page tables at the top of RAM.

/// First mapped address; `[0, NULL_GUARD_END)` is not present in the page tables.
pub const NULL_GUARD_END: u64 = 0x1_0000;
/// The page tables' fixed places (PML4, PDPT, the first 2 MiB's table, the directories)
/// are the syscall layer's, which keeps the tables (see `forkvm_kernel::pagetable`).
pub use forkvm_kernel::pagetable::{LOW_PAGE_TABLE, PAGE_DIRECTORIES, PDPT, PML4};
/// Global descriptor table.
pub const GDT: u64 = 0x1_3000;
/// Interrupt descriptor table (256 gates).
pub const IDT: u64 = 0x1_4000;
/// Task-state segment (gives the CPU a ring-0 stack for exceptions).
pub const TSS: u64 = 0x1_5000;
/// The `syscall` entry stub (`LSTAR` points here).
pub const SYSCALL_STUB: u64 = 0x1_6000;
/// Exception stubs, one per vector, `EXCEPTION_STUB_STRIDE` bytes apart.
pub const EXCEPTION_STUBS: u64 = 0x1_6100;
pub const EXCEPTION_STUB_STRIDE: u64 = 8;
/// The ring-0 stack the CPU switches to on an exception: `[RING0_STACK_BOTTOM, RING0_STACK_TOP)`.
pub const RING0_STACK_BOTTOM: u64 = 0x1_7000;
pub const RING0_STACK_TOP: u64 = 0x2_0000;
/// End of the system area; the program's memory starts here.
pub const USER_START: u64 = 0x10_0000;
/// The largest RAM the page directories between `PAGE_DIRECTORIES` and `USER_START` can map.
pub const MAX_RAM: u64 = ((USER_START - PAGE_DIRECTORIES) / 4096) << 30;
/// RAM must be a multiple of this (it is mapped with 2 MiB pages).
pub const RAM_ALIGN: u64 = 2 << 20;

/// I/O port the syscall stub writes to.
pub const SYSCALL_PORT: u16 = 0x20;
/// Exception stub for vector `v` writes to port `EXCEPTION_PORT_BASE + v`.
pub const EXCEPTION_PORT_BASE: u16 = 0x40;
/// Exceptions vectors 0..EXCEPTION_VECTORS have stubs.
pub const EXCEPTION_VECTORS: u16 = 32;

/// Code segment selector for ring 0 (GDT entry 1).
pub const KERNEL_CS: u16 = 0x08;
/// Data segment selector for ring 0 (GDT entry 2).
pub const KERNEL_DS: u16 = 0x10;
/// 32-bit user code (GDT entry 3): unused, but `sysret` derives the 64-bit selectors from it.
pub const USER_CS32: u16 = 0x18 | 3;
/// Data segment selector for ring 3 (GDT entry 4).
pub const USER_DS: u16 = 0x20 | 3;
/// 64-bit code segment selector for ring 3 (GDT entry 5).
pub const USER_CS: u16 = 0x28 | 3;
/// Task-state segment selector (GDT entries 6-7).
pub const TSS_SELECTOR: u16 = 0x30;
