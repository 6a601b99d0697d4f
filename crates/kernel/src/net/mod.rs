//! Sockets inside the sandbox: unix-domain sockets (stream, datagram and seqpacket; paths,
//! the abstract namespace, `socketpair`) and TCP and UDP over loopback. They connect the
//! sandbox's own threads to each other; nothing here reaches a host network. A connection
//! to an address that is not this machine's fails with `ENETUNREACH`.
//!
//! A stream connection is two sockets whose incoming buffers the other writes; a listener
//! holds connections that are made (loopback connects complete at once) until `accept`
//! takes them. Operations that cannot go on yet answer `WouldBlock`: the syscall layer
//! turns that into `EAGAIN` or a wait for I/O.

pub mod addr;

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use syscalls::Errno;

pub use addr::{AF_INET, AF_INET6, AF_UNIX, SockAddr};

use crate::abi::from_prefix;
use crate::file::OpenFile;
use crate::readiness;
use crate::slab::Slab;

/// Bytes a stream socket buffers from its peer.
pub const STREAM_BUFFER: usize = 256 * 1024;
/// Bytes of datagrams a socket holds.
pub const DATAGRAM_BUFFER: usize = 256 * 1024;
/// The largest datagram.
pub const MAX_DATAGRAM: usize = 65_507;
/// Ephemeral ports (Linux's default `ip_local_port_range`).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// The socket type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Stream,
    Datagram,
    /// Connected, reliable, message-preserving (unix only).
    SeqPacket,
}

impl Kind {
    pub fn from_type(socket_type: i32) -> Option<Kind> {
        match socket_type {
            libc::SOCK_STREAM => Some(Kind::Stream),
            libc::SOCK_DGRAM => Some(Kind::Datagram),
            libc::SOCK_SEQPACKET => Some(Kind::SeqPacket),
            _ => None,
        }
    }

    pub fn as_type(self) -> i32 {
        match self {
            Kind::Stream => libc::SOCK_STREAM,
            Kind::Datagram => libc::SOCK_DGRAM,
            Kind::SeqPacket => libc::SOCK_SEQPACKET,
        }
    }

    fn connection_oriented(self) -> bool {
        self != Kind::Datagram
    }
}

/// Where a socket is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Open,
    Listening {
        backlog: usize,
        queue: VecDeque<usize>,
    },
    Connected {
        peer: usize,
    },
    /// Was connected; the peer is gone.
    Disconnected,
}

/// A message: its sender, bytes, descriptors passed with it (`SCM_RIGHTS`) and the IP
/// header fields a receiver may ask about.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub from: SockAddr,
    pub data: Vec<u8>,
    pub rights: Vec<OpenFile>,
    pub traffic: Traffic,
}

/// The hop limit (TTL) and traffic class (TOS) a datagram was sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub hop_limit: u8,
    pub class: u8,
}

impl Default for Traffic {
    /// Linux's defaults: 64 hops, class 0.
    fn default() -> Self {
        Traffic {
            hop_limit: 64,
            class: 0,
        }
    }
}

/// One socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Socket {
    pub family: u16,
    pub kind: Kind,
    pub protocol: i32,
    pub local: Option<SockAddr>,
    /// The peer of a connection, or a datagram socket's default destination.
    pub remote: Option<SockAddr>,
    pub state: State,
    /// Stream bytes from the peer.
    incoming: VecDeque<u8>,
    /// Descriptors passed on a stream, with the stream position they arrive at.
    stream_rights: VecDeque<(u64, Vec<OpenFile>)>,
    /// Stream bytes ever received and ever consumed (positions for `stream_rights`).
    received: u64,
    consumed: u64,
    /// Datagrams and seqpacket messages.
    messages: VecDeque<Message>,
    message_bytes: usize,
    pub read_shut: bool,
    pub write_shut: bool,
    /// The peer will send no more (it shut down writing, or closed).
    peer_done: bool,
    /// Options set with `setsockopt`, as the bytes given.
    pub options: BTreeMap<(i32, i32), Vec<u8>>,
    /// An error the next operation reports (`SO_ERROR`): a connected UDP socket's datagram
    /// found no socket at its destination (Linux learns that from an ICMP reply).
    pub pending_error: Option<i32>,
    /// Made by `accept`: it carries its listener's name but does not hold it (binding that
    /// name again, or looking it up, never finds this one).
    accepted: bool,
    /// The filesystem name a unix socket bound to a path made (connecting by path finds
    /// the socket through it, as Linux finds the inode).
    pub fs_node: Option<forkvm_image::NodeId>,
    /// A TCP socket whose peer closed took one more write (Linux sends it, and the reset
    /// that comes back fails the next one with `EPIPE`).
    reset: bool,
}

