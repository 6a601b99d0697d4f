//! Process-information, resource-limit, signal-disposition and futex syscalls.

use std::mem::offset_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use super::{Stop, SysResult};
use crate::abi::Timeval;
use crate::context::UserContext;
use crate::process::Process;

const ARCH_SET_GS: i32 = 0x1001;
const ARCH_SET_FS: i32 = 0x1002;
const ARCH_GET_FS: i32 = 0x1003;
const ARCH_GET_GS: i32 = 0x1004;
const ARCH_GET_CPUID: i32 = 0x1011;
const ARCH_SET_CPUID: i32 = 0x1012;

/// Highest canonical user address; FS/GS bases beyond it would fault on entry.
const USER_ADDR_MAX: u64 = 0x7fff_ffff_ffff;

/// Number of resource limits Linux defines (`RLIM_NLIMITS`).
const RLIMIT_COUNT: u32 = 16;

/// `struct utsname`: six NUL-padded strings.
#[repr(C)]
#[derive(Clone, Copy)]
struct Utsname {
    sysname: [u8; 65],
    nodename: [u8; 65],
    release: [u8; 65],
    version: [u8; 65],
    machine: [u8; 65],
    domainname: [u8; 65],
}

/// `struct sysinfo`, with its padding made fields.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Sysinfo {
    uptime: i64,
    loads: [u64; 3],
    totalram: u64,
    freeram: u64,
    sharedram: u64,
    bufferram: u64,
    totalswap: u64,
    freeswap: u64,
    procs: u16,
    pad: u16,
    pad2: u32,
    totalhigh: u64,
    freehigh: u64,
    mem_unit: u32,
    pad3: u32,
}

/// `struct rlimit` (`prlimit64`'s).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Rlimit {
    rlim_cur: u64,
    rlim_max: u64,
}

/// `struct rusage`: the CPU times, then fourteen counters, of which only the resident
/// set size is reported.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Rusage {
    ru_utime: Timeval,
    ru_stime: Timeval,
    ru_maxrss: i64,
    ru_rest: [i64; 13],
}

/// `struct tms`, in clock ticks.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Tms {
    tms_utime: i64,
    tms_stime: i64,
    tms_cutime: i64,
    tms_cstime: i64,
}

// SAFETY: each is `repr(C)` and made only of integers, byte arrays and `Timeval`s, with
// any padding made a field (sizes and offsets checked below): every byte pattern is a value.
unsafe impl ByteValued for Utsname {}
// SAFETY: as above.
unsafe impl ByteValued for Sysinfo {}
// SAFETY: as above.
unsafe impl ByteValued for Rlimit {}
// SAFETY: as above.
unsafe impl ByteValued for Rusage {}
// SAFETY: as above.
unsafe impl ByteValued for Tms {}

const _: () = {
    assert!(size_of::<Utsname>() == 390);
    assert!(size_of::<Sysinfo>() == 112);
    assert!(offset_of!(Sysinfo, procs) == 80);
    assert!(offset_of!(Sysinfo, totalhigh) == 88);
    assert!(offset_of!(Sysinfo, mem_unit) == 104);
    assert!(size_of::<Rlimit>() == 16);
    assert!(size_of::<Rusage>() == 144);
    assert!(offset_of!(Rusage, ru_maxrss) == 32);
    assert!(size_of::<Tms>() == 32);
};

fn utsname_field(value: &[u8]) -> [u8; 65] {
    let mut field = [0u8; 65];
    field[..value.len()].copy_from_slice(value);
    field
}

