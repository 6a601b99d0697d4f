//! The GDT, IDT, TSS and the two kinds of ring-0 stubs through which the program reaches us.
//!
//! * `syscall` jumps (via `LSTAR`) to `out SYSCALL_PORT, al`: the `out` exits to the VMM,
//!   which serves the call and returns to ring 3 itself by setting rip, rflags and the user
//!   segments (kvm_pvm cannot emulate `sysretq` in its ring 0: it triple-faults).
//! * Every CPU exception vector points at `out EXCEPTION_PORT_BASE+vector, al; hlt`, so a
//!   fault becomes an exit that names its vector; the CPU has pushed the faulting frame onto
//!   the TSS ring-0 stack, where the VMM reads it.
//!
//! kvm_pvm checks the TSS I/O permission bitmap even for its emulated ring 0, so the bitmap
//! opens exactly the stub ports. A ring-3 program can therefore execute `out` to those ports
//! too; the VMM tells a genuine stub exit from a forged one by the code segment (ring 0) and
//! the exact stub address, and ends a sandbox that forges one.

use forkvm_memory::ram::{GuestRam, OutOfBounds};

use crate::layout::{
    EXCEPTION_PORT_BASE, EXCEPTION_STUB_STRIDE, EXCEPTION_STUBS, EXCEPTION_VECTORS, GDT, IDT,
    KERNEL_CS, RING0_STACK_TOP, SYSCALL_PORT, SYSCALL_STUB, TSS,
};

/// Size of the 64-bit TSS without the I/O bitmap.
const TSS_BASE_LEN: usize = 0x68;
/// Bytes of I/O permission bitmap: ports 0..IO_BITMAP_PORTS, then the required 0xff byte.
const IO_BITMAP_PORTS: usize = 0x80;
/// TSS limit, covering the I/O bitmap and its terminating byte.
pub const TSS_LIMIT: u32 = (TSS_BASE_LEN + IO_BITMAP_PORTS / 8 + 1 - 1) as u32;
/// GDT byte size limit (8 descriptors, the TSS taking two).
pub const GDT_LIMIT: u16 = 8 * 8 - 1;
/// IDT byte size limit (256 gates of 16 bytes).
pub const IDT_LIMIT: u16 = 256 * 16 - 1;
/// Address right after the syscall stub's `out`: where the vCPU stops on a syscall exit.
pub const SYSCALL_EXIT_RIP: u64 = SYSCALL_STUB + 2;

const OUT_IMM8_AL: u8 = 0xe6;
const HLT: u8 = 0xf4;

/// Writes all descriptor tables and stubs into the system area.
pub fn install(ram: &GuestRam) -> Result<(), OutOfBounds> {
    ram.write(GDT, &gdt())?;
    ram.write(TSS, &tss())?;
    ram.write(IDT, &idt())?;

    ram.write(SYSCALL_STUB, &[OUT_IMM8_AL, SYSCALL_PORT as u8, HLT])?;

    for vector in 0..EXCEPTION_VECTORS {
        let stub = [OUT_IMM8_AL, (EXCEPTION_PORT_BASE + vector) as u8, HLT];
        ram.write(exception_stub(vector), &stub)?;
    }
    Ok(())
}

fn exception_stub(vector: u16) -> u64 {
    EXCEPTION_STUBS + u64::from(vector) * EXCEPTION_STUB_STRIDE
}

fn gdt() -> Vec<u8> {
    let tss_low = {
        let base = TSS;
        let limit = u64::from(TSS_LIMIT);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89u64 << 40) // present, 64-bit available TSS
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56)
    };
    let tss_high = TSS >> 32;
    let entries: [u64; 8] = [
        0,
        0x00af_9b00_0000_ffff, // ring-0 64-bit code
        0x00cf_9300_0000_ffff, // ring-0 data
        0x00cf_fb00_0000_ffff, // ring-3 32-bit code (sysret layout)
        0x00cf_f300_0000_ffff, // ring-3 data
        0x00af_fb00_0000_ffff, // ring-3 64-bit code
        tss_low,
        tss_high,
    ];
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn tss() -> Vec<u8> {
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[4..12].copy_from_slice(&RING0_STACK_TOP.to_le_bytes());
    tss[102..104].copy_from_slice(&(TSS_BASE_LEN as u16).to_le_bytes());
    // Bitmap: a set bit denies the port. Deny all, then open the stub ports. The byte after
    // the bitmap must be all ones.
    let bitmap = &mut tss[TSS_BASE_LEN..];
    bitmap.fill(0xff);
    let open = std::iter::once(SYSCALL_PORT)
        .chain(EXCEPTION_PORT_BASE..EXCEPTION_PORT_BASE + EXCEPTION_VECTORS);
    for port in open {
        bitmap[usize::from(port) / 8] &= !(1 << (port % 8));
    }
    tss
}

fn idt() -> Vec<u8> {
    let mut idt = vec![0u8; IDT_LIMIT as usize + 1];
    for vector in 0..EXCEPTION_VECTORS {
        let handler = exception_stub(vector);
        // Breakpoint and overflow are raised by instructions ring 3 may execute (int3, into):
        // DPL 3 lets them arrive as themselves rather than as #GP.
        let dpl = if vector == 3 || vector == 4 { 3 } else { 0 };
        let type_attr: u64 = 0x80 | (dpl << 5) | 0xe; // present, 64-bit interrupt gate
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (type_attr << 40)
            | (((handler >> 16) & 0xffff) << 48);
        let high = handler >> 32;
        let at = vector as usize * 16;
        idt[at..at + 8].copy_from_slice(&low.to_le_bytes());
        idt[at + 8..at + 16].copy_from_slice(&high.to_le_bytes());
    }
    idt
}

/// Which exception vectors push an error code.
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Short name of an exception vector, for fault messages.
pub fn vector_name(vector: u8) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug (#DB)",
        2 => "NMI",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack fault (#SS)",
        13 => "general protection (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating point (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating point (#XM)",
        _ => "exception",
    }
}

/// The Linux signal a vector would raise in a process, for exit statuses.
pub fn vector_signal(vector: u8) -> i32 {
    match vector {
        0 | 16 | 19 => libc::SIGFPE,
        1 | 3 => libc::SIGTRAP,
        6 => libc::SIGILL,
        17 => libc::SIGBUS,
        _ => libc::SIGSEGV,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gate_points_at_stub() {
        let idt = idt();
        let gate = &idt[14 * 16..15 * 16];
        let low = u64::from_le_bytes(gate[..8].try_into().unwrap());
        let target = (low & 0xffff) | (((low >> 48) & 0xffff) << 16);
        assert_eq!(target, exception_stub(14));
        assert_eq!((low >> 16) & 0xffff, u64::from(KERNEL_CS));
    }

    #[test]
    fn tss_opens_only_stub_ports() {
        let tss = tss();
        assert_eq!(
            u64::from_le_bytes(tss[4..12].try_into().unwrap()),
            RING0_STACK_TOP
        );
        let base = usize::from(u16::from_le_bytes(tss[102..104].try_into().unwrap()));
        let allowed = |port: usize| tss[base + port / 8] & (1 << (port % 8)) == 0;
        assert!(allowed(0x20));
        assert!(allowed(0x40) && allowed(0x5f));
        assert!(!allowed(0x21) && !allowed(0x60) && !allowed(0x3f));
        assert_eq!(*tss.last().unwrap(), 0xff);
        assert_eq!(tss.len(), TSS_LIMIT as usize + 1);
    }
}
