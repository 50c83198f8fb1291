//! `netprobe`: the tiny TCP client/server the integration tests run inside their network
//! namespaces and cgroups. A separate binary (not a thread of the test) because what is under
//! test is the cgroup and uid of the *socket's* process, which must be placed by the harness.
//!
//! ```text
//! netprobe listen  <addr>                                   echo server; prints "listening" when ready
//! netprobe connect <addr> [--timeout-ms N]                  exit 0 connected, 1 refused/reset, 2 timed out
//! netprobe chat    <addr> [--messages N] [--interval-ms M] [--timeout-ms T]
//!                                                            one connection, N echo round trips; exit 0 only if all echoed
//! netprobe storm   <addr>[,<addr>…] --stop-file F [--threads N] [--timeout-ms T] [--pause-ms P]
//!                                                            connects to each address in a loop until F exists, then
//!                                                            prints "endpoint=<addr> attempts=A connected=C …" per
//!                                                            address, then the totals "attempts=A connected=C
//!                                                            refused=R timed_out=T other=O"
//! ```
//! Any other failure (bad usage, unexpected socket error, a wrong echo) exits 3, so that the
//! exit codes the tests assert on (0/1/2) cannot be produced by accident.
#![forbid(unsafe_code)]

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const CONNECTED: u8 = 0;
const REFUSED: u8 = 1;
const TIMED_OUT: u8 = 2;
const OTHER: u8 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("listen") => parse_addr(&args).and_then(listen),
        Some("connect") => parse_addr(&args).and_then(|a| connect(a, &args)),
        Some("chat") => parse_addr(&args).and_then(|a| chat(a, &args)),
        Some("storm") => storm(&args),
        _ => Err(Failure::usage(
            "expected listen|connect|chat <addr> [options]",
        )),
    };
    match result {
        Ok(()) => ExitCode::from(CONNECTED),
        Err(f) => {
            eprintln!("netprobe: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A failure and the exit code that classifies it.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: &str) -> Self {
        Failure {
            code: OTHER,
            message: format!("usage: {message}"),
        }
    }

    /// Classifies a socket error: refused and reset are what a REJECT or a closed port give,
    /// a timeout is what a dropped SYN gives; anything else is unexpected.
    fn from_io(what: &str, e: &io::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => REFUSED,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => TIMED_OUT,
            _ => OTHER,
        };
        Failure {
            code,
            message: format!("{what}: {e}"),
        }
    }
}

fn parse_addr(args: &[String]) -> Result<SocketAddr, Failure> {
    let text = args
        .get(1)
        .ok_or_else(|| Failure::usage("missing <addr>"))?;
    text.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Failure::usage(&format!("{text:?} is not an address like 127.0.0.1:2822")))
}

/// The value of `--name N`, or `default` when the option is absent.
fn option(args: &[String], name: &str, default: u64) -> Result<u64, Failure> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Failure::usage(&format!("{name} needs a number"))),
    }
}

fn listen(addr: SocketAddr) -> Result<(), Failure> {
    let listener = TcpListener::bind(addr).map_err(|e| Failure::from_io("bind", &e))?;
    // The harness waits for this line: the socket is bound and listening once it appears.
    let mut out = io::stdout();
    let _ = writeln!(out, "listening");
    let _ = out.flush();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                std::thread::spawn(move || echo(s));
            }
            Err(e) => eprintln!("netprobe: accept: {e}"),
        }
    }
    Ok(())
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn connect(addr: SocketAddr, args: &[String]) -> Result<(), Failure> {
    let timeout = Duration::from_millis(option(args, "--timeout-ms", 1000)?.max(1));
    let start = Instant::now();
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| Failure::from_io("connect", &e))?;
    println!("connected in {} us", start.elapsed().as_micros());
    Ok(())
}

/// Connection attempts as fast as `--threads` threads can make them (each thread takes every
/// address in turn), each with its own timeout, until the stop file appears; then the counts.
fn storm(args: &[String]) -> Result<(), Failure> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let list = args
        .get(1)
        .ok_or_else(|| Failure::usage("missing <addr>[,<addr>]"))?;
    let addrs: Vec<SocketAddr> = list
        .split(',')
        .map(|a| {
            a.parse()
                .map_err(|_| Failure::usage(&format!("{a:?} is not an address")))
        })
        .collect::<Result<_, _>>()?;
    let stop = match args.iter().position(|a| a == "--stop-file") {
        Some(i) => std::path::PathBuf::from(
            args.get(i + 1)
                .ok_or_else(|| Failure::usage("--stop-file needs a path"))?,
        ),
        None => return Err(Failure::usage("storm needs --stop-file")),
    };
    let threads = option(args, "--threads", 2)?.clamp(1, 64);
    let timeout = Duration::from_millis(option(args, "--timeout-ms", 100)?.max(1));
    // A pause between rounds keeps a client that always connects from running out of
    // loopback ports (each closed connection holds one in TIME_WAIT for a minute).
    let pause = Duration::from_millis(option(args, "--pause-ms", 0)?);
    // Per address: attempts, connected, refused, timed out, other.
    let counts: Arc<Vec<[AtomicU64; 5]>> =
        Arc::new(addrs.iter().map(|_| Default::default()).collect());
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (addrs, stop, counts) = (addrs.clone(), stop.clone(), counts.clone());
            std::thread::spawn(move || {
                while !stop.exists() {
                    for (a, counts) in addrs.iter().zip(counts.iter()) {
                        counts[0].fetch_add(1, Ordering::Relaxed);
                        let slot = match TcpStream::connect_timeout(a, timeout) {
                            Ok(_) => 1,
                            Err(e) => match Failure::from_io("connect", &e).code {
                                REFUSED => 2,
                                TIMED_OUT => 3,
                                _ => 4,
                            },
                        };
                        counts[slot].fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(pause);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    // One line per address, then the totals.
    let mut total = [0u64; 5];
    for (a, c) in addrs.iter().zip(counts.iter()) {
        let c: Vec<u64> = c.iter().map(|x| x.load(Ordering::Relaxed)).collect();
        for (t, v) in total.iter_mut().zip(&c) {
            *t += v;
        }
        println!(
            "endpoint={a} attempts={} connected={} refused={} timed_out={} other={}",
            c[0], c[1], c[2], c[3], c[4]
        );
    }
    let c = total;
    println!(
        "attempts={} connected={} refused={} timed_out={} other={}",
        c[0], c[1], c[2], c[3], c[4]
    );
    Ok(())
}

fn chat(addr: SocketAddr, args: &[String]) -> Result<(), Failure> {
    let messages = option(args, "--messages", 10)?;
    let interval = Duration::from_millis(option(args, "--interval-ms", 0)?);
    let timeout = Duration::from_millis(option(args, "--timeout-ms", 2000)?.max(1));
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| Failure::from_io("connect", &e))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| Failure::from_io("socket options", &e))?;
    for i in 0..messages {
        if i > 0 {
            std::thread::sleep(interval);
        }
        let msg = format!("netprobe message {i} of {messages}\n");
        s.write_all(msg.as_bytes())
            .map_err(|e| Failure::from_io(&format!("write of message {i}"), &e))?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).map_err(|e| {
            // A dropped data packet shows as a read timeout; say which round trip stalled.
            Failure::from_io(&format!("echo of message {i} (after {i} round trips)"), &e)
        })?;
        if back != msg.as_bytes() {
            return Err(Failure {
                code: OTHER,
                message: format!(
                    "echo of message {i} differs: {:?}",
                    String::from_utf8_lossy(&back)
                ),
            });
        }
    }
    println!("echoed {messages}/{messages}");
    Ok(())
}
