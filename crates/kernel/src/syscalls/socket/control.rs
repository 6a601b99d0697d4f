//! `msghdr`s and control messages: what a `sendmsg` attaches (descriptors, credentials,
//! hop limit and traffic class) and what a `recvmsg` reports, cut to the buffer exactly as
//! Linux cuts it (`MSG_CTRUNC`, partial last message, padding up to the room left).

use std::mem::offset_of;

use syscalls::Errno;
use vm_memory::ByteValued;

use crate::abi::from_prefix;
use crate::file::OpenFile;
use crate::net::{AF_INET, AF_INET6, AF_UNIX, Received, Socket, Traffic};
use crate::process::{Process, identity};

/// `sizeof(struct cmsghdr)`: the data follows at once (8-byte aligned already).
const CMSG_HEADER: usize = size_of::<CmsgHdr>();
/// The most control bytes a `sendmsg` may pass (Linux's `optmem_max`).
pub(super) const MAX_CONTROL: u64 = 20 * 1024;
/// Descriptors one `SCM_RIGHTS` message may carry (Linux's `SCM_MAX_FD`).
const MAX_RIGHTS: usize = 253;
const SCM_RIGHTS: i32 = 1;
const SCM_CREDENTIALS: i32 = 2;

/// `struct msghdr`, its padding made fields.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct MsgHdr {
    pub msg_name: u64,
    pub msg_namelen: u32,
    pad: u32,
    pub msg_iov: u64,
    pub msg_iovlen: u64,
    pub msg_control: u64,
    pub msg_controllen: u64,
    pub msg_flags: i32,
    pad2: u32,
}

/// `struct cmsghdr`'s header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct CmsgHdr {
    cmsg_len: u64,
    cmsg_level: i32,
    cmsg_type: i32,
}

/// `struct ucred`, as `SCM_CREDENTIALS` and `SO_PEERCRED` carry it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Ucred {
    pid: u32,
    uid: u32,
    gid: u32,
}

impl Ucred {
    /// The credentials of a sender in process `pid` (every process has the same user).
    pub(super) fn of(pid: u32) -> Ucred {
        Ucred {
            pid,
            uid: identity::UID as u32,
            gid: identity::GID as u32,
        }
    }
}

// SAFETY: each is `repr(C)` integers with any padding made a field (checked below): every
// byte pattern is a value.
unsafe impl ByteValued for MsgHdr {}
// SAFETY: as above.
unsafe impl ByteValued for CmsgHdr {}
// SAFETY: as above.
unsafe impl ByteValued for Ucred {}

const _: () = {
    assert!(size_of::<MsgHdr>() == 56);
    assert!(offset_of!(MsgHdr, msg_iov) == 16);
    assert!(offset_of!(MsgHdr, msg_controllen) == 40);
    assert!(offset_of!(MsgHdr, msg_flags) == 48);
    assert!(size_of::<CmsgHdr>() == 16);
    assert!(size_of::<Ucred>() == 12);
};

/// What a `sendmsg`'s control messages carry.
#[derive(Default)]
pub(crate) struct Outgoing {
    /// Copies of the descriptions passed (`SCM_RIGHTS`).
    pub rights: Vec<OpenFile>,
    pub hop_limit: Option<u8>,
    pub class: Option<u8>,
}

/// Reads a control message's value as an `int` that must be exactly that size (the IP
/// options), within `range`; `-1` means the socket's own setting.
fn int_value(data: &[u8], range: std::ops::RangeInclusive<i32>) -> Result<Option<u8>, Errno> {
    if data.len() != size_of::<i32>() {
        return Err(Errno::EINVAL);
    }
    match from_prefix::<i32>(data) {
        -1 => Ok(None),
        v if range.contains(&v) => Ok(Some(v as u8)),
        _ => Err(Errno::EINVAL),
    }
}

