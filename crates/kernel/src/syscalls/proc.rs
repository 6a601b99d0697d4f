//! Process-information, resource-limit, signal-disposition and futex syscalls.

use syscalls::Errno;

use super::{Stop, SysResult};
use crate::context::UserContext;
use crate::process::{Process, identity};

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

    pub(crate) fn sys_getresid(&mut self, a: u64, b: u64, c: u64) -> SysResult {
        for addr in [a, b, c] {
            self.write_user(addr, &0u32.to_le_bytes())?;
        }
        Ok(0)
    }

    pub(crate) fn sys_uname(&mut self, out: u64) -> SysResult {
        let mut buf = Vec::with_capacity(65 * 6);
        for field in [
            &b"Linux"[..],
            &self.names.host,
            b"6.1.0-forkvm",
            b"#1 SMP PREEMPT_DYNAMIC forkvm",
            b"x86_64",
            &self.names.domain,
        ] {
            buf.extend_from_slice(&utsname_field(field));
        }
        self.write_user(out, &buf)?;
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
        // struct sysinfo (x86-64): uptime, loads[3], totalram, freeram, sharedram, bufferram,
        // totalswap, freeswap (longs), procs (u16 + pad), totalhigh, freehigh, mem_unit (u32).
        let mut b = vec![0u8; 112];
        let uptime = self.start_time.elapsed().as_secs() + 1;
        let total = self.mm.limit_bytes();
        let free = total.saturating_sub(self.mm.charged_bytes());
        b[0..8].copy_from_slice(&uptime.to_le_bytes());
        b[32..40].copy_from_slice(&total.to_le_bytes());
        b[40..48].copy_from_slice(&free.to_le_bytes());
        b[80..82].copy_from_slice(&1u16.to_le_bytes());
        b[104..108].copy_from_slice(&1u32.to_le_bytes());
        self.write_user(out, &b)?;
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
            libc::RLIMIT_NPROC => (1, 1),
            libc::RLIMIT_CORE | libc::RLIMIT_MEMLOCK => (0, 0),
            r if r < RLIMIT_COUNT => (INF, INF),
            _ => return Err(Errno::EINVAL),
        })
    }

    pub(crate) fn sys_prlimit64(
        &mut self,
        pid: i32,
        resource: u32,
        new: u64,
        old: u64,
    ) -> SysResult {
        if pid != 0 && pid as u64 != identity::PID {
            return Err(Errno::ESRCH.into());
        }
        let (cur, max) = self.rlimit(resource)?;
        if new != 0 {
            // Limits are the VMM's to set; lowering is accepted and ignored, raising refused.
            let b = self.read_user(new, 16)?;
            let want_max = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
            if want_max > max {
                return Err(Errno::EPERM.into());
            }
        }
        if old != 0 {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&cur.to_le_bytes());
            b[8..].copy_from_slice(&max.to_le_bytes());
            self.write_user(old, &b)?;
        }
        Ok(0)
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
        let mut b = vec![0u8; 144];
        if who != libc::RUSAGE_CHILDREN {
            let (sec, usec) = self.cpu_time();
            b[0..8].copy_from_slice(&sec.to_le_bytes());
            b[8..16].copy_from_slice(&usec.to_le_bytes());
            let maxrss_kib = self.mm.mapped_bytes() / 1024;
            b[32..40].copy_from_slice(&maxrss_kib.to_le_bytes());
        }
        self.write_user(out, &b)?;
        Ok(0)
    }

    pub(crate) fn sys_times(&mut self, out: u64) -> SysResult {
        let (sec, usec) = self.cpu_time();
        let ticks = sec * 100 + usec / 10_000;
        if out != 0 {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&ticks.to_le_bytes());
            self.write_user(out, &b)?;
        }
        Ok(self.start_time.elapsed().as_millis() as u64 / 10)
    }

    pub(crate) fn sys_sched_getaffinity(&mut self, pid: i32, len: u64, mask: u64) -> SysResult {
        if pid != 0 && pid as u64 != identity::PID {
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
                self.write_user(addr, &0u32.to_le_bytes())?;
            }
        }
        Ok(0)
    }

    pub(crate) fn sys_prctl(&mut self, option: i32, arg: u64) -> SysResult {
        match option {
            libc::PR_SET_NAME | libc::PR_SET_PDEATHSIG | libc::PR_SET_DUMPABLE => Ok(0),
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
