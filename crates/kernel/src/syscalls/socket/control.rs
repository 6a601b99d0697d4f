//! `msghdr`s and control messages: what a `sendmsg` attaches (descriptors, credentials,
//! hop limit and traffic class) and what a `recvmsg` reports, cut to the buffer exactly as
//! Linux cuts it (`MSG_CTRUNC`, partial last message, padding up to the room left).

use syscalls::Errno;

use crate::file::OpenFile;
use crate::net::{AF_INET, AF_INET6, AF_UNIX, Received, Socket, Traffic};
use crate::process::{Process, identity};

/// `sizeof(struct msghdr)` and of `struct cmsghdr`'s header.
pub(super) const MSGHDR_BYTES: usize = 56;
const CMSG_HEADER: usize = 16;
/// The most control bytes a `sendmsg` may pass (Linux's `optmem_max`).
pub(super) const MAX_CONTROL: u64 = 20 * 1024;
/// Descriptors one `SCM_RIGHTS` message may carry (Linux's `SCM_MAX_FD`).
const MAX_RIGHTS: usize = 253;
const SCM_RIGHTS: i32 = 1;
const SCM_CREDENTIALS: i32 = 2;
/// `struct ucred`: pid, uid, gid.
const UCRED_BYTES: usize = 12;

/// A `msghdr`, as read from the program.
pub(super) struct MsgHdr {
    pub name: u64,
    pub name_len: u32,
    pub iov: u64,
    pub iov_len: u64,
    pub control: u64,
    pub control_len: u64,
}

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
    let bytes: [u8; 4] = data.try_into().map_err(|_| Errno::EINVAL)?;
    match i32::from_le_bytes(bytes) {
        -1 => Ok(None),
        v if range.contains(&v) => Ok(Some(v as u8)),
        _ => Err(Errno::EINVAL),
    }
}

impl Process {
    pub(super) fn read_msghdr(&self, addr: u64) -> Result<MsgHdr, Errno> {
        let raw = self.read_user(addr, MSGHDR_BYTES)?;
        let word = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        Ok(MsgHdr {
            name: word(0),
            name_len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            iov: word(16),
            iov_len: word(24),
            control: word(32),
            control_len: word(40),
        })
    }

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
            let cmsg_len = u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
            let level = i32::from_le_bytes(raw[at + 8..at + 12].try_into().expect("4 bytes"));
            let kind = i32::from_le_bytes(raw[at + 12..at + 16].try_into().expect("4 bytes"));
            let cmsg_len = usize::try_from(cmsg_len).map_err(|_| Errno::EINVAL)?;
            if cmsg_len < CMSG_HEADER || cmsg_len > raw.len() - at {
                return Err(Errno::EINVAL);
            }
            let data = &raw[at + CMSG_HEADER..at + cmsg_len];
            match (family, level, kind) {
                (AF_UNIX, libc::SOL_SOCKET, SCM_RIGHTS) => {
                    for chunk in data.chunks_exact(4) {
                        let fd = i32::from_le_bytes(chunk.try_into().expect("4 bytes"));
                        outgoing.rights.push(self.files.get(fd)?.clone());
                    }
                    if outgoing.rights.len() > MAX_RIGHTS {
                        return Err(Errno::EINVAL);
                    }
                }
                // Credentials may only claim what they are: this process.
                (AF_UNIX, libc::SOL_SOCKET, SCM_CREDENTIALS)
                    if data.len() == UCRED_BYTES && data != credentials() =>
                {
                    return Err(Errno::EPERM);
                }
                (AF_UNIX, libc::SOL_SOCKET, SCM_CREDENTIALS) if data.len() == UCRED_BYTES => {}
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
                .and_then(|v| v.get(..4))
                .map(|v| i32::from_le_bytes(v.try_into().expect("4 bytes")))
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
                    writer.put(libc::SOL_SOCKET, SCM_CREDENTIALS, &credentials());
                }
                let rights = std::mem::take(&mut received.rights);
                self.install_rights(&mut writer, rights, cloexec);
            }
            AF_INET6 if socket.kind != crate::net::Kind::Stream => {
                if flag(libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT) {
                    let hops = i32::from(traffic.hop_limit).to_le_bytes();
                    writer.put(libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, &hops);
                }
                if flag(libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS) {
                    let class = i32::from(traffic.class).to_le_bytes();
                    writer.put(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &class);
                }
            }
            AF_INET if socket.kind != crate::net::Kind::Stream => {
                if flag(libc::IPPROTO_IP, libc::IP_RECVTTL) {
                    let ttl = i32::from(traffic.hop_limit).to_le_bytes();
                    writer.put(libc::IPPROTO_IP, libc::IP_TTL, &ttl);
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
        let fits = writer.room.saturating_sub(CMSG_HEADER) / 4;
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
            let data: Vec<u8> = fds.iter().flat_map(|fd| fd.to_le_bytes()).collect();
            writer.put(libc::SOL_SOCKET, SCM_RIGHTS, &data);
        }
    }
}

/// The credentials every sender in the sandbox has.
fn credentials() -> Vec<u8> {
    [
        identity::PID as u32,
        identity::UID as u32,
        identity::GID as u32,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect()
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
        self.bytes.extend_from_slice(&(len as u64).to_le_bytes());
        self.bytes.extend_from_slice(&level.to_le_bytes());
        self.bytes.extend_from_slice(&kind.to_le_bytes());
        self.bytes.extend_from_slice(&data[..len - CMSG_HEADER]);
        let space = (CMSG_HEADER + data.len())
            .next_multiple_of(8)
            .min(self.room);
        self.bytes.resize(self.bytes.len() + space - len, 0);
        self.room -= space;
    }
}
