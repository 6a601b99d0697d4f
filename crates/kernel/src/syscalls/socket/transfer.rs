//! Sending and receiving: the one send path and the one receive path every call takes
//! (`write`, `send`, `sendto`, `sendmsg`, `sendmmsg`, `writev`, `sendfile` and their
//! receiving counterparts), with the `MSG_*` flags, timeouts and `SIGPIPE`.

use std::mem::offset_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use super::control::{MAX_CONTROL, MsgHdr, Outgoing};
use crate::abi::{Timeval, from_prefix};
use crate::file::{FileObject, OpenFile};
use crate::net::{
    AF_UNIX, DATAGRAM_BUFFER, Kind, MAX_DATAGRAM, NetError, STREAM_BUFFER, SockAddr, Traffic,
};
use crate::process::Process;
use crate::signals::SigInfo;
use crate::syscalls::{Stop, SysResult};
use crate::threads::{Resume, monotonic_ns};

const MSG_OOB: i32 = 0x1;
const MSG_PEEK: i32 = 0x2;
const MSG_CTRUNC: i32 = 0x8;
const MSG_TRUNC: i32 = 0x20;
const MSG_DONTWAIT: i32 = 0x40;
const MSG_WAITALL: i32 = 0x100;
const MSG_ERRQUEUE: i32 = 0x2000;
const MSG_NOSIGNAL: i32 = 0x4000;
const MSG_CMSG_CLOEXEC: i32 = 0x4000_0000;

/// `struct mmsghdr`: a `msghdr` and the length the call reports for it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct MMsgHdr {
    msg_hdr: MsgHdr,
    msg_len: u32,
    pad: u32,
}

// SAFETY: `repr(C)`: a `MsgHdr` (itself `ByteValued`) and integers, the tail padding made a
// field (checked below): every byte pattern is a value.
unsafe impl ByteValued for MMsgHdr {}

const _: () = {
    assert!(size_of::<MMsgHdr>() == 64);
    assert!(offset_of!(MMsgHdr, msg_len) == 56);
};

/// Where `recvmsg` writes back into the caller's `msghdr`.
const NAMELEN_AT: u64 = offset_of!(MsgHdr, msg_namelen) as u64;
const CONTROLLEN_AT: u64 = offset_of!(MsgHdr, msg_controllen) as u64;
const FLAGS_AT: u64 = offset_of!(MsgHdr, msg_flags) as u64;
/// Where `sendmmsg`/`recvmmsg` report each message's length, and their stride.
const MSG_LEN_AT: u64 = offset_of!(MMsgHdr, msg_len) as u64;
const MMSGHDR_BYTES: u64 = size_of::<MMsgHdr>() as u64;

/// Where a message goes and what it carries besides its bytes.
pub(crate) struct Message {
    pub to: Option<SockAddr>,
    pub rights: Vec<OpenFile>,
    pub traffic: Traffic,
}

impl Message {
    /// Plain bytes to the connected peer (`sendfile`).
    pub(crate) fn plain() -> Message {
        Message {
            to: None,
            rights: Vec::new(),
            traffic: Traffic::default(),
        }
    }
}

impl Process {
    /// Copies the bytes of `vecs` out of program memory, at most `limit` of them.
    fn gather(&self, vecs: &[(u64, u64)], limit: usize) -> Result<Vec<u8>, Errno> {
        let mut data = Vec::new();
        for &(base, len) in vecs {
            let take = (len as usize).min(limit - data.len());
            if take == 0 {
                if data.len() == limit {
                    break;
                }
                continue;
            }
            data.extend_from_slice(&self.read_user(base, take)?);
        }
        Ok(data)
    }