impl Process {
    pub(crate) fn sys_arch_prctl(
        &mut self,
        code: i32,
        addr: u64,
        ctx: &mut UserContext,
    ) -> SysResult {
        match code {
            ARCH_SET_FS | ARCH_SET_GS => {
                if addr > USER_ADDR_MAX {
                    return Err(Errno::EPERM.into());
                }
                if code == ARCH_SET_FS {
                    ctx.fs_base = addr;
                } else {
                    ctx.gs_base = addr;
                }
                Ok(0)
            }
            ARCH_GET_FS => self
                .write_u64(addr, ctx.fs_base)
                .map(|_| 0)
                .map_err(Stop::from),
            ARCH_GET_GS => self
                .write_u64(addr, ctx.gs_base)
                .map(|_| 0)
                .map_err(Stop::from),
            ARCH_GET_CPUID => Ok(1),
            ARCH_SET_CPUID => Err(Errno::ENODEV.into()),
            _ => Err(Errno::EINVAL.into()),
        }
    }

    pub(crate) fn sys_uname(&mut self, out: u64) -> SysResult {
        let names = Utsname {
            sysname: utsname_field(b"Linux"),
            nodename: utsname_field(&self.names.host),
            release: utsname_field(b"6.1.0-forkvm"),
            version: utsname_field(b"#1 SMP PREEMPT_DYNAMIC forkvm"),
            machine: utsname_field(b"x86_64"),
            domainname: utsname_field(&self.names.domain),
        };
        self.write_obj(out, &names)?;
        Ok(0)
    }

    /// `sethostname`/`setdomainname`: at most 64 bytes, for this sandbox only.
    pub(crate) fn sys_set_name(&mut self, name: u64, len: u64, domain: bool) -> SysResult {
        if len > 64 {
            return Err(Errno::EINVAL.into());
        }
        let value = self.read_user(name, len as usize)?;
        if domain {
            self.names.domain = value;
        } else {
            self.names.host = value;
        }
        Ok(0)
    }

    pub(crate) fn sys_sysinfo(&mut self, out: u64) -> SysResult {
        let total = self.mm.limit_bytes();
        let info = Sysinfo {
            uptime: (self.start_time.elapsed().as_secs() + 1) as i64,
            totalram: total,
            freeram: total.saturating_sub(self.mm.charged_bytes()),
            procs: 1,
            mem_unit: 1,
            ..Sysinfo::default()
        };
        self.write_obj(out, &info)?;
        Ok(0)
    }

    fn rlimit(&self, resource: u32) -> Result<(u64, u64), Errno> {
        const INF: u64 = u64::MAX;
        Ok(match resource {
            libc::RLIMIT_STACK => {
                let s = self.mm.layout().stack_size;
                (s, s)
            }
            libc::RLIMIT_NOFILE => {
                let n = self.files.max_fds() as u64;
                (n, n)
            }
            libc::RLIMIT_AS | libc::RLIMIT_DATA => {
                let m = self.mm.limit_bytes();
                (m, m)
            }
            libc::RLIMIT_NPROC => {
                let n = crate::procs::MAX_PROCESSES as u64;
                (n, n)
            }
            libc::RLIMIT_CORE | libc::RLIMIT_MEMLOCK => (0, 0),
            r if r < RLIMIT_COUNT => (INF, INF),
            _ => return Err(Errno::EINVAL),
        })
    }

    /// `prlimit64` (and `getrlimit`/`setrlimit`) of the caller or another process. Limits are
    /// the VMM's: a process may lower its open-file and address-space limits (for itself
    /// and the children it makes after), not raise them past what it was given.
    pub(crate) fn sys_prlimit64(
        &mut self,
        pid: i32,
        resource: u32,
        new: u64,
        old: u64,
    ) -> SysResult {
        let target = match pid {
            0 => self.pid(),
            p if p > 0 && self.procs.is_alive(p as u32) => p as u32,
            _ => return Err(Errno::ESRCH.into()),
        };
        let wanted: Option<Rlimit> = if new != 0 {
            Some(self.read_obj(new)?)
        } else {
            None
        };
        let (cur, max) = self.with_process(target, |p| p.apply_rlimit(resource, wanted))?;
        if old != 0 {
            let limit = Rlimit {
                rlim_cur: cur,
                rlim_max: max,
            };
            self.write_obj(old, &limit)?;
        }
        Ok(0)
    }

