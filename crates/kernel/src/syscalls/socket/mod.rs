//! The socket syscalls over `crate::net`: creating, naming and connecting sockets here;
//! sending and receiving in `transfer`, control messages (`SCM_RIGHTS`, credentials, IP
//! header fields) in `control`, and socket options in `options`.
//!
//! Everything a program hands in (addresses, `msghdr`s, control messages, option values) is
//! read through bounds-checked copies; lengths are capped before anything is allocated.

mod control;
mod options;
mod transfer;

pub(crate) use transfer::Message;

use std::net::{Ipv4Addr, Ipv6Addr};

use syscalls::Errno;

use super::SysResult;
use crate::errno::from_fs;
use crate::file::{FileObject, OpenFile};
use crate::net::{AF_INET, AF_INET6, AF_UNIX, Kind, NetError, SockAddr, State};
use crate::process::Process;

/// `sizeof(struct sockaddr_storage)`: the longest address a program may pass.
const MAX_ADDR_LEN: u32 = 128;

impl Process {
    /// The socket behind `fd` (`ENOTSOCK` for other descriptors).
    fn socket_id(&self, fd: i32) -> Result<usize, Errno> {
        match self.files.get(fd)?.object {
            FileObject::Socket(id) => Ok(id),
            _ => Err(Errno::ENOTSOCK),
        }
    }

    fn socket_family(&self, id: usize) -> Result<u16, Errno> {
        Ok(self.sockets.get(id).ok_or(Errno::EBADF)?.family)
    }

    /// Installs a descriptor for socket `id` (released if that fails).
    fn open_socket(&mut self, id: usize, flags: i32) -> Result<i32, Errno> {
        let status = libc::O_RDWR | (flags & libc::SOCK_NONBLOCK);
        let file = OpenFile::new(
            FileObject::Socket(id),
            status,
            format!("socket:[{id}]").into_bytes(),
        );
        self.files
            .open(file, flags & libc::SOCK_CLOEXEC != 0)
            .inspect_err(|_| {
                self.sockets.release(id);
            })
    }

    pub(crate) fn sys_socket(&mut self, family: i32, socket_type: i32, protocol: i32) -> SysResult {
        let flags = socket_type & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        let family = u16::try_from(family).map_err(|_| Errno::EAFNOSUPPORT)?;
        if !matches!(family, AF_UNIX | AF_INET | AF_INET6) {
            // Netlink, packet and the rest reach the host's network stack: not here.
            return self.refuse("socket", Errno::EAFNOSUPPORT);
        }
        let base_type = socket_type & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        if base_type == libc::SOCK_RAW {
            return self.refuse("socket", Errno::EPERM);
        }
        let kind = Kind::from_type(base_type).ok_or(Errno::EINVAL)?;
        let protocol = match (family, kind, protocol) {
            (AF_UNIX, _, 0 | libc::PF_UNIX) => 0,
            (AF_INET | AF_INET6, Kind::Stream, 0 | libc::IPPROTO_TCP) => libc::IPPROTO_TCP,
            (AF_INET | AF_INET6, Kind::Datagram, 0 | libc::IPPROTO_UDP) => libc::IPPROTO_UDP,
            // UDP-Lite: datagrams as UDP's (checksum coverage means nothing on loopback).
            (AF_INET | AF_INET6, Kind::Datagram, libc::IPPROTO_UDPLITE) => libc::IPPROTO_UDPLITE,
            (AF_INET | AF_INET6, Kind::SeqPacket, _) => return Err(Errno::ESOCKTNOSUPPORT.into()),
            _ => return Err(Errno::EPROTONOSUPPORT.into()),
        };
        let id = self.sockets.create(family, kind, protocol);
        Ok(self.open_socket(id, flags)? as u64)
    }

