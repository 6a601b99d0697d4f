//! Socket addresses as the program passes them (`sockaddr_un`, `sockaddr_in`,
//! `sockaddr_in6`), parsed and validated, and written back.

use std::net::{Ipv4Addr, Ipv6Addr};

use std::mem::offset_of;

use serde::{Deserialize, Serialize};
use syscalls::Errno;
use vm_memory::ByteValued;

use crate::abi::from_prefix;

pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Longest `sun_path` (108 bytes, including a terminating NUL for paths).
const UNIX_PATH_MAX: usize = 108;
/// The shortest `sockaddr_in6` Linux takes: without `sin6_scope_id` (RFC 2133's).
const SOCKADDR_IN6_MIN: usize = offset_of!(SockaddrIn6, sin6_scope_id);

/// `struct sockaddr_in`. The port and address are in network byte order, kept as bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SockaddrIn {
    sin_family: u16,
    sin_port: [u8; 2],
    sin_addr: [u8; 4],
    sin_zero: [u8; 8],
}

/// `struct sockaddr_in6`; the port, flow label and address in network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SockaddrIn6 {
    sin6_family: u16,
    sin6_port: [u8; 2],
    sin6_flowinfo: u32,
    sin6_addr: [u8; 16],
    sin6_scope_id: u32,
}

// SAFETY: both are `repr(C)`, made of integers and byte arrays laid out without padding
// (checked below): every byte pattern is a value.
unsafe impl ByteValued for SockaddrIn {}
// SAFETY: as above.
unsafe impl ByteValued for SockaddrIn6 {}

const _: () = {
    assert!(size_of::<SockaddrIn>() == 16);
    assert!(offset_of!(SockaddrIn, sin_addr) == 4);
    assert!(size_of::<SockaddrIn6>() == 28);
    assert!(offset_of!(SockaddrIn6, sin6_addr) == 8);
    assert!(SOCKADDR_IN6_MIN == 24);
};

/// A socket address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SockAddr {
    /// An unnamed unix socket (`socketpair`, an unbound client).
    UnixUnnamed,
    /// A unix socket bound to an absolute path in the sandbox filesystem.
    UnixPath(Vec<u8>),
    /// A unix socket in the abstract namespace (the name after the leading NUL).
    UnixAbstract(Vec<u8>),
    Inet(Ipv4Addr, u16),
    Inet6(Ipv6Addr, u16),
}

impl SockAddr {
    /// Parses `bytes` (`addrlen` bytes of a `sockaddr`) for a socket of `family`.
    pub fn parse(bytes: &[u8], family: u16) -> Result<SockAddr, Errno> {
        if bytes.len() < 2 {
            return Err(Errno::EINVAL);
        }
        let given: u16 = from_prefix(bytes);
        if given != family {
            // AF_UNSPEC on a datagram socket's connect means "disconnect"; callers handle it.
            return Err(Errno::EAFNOSUPPORT);
        }
        match family {
            AF_UNIX => {
                let path = &bytes[2..];
                if path.len() > UNIX_PATH_MAX {
                    return Err(Errno::EINVAL);
                }
                match path.first() {
                    None => Ok(SockAddr::UnixUnnamed),
                    Some(0) => Ok(SockAddr::UnixAbstract(path[1..].to_vec())),
                    Some(_) => {
                        let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                        if end == 0 {
                            return Err(Errno::EINVAL);
                        }
                        Ok(SockAddr::UnixPath(path[..end].to_vec()))
                    }
                }
            }
            AF_INET => {
                if bytes.len() < size_of::<SockaddrIn>() {
                    return Err(Errno::EINVAL);
                }
                let sin: SockaddrIn = from_prefix(bytes);
                let port = u16::from_be_bytes(sin.sin_port);
                Ok(SockAddr::Inet(Ipv4Addr::from(sin.sin_addr), port))
            }
            AF_INET6 => {
                if bytes.len() < SOCKADDR_IN6_MIN {
                    return Err(Errno::EINVAL);
                }
                let sin6: SockaddrIn6 = from_prefix(bytes);
                let port = u16::from_be_bytes(sin6.sin6_port);
                Ok(SockAddr::Inet6(Ipv6Addr::from(sin6.sin6_addr), port))
            }
            _ => Err(Errno::EAFNOSUPPORT),
        }
    }