/// Why a socket operation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetError {
    /// Not now: retry when the socket is ready (`EAGAIN`, or a wait).
    WouldBlock,
    Errno(Errno),
}

impl From<Errno> for NetError {
    fn from(e: Errno) -> Self {
        NetError::Errno(e)
    }
}

type NetResult<T> = Result<T, NetError>;

impl Socket {
    fn new(family: u16, kind: Kind, protocol: i32) -> Socket {
        Socket {
            family,
            kind,
            protocol,
            local: None,
            remote: None,
            state: State::Open,
            incoming: VecDeque::new(),
            stream_rights: VecDeque::new(),
            received: 0,
            consumed: 0,
            messages: VecDeque::new(),
            message_bytes: 0,
            read_shut: false,
            write_shut: false,
            peer_done: false,
            options: BTreeMap::new(),
            pending_error: None,
            fs_node: None,
            accepted: false,
            reset: false,
        }
    }

    pub fn v6_only(&self) -> bool {
        self.options
            .get(&(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY))
            .is_some_and(|v| v.iter().any(|&b| b != 0))
    }

    fn unnamed(&self) -> SockAddr {
        match self.family {
            AF_INET => SockAddr::Inet(std::net::Ipv4Addr::UNSPECIFIED, 0),
            AF_INET6 => SockAddr::Inet6(std::net::Ipv6Addr::UNSPECIFIED, 0),
            _ => SockAddr::UnixUnnamed,
        }
    }

    /// The name `getsockname` reports.
    pub fn name(&self) -> SockAddr {
        self.local.clone().unwrap_or_else(|| self.unnamed())
    }

    /// Bytes (or, for message sockets, the next message's bytes) ready to read.
    pub fn readable_bytes(&self) -> usize {
        match self.kind {
            Kind::Stream => self.incoming.len(),
            _ => self.messages.front().map_or(0, |m| m.data.len()),
        }
    }

    /// Whether no more bytes can arrive (the peer finished, or reading was shut down).
    pub fn at_end(&self) -> bool {
        self.peer_done
            || self.read_shut
            || self.state != State::Open && !matches!(self.state, State::Connected { .. })
    }

    /// A buffer size option (`SO_RCVBUF`, `SO_SNDBUF`) when set below `full`.
    fn buffer_option(&self, name: i32, full: usize) -> usize {
        self.options
            .get(&(libc::SOL_SOCKET, name))
            .and_then(|v| v.get(..size_of::<i32>()))
            .map(from_prefix::<i32>)
            .and_then(|v| usize::try_from(v).ok())
            .map_or(full, |v| v.min(full))
    }

    /// How much more it takes in: its buffer's size (`SO_RCVBUF` when set smaller, as
    /// programs that test flow control set it) less what it holds.
    fn room(&self) -> usize {
        match self.kind {
            Kind::Stream => self
                .buffer_option(libc::SO_RCVBUF, STREAM_BUFFER)
                .saturating_sub(self.incoming.len()),
            _ => self
                .buffer_option(libc::SO_RCVBUF, DATAGRAM_BUFFER)
                .saturating_sub(self.message_bytes),
        }
    }

    /// The most one stream write moves (`SO_SNDBUF` when set smaller).
    fn send_limit(&self) -> usize {
        self.buffer_option(libc::SO_SNDBUF, STREAM_BUFFER)
    }

    /// Its readiness, as `poll`/`epoll` bits.
    fn readiness(&self, peer: Option<&Socket>) -> u32 {
        use readiness::*;
        let mut events = if self.pending_error.is_some() { ERR } else { 0 };
        match &self.state {
            State::Listening { queue, .. } => {
                if !queue.is_empty() {
                    events |= IN | RDNORM;
                }
                return events;
            }
            // A write does not wait (it fails, or is lost): writable, as on Linux.
            State::Disconnected => events |= HUP | IN | RDNORM | RDHUP | OUT | WRNORM,
            State::Open if self.kind.connection_oriented() => events |= OUT | WRNORM | HUP,
            _ => {}
        }
        let has_data = !self.incoming.is_empty() || !self.messages.is_empty();
        if has_data || self.peer_done || self.read_shut {
            events |= IN | RDNORM;
        }
        if self.peer_done {
            events |= RDHUP;
        }
        match (&self.state, peer) {
            (State::Connected { .. }, Some(peer))
                if !self.write_shut && peer.room() > 0 && !peer.read_shut =>
            {
                events |= OUT | WRNORM;
            }
            (State::Connected { .. }, None) => events |= OUT | WRNORM | HUP,
            (State::Open, _) if self.kind == Kind::Datagram => events |= OUT | WRNORM,
            _ => {}
        }
        if self.read_shut && self.write_shut {
            events |= HUP;
        }
        events
    }
}

