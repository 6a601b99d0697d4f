//! The system area's page-table entries: the first 2 MiB below the program.
//!
//! The tables themselves belong to the syscall layer (`forkvm_kernel::pagetable`), which
//! keeps the program's entries in step with its mappings. This module writes the fixed
//! part of the first 2 MiB's table: a not-present NULL guard, the page-table pages
//! themselves not present (the MMU reads them by physical address; the program never
//! needs to), the descriptor tables and stubs read-only, and the writable ring-0
//! exception stack.
//!
//! kvm_pvm runs emulated ring-0 code with user-mode page permissions (a fetch of the stub
//! from a supervisor page faults, and the CPU's pushes to the exception stack need a
//! user-writable page), so these pages must be user pages. The program can therefore
//! read the stubs and descriptor tables and write the exception stack; it can only
//! damage its own VM's exception frames, which the VMM validates (and a frame the
//! program forges is reported as the program's fault: see `exit::is_real_exception`).

use forkvm_kernel::pagetable::{LOW_PAGE_TABLE, PAGE_DIRECTORIES, PML4};
use forkvm_memory::ram::{GuestRam, OutOfBounds};

use crate::layout::{GDT, NULL_GUARD_END, RING0_STACK_BOTTOM, RING0_STACK_TOP, SYSCALL_STUB};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const NO_EXECUTE: u64 = 1 << 63;
const PAGE: u64 = 4096;

/// Writes the system area's entries into the first 2 MiB's table.
pub fn build_system_area(ram: &GuestRam) -> Result<(), OutOfBounds> {
    let mut entries = Vec::with_capacity((PAGE_DIRECTORIES / PAGE) as usize * 8);
    for addr in (0..PAGE_DIRECTORIES).step_by(PAGE as usize) {
        let value = if addr < NULL_GUARD_END || (PML4..GDT).contains(&addr) {
            0
        } else if (SYSCALL_STUB..SYSCALL_STUB + PAGE).contains(&addr) {
            addr | PRESENT | USER
        } else if (RING0_STACK_BOTTOM..RING0_STACK_TOP).contains(&addr) {
            addr | PRESENT | WRITABLE | USER | NO_EXECUTE
        } else {
            addr | PRESENT | USER | NO_EXECUTE
        };
        entries.extend_from_slice(&value.to_le_bytes());
    }
    // Everything from the page directories up to the program's start stays not present.
    ram.write(LOW_PAGE_TABLE, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{IDT, PDPT};

    fn entry(ram: &GuestRam, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        ram.read(LOW_PAGE_TABLE + addr / PAGE * 8, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn guards_tables_stubs_and_stack() {
        let ram = GuestRam::anonymous(4 << 20).unwrap();
        build_system_area(&ram).unwrap();
        for hidden in [0, PML4, PDPT, LOW_PAGE_TABLE, PAGE_DIRECTORIES] {
            assert_eq!(entry(&ram, hidden), 0, "{hidden:#x}");
        }
        assert_eq!(entry(&ram, SYSCALL_STUB), SYSCALL_STUB | PRESENT | USER);
        assert_eq!(entry(&ram, IDT), IDT | PRESENT | USER | NO_EXECUTE);
        assert_ne!(entry(&ram, RING0_STACK_BOTTOM) & WRITABLE, 0);
    }
}