    pub(crate) fn sys_socketpair(
        &mut self,
        family: i32,
        socket_type: i32,
        protocol: i32,
        out: u64,
    ) -> SysResult {
        if family != i32::from(AF_UNIX) {
            return Err(if matches!(family, libc::AF_INET | libc::AF_INET6) {
                Errno::EOPNOTSUPP
            } else {
                Errno::EAFNOSUPPORT
            }
            .into());
        }
        let flags = socket_type & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
        let kind = Kind::from_type(socket_type & !flags).ok_or(Errno::EINVAL)?;
        if !matches!(protocol, 0 | libc::PF_UNIX) {
            return Err(Errno::EPROTONOSUPPORT.into());
        }
        self.check_user(out, 8)?;
        let (a, b) = self.sockets.pair(kind);
        let fd_a = match self.open_socket(a, flags) {
            Ok(fd) => fd,
            Err(e) => {
                self.sockets.release(b);
                return Err(e.into());
            }
        };
        let fd_b = match self.open_socket(b, flags) {
            Ok(fd) => fd,
            Err(e) => {
                self.close_fd(fd_a)?;
                return Err(e.into());
            }
        };
        self.write_obj(out, &[fd_a, fd_b])?;
        Ok(0)
    }

    /// Reads a `sockaddr` of `len` bytes for a socket of `family`. Connecting or sending
    /// to an internet wildcard address reaches this machine (Linux treats it as loopback).
    fn read_sockaddr(&self, addr: u64, len: u32, family: u16) -> Result<SockAddr, Errno> {
        if len > MAX_ADDR_LEN {
            return Err(Errno::EINVAL);
        }
        let bytes = self.read_user(addr, len as usize)?;
        SockAddr::parse(&bytes, family)
    }

    fn destination(addr: SockAddr) -> SockAddr {
        match addr {
            SockAddr::Inet(ip, port) if ip.is_unspecified() => {
                SockAddr::Inet(Ipv4Addr::LOCALHOST, port)
            }
            SockAddr::Inet6(ip, port) if ip.is_unspecified() => {
                SockAddr::Inet6(Ipv6Addr::LOCALHOST, port)
            }
            other => other,
        }
    }

    /// Writes `addr` to a `sockaddr` buffer of `*len_ptr` bytes (cut to fit) and its full
    /// length to `*len_ptr`, as `accept`, `getsockname` and `recvfrom` do. Null: nothing.
    fn write_sockaddr(&self, addr: &SockAddr, out: u64, len_ptr: u64) -> Result<(), Errno> {
        if out == 0 || len_ptr == 0 {
            return Ok(());
        }
        let room: u32 = self.read_obj(len_ptr)?;
        if room as i32 <= -1 {
            return Err(Errno::EINVAL);
        }
        let bytes = addr.encode();
        let n = bytes.len().min(room as usize);
        self.write_user(out, &bytes[..n])?;
        self.write_obj(len_ptr, &(bytes.len() as u32))
    }

    pub(crate) fn sys_bind(&mut self, fd: i32, addr: u64, len: u32) -> SysResult {
        let id = self.socket_id(fd)?;
        let addr = self.read_sockaddr(addr, len, self.socket_family(id)?)?;
        match &addr {
            SockAddr::UnixPath(path) => {
                let path = path.clone();
                // The name must be free before the socket takes it; then it appears in the
                // filesystem (and stays after the socket closes, until unlinked).
                if self.sockets.get(id).is_some_and(|s| s.local.is_some()) {
                    return Err(Errno::EINVAL.into());
                }
                let node = self
                    .create_special_at(libc::AT_FDCWD, &path, forkvm_image::Kind::Socket, 0o777)
                    .map_err(|e| {
                        if e == Errno::EEXIST {
                            Errno::EADDRINUSE
                        } else {
                            e
                        }
                    })?;
                if let Err(e) = self.sockets.bind(id, addr) {
                    let _ = self.remove_name(&path);
                    return Err(e.into());
                }
                if let Some(socket) = self.sockets.get_mut(id) {
                    socket.fs_node = Some(node);
                }
            }
            _ => self.sockets.bind(id, addr)?,
        }
        Ok(0)
    }