/// Every socket of the process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sockets {
    slab: Slab<Socket>,
    next_port: u16,
    /// The last unix autobind name handed out.
    next_name: u32,
}

impl Sockets {
    pub fn get(&self, id: usize) -> Option<&Socket> {
        self.slab.get(id)
    }

    pub fn get_mut(&mut self, id: usize) -> Option<&mut Socket> {
        self.slab.get_mut(id)
    }

    fn socket(&self, id: usize) -> Result<&Socket, Errno> {
        self.slab.get(id).ok_or(Errno::EBADF)
    }

    fn socket_mut(&mut self, id: usize) -> Result<&mut Socket, Errno> {
        self.slab.get_mut(id).ok_or(Errno::EBADF)
    }

    pub fn create(&mut self, family: u16, kind: Kind, protocol: i32) -> usize {
        self.slab.insert(Socket::new(family, kind, protocol))
    }

    /// `socketpair`: two connected unix sockets.
    pub fn pair(&mut self, kind: Kind) -> (usize, usize) {
        let a = self.create(AF_UNIX, kind, 0);
        let b = self.create(AF_UNIX, kind, 0);
        for (me, peer) in [(a, b), (b, a)] {
            let socket = self.slab.get_mut(me).expect("just made");
            socket.state = State::Connected { peer };
            socket.remote = Some(SockAddr::UnixUnnamed);
        }
        (a, b)
    }

    /// The socket whose path-bound name is filesystem node `node`, and the address it is
    /// bound to.
    pub fn at_node(&self, node: forkvm_image::NodeId) -> Option<SockAddr> {
        self.slab
            .iter()
            .find(|(_, s)| s.fs_node == Some(node))
            .and_then(|(_, s)| s.local.clone())
    }

    /// Whether a socket is bound to exactly `addr`.
    pub fn is_bound(&self, addr: &SockAddr) -> bool {
        self.slab
            .iter()
            .any(|(_, s)| s.local.as_ref() == Some(addr))
    }

    /// Another description holds `id` (passed over a socket).
    pub fn retain(&mut self, id: usize) {
        self.slab.retain(id);
    }

    /// The socket bound to exactly `addr`, or (for internet addresses) one whose bound
    /// address takes traffic for it, of the same type.
    fn bound_to(&self, addr: &SockAddr, kind: Kind, exclude: usize) -> Option<usize> {
        let exact = self.slab.iter().find(|(id, s)| {
            *id != exclude && !s.accepted && s.kind == kind && s.local.as_ref() == Some(addr)
        });
        if let Some((id, _)) = exact {
            return Some(id);
        }
        addr.port()?;
        self.slab
            .iter()
            .filter(|(id, s)| *id != exclude && !s.accepted && s.kind == kind)
            .find(|(_, s)| {
                s.local
                    .as_ref()
                    .is_some_and(|local| local.accepts(addr, s.v6_only()))
            })
            .map(|(id, _)| id)
    }

