//! Putting a fresh vCPU into 64-bit ring 3 at the program's entry point.
//!
//! There is no boot code: long mode, paging, segments, the syscall MSRs and the extended
//! state (XCR0) are set directly through KVM. Order matters only in that CPUID must be set
//! before XCR0 (KVM validates XCR0 against the guest's CPUID).

use forkvm_kernel::vdso::GuestTsc;
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::descriptors::{GDT_LIMIT, IDT_LIMIT, TSS_LIMIT};
use crate::layout::{
    GDT, IDT, KERNEL_CS, PML4, SYSCALL_STUB, TSS, TSS_SELECTOR, USER_CS, USER_CS32, USER_DS,
};

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// No-execute enable: page-table entries' bit 63 forbids instruction fetches.
const EFER_NXE: u64 = 1 << 11;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
/// Flags cleared on `syscall` entry: TF, IF, DF, IOPL, NT, AC (as Linux does).
const SFMASK: u64 = 0x4_7700;

/// Initial RFLAGS in ring 3: only the always-one bit (IOPL 0, interrupts off).
pub const USER_RFLAGS: u64 = 0x2;

/// Errors while configuring a vCPU, one per KVM operation.
#[derive(Debug, Error)]
pub enum VcpuSetupError {
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    GetSupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("pinning the TSC offset (KVM_VCPU_TSC_OFFSET): {0}")]
    PinTsc(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set only {set} of {wanted} MSRs")]
    PartialMsrs { set: usize, wanted: usize },
    #[error("building the MSR list: {0}")]
    MsrList(String),
    #[error("KVM_SET_XCRS: {0}")]
    SetXcrs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_REGS: {0}")]
    GetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_XSAVE: {0}")]
    GetXsave(kvm_ioctls::Error),
    #[error("KVM_SET_XSAVE: {0}")]
    SetXsave(kvm_ioctls::Error),
    #[error("KVM_GET_XCRS: {0}")]
    GetXcrs(kvm_ioctls::Error),
    #[error("XSAVE region of {0} words, expected 1024")]
    XsaveSize(usize),
}

/// The vCPU state a snapshot keeps: general and system registers, and the extended state
/// (x87/SSE/AVX registers, MXCSR) with XCR0. Everything else (CPUID, syscall MSRs, the
/// descriptor tables in guest memory) is the same for every sandbox and set by `configure`.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The 4 KiB `KVM_GET_XSAVE` region (x87, SSE, AVX, AVX-512 state).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("fs_base", &format_args!("{:#x}", self.sregs.fs.base))
            .field("xcr0", &format_args!("{:#x}", self.xcrs.xcrs[0].value))
            .finish()
    }
}

impl VcpuState {
    /// Reads the state of a stopped vCPU.
    pub fn capture(vcpu: &VcpuFd) -> Result<Self, VcpuSetupError> {
        Ok(Self {
            regs: vcpu.get_regs().map_err(VcpuSetupError::GetRegs)?,
            sregs: vcpu.get_sregs().map_err(VcpuSetupError::GetSregs)?,
            xsave: vcpu
                .get_xsave()
                .map_err(VcpuSetupError::GetXsave)?
                .region
                .to_vec(),
            xcrs: vcpu.get_xcrs().map_err(VcpuSetupError::GetXcrs)?,
        })
    }

    /// Puts a fresh vCPU into this state. Order matters: CPUID before XCR0 (KVM checks XCR0
    /// against it), XCR0 before XSAVE (the XSAVE image may only use enabled components),
    /// and SET_REGS last because SET_SREGS/XSAVE do not touch the general registers.
    pub fn restore(&self, vcpu: &VcpuFd, cpu: &CpuTemplate) -> Result<(), VcpuSetupError> {
        cpu.apply(vcpu)?;
        self.restore_registers(vcpu)
    }

    /// Puts back the registers of a vCPU that was restored and then ran (CPUID and MSRs are
    /// unchanged: ring 3 cannot write MSRs, and KVM refuses new CPUID after a run).
    pub fn restore_registers(&self, vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
        vcpu.set_sregs(&self.sregs)
            .map_err(VcpuSetupError::SetSregs)?;
        vcpu.set_xcrs(&self.xcrs).map_err(VcpuSetupError::SetXcrs)?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(VcpuSetupError::XsaveSize(self.xsave.len()));
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a fully initialized legacy-size `kvm_xsave` (4 KiB region, no
        // trailing extension), which is exactly what KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(VcpuSetupError::SetXsave)?;
        vcpu.set_regs(&self.regs).map_err(VcpuSetupError::SetRegs)
    }
}

/// The ring-3 code and stack segments every sandbox's program runs with.
pub fn user_segments() -> (kvm_segment, kvm_segment) {
    (segment(USER_CS, true), segment(USER_DS, false))
}

/// Ring-3 instruction-set features that KVM's supported list can leave out although the CPU
/// executes them natively in guest user mode: `(leaf, subleaf, register 0=eax..3=edx, bits)`.
/// kvm_pvm omits LZCNT (`ABM`), which makes glibc treat the CPU as below x86-64-v3 and
/// steers libraries to slower code. Each bit is claimed only where the host CPU has it.
const NATIVE_USER_FEATURES: &[(u32, u32, usize, u32)] = &[(0x8000_0001, 0, 2, 1 << 5)];

/// The host's CPUID as KVM offers it to guests, completed with [`NATIVE_USER_FEATURES`]
/// the host CPU has.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VcpuSetupError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuSetupError::GetSupportedCpuid)?;
    complete_user_features(&mut cpuid);
    Ok(cpuid)
}