    /// The address of the socket a unix path names: `ENOENT` when nothing is there,
    /// `ECONNREFUSED` when it is not a socket or no socket has it any more.
    pub(super) fn unix_destination(&self, addr: SockAddr) -> Result<SockAddr, Errno> {
        let SockAddr::UnixPath(path) = &addr else {
            return Ok(addr);
        };
        let resolved = self.resolve_at(libc::AT_FDCWD, path, true)?;
        if self.fs.kind(resolved.node).map_err(from_fs)? != forkvm_image::Kind::Socket {
            return Err(Errno::ECONNREFUSED);
        }
        self.sockets
            .at_node(resolved.node)
            .ok_or(Errno::ECONNREFUSED)
    }

    pub(crate) fn sys_listen(&mut self, fd: i32, backlog: i32) -> SysResult {
        let id = self.socket_id(fd)?;
        self.sockets.listen(id, backlog)?;
        Ok(0)
    }

    pub(crate) fn sys_connect(&mut self, fd: i32, addr: u64, len: u32) -> SysResult {
        let id = self.socket_id(fd)?;
        let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
        let (family, kind) = (socket.family, socket.kind);
        // `AF_UNSPEC` dissolves a datagram socket's association.
        if len >= 2 && self.read_user(addr, 2)? == [0, 0] && kind == Kind::Datagram {
            if let Some(socket) = self.sockets.get_mut(id) {
                socket.remote = None;
            }
            return Ok(0);
        }
        let addr =
            self.unix_destination(Self::destination(self.read_sockaddr(addr, len, family)?))?;
        let nonblocking = self.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0;
        match self.sockets.connect(id, addr.clone()) {
            // Loopback connects complete at once, but a nonblocking TCP connect on Linux
            // still answers EINPROGRESS (the handshake is asynchronous), and programs rely
            // on it: the socket is writable when they look, with `SO_ERROR` 0.
            Ok(()) if nonblocking && family != AF_UNIX && kind == Kind::Stream => {
                self.io_event();
                Err(Errno::EINPROGRESS.into())
            }
            Ok(()) => {
                self.io_event();
                Ok(0)
            }
            Err(NetError::WouldBlock) => Err(self.wait_or_again(nonblocking)),
            Err(NetError::Errno(e)) => Err(e.into()),
        }
    }

    pub(crate) fn sys_accept4(
        &mut self,
        fd: i32,
        addr: u64,
        len_ptr: u64,
        flags: i32,
    ) -> SysResult {
        if flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let id = self.socket_id(fd)?;
        let nonblocking = self.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0;
        if addr != 0 {
            self.check_user(len_ptr, 4)?;
        }
        let accepted = match self.sockets.accept(id) {
            Ok(accepted) => accepted,
            Err(NetError::WouldBlock) => return Err(self.wait_or_again(nonblocking)),
            Err(NetError::Errno(e)) => return Err(e.into()),
        };
        let peer = self
            .sockets
            .get(accepted)
            .and_then(|s| s.remote.clone())
            .unwrap_or(SockAddr::UnixUnnamed);
        let new_fd = self.open_socket(accepted, flags)?;
        if let Err(e) = self.write_sockaddr(&peer, addr, len_ptr) {
            self.close_fd(new_fd)?;
            return Err(e.into());
        }
        Ok(new_fd as u64)
    }

    pub(crate) fn sys_getsockname(&mut self, fd: i32, addr: u64, len_ptr: u64) -> SysResult {
        let id = self.socket_id(fd)?;
        let name = self.sockets.get(id).ok_or(Errno::EBADF)?.name();
        self.write_sockaddr(&name, addr, len_ptr)?;
        Ok(0)
    }

    pub(crate) fn sys_getpeername(&mut self, fd: i32, addr: u64, len_ptr: u64) -> SysResult {
        let id = self.socket_id(fd)?;
        let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
        let connected = match socket.kind {
            Kind::Datagram => socket.remote.is_some(),
            _ => matches!(socket.state, State::Connected { .. }),
        };
        let peer = socket
            .remote
            .clone()
            .filter(|_| connected)
            .ok_or(Errno::ENOTCONN)?;
        self.write_sockaddr(&peer, addr, len_ptr)?;
        Ok(0)
    }

    pub(crate) fn sys_shutdown(&mut self, fd: i32, how: i32) -> SysResult {
        let id = self.socket_id(fd)?;
        self.sockets.shutdown(id, how)?;
        self.io_event();
        Ok(0)
    }
}