    fn free_port(&mut self, addr: &SockAddr, kind: Kind) -> Result<u16, Errno> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            let port = EPHEMERAL.start() + self.next_port % span as u16;
            self.next_port = self.next_port.wrapping_add(1);
            if self
                .bound_to(&addr.with_port(port), kind, usize::MAX)
                .is_none()
            {
                return Ok(port);
            }
        }
        Err(Errno::EADDRINUSE)
    }

    /// `bind`. Internet addresses must be this machine's; port 0 picks a free one.
    pub fn bind(&mut self, id: usize, addr: SockAddr) -> Result<(), Errno> {
        let socket = self.socket(id)?;
        let kind = socket.kind;
        if socket.local.is_some() {
            return Err(Errno::EINVAL);
        }
        let addr = match addr {
            SockAddr::Inet(..) | SockAddr::Inet6(..) if !addr.is_local() => {
                return Err(Errno::EADDRNOTAVAIL);
            }
            SockAddr::Inet(..) | SockAddr::Inet6(..) if addr.port() == Some(0) => {
                let port = self.free_port(&addr, kind)?;
                addr.with_port(port)
            }
            // A unix address of just the family: a unique abstract name (`autobind`).
            SockAddr::UnixUnnamed => self.unix_autoname()?,
            addr => addr,
        };
        let new_v6_only = self.socket(id)?.v6_only();
        let taken = self.slab.iter().any(|(other, s)| {
            other != id
                && !s.accepted
                && s.kind == kind
                && s.local.as_ref().is_some_and(|local| {
                    local == &addr
                        || (addr.port().is_some()
                            && local.port() == addr.port()
                            && (local.accepts(&addr, s.v6_only())
                                || addr.accepts(local, new_v6_only)))
                })
        });
        if taken {
            return Err(Errno::EADDRINUSE);
        }
        self.socket_mut(id)?.local = Some(addr);
        Ok(())
    }

    /// A free abstract name of five hex digits, as Linux's unix autobind picks.
    fn unix_autoname(&mut self) -> Result<SockAddr, Errno> {
        for _ in 0..=0xfffff {
            let name = format!("{:05x}", self.next_unix_name());
            let addr = SockAddr::UnixAbstract(name.into_bytes());
            if !self.is_bound(&addr) {
                return Ok(addr);
            }
        }
        Err(Errno::EADDRINUSE)
    }

    fn next_unix_name(&mut self) -> u32 {
        self.next_name = (self.next_name + 1) & 0xfffff;
        self.next_name
    }

    /// A socket bound to a wildcard address that connects to `to` is named by the address
    /// it reaches from, as Linux picks a source address: `to`'s own (a loopback one).
    fn choose_source(&mut self, id: usize, to: &SockAddr) -> Result<(), Errno> {
        let socket = self.socket_mut(id)?;
        let source = match (&socket.local, to) {
            (Some(SockAddr::Inet(ip, port)), SockAddr::Inet(dest, _)) if ip.is_unspecified() => {
                SockAddr::Inet(*dest, *port)
            }
            (Some(SockAddr::Inet6(ip, port)), SockAddr::Inet6(dest, _)) if ip.is_unspecified() => {
                SockAddr::Inet6(*dest, *port)
            }
            // An IPv6 socket reaching an IPv4 address is named by its mapped form.
            (Some(SockAddr::Inet6(ip, port)), SockAddr::Inet(dest, _)) if ip.is_unspecified() => {
                SockAddr::Inet6(dest.to_ipv6_mapped(), *port)
            }
            _ => return Ok(()),
        };
        socket.local = Some(source);
        Ok(())
    }

    /// Binds an internet socket to a free port on the wildcard address, as Linux does for
    /// `listen`, `connect` or `sendto` on an unbound socket.
    fn autobind(&mut self, id: usize) -> Result<(), Errno> {
        let socket = self.socket(id)?;
        if socket.local.is_some() || socket.family == AF_UNIX {
            return Ok(());
        }
        let unnamed = socket.unnamed();
        self.bind(id, unnamed)
    }

    pub fn listen(&mut self, id: usize, backlog: i32) -> Result<(), Errno> {
        let socket = self.socket(id)?;
        if !socket.kind.connection_oriented() {
            return Err(Errno::EOPNOTSUPP);
        }
        if matches!(socket.state, State::Connected { .. } | State::Disconnected) {
            return Err(Errno::EINVAL);
        }
        if socket.family == AF_UNIX && socket.local.is_none() {
            return Err(Errno::EINVAL);
        }
        self.autobind(id)?;
        // Linux caps the backlog at somaxconn (4096) and treats nonsense as that.
        let backlog = usize::try_from(backlog).map_or(4096, |b| b.clamp(1, 4096));
        let socket = self.socket_mut(id)?;
        match &mut socket.state {
            State::Listening { backlog: b, .. } => *b = backlog,
            state => {
                *state = State::Listening {
                    backlog,
                    queue: VecDeque::new(),
                }
            }
        }
        Ok(())
    }

    /// `connect`. A stream connection to a listener is made at once and queued for its
    /// `accept`; a datagram socket just records its destination.
    pub fn connect(&mut self, id: usize, addr: SockAddr) -> NetResult<()> {
        if matches!(addr, SockAddr::Inet(..) | SockAddr::Inet6(..)) && !addr.is_local() {
            return Err(Errno::ENETUNREACH.into());
        }
        let socket = self.socket(id)?;
        let kind = socket.kind;
        if kind == Kind::Datagram {
            self.autobind(id)?;
            self.choose_source(id, &addr)?;
            self.socket_mut(id)?.remote = Some(addr);
            return Ok(());
        }
        match socket.state {
            State::Connected { .. } => return Err(Errno::EISCONN.into()),
            State::Listening { .. } => return Err(Errno::EINVAL.into()),
            State::Disconnected => return Err(Errno::EISCONN.into()),
            State::Open => {}
        }
        let family = socket.family;
        let listener = self
            .bound_to(&addr, kind, id)
            .filter(|&l| {
                matches!(
                    self.slab.get(l).map(|s| &s.state),
                    Some(State::Listening { .. })
                )
            })
            .ok_or(Errno::ECONNREFUSED)?;
        if let Some(Socket {
            state: State::Listening { backlog, queue },
            ..
        }) = self.slab.get(listener)
            && queue.len() > *backlog
        {
            return Err(NetError::WouldBlock);
        }
        self.autobind(id)?;
        self.choose_source(id, &addr)?;
        let server_name = self.socket(listener)?.name();
        let client_name = self.socket(id)?.name();
        let listener_options = self.socket(listener)?.options.clone();
        let accepted = self.create(family, kind, self.socket(listener)?.protocol);
        {
            let server = self.slab.get_mut(accepted).expect("just made");
            server.state = State::Connected { peer: id };
            // Its name is the address the client reached (a wildcard listener's would be
            // the wildcard), or the listener's path for unix sockets.
            server.local = Some(if addr.port().is_some() {
                addr.clone()
            } else {
                server_name
            });
            server.remote = Some(client_name);
            server.accepted = true;
            // As in Linux, an accepted socket starts with its listener's options.
            server.options = listener_options;
        }
        let client = self.socket_mut(id)?;
        client.state = State::Connected { peer: accepted };
        client.remote = Some(addr);
        if let Some(Socket {
            state: State::Listening { queue, .. },
            ..
        }) = self.slab.get_mut(listener)
        {
            queue.push_back(accepted);
        }
        Ok(())
    }

    /// `accept`: the next connection made to listener `id`.
    pub fn accept(&mut self, id: usize) -> NetResult<usize> {
        let socket = self.socket_mut(id)?;
        let State::Listening { queue, .. } = &mut socket.state else {
            return Err(Errno::EINVAL.into());
        };
        queue.pop_front().ok_or(NetError::WouldBlock)
    }

    /// The socket a connected socket sends to, if it still exists.
    fn peer_of(&self, id: usize) -> Option<usize> {
        match self.slab.get(id)?.state {
            State::Connected { peer } => Some(peer),
            _ => None,
        }
    }

    /// Sends `data` (and `rights`). Streams take what fits and return how much; messages go
    /// whole or not at all. `to` is a datagram's destination (or the connected peer's).
    pub fn send(
        &mut self,
        id: usize,
        data: &[u8],
        to: Option<SockAddr>,
        rights: Vec<OpenFile>,
        traffic: Traffic,
    ) -> NetResult<usize> {
        let socket = self.socket(id)?;
        if socket.kind == Kind::Stream
            && let Some(error) = self.socket_mut(id)?.pending_error.take()
        {
            return Err(Errno::new(error).into());
        }
        let socket = self.socket(id)?;
        if socket.write_shut {
            return Err(Errno::EPIPE.into());
        }
        let kind = socket.kind;
        if kind == Kind::Datagram {
            return self.send_datagram(id, data, to, rights, traffic);
        }
        let peer = match socket.state {
            State::Connected { peer } => peer,
            State::Disconnected if socket.family != AF_UNIX && !socket.reset => {
                let socket = self.socket_mut(id)?;
                socket.reset = true;
                return Ok(data.len().min(socket.send_limit()));
            }
            State::Disconnected => return Err(Errno::EPIPE.into()),
            _ => return Err(Errno::ENOTCONN.into()),
        };
        let from = socket.name();
        let send_limit = socket.send_limit();
        let target = self.socket_mut(peer).map_err(|_| Errno::EPIPE)?;
        if target.read_shut {
            return Err(Errno::EPIPE.into());
        }
        if kind == Kind::SeqPacket {
            if data.len() > DATAGRAM_BUFFER {
                return Err(Errno::EMSGSIZE.into());
            }
            if target.room() < data.len().max(1) {
                return Err(NetError::WouldBlock);
            }
            target.message_bytes += data.len();
            target.messages.push_back(Message {
                from,
                data: data.to_vec(),
                rights,
                traffic,
            });
            return Ok(data.len());
        }
        let n = data.len().min(target.room()).min(send_limit);
        if n == 0 && !data.is_empty() {
            return Err(NetError::WouldBlock);
        }
        if !rights.is_empty() {
            target.stream_rights.push_back((target.received, rights));
        }
        target.incoming.extend(&data[..n]);
        target.received += n as u64;
        Ok(n)
    }

    fn send_datagram(
        &mut self,
        id: usize,
        data: &[u8],
        to: Option<SockAddr>,
        rights: Vec<OpenFile>,
        traffic: Traffic,
    ) -> NetResult<usize> {
        let socket = self.socket(id)?;
        // One of a `socketpair`: its peer has no name, it is reached directly.
        let paired = match (&to, &socket.state) {
            (None, State::Connected { peer }) => Some(*peer),
            (None, State::Disconnected) => return Err(Errno::ECONNREFUSED.into()),
            _ => None,
        };
        let to = to
            .or_else(|| socket.remote.clone())
            .ok_or(Errno::EDESTADDRREQ)?;
        if matches!(to, SockAddr::Inet(..) | SockAddr::Inet6(..)) && !to.is_local() {
            return Err(Errno::ENETUNREACH.into());
        }
        if data.len() > MAX_DATAGRAM {
            return Err(Errno::EMSGSIZE.into());
        }
        self.autobind(id)?;
        let from = self.socket(id)?.name();
        let Some(target) = paired.or_else(|| self.bound_to(&to, Kind::Datagram, usize::MAX)) else {
            return match to {
                // UDP: the datagram is lost; a connected socket hears of it, as from the
                // ICMP "port unreachable" loopback returns (a resolver then fails at once).
                SockAddr::Inet(..) | SockAddr::Inet6(..) => {
                    let socket = self.socket_mut(id)?;
                    if socket.remote.is_some() {
                        socket.pending_error = Some(Errno::ECONNREFUSED.into_raw());
                    }
                    Ok(data.len())
                }
                // Unix: nobody bound there.
                _ => Err(Errno::ECONNREFUSED.into()),
            };
        };
        let target = self.socket_mut(target)?;
        if target.read_shut {
            return Ok(data.len());
        }
        if target.room() < data.len().max(1) {
            if target.family == AF_UNIX {
                return Err(NetError::WouldBlock);
            }
            // A full UDP socket drops what arrives.
            return Ok(data.len());
        }
        target.message_bytes += data.len();
        target.messages.push_back(Message {
            from,
            data: data.to_vec(),
            rights,
            traffic,
        });
        Ok(data.len())
    }

    /// Receives up to `max` bytes: for a stream, what is buffered (0 at end of stream); for a
    /// message socket, the next message (cut to `max`; the second value says it was). With
    /// `peek`, nothing is consumed.
    pub fn recv(&mut self, id: usize, max: usize, peek: bool) -> NetResult<Received> {
        let socket = self.socket_mut(id)?;
        if let Some(error) = socket.pending_error.take() {
            return Err(Errno::new(error).into());
        }
        if let State::Listening { .. } = socket.state {
            return Err(Errno::ENOTCONN.into());
        }
        if socket.kind != Kind::Stream {
            let Some(message) = socket.messages.front() else {
                if socket.read_shut || socket.peer_done || socket.state == State::Disconnected {
                    return Ok(Received::default());
                }
                return Err(NetError::WouldBlock);
            };
            let take = message.data.len().min(max);
            let mut received = Received {
                data: message.data[..take].to_vec(),
                message_len: message.data.len(),
                from: Some(message.from.clone()),
                rights: Vec::new(),
                traffic: message.traffic,
            };
            if !peek {
                let message = socket.messages.pop_front().expect("front exists");
                socket.message_bytes -= message.data.len();
                received.rights = message.rights;
            }
            return Ok(received);
        }
        if socket.incoming.is_empty() {
            if socket.read_shut
                || socket.peer_done
                || matches!(socket.state, State::Disconnected | State::Open)
            {
                if socket.state == State::Open && !socket.read_shut {
                    return Err(Errno::ENOTCONN.into());
                }
                return Ok(Received::default());
            }
            return Err(NetError::WouldBlock);
        }
        // Descriptors passed with a write arrive with its first byte, and a read stops at
        // the next write that carries some.
        let mut take = socket.incoming.len().min(max);
        if let Some(&(position, _)) = socket
            .stream_rights
            .iter()
            .find(|(p, _)| *p > socket.consumed)
        {
            take = take.min((position - socket.consumed) as usize);
        }
        let data: Vec<u8> = socket.incoming.iter().take(take).copied().collect();
        let mut received = Received {
            message_len: data.len(),
            data,
            from: socket.remote.clone(),
            ..Received::default()
        };
        if !peek {
            if let Some(&(position, _)) = socket.stream_rights.front()
                && position <= socket.consumed
            {
                received.rights = socket.stream_rights.pop_front().expect("front exists").1;
            }
            socket.incoming.drain(..take);
            socket.consumed += take as u64;
        }
        Ok(received)
    }

    /// `shutdown`: `SHUT_RD`, `SHUT_WR` or both.
    pub fn shutdown(&mut self, id: usize, how: i32) -> Result<(), Errno> {
        let socket = self.socket(id)?;
        if !matches!(socket.state, State::Connected { .. } | State::Disconnected)
            && socket.kind.connection_oriented()
        {
            return Err(Errno::ENOTCONN);
        }
        let (read, write) = match how {
            libc::SHUT_RD => (true, false),
            libc::SHUT_WR => (false, true),
            libc::SHUT_RDWR => (true, true),
            _ => return Err(Errno::EINVAL),
        };
        let peer = self.peer_of(id);
        let socket = self.socket_mut(id)?;
        socket.read_shut |= read;
        socket.write_shut |= write;
        if write && let Some(peer) = peer.and_then(|p| self.slab.get_mut(p)) {
            peer.peer_done = true;
        }
        Ok(())
    }

    /// A description of socket `id` closed. When it was the last, the socket goes: its peer
    /// sees the end of the stream, and connections waiting in a listener's queue are
    /// dropped. Returns the descriptors that were in flight to it, for their release.
    pub fn release(&mut self, id: usize) -> Vec<OpenFile> {
        let Some(socket) = self.slab.release(id) else {
            return Vec::new();
        };
        let mut orphans: Vec<OpenFile> = socket
            .stream_rights
            .into_iter()
            .flat_map(|(_, rights)| rights)
            .chain(socket.messages.into_iter().flat_map(|m| m.rights))
            .collect();
        match socket.state {
            State::Connected { peer } => {
                // A TCP socket closed with bytes it never read resets the connection (Linux
                // sends RST): the peer's next operation fails with ECONNRESET.
                let reset = socket.family != AF_UNIX
                    && socket.kind == Kind::Stream
                    && !socket.incoming.is_empty();
                if let Some(peer) = self.slab.get_mut(peer) {
                    peer.state = State::Disconnected;
                    peer.peer_done = true;
                    if reset {
                        peer.pending_error = Some(Errno::ECONNRESET.into_raw());
                        peer.reset = true;
                    }
                }
            }
            State::Listening { queue, .. } => {
                for pending in queue {
                    orphans.extend(self.release(pending));
                }
            }
            _ => {}
        }
        orphans
    }

    /// Readiness of socket `id` as `poll`/`epoll` bits.
    pub fn readiness(&self, id: usize) -> u32 {
        let Some(socket) = self.slab.get(id) else {
            return readiness::NVAL;
        };
        let peer = self.peer_of(id).and_then(|p| self.slab.get(p));
        socket.readiness(peer)
    }
}