fn complete_user_features(cpuid: &mut CpuId) {
    for &(leaf, subleaf, register, bits) in NATIVE_USER_FEATURES {
        let host = std::arch::x86_64::__cpuid_count(leaf, subleaf);
        let host = [host.eax, host.ebx, host.ecx, host.edx][register] & bits;
        let entry = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == leaf && e.index == subleaf);
        if let Some(entry) = entry {
            *[
                &mut entry.eax,
                &mut entry.ebx,
                &mut entry.ecx,
                &mut entry.edx,
            ][register] |= host;
        }
    }
}

/// XCR0 value enabling every state component the CPUID allows (x87, SSE, AVX, AVX-512 …),
/// so numpy's SIMD code paths run.
pub fn supported_xcr0(cpuid: &CpuId) -> u64 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(0x3)
}

/// Everything that is the same for all vCPUs of all sandboxes (CPUID, XCR0, the TSC).
#[derive(Clone)]
pub struct CpuTemplate {
    pub cpuid: CpuId,
    pub xcr0: u64,
    /// The guest TSC, when every vCPU's is pinned to the host's (see `tsc`).
    pub tsc: Option<GuestTsc>,
}

impl CpuTemplate {
    pub fn from_host(kvm: &Kvm) -> Result<Self, VcpuSetupError> {
        let cpuid = supported_cpuid(kvm)?;
        let xcr0 = supported_xcr0(&cpuid);
        let tsc = crate::tsc::probe(kvm);
        Ok(Self { cpuid, xcr0, tsc })
    }

    /// The settings of a new vCPU that come before any register: CPUID, syscall MSRs, and
    /// the TSC offset.
    fn apply(&self, vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(VcpuSetupError::SetCpuid)?;
        set_syscall_msrs(vcpu)?;
        if self.tsc.is_some() {
            crate::tsc::pin_to_host(vcpu).map_err(VcpuSetupError::PinTsc)?;
        }
        Ok(())
    }
}

/// Configures `vcpu` for 64-bit ring 3 with our descriptor tables and syscall MSRs, and
/// starts it at `rip` with stack `rsp`.
pub fn configure(
    vcpu: &VcpuFd,
    cpu: &CpuTemplate,
    rip: u64,
    rsp: u64,
) -> Result<(), VcpuSetupError> {
    cpu.apply(vcpu)?;
    let mut sregs = vcpu.get_sregs().map_err(VcpuSetupError::GetSregs)?;
    set_system_registers(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(VcpuSetupError::SetSregs)?;

    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = cpu.xcr0;
    vcpu.set_xcrs(&xcrs).map_err(VcpuSetupError::SetXcrs)?;

    let regs = kvm_regs {
        rip,
        rsp,
        rflags: USER_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(VcpuSetupError::SetRegs)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn set_system_registers(sregs: &mut kvm_sregs) {
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

    sregs.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;

    sregs.gdt.base = GDT;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT;
    sregs.idt.limit = IDT_LIMIT;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
}

fn set_syscall_msrs(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    // STAR[47:32]: selectors loaded by `syscall` (CS, SS = CS+8);
    // STAR[63:48]: base for `sysret` (CS = base+16, SS = base+8), both with RPL 3.
    let star = (u64::from(USER_CS32 & !3) << 48) | (u64::from(KERNEL_CS) << 32);
    let entries = [
        kvm_msr_entry {
            index: MSR_STAR,
            data: star,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_LSTAR,
            data: SYSCALL_STUB,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_SFMASK,
            data: SFMASK,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|e| VcpuSetupError::MsrList(e.to_string()))?;
    let set = vcpu.set_msrs(&msrs).map_err(VcpuSetupError::SetMsrs)?;
    if set != entries.len() {
        return Err(VcpuSetupError::PartialMsrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_segments_are_ring3_long_mode() {
        let cs = segment(USER_CS, true);
        assert_eq!((cs.dpl, cs.l, cs.db), (3, 1, 0));
        let ds = segment(USER_DS, false);
        assert_eq!((ds.dpl, ds.l, ds.db), (3, 0, 1));
    }
}