    /// Sets `resource` to `wanted` (if any) in the current process; returns the limit from
    /// before.
    fn apply_rlimit(&mut self, resource: u32, wanted: Option<Rlimit>) -> Result<(u64, u64), Errno> {
        let (cur, max) = self.rlimit(resource)?;
        let Some(wanted) = wanted else {
            return Ok((cur, max));
        };
        if wanted.rlim_cur > wanted.rlim_max {
            return Err(Errno::EINVAL);
        }
        if wanted.rlim_max > max {
            return Err(Errno::EPERM);
        }
        match resource {
            libc::RLIMIT_NOFILE => {
                let n = usize::try_from(wanted.rlim_cur).unwrap_or(usize::MAX);
                self.files.set_max_fds(n.min(self.files.max_fds()));
            }
            libc::RLIMIT_AS | libc::RLIMIT_DATA => {
                self.mm
                    .set_limit_bytes(wanted.rlim_cur.min(self.mm.limit_bytes()));
            }
            // The rest are fixed (and lowering them is accepted without effect).
            _ => {}
        }
        Ok((cur, max))
    }

    fn cpu_time(&self) -> (u64, u64) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid writable timespec owned by this frame.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (ts.tv_sec as u64, ts.tv_nsec as u64 / 1000)
    }

    pub(crate) fn sys_getrusage(&mut self, who: i32, out: u64) -> SysResult {
        if who != libc::RUSAGE_SELF && who != libc::RUSAGE_CHILDREN && who != libc::RUSAGE_THREAD {
            return Err(Errno::EINVAL.into());
        }
        let mut usage = Rusage::default();
        if who != libc::RUSAGE_CHILDREN {
            let (sec, usec) = self.cpu_time();
            usage.ru_utime = Timeval {
                tv_sec: sec as i64,
                tv_usec: usec as i64,
            };
            usage.ru_maxrss = (self.mm.mapped_bytes() / 1024) as i64;
        }
        self.write_obj(out, &usage)?;
        Ok(0)
    }

    pub(crate) fn sys_times(&mut self, out: u64) -> SysResult {
        let (sec, usec) = self.cpu_time();
        let ticks = sec * 100 + usec / 10_000;
        if out != 0 {
            let times = Tms {
                tms_utime: ticks as i64,
                ..Tms::default()
            };
            self.write_obj(out, &times)?;
        }
        Ok(self.start_time.elapsed().as_millis() as u64 / 10)
    }

    pub(crate) fn sys_sched_getaffinity(&mut self, pid: i32, len: u64, mask: u64) -> SysResult {
        if pid != 0 && pid as u32 != self.pid() {
            return Err(Errno::ESRCH.into());
        }
        if len < 8 || !len.is_multiple_of(8) {
            return Err(Errno::EINVAL.into());
        }
        // One vCPU: CPU 0 only.
        self.write_u64(mask, 1)?;
        Ok(8)
    }

    pub(crate) fn sys_getcpu(&mut self, cpu: u64, node: u64) -> SysResult {
        for addr in [cpu, node] {
            if addr != 0 {
                self.write_obj(addr, &0u32)?;
            }
        }
        Ok(0)
    }

    pub(crate) fn sys_prctl(&mut self, option: i32, arg: u64) -> SysResult {
        match option {
            libc::PR_SET_PDEATHSIG => self.set_pdeathsig(arg),
            libc::PR_GET_PDEATHSIG => self.get_pdeathsig(arg),
            libc::PR_SET_NAME | libc::PR_SET_DUMPABLE => Ok(0),
            libc::PR_GET_NAME => {
                self.write_user(arg, b"python3\0\0\0\0\0\0\0\0\0")?;
                Ok(0)
            }
            libc::PR_GET_DUMPABLE => Ok(0),
            libc::PR_SET_NO_NEW_PRIVS | libc::PR_GET_NO_NEW_PRIVS => Ok(1),
            _ => Err(Errno::EINVAL.into()),
        }
    }

    pub(crate) fn sys_capget(&mut self, data: u64) -> SysResult {
        if data != 0 {
            self.write_user(data, &[0u8; 24])?;
        }
        Ok(0)
    }
}