impl Process {
    /// Parses the control messages of a `sendmsg` on a socket of `family`. As in Linux,
    /// levels the family does not handle are skipped, and an unknown type at a level it
    /// does handle is `EINVAL`.
    pub(super) fn read_control(
        &self,
        control: u64,
        len: u64,
        family: u16,
    ) -> Result<Outgoing, Errno> {
        let mut outgoing = Outgoing::default();
        if control == 0 || len == 0 {
            return Ok(outgoing);
        }
        if len > MAX_CONTROL {
            return Err(Errno::ENOBUFS);
        }
        let raw = self.read_user(control, len as usize)?;
        let mut at = 0;
        while at + CMSG_HEADER <= raw.len() {
            let header: CmsgHdr = from_prefix(&raw[at..]);
            let (level, kind) = (header.cmsg_level, header.cmsg_type);
            let cmsg_len = usize::try_from(header.cmsg_len).map_err(|_| Errno::EINVAL)?;
            if cmsg_len < CMSG_HEADER || cmsg_len > raw.len() - at {
                return Err(Errno::EINVAL);
            }
            let data = &raw[at + CMSG_HEADER..at + cmsg_len];
            match (family, level, kind) {
                (AF_UNIX, libc::SOL_SOCKET, SCM_RIGHTS) => {
                    for chunk in data.chunks_exact(size_of::<i32>()) {
                        let fd: i32 = from_prefix(chunk);
                        outgoing.rights.push(self.files.get(fd)?.clone());
                    }
                    if outgoing.rights.len() > MAX_RIGHTS {
                        return Err(Errno::EINVAL);
                    }
                }
                // Credentials may only claim what they are: this process.
                (AF_UNIX, libc::SOL_SOCKET, SCM_CREDENTIALS)
                    if data.len() == size_of::<Ucred>()
                        && from_prefix::<Ucred>(data) != Ucred::of(self.pid()) =>
                {
                    return Err(Errno::EPERM);
                }
                (AF_UNIX, libc::SOL_SOCKET, SCM_CREDENTIALS)
                    if data.len() == size_of::<Ucred>() => {}
                (_, libc::SOL_SOCKET, _) => return Err(Errno::EINVAL),
                (AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                    outgoing.hop_limit = int_value(data, 0..=255)?;
                }
                (AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                    outgoing.class = int_value(data, 0..=255)?;
                }
                (AF_INET6, libc::IPPROTO_IPV6, _) => return Err(Errno::EINVAL),
                (AF_INET, libc::IPPROTO_IP, libc::IP_TTL) => {
                    outgoing.hop_limit = int_value(data, 1..=255)?;
                }
                (AF_INET, libc::IPPROTO_IP, libc::IP_TOS) => {
                    let value = match data {
                        [byte] => *byte,
                        _ => int_value(data, 0..=255)?.unwrap_or(0),
                    };
                    outgoing.class = Some(value);
                }
                (AF_INET, libc::IPPROTO_IP, _) => return Err(Errno::EINVAL),
                _ => {}
            }
            at += cmsg_len.next_multiple_of(8);
        }
        Ok(outgoing)
    }