/// What a receive got.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub data: Vec<u8>,
    /// The whole message's length (more than `data` when it was cut: `MSG_TRUNC`).
    pub message_len: usize,
    pub from: Option<SockAddr>,
    pub rights: Vec<OpenFile>,
    pub traffic: Traffic,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lo(port: u16) -> SockAddr {
        SockAddr::Inet(Ipv4Addr::LOCALHOST, port)
    }

    #[test]
    fn a_stream_connection_carries_bytes_both_ways_and_ends() {
        let mut net = Sockets::default();
        let server = net.create(AF_INET, Kind::Stream, 0);
        net.bind(server, lo(0)).unwrap();
        let port = net.get(server).unwrap().name().port().unwrap();
        assert!(EPHEMERAL.contains(&port));
        net.listen(server, 5).unwrap();
        let client = net.create(AF_INET, Kind::Stream, 0);
        assert_eq!(
            net.connect(client, lo(port + 1)),
            Err(NetError::Errno(Errno::ECONNREFUSED))
        );
        net.connect(client, lo(port)).unwrap();
        let conn = net.accept(server).unwrap();
        assert_eq!(net.accept(server), Err(NetError::WouldBlock));
        assert_eq!(
            net.send(client, b"ping", None, Vec::new(), Traffic::default()),
            Ok(4)
        );
        assert_eq!(net.recv(conn, 2, false).unwrap().data, b"pi");
        assert_eq!(net.recv(conn, 10, false).unwrap().data, b"ng");
        assert_eq!(net.recv(conn, 10, false).err(), Some(NetError::WouldBlock));
        assert_eq!(
            net.get(conn).unwrap().remote,
            Some(net.get(client).unwrap().name())
        );
        net.release(client);
        assert!(
            net.recv(conn, 10, false).unwrap().data.is_empty(),
            "end of stream"
        );
        let lost = net.send(conn, b"x", None, Vec::new(), Traffic::default());
        assert_eq!(
            lost,
            Ok(1),
            "one more write goes out and is lost, as in TCP"
        );
        assert_eq!(
            net.send(conn, b"x", None, Vec::new(), Traffic::default()),
            Err(NetError::Errno(Errno::EPIPE))
        );
    }

    #[test]
    fn udp_datagrams_keep_their_boundaries_and_senders() {
        let mut net = Sockets::default();
        let a = net.create(AF_INET, Kind::Datagram, 0);
        let b = net.create(AF_INET, Kind::Datagram, 0);
        net.bind(a, lo(9999)).unwrap();
        assert_eq!(net.bind(b, lo(9999)), Err(Errno::EADDRINUSE));
        net.send(b, b"one", Some(lo(9999)), Vec::new(), Traffic::default())
            .unwrap();
        net.send(b, b"two!", Some(lo(9999)), Vec::new(), Traffic::default())
            .unwrap();
        let first = net.recv(a, 2, false).unwrap();
        assert_eq!((first.data.as_slice(), first.message_len), (&b"on"[..], 3));
        assert_eq!(first.from, Some(net.get(b).unwrap().name()));
        assert_eq!(net.recv(a, 10, false).unwrap().data, b"two!");
        let far = SockAddr::Inet(Ipv4Addr::new(10, 0, 0, 1), 53);
        assert_eq!(
            net.send(b, b"x", Some(far), Vec::new(), Traffic::default()),
            Err(NetError::Errno(Errno::ENETUNREACH))
        );
    }

    #[test]
    fn closing_with_unread_bytes_resets_the_connection() {
        let mut net = Sockets::default();
        let server = net.create(AF_INET, Kind::Stream, 0);
        net.bind(server, lo(0)).unwrap();
        let port = net.get(server).unwrap().name().port().unwrap();
        net.listen(server, 1).unwrap();
        let client = net.create(AF_INET, Kind::Stream, 0);
        net.connect(client, lo(port)).unwrap();
        let conn = net.accept(server).unwrap();
        let plain = Traffic::default();
        net.send(client, b"unread", None, Vec::new(), plain)
            .unwrap();
        net.release(conn);
        assert_ne!(net.readiness(client) & readiness::ERR, 0);
        let reset = net.send(client, b"x", None, Vec::new(), plain);
        assert_eq!(reset, Err(NetError::Errno(Errno::ECONNRESET)));
        let after = net.send(client, b"x", None, Vec::new(), plain);
        assert_eq!(after, Err(NetError::Errno(Errno::EPIPE)));
        assert!(net.recv(client, 10, false).unwrap().data.is_empty());
    }

    #[test]
    fn a_datagram_pair_reaches_its_unnamed_peer() {
        let mut net = Sockets::default();
        let (a, b) = net.pair(Kind::Datagram);
        for data in [&b"one"[..], b"two"] {
            assert_eq!(
                net.send(a, data, None, Vec::new(), Traffic::default()),
                Ok(3)
            );
        }
        assert_eq!(net.recv(b, 10, false).unwrap().data, b"one");
        assert_eq!(net.recv(b, 10, false).unwrap().data, b"two");
        net.release(b);
        let gone = net.send(a, b"x", None, Vec::new(), Traffic::default());
        assert_eq!(gone, Err(NetError::Errno(Errno::ECONNREFUSED)));
    }

    #[test]
    fn a_full_buffer_blocks_the_writer() {
        let mut net = Sockets::default();
        let (a, b) = net.pair(Kind::Stream);
        let big = vec![7u8; STREAM_BUFFER + 10];
        assert_eq!(
            net.send(a, &big, None, Vec::new(), Traffic::default()),
            Ok(STREAM_BUFFER)
        );
        assert_eq!(
            net.send(a, b"x", None, Vec::new(), Traffic::default()),
            Err(NetError::WouldBlock)
        );
        net.recv(b, 10, false).unwrap();
        assert_eq!(
            net.send(a, &big, None, Vec::new(), Traffic::default()),
            Ok(10)
        );
        net.shutdown(a, libc::SHUT_WR).unwrap();
        assert_ne!(net.readiness(b) & readiness::RDHUP, 0);
    }
}
