//! `pktprobe`: the UDP, ICMP and bridge-netfilter probes of the egress and ingress tests (TCP
//! is `netprobe`'s). A separate process, placed by the harness in a network namespace and a
//! cgroup, because the socket's cgroup is what the rules match.
//!
//! ```text
//! pktprobe udp-echo <addr>                       echo server; prints "listening" when ready
//! pktprobe udp <addr> [--timeout-ms N]           exit 0 echoed, 1 refused, 2 timed out
//! pktprobe ping <ip> [--timeout-ms N]            ICMP echo; exit 0 answered, 1 refused, 2 timed out
//! pktprobe bridge-netfilter [--proc-sys-bridge P] [--modprobe M]
//!                                                ensure_bridge_netfilter; prints the outcome;
//!                                                exit 0 on, 1 failed closed
//! ```
//! Any other failure exits 3.
#![forbid(unsafe_code)]

use std::io::{self, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockProtocol, SockType, SockaddrStorage, recvfrom, sendto, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;

const OK: u8 = 0;
const REFUSED: u8 = 1;
const TIMED_OUT: u8 = 2;
const OTHER: u8 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("udp-echo") => arg(&args, 1).and_then(udp_echo),
        Some("udp") => arg(&args, 1).and_then(|a| udp(&a, timeout(&args))),
        Some("ping") => arg(&args, 1).and_then(|a| ping(&a, timeout(&args))),
        Some("bridge-netfilter") => Ok(bridge(&args)),
        _ => Err((
            OTHER,
            "usage: udp-echo|udp|ping|bridge-netfilter ...".to_string(),
        )),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err((code, msg)) => {
            eprintln!("pktprobe: {msg}");
            ExitCode::from(code)
        }
    }
}

type Res = Result<u8, (u8, String)>;

fn arg(args: &[String], i: usize) -> Result<String, (u8, String)> {
    args.get(i)
        .cloned()
        .ok_or((OTHER, "missing address".to_string()))
}

fn option(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn timeout(args: &[String]) -> Duration {
    Duration::from_millis(
        option(args, "--timeout-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    )
}

fn other(what: &str, e: impl std::fmt::Display) -> (u8, String) {
    (OTHER, format!("{what}: {e}"))
}

fn udp_echo(addr: String) -> Res {
    let a: SocketAddr = addr.parse().map_err(|e| other(&addr, e))?;
    let s = UdpSocket::bind(a).map_err(|e| other("bind", e))?;
    println!("listening");
    let _ = io::stdout().flush();
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = s.recv_from(&mut buf).map_err(|e| other("recv", e))?;
        let _ = s.send_to(&buf[..n], from);
    }
}

fn classify(e: &io::Error) -> (u8, String) {
    match e.kind() {
        ErrorKind::ConnectionRefused => (REFUSED, e.to_string()),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => (TIMED_OUT, e.to_string()),
        _ if e.raw_os_error() == Some(nix::libc::EHOSTUNREACH)
            || e.raw_os_error() == Some(nix::libc::EACCES)
            || e.raw_os_error() == Some(nix::libc::EPERM) =>
        {
            (REFUSED, e.to_string())
        }
        _ => (OTHER, e.to_string()),
    }
}

fn udp(addr: &str, timeout: Duration) -> Res {
    let a: SocketAddr = addr.parse().map_err(|e| other(addr, e))?;
    let bind: SocketAddr = if a.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|e| other("bind", e))?
    } else {
        "[::]:0".parse().map_err(|e| other("bind", e))?
    };
    let s = UdpSocket::bind(bind).map_err(|e| other("bind", e))?;
    s.connect(a).map_err(|e| classify(&e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| other("timeout", e))?;
    s.send(b"probe").map_err(|e| classify(&e))?;
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf).map_err(|e| classify(&e))?;
    if &buf[..n] == b"probe" {
        Ok(OK)
    } else {
        Err((OTHER, "wrong echo".into()))
    }
}

fn ping(addr: &str, timeout: Duration) -> Res {
    let ip: IpAddr = addr.parse().map_err(|e| other(addr, e))?;
    let (fam, proto, ty) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8u8),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128u8),
    };
    let fd = socket(fam, SockType::Datagram, SockFlag::empty(), proto)
        .map_err(|e| other("ICMP socket (is net.ipv4.ping_group_range set?)", e))?;
    let tv = TimeVal::new(
        i64::try_from(timeout.as_secs()).unwrap_or(1),
        i64::from(timeout.subsec_micros()),
    );
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(|e| other("timeout", e))?;
    let dest = SockaddrStorage::from(SocketAddr::new(ip, 0));
    // Echo request; the kernel fills in the identifier and the checksum.
    let packet = [ty, 0, 0, 0, 0, 0, 0, 1, b'p', b'k', b't'];
    sendto(
        fd.as_raw_fd(),
        &packet,
        &dest,
        nix::sys::socket::MsgFlags::empty(),
    )
    .map_err(|e| classify(&io::Error::from(e)))?;
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut buf) {
            // Echo reply: type 0 (ICMP) or 129 (ICMPv6).
            Ok((n, _)) if n >= 8 && (buf[0] == 0 || buf[0] == 129) => return Ok(OK),
            Ok(_) if start.elapsed() < timeout => continue,
            Ok(_) => return Err((TIMED_OUT, "no echo reply".into())),
            Err(e) => return Err(classify(&io::Error::from(e))),
        }
    }
}

fn bridge(args: &[String]) -> u8 {
    use platform::firewall::status::{BridgePaths, ensure_bridge_netfilter};
    let mut paths = BridgePaths::system();
    if let Some(p) = option(args, "--proc-sys-bridge") {
        paths.proc_sys_bridge = PathBuf::from(p);
    }
    if let Some(m) = option(args, "--modprobe") {
        paths.modprobe = PathBuf::from(m);
    }
    match ensure_bridge_netfilter(&paths) {
        Ok(state) => {
            println!("{state:?}");
            OK
        }
        Err(e) => {
            println!("failed closed: {e}");
            REFUSED
        }
    }
}
