//! Sockets that speak from another address: outbound tunnels from the source pod's address,
//! inbound deliveries from the original source's (IP_TRANSPARENT lets a socket bind an
//! address the node does not own; the datapath routes the replies back to it).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `dst`, from `src` (any port) when given, with `mark` as SO_MARK.
pub async fn connect_from(
    src: Option<std::net::IpAddr>,
    dst: SocketAddr,
    mark: Option<u32>,
) -> io::Result<TcpStream> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // Non-blocking from the start: two fcntl calls fewer on every tunnelled connection.
    let s = Socket::new(
        domain,
        Type::STREAM.cloexec().nonblocking(),
        Some(Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    if let Some(ip) = src {
        if dst.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(s));
    sock.connect(dst).await
}
