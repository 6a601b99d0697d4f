//! The guest's time-stamp counter, made the host's. Every vCPU's TSC offset is pinned to zero
//! (`KVM_VCPU_TSC_OFFSET`), so `rdtsc` in the guest reads the host's TSC, and the guest's
//! vDSO can turn it into time from a reference point the host writes
//! (`forkvm_kernel::vdso`). On kvm_pvm the guest runs on the host's TSC by construction; on
//! hardware virtualization the pinned offset makes it so.

use forkvm_kernel::vdso::GuestTsc;
use kvm_bindings::{KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, KVMIO, kvm_device_attr};
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

// kvm-ioctls offers vCPU device attributes on aarch64 only.
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);

/// Sets `vcpu`'s TSC offset to zero.
pub fn pin_to_host(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let offset: u64 = 0;
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: &offset as *const u64 as u64,
    };
    // SAFETY: KVM_SET_DEVICE_ATTR on a vCPU fd reads `attr` and, for this attribute, the u64
    // at `attr.addr`; both live on this frame for the duration of the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret != 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// Whether this KVM lets us give guests the host's TSC, and its rate: a throwaway VM's
/// vCPU must accept the pinned offset and report its frequency. The host TSC must also be
/// invariant (constant rate in every power state), or extrapolating time from it is wrong.
/// `None` leaves the vDSO's clock page disabled: every clock call is then a syscall.
pub fn probe(kvm: &Kvm) -> Option<GuestTsc> {
    let invariant = std::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0;
    if !invariant {
        tracing::info!("the host TSC is not invariant: guest clock reads are syscalls");
        return None;
    }
    let probe = || -> Result<GuestTsc, kvm_ioctls::Error> {
        let vm = kvm.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        pin_to_host(&vcpu)?;
        Ok(GuestTsc {
            khz: vcpu.get_tsc_khz()?,
        })
    };
    match probe() {
        Ok(tsc) if tsc.khz > 0 => Some(tsc),
        Ok(_) => None,
        Err(error) => {
            tracing::info!(%error, "cannot pin the guest TSC: guest clock reads are syscalls");
            None
        }
    }
}
