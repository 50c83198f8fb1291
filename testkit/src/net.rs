//! Loopback ports and bounded TCP waits.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::error::{Result, err, io_ctx};

/// A TCP port free on every address of `ips` at the time of asking (`ips` must not be empty).
pub fn free_port(ips: &[IpAddr]) -> Result<u16> {
    let Some((first, rest)) = ips.split_first() else {
        return err("free_port: no address given");
    };
    for _ in 0..100 {
        let l = TcpListener::bind(SocketAddr::new(*first, 0))
            .map_err(io_ctx(format!("binding {first}:0")))?;
        let port = l.local_addr().map_err(io_ctx("local address"))?.port();
        if rest
            .iter()
            .all(|ip| TcpListener::bind(SocketAddr::new(*ip, port)).is_ok())
        {
            return Ok(port);
        }
    }
    err(format!("no common free TCP port on {ips:?}"))
}

/// A UDP port free on `ip` at the time of asking.
pub fn free_udp_port(ip: IpAddr) -> Result<u16> {
    let s = UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(io_ctx(format!("binding {ip}:0")))?;
    Ok(s.local_addr().map_err(io_ctx("local address"))?.port())
}

/// Waits until something accepts TCP connections on `addr` (in this network namespace).
pub fn wait_tcp(addr: SocketAddr, within: Duration) -> Result<()> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    err(format!("nothing listens on {addr} after {within:?}"))
}