    /// The hop limit and class a datagram from `socket` goes with: the control message's,
    /// else the socket's options, else Linux's defaults.
    pub(super) fn traffic_of(socket: &Socket, outgoing: &Outgoing) -> Traffic {
        let option = |level, name| {
            socket
                .options
                .get(&(level, name))
                .and_then(|v| v.get(..size_of::<i32>()))
                .map(from_prefix::<i32>)
                .filter(|v| (0..=255).contains(v))
                .map(|v| v as u8)
        };
        let (hops, class) = if socket.family == AF_INET6 {
            (
                option(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
                option(libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
            )
        } else {
            (
                option(libc::IPPROTO_IP, libc::IP_TTL),
                option(libc::IPPROTO_IP, libc::IP_TOS),
            )
        };
        let default = Traffic::default();
        Traffic {
            hop_limit: outgoing.hop_limit.or(hops).unwrap_or(default.hop_limit),
            class: outgoing.class.or(class).unwrap_or(default.class),
        }
    }

    /// The control messages for `received` on `socket`, in Linux's order, cut to `room`
    /// bytes. Descriptors are installed here (those that do not fit are released).
    pub(super) fn write_control(
        &mut self,
        socket: &Socket,
        received: &mut Received,
        room: usize,
        cloexec: bool,
    ) -> ControlWriter {
        let mut writer = ControlWriter::new(room);
        let flag = |level, name| {
            socket
                .options
                .get(&(level, name))
                .is_some_and(|v| v.iter().any(|&b| b != 0))
        };
        let traffic = received.traffic;
        match socket.family {
            AF_UNIX => {
                if flag(libc::SOL_SOCKET, libc::SO_PASSCRED) {
                    writer.put(
                        libc::SOL_SOCKET,
                        SCM_CREDENTIALS,
                        Ucred::of(self.pid()).as_slice(),
                    );
                }
                let rights = std::mem::take(&mut received.rights);
                self.install_rights(&mut writer, rights, cloexec);
            }
            AF_INET6 if socket.kind != crate::net::Kind::Stream => {
                if flag(libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT) {
                    let hops = i32::from(traffic.hop_limit);
                    writer.put(libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, hops.as_slice());
                }
                if flag(libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS) {
                    let class = i32::from(traffic.class);
                    writer.put(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, class.as_slice());
                }
            }
            AF_INET if socket.kind != crate::net::Kind::Stream => {
                if flag(libc::IPPROTO_IP, libc::IP_RECVTTL) {
                    let ttl = i32::from(traffic.hop_limit);
                    writer.put(libc::IPPROTO_IP, libc::IP_TTL, ttl.as_slice());
                }
                if flag(libc::IPPROTO_IP, libc::IP_RECVTOS) {
                    writer.put(libc::IPPROTO_IP, libc::IP_TOS, &[traffic.class]);
                }
            }
            _ => {}
        }
        writer
    }

    /// Installs received descriptors, as many as the room left holds and the descriptor
    /// table takes; the rest are released and the message marked cut.
    fn install_rights(&mut self, writer: &mut ControlWriter, rights: Vec<OpenFile>, cloexec: bool) {
        if rights.is_empty() {
            return;
        }
        let fits = writer.room.saturating_sub(CMSG_HEADER) / size_of::<i32>();
        let mut fds: Vec<i32> = Vec::new();
        for file in rights {
            let object = file.object.clone();
            if fds.len() >= fits {
                writer.truncated = true;
                self.release(object);
                continue;
            }
            match self.files.open(file, cloexec) {
                Ok(fd) => fds.push(fd),
                Err(_) => {
                    writer.truncated = true;
                    self.release(object);
                }
            }
        }
        if !fds.is_empty() {
            let data: Vec<u8> = fds.iter().flat_map(|fd| fd.as_slice()).copied().collect();
            writer.put(libc::SOL_SOCKET, SCM_RIGHTS, &data);
        }
    }
}

/// Control messages being written into a buffer of limited room (Linux's `put_cmsg`).
pub(super) struct ControlWriter {
    pub bytes: Vec<u8>,
    room: usize,
    /// Something did not fit (`MSG_CTRUNC`).
    pub truncated: bool,
}

impl ControlWriter {
    fn new(room: usize) -> Self {
        ControlWriter {
            bytes: Vec::new(),
            room,
            truncated: false,
        }
    }

    /// Adds one message: a header that does not fit drops it; data that does not fit is
    /// cut (its length says so); the padding after it is taken as far as there is room.
    fn put(&mut self, level: i32, kind: i32, data: &[u8]) {
        if self.room < CMSG_HEADER {
            self.truncated = true;
            return;
        }
        let mut len = CMSG_HEADER + data.len();
        if self.room < len {
            self.truncated = true;
            len = self.room;
        }
        let header = CmsgHdr {
            cmsg_len: len as u64,
            cmsg_level: level,
            cmsg_type: kind,
        };
        self.bytes.extend_from_slice(header.as_slice());
        self.bytes.extend_from_slice(&data[..len - CMSG_HEADER]);
        let space = (CMSG_HEADER + data.len())
            .next_multiple_of(8)
            .min(self.room);
        self.bytes.resize(self.bytes.len() + space - len, 0);
        self.room -= space;
    }
}