    /// The `sockaddr` bytes for this address.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            // `sockaddr_un`: the family, then as much of `sun_path` as the name takes.
            SockAddr::UnixUnnamed => AF_UNIX.as_slice().to_vec(),
            SockAddr::UnixPath(path) => {
                let mut out = AF_UNIX.as_slice().to_vec();
                out.extend_from_slice(path);
                out.push(0);
                out
            }
            SockAddr::UnixAbstract(name) => {
                let mut out = AF_UNIX.as_slice().to_vec();
                out.push(0);
                out.extend_from_slice(name);
                out
            }
            SockAddr::Inet(ip, port) => SockaddrIn {
                sin_family: AF_INET,
                sin_port: port.to_be_bytes(),
                sin_addr: ip.octets(),
                ..SockaddrIn::default()
            }
            .as_slice()
            .to_vec(),
            SockAddr::Inet6(ip, port) => SockaddrIn6 {
                sin6_family: AF_INET6,
                sin6_port: port.to_be_bytes(),
                sin6_addr: ip.octets(),
                ..SockaddrIn6::default()
            }
            .as_slice()
            .to_vec(),
        }
    }

    /// The port of an internet address.
    pub fn port(&self) -> Option<u16> {
        match self {
            SockAddr::Inet(_, port) | SockAddr::Inet6(_, port) => Some(*port),
            _ => None,
        }
    }

    /// The same address with another port.
    pub fn with_port(&self, port: u16) -> SockAddr {
        match self {
            SockAddr::Inet(ip, _) => SockAddr::Inet(*ip, port),
            SockAddr::Inet6(ip, _) => SockAddr::Inet6(*ip, port),
            other => other.clone(),
        }
    }

    /// Whether an internet address is this machine's: loopback, or the wildcard (which a
    /// sandbox's only interface, loopback, stands behind).
    pub fn is_local(&self) -> bool {
        match self {
            SockAddr::Inet(ip, _) => ip.is_loopback() || ip.is_unspecified(),
            SockAddr::Inet6(ip, _) => {
                ip.is_loopback()
                    || ip.is_unspecified()
                    || ip
                        .to_ipv4_mapped()
                        .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
            }
            _ => true,
        }
    }

    /// Whether a socket bound to `self` receives what is sent to `target`: the same port,
    /// and the same address or a wildcard one (IPv6 wildcards take IPv4 traffic unless the
    /// socket is IPv6-only).
    pub fn accepts(&self, target: &SockAddr, v6_only: bool) -> bool {
        if self.port() != target.port() {
            return self == target;
        }
        let v4 = |addr: &SockAddr| match addr {
            SockAddr::Inet(ip, _) => Some(*ip),
            SockAddr::Inet6(ip, _) => ip.to_ipv4_mapped(),
            _ => None,
        };
        match (self, target) {
            // IPv4 sockets take IPv4 traffic only (an IPv6 address counts if it maps one).
            (SockAddr::Inet(ip, _), _) => {
                v4(target).is_some_and(|t| ip.is_unspecified() || t == *ip)
            }
            (SockAddr::Inet6(ip, _), SockAddr::Inet6(t, _)) => {
                ip.is_unspecified()
                    || ip == t
                    || (!v6_only && v4(self).is_some() && v4(self) == v4(target))
            }
            (SockAddr::Inet6(ip, _), SockAddr::Inet(..)) => {
                !v6_only && (ip.is_unspecified() || v4(self) == v4(target))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for addr in [
            SockAddr::UnixPath(b"/tmp/s".to_vec()),
            SockAddr::UnixAbstract(b"name".to_vec()),
            SockAddr::Inet(Ipv4Addr::LOCALHOST, 8080),
            SockAddr::Inet6(Ipv6Addr::LOCALHOST, 443),
        ] {
            let family = u16::from_le_bytes(addr.encode()[..2].try_into().unwrap());
            assert_eq!(SockAddr::parse(&addr.encode(), family), Ok(addr));
        }
        assert_eq!(
            SockAddr::parse(&[1, 0, b'/', b'x', 0, 0], AF_UNIX),
            Ok(SockAddr::UnixPath(b"/x".to_vec()))
        );
        assert_eq!(SockAddr::parse(&[2, 0], AF_INET), Err(Errno::EINVAL));
        assert_eq!(
            SockAddr::parse(&[1, 0, b'x'], AF_INET),
            Err(Errno::EAFNOSUPPORT)
        );
    }

    #[test]
    fn wildcards_accept_loopback_traffic() {
        let any4 = SockAddr::Inet(Ipv4Addr::UNSPECIFIED, 80);
        let lo4 = SockAddr::Inet(Ipv4Addr::LOCALHOST, 80);
        let any6 = SockAddr::Inet6(Ipv6Addr::UNSPECIFIED, 80);
        assert!(any4.accepts(&lo4, false));
        assert!(any6.accepts(&lo4, false));
        assert!(!any6.accepts(&lo4, true));
        assert!(!lo4.accepts(&lo4.with_port(81), false));
        assert!(lo4.is_local() && !SockAddr::Inet(Ipv4Addr::new(8, 8, 8, 8), 53).is_local());
        assert!(
            !any4.accepts(&any6, false),
            "IPv4 wildcards take no IPv6 traffic"
        );
    }
}