    /// Copies `data` into program memory across `vecs`.
    fn scatter(&self, vecs: &[(u64, u64)], data: &[u8]) -> Result<(), Errno> {
        let mut done = 0;
        for &(base, len) in vecs {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            self.write_user(base, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// A blocked socket call: `EAGAIN` when nonblocking; else a wait for I/O, bounded by the
    /// socket's `SO_RCVTIMEO`/`SO_SNDTIMEO` when set (`EAGAIN` when it passes).
    fn socket_wait(&self, id: usize, nonblocking: bool, option: i32) -> Stop {
        if nonblocking {
            return Errno::EAGAIN.into();
        }
        let mut wait = Self::io_wait();
        let timeout = self
            .sockets
            .get(id)
            .and_then(|s| s.options.get(&(libc::SOL_SOCKET, option)))
            .filter(|v| v.len() >= size_of::<Timeval>())
            .map(|v| {
                // Stored as the program set it: a `timeval`, negative parts meaning none.
                let tv: Timeval = from_prefix(v);
                let (sec, usec) = (tv.tv_sec.max(0) as u64, tv.tv_usec.max(0) as u64);
                sec.saturating_mul(1_000_000_000)
                    .saturating_add(usec.saturating_mul(1000))
            })
            .filter(|&ns| ns > 0);
        if let Some(ns) = timeout {
            let deadline = self
                .threads
                .restart_deadline()
                .unwrap_or_else(|| monotonic_ns().saturating_add(ns));
            wait.deadline_ns = Some(deadline);
            wait.on_timeout = Resume::Return((-i64::from(Errno::EAGAIN.into_raw())) as u64);
        }
        Stop::Block(wait)
    }

    /// Sends the bytes of `vecs` (with what the control messages attach) on socket `fd`:
    /// the one path under `write`, `send`, `sendto`, `sendmsg` and `writev`.
    fn socket_send(
        &mut self,
        fd: i32,
        vecs: &[(u64, u64)],
        to: Option<SockAddr>,
        outgoing: Outgoing,
        flags: i32,
    ) -> SysResult {
        let id = self.socket_id(fd)?;
        if flags & MSG_OOB != 0 {
            return Err(Errno::EOPNOTSUPP.into());
        }
        let nonblocking =
            flags & MSG_DONTWAIT != 0 || self.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0;
        let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
        let total: u64 = vecs.iter().map(|&(_, len)| len).sum();
        let limit = match (socket.kind, socket.family) {
            (Kind::Stream, _) => STREAM_BUFFER,
            (_, AF_UNIX) => DATAGRAM_BUFFER,
            _ => MAX_DATAGRAM,
        };
        if socket.kind != Kind::Stream && total > limit as u64 {
            return Err(Errno::EMSGSIZE.into());
        }
        // A connected stream ignores a destination; Linux refuses one on a unix stream.
        let to = match (socket.kind, to) {
            (Kind::Datagram, to) => to.map(Self::destination),
            (_, Some(_)) if socket.family == AF_UNIX => return Err(Errno::EISCONN.into()),
            _ => None,
        };
        let traffic = Self::traffic_of(socket, &outgoing);
        let data = self.gather(vecs, limit)?;
        let message = Message {
            to,
            rights: outgoing.rights,
            traffic,
        };
        self.socket_send_data(id, &data, message, flags, nonblocking)
    }

    /// Sends `data` gathered already (see `socket_send`; `sendfile` comes here directly).
    pub(crate) fn socket_send_data(
        &mut self,
        id: usize,
        data: &[u8],
        message: Message,
        flags: i32,
        nonblocking: bool,
    ) -> SysResult {
        let Message {
            to,
            rights,
            traffic,
        } = message;
        let objects: Vec<FileObject> = rights.iter().map(|r| r.object.clone()).collect();
        match self.sockets.send(id, data, to, rights, traffic) {
            Ok(n) => {
                for object in &objects {
                    self.retain(object);
                }
                self.io_event();
                Ok(n as u64)
            }
            Err(NetError::WouldBlock) => Err(self.socket_wait(id, nonblocking, libc::SO_SNDTIMEO)),
            Err(NetError::Errno(Errno::EPIPE)) => {
                if flags & MSG_NOSIGNAL == 0 {
                    let tid = self.threads.current();
                    let _ = self.send_to_thread(tid, SigInfo::kernel(libc::SIGPIPE));
                }
                Err(Errno::EPIPE.into())
            }
            Err(NetError::Errno(e)) => Err(e.into()),
        }
    }

    /// Receives into `vecs` from socket `fd`: the one path under `read`, `recv`,
    /// `recvfrom`, `recvmsg` and `readv`. Returns the byte count to report and what came.
    fn socket_recv(
        &mut self,
        fd: i32,
        vecs: &[(u64, u64)],
        flags: i32,
    ) -> Result<(u64, crate::net::Received), Stop> {
        let id = self.socket_id(fd)?;
        if flags & MSG_OOB != 0 {
            return Err(Errno::EINVAL.into());
        }
        if flags & MSG_ERRQUEUE != 0 {
            return Err(Errno::EAGAIN.into());
        }
        let nonblocking =
            flags & MSG_DONTWAIT != 0 || self.files.get(fd)?.status_flags & libc::O_NONBLOCK != 0;
        let capacity = vecs
            .iter()
            .map(|&(_, len)| len)
            .sum::<u64>()
            .min(crate::syscalls::io::MAX_IO) as usize;
        let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
        // `MSG_WAITALL`: wait until all of it is there (what fits the buffer) or the end.
        if flags & MSG_WAITALL != 0
            && !nonblocking
            && socket.kind == Kind::Stream
            && socket.readable_bytes() < capacity.min(STREAM_BUFFER)
            && !socket.at_end()
        {
            return Err(self.socket_wait(id, false, libc::SO_RCVTIMEO));
        }
        let peek = flags & MSG_PEEK != 0;
        match self.sockets.recv(id, capacity, peek) {
            Ok(received) => {
                self.scatter(vecs, &received.data)?;
                if !peek {
                    self.io_event();
                }
                let count = if flags & MSG_TRUNC != 0 {
                    received.message_len
                } else {
                    received.data.len()
                };
                Ok((count as u64, received))
            }
            Err(NetError::WouldBlock) => Err(self.socket_wait(id, nonblocking, libc::SO_RCVTIMEO)),
            Err(NetError::Errno(e)) => Err(e.into()),
        }
    }

    /// Releases descriptors that arrived where nobody can take them.
    fn drop_rights(&mut self, rights: Vec<OpenFile>) {
        for file in rights {
            self.release(file.object);
        }
    }

    /// `read`/`readv` on a socket.
    pub(crate) fn socket_read(&mut self, fd: i32, vecs: &[(u64, u64)]) -> SysResult {
        let (n, received) = self.socket_recv(fd, vecs, 0)?;
        self.drop_rights(received.rights);
        Ok(n)
    }

    /// `write`/`writev` on a socket.
    pub(crate) fn socket_write(&mut self, fd: i32, vecs: &[(u64, u64)]) -> SysResult {
        self.socket_send(fd, vecs, None, Outgoing::default(), 0)
    }

    pub(crate) fn sys_sendto(
        &mut self,
        fd: i32,
        buf: u64,
        len: u64,
        flags: i32,
        addr: u64,
        addr_len: u32,
    ) -> SysResult {
        let id = self.socket_id(fd)?;
        let to = if addr == 0 {
            None
        } else {
            let addr = self.read_sockaddr(addr, addr_len, self.socket_family(id)?)?;
            Some(self.unix_destination(addr)?)
        };
        self.socket_send(fd, &[(buf, len)], to, Outgoing::default(), flags)
    }

    pub(crate) fn sys_recvfrom(
        &mut self,
        fd: i32,
        buf: u64,
        len: u64,
        flags: i32,
        addr: u64,
        len_ptr: u64,
    ) -> SysResult {
        let (n, received) = self.socket_recv(fd, &[(buf, len)], flags)?;
        self.drop_rights(received.rights);
        self.write_source(fd, received.from.as_ref(), addr, len_ptr)?;
        Ok(n)
    }

    /// Reports where received data came from: internet streams and unbound unix senders
    /// report no address (length 0, as Linux does), everything else the sender's.
    fn write_source(
        &self,
        fd: i32,
        from: Option<&SockAddr>,
        addr: u64,
        len_ptr: u64,
    ) -> Result<(), Errno> {
        if addr == 0 || len_ptr == 0 {
            return Ok(());
        }
        let id = self.socket_id(fd)?;
        let socket = self.sockets.get(id).ok_or(Errno::EBADF)?;
        match from {
            Some(SockAddr::UnixUnnamed) => self.write_obj(len_ptr, &0u32),
            Some(from) if !(socket.kind == Kind::Stream && socket.family != AF_UNIX) => {
                self.write_sockaddr(from, addr, len_ptr)
            }
            _ => self.write_obj(len_ptr, &0u32),
        }
    }

    pub(crate) fn sys_sendmsg(&mut self, fd: i32, msg: u64, flags: i32) -> SysResult {
        let id = self.socket_id(fd)?;
        let header: MsgHdr = self.read_obj(msg)?;
        let to = if header.msg_name == 0 {
            None
        } else {
            let family = self.socket_family(id)?;
            let addr = self.read_sockaddr(header.msg_name, header.msg_namelen, family)?;
            Some(self.unix_destination(addr)?)
        };
        let vecs = self.read_iovecs(header.msg_iov, header.msg_iovlen)?;
        let outgoing = self.read_control(
            header.msg_control,
            header.msg_controllen,
            self.socket_family(id)?,
        )?;
        self.socket_send(fd, &vecs, to, outgoing, flags)
    }

    pub(crate) fn sys_recvmsg(&mut self, fd: i32, msg: u64, flags: i32) -> SysResult {
        let header: MsgHdr = self.read_obj(msg)?;
        let vecs = self.read_iovecs(header.msg_iov, header.msg_iovlen)?;
        let room = header.msg_controllen.min(MAX_CONTROL);
        if header.msg_control != 0 {
            self.check_user(header.msg_control, room)?;
        }
        let (n, mut received) = self.socket_recv(fd, &vecs, flags)?;
        let mut out_flags = 0;
        if received.data.len() < received.message_len {
            out_flags |= MSG_TRUNC;
        }
        if header.msg_name != 0 {
            let len_ptr = msg + NAMELEN_AT;
            self.write_obj(len_ptr, &header.msg_namelen)?;
            self.write_source(fd, received.from.as_ref(), header.msg_name, len_ptr)?;
        }
        let socket = self
            .sockets
            .get(self.socket_id(fd)?)
            .ok_or(Errno::EBADF)?
            .clone();
        let room = if header.msg_control == 0 {
            0
        } else {
            room as usize
        };
        let control =
            self.write_control(&socket, &mut received, room, flags & MSG_CMSG_CLOEXEC != 0);
        if control.truncated {
            out_flags |= MSG_CTRUNC;
        }
        if !control.bytes.is_empty() {
            self.write_user(header.msg_control, &control.bytes)?;
        }
        self.write_obj(msg + CONTROLLEN_AT, &(control.bytes.len() as u64))?;
        self.write_obj(msg + FLAGS_AT, &out_flags)?;
        Ok(n)
    }

    /// `sendmmsg`: `sendmsg` for each of `count` `mmsghdr`s until one fails; the count sent
    /// (an error only if the first failed).
    pub(crate) fn sys_sendmmsg(&mut self, fd: i32, msgs: u64, count: u32, flags: i32) -> SysResult {
        let count = count.min(1024) as u64;
        let mut sent = 0;
        while sent < count {
            let entry = msgs + sent * MMSGHDR_BYTES;
            match self.sys_sendmsg(fd, entry, flags) {
                Ok(n) => {
                    self.write_obj(entry + MSG_LEN_AT, &(n as u32))?;
                    sent += 1;
                }
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(sent)
    }

    /// `recvmmsg` (without its timeout): `recvmsg` for each `mmsghdr` until nothing more is
    /// waiting; only the first may block.
    pub(crate) fn sys_recvmmsg(&mut self, fd: i32, msgs: u64, count: u32, flags: i32) -> SysResult {
        let count = count.min(1024) as u64;
        let mut received = 0;
        while received < count {
            let entry = msgs + received * MMSGHDR_BYTES;
            let flags = if received == 0 {
                flags
            } else {
                flags | MSG_DONTWAIT
            };
            match self.sys_recvmsg(fd, entry, flags) {
                Ok(n) => {
                    self.write_obj(entry + MSG_LEN_AT, &(n as u32))?;
                    received += 1;
                }
                Err(e) if received == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(received)
    }
}
