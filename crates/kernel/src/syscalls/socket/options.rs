//! `setsockopt` and `getsockopt`.

use syscalls::Errno;
use vm_memory::ByteValued;

use super::control::Ucred;
use crate::abi::{Timeval, from_prefix};
use crate::net::{AF_INET6, AF_UNIX, State};
use crate::process::Process;
use crate::syscalls::SysResult;

/// The longest option value `setsockopt` keeps.
const MAX_OPTION: u32 = 256;
/// What `SO_RCVBUF`/`SO_SNDBUF` report unless set (Linux's default `wmem_default`).
const DEFAULT_BUFFER: i32 = 212_992;

/// `struct linger` (`SO_LINGER`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Linger {
    l_onoff: i32,
    l_linger: i32,
}

// SAFETY: `repr(C)`, two `i32`s: no padding, every byte pattern is a value.
unsafe impl ByteValued for Linger {}

const _: () = assert!(size_of::<Linger>() == 8);

/// Options this layer knows, by level and name: `getsockopt` answers them (stored value or
/// default); others are `ENOPROTOOPT` until set.
const KNOWN_OPTIONS: &[(i32, i32)] = &[
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_LINGER),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_PASSCRED),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

impl Process {
    pub(crate) fn sys_setsockopt(
        &mut self,
        fd: i32,
        level: i32,
        name: i32,
        value: u64,
        len: u32,
    ) -> SysResult {
        let id = self.socket_id(fd)?;
        if len > MAX_OPTION {
            return Err(Errno::EINVAL.into());
        }
        let mut bytes = self.read_user(value, len as usize)?;
        let int_option = !matches!(
            (level, name),
            (
                libc::SOL_SOCKET,
                libc::SO_LINGER | libc::SO_RCVTIMEO | libc::SO_SNDTIMEO
            )
        );
        if int_option && bytes.len() < size_of::<i32>() {
            return Err(Errno::EINVAL.into());
        }
        match (level, name) {
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF) => {
                // Linux keeps twice what was asked (for its bookkeeping) and reports that.
                let asked: i32 = from_prefix(&bytes);
                let kept = asked.clamp(2304, i32::MAX / 2).saturating_mul(2);
                bytes = kept.as_slice().to_vec();
            }
            (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO)
                if bytes.len() < size_of::<Timeval>() =>
            {
                return Err(Errno::EINVAL.into());
            }
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) => {
                let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
                if socket.family != AF_INET6 {
                    return Err(Errno::ENOPROTOOPT.into());
                }
                if socket.local.is_some() {
                    return Err(Errno::EINVAL.into());
                }
            }
            (libc::IPPROTO_TCP, _) | (libc::IPPROTO_IP, _) | (libc::IPPROTO_IPV6, _) => {
                let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
                if socket.family == AF_UNIX {
                    return Err(Errno::EOPNOTSUPP.into());
                }
            }
            (libc::SOL_SOCKET, _) => {}
            _ => return Err(Errno::ENOPROTOOPT.into()),
        }
        let socket = self.sockets.get_mut(id).ok_or(Errno::EBADF)?;
        socket.options.insert((level, name), bytes);
        Ok(0)
    }

    pub(crate) fn sys_getsockopt(
        &mut self,
        fd: i32,
        level: i32,
        name: i32,
        value: u64,
        len_ptr: u64,
    ) -> SysResult {
        let id = self.socket_id(fd)?;
        let room: u32 = self.read_obj(len_ptr)?;
        if room as i32 <= -1 {
            return Err(Errno::EINVAL.into());
        }
        let socket = self.sockets.get_mut(id).ok_or(Errno::EBADF)?;
        let int = |v: i32| v.as_slice().to_vec();
        let bytes = match (level, name) {
            (libc::SOL_SOCKET, libc::SO_TYPE) => int(socket.kind.as_type()),
            (libc::SOL_SOCKET, libc::SO_DOMAIN) => int(i32::from(socket.family)),
            (libc::SOL_SOCKET, libc::SO_PROTOCOL) => int(socket.protocol),
            (libc::SOL_SOCKET, libc::SO_ERROR) => int(socket.pending_error.take().unwrap_or(0)),
            (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => {
                int(i32::from(matches!(socket.state, State::Listening { .. })))
            }
            (libc::SOL_SOCKET, libc::SO_PEERCRED) => {
                if socket.family != AF_UNIX {
                    return Err(Errno::ENOPROTOOPT.into());
                }
                // Every peer is this process.
                Ucred::of(self.pid()).as_slice().to_vec()
            }
            (libc::SOL_SOCKET, libc::SO_RCVBUF | libc::SO_SNDBUF) => socket
                .options
                .get(&(level, name))
                .cloned()
                .unwrap_or_else(|| int(DEFAULT_BUFFER)),
            key => match socket.options.get(&key) {
                Some(value) => value.clone(),
                None if KNOWN_OPTIONS.contains(&key) => match key {
                    (libc::SOL_SOCKET, libc::SO_LINGER) => Linger::default().as_slice().to_vec(),
                    (libc::SOL_SOCKET, libc::SO_RCVTIMEO | libc::SO_SNDTIMEO) => {
                        Timeval::default().as_slice().to_vec()
                    }
                    (libc::SOL_SOCKET, libc::SO_RCVLOWAT) => int(1),
                    (libc::IPPROTO_IP, libc::IP_TTL) => int(64),
                    _ => int(0),
                },
                None => return Err(Errno::ENOPROTOOPT.into()),
            },
        };
        let n = bytes.len().min(room as usize);
        self.write_user(value, &bytes[..n])?;
        self.write_obj(len_ptr, &(n as u32))?;
        Ok(0)
    }
}
