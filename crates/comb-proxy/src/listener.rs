//! The proxy's listening sockets: loopback addresses, optionally IP_TRANSPARENT so sockets
//! the datapath assigns with `bpf_sk_assign` are accepted with their original destination.
//! SO_REUSEPORT on all of them: during an upgrade the successor binds the same ports while
//! the draining proxy still listens (the datapath's listener slot decides who takes new
//! flows; docs/upgrades.md).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Address family of a listener (the datapath's `comb_proxy_listeners` index: 0 IPv4, 1 IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

/// Room for connection bursts while workers are busy.
const BACKLOG: i32 = 4096;

/// Binds a listener on 127.0.0.1:port or [::1]:port.
pub fn bind(family: Family, port: u16, transparent: bool) -> io::Result<std::net::TcpListener> {
    let (domain, addr) = match family {
        Family::V4 => (Domain::IPV4, SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        Family::V6 => (Domain::IPV6, SocketAddr::from((Ipv6Addr::LOCALHOST, port))),
    };
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if family == Family::V6 {
        s.set_only_v6(true)?;
    }
    if transparent {
        match family {
            Family::V4 => s.set_ip_transparent_v4(true)?,
            Family::V6 => s.set_ip_transparent_v6(true)?,
        }
    }
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Binds a listener on `addr` (HBONE inbound: 0.0.0.0:15008 by default).
pub fn bind_addr(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if transparent {
        if addr.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
    }
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// True when the error means "no IPv6 here" (disabled stack, no ::1), not a real failure.
pub fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}
