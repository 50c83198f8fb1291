//! The alert listener's SMTP session on arbitrary client bytes, over a real loopback socket
//! to the real server (`agent::alerts::serve`). The client sends the bytes, closes its
//! sending side and reads every reply. Checked:
//! - the server answers with a `220` greeting, then exactly one reply per command line (a
//!   multi-line `250-…` reply counts once), each `<3 digits><space or dash>text\r\n` with a
//!   code of the server's vocabulary, and nothing after a closing reply (`221`, `421`,
//!   `451`, a closing `552`);
//! - after a `354`, the lines up to the lone `.` are the mail, and its one reply is `250`
//!   (accepted) or a refusal code; an accepted mail whose fields make an alert delivers that
//!   alert — the same one this target builds from the mail with the public parser — and no
//!   other alert is ever delivered;
//! - the replies stay small: never more than a bounded number of bytes per input line.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use agent::alerts::{Alert, MailParser, serve, to_alert};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{Mutex, mpsc};

struct Server {
    rt: Runtime,
    addr: SocketAddr,
    alerts: Mutex<mpsc::Receiver<Alert>>,
}

const IPS: [&str; 2] = ["10.0.0.9", "10.0.0.10"];

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        // One thread: the session runs only while the client waits, so each input's
        // coverage is its own.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("smtp: a runtime: {e}"));
        // Room for every alert one input can hold (a mail takes more than 8 bytes), so the
        // server never waits on the channel while the client waits on the server.
        let (tx, rx) = mpsc::channel(16 * 1024);
        let addr = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("smtp: binding 127.0.0.1:0: {e}"));
            let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let ips = IPS.iter().map(|s| s.to_string()).collect();
            tokio::spawn(async move {
                let r = serve(listener, ips, tx).await;
                panic!("smtp: the server stopped: {r:?}");
            });
            addr
        });
        Server {
            rt,
            addr,
            alerts: Mutex::new(rx),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    let (replies, reset) = s.rt.block_on(exchange(s.addr, data));
    let mut delivered = Vec::new();
    s.rt.block_on(async {
        let mut rx = s.alerts.lock().await;
        while let Ok(a) = rx.try_recv() {
            delivered.push(a);
        }
    });
    check(data, &replies, reset, &delivered);
});

async fn exchange(addr: SocketAddr, data: &[u8]) -> (Vec<u8>, bool) {
    let mut c = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("smtp: connecting: {e}"));
    let (mut r, mut w) = c.split();
    let mut replies = Vec::new();
    // Reading while writing: a server that stops reading cannot block the client's writes
    // while the client does not read (both buffers full).
    let write = async {
        let ok = w.write_all(data).await.is_ok();
        let _ = w.shutdown().await;
        ok
    };
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return false,
                Ok(n) => replies.extend_from_slice(&buf[..n]),
                // The server closed with unread input (after QUIT or a 421): the kernel
                // resets, and replies still in flight may be lost.
                Err(_) => return true,
            }
            assert!(
                replies.len() < 64 * 1024 + 256 * (data.len() + 1),
                "replies grow without bound"
            );
        }
    };
    let (_, reset) = tokio::join!(write, read);
    (replies, reset)
}

/// A reply (the last line of a multi-line one).
struct Reply {
    code: u16,
}

fn split_replies(bytes: &[u8]) -> (Vec<Reply>, bool) {
    let mut out = Vec::new();
    let text =
        String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| panic!("replies are not UTF-8"));
    let mut lines = text.split_inclusive("\r\n").peekable();
    let mut complete = true;
    while let Some(l) = lines.next() {
        if !l.ends_with("\r\n") {
            complete = false;
            break;
        }
        let b = l.as_bytes();
        assert!(
            b.len() >= 6 && b[..3].iter().all(u8::is_ascii_digit) && (b[3] == b' ' || b[3] == b'-'),
            "malformed reply line {l:?}"
        );
        let code: u16 = l[..3].parse().unwrap_or(0);
        if b[3] == b'-' {
            // Continuation: the final line follows with the same code.
            let next = lines.peek().copied().unwrap_or("");
            if next.is_empty() {
                complete = false;
                break;
            }
            assert!(
                next.starts_with(&l[..3]),
                "multi-line reply changes its code: {l:?} {next:?}"
            );
            continue;
        }
        const CODES: [u16; 15] = [
            220, 221, 250, 252, 214, 354, 421, 451, 452, 500, 501, 503, 552, 211, 0,
        ];
        assert!(CODES.contains(&code), "unexpected reply code in {l:?}");
        out.push(Reply { code });
    }
    (out, complete)
}

/// The client's lines as the server reads them: split on LF, one trailing CR dropped; a last
/// line without LF is never seen (the client closed first).
fn lines(data: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    out.pop();
    out.into_iter()
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect()
}

fn check(data: &[u8], raw: &[u8], reset: bool, delivered: &[Alert]) {
    let (replies, complete) = split_replies(raw);
    assert!(
        complete || reset,
        "a reply was cut short without a reset: {raw:?}"
    );
    let mut replies = replies.into_iter();
    match replies.next() {
        Some(r) => assert_eq!(r.code, 220, "greeting"),
        None => {
            assert!(reset, "no greeting");
            return;
        }
    }
    let ips: Vec<String> = IPS.iter().map(|s| s.to_string()).collect();
    let mut expected_alerts: Vec<Alert> = Vec::new();
    let mut input = lines(data).into_iter();
    let mut closed = false;
    let mut unanswered = 0usize;
    while let Some(line) = input.next() {
        let Some(reply) = replies.next() else {
            unanswered += 1;
            continue;
        };
        assert!(!closed, "a reply after the server closed");
        let command = String::from_utf8_lossy(line).to_ascii_uppercase();
        let verb = command.split(' ').next().unwrap_or("").trim().to_string();
        match reply.code {
            221 => {
                assert_eq!(verb, "QUIT", "221 answers only QUIT");
                closed = true;
            }
            421 => closed = true,
            354 => {
                assert!(verb == "DATA", "354 answers only DATA: {command:?}");
                // The mail: lines up to a lone ".", dot-unstuffed.
                let mut parser = MailParser::new();
                let mut size = 0usize;
                let mut ended = false;
                for l in input.by_ref() {
                    if l == b"." {
                        ended = true;
                        break;
                    }
                    let content = l.strip_prefix(b".").unwrap_or(l);
                    size += content.len() + 2;
                    if size <= agent::alerts::MAX_MESSAGE_BYTES {
                        parser.feed_line(&String::from_utf8_lossy(content));
                    }
                }
                let Some(end) = replies.next() else {
                    // The client closed inside the mail: nothing is delivered, no reply.
                    assert!(!ended || reset, "a finished mail got no reply");
                    break;
                };
                assert!(ended, "a reply to a mail that never ended");
                match end.code {
                    250 => {
                        assert!(size <= agent::alerts::MAX_MESSAGE_BYTES);
                        if let Some(a) = parser.finish().and_then(|m| to_alert(&m, &ips, 0)) {
                            expected_alerts.push(a);
                        }
                    }
                    552 => assert!(
                        size > agent::alerts::MAX_MESSAGE_BYTES,
                        "552 for {size} bytes"
                    ),
                    other => panic!("a mail answered {other}"),
                }
            }
            250 => {
                let ok = ["HELO", "EHLO", "MAIL", "RCPT", "RSET", "NOOP"].contains(&verb.as_str());
                assert!(ok, "250 for {command:?}");
            }
            code => {
                assert!(
                    code >= 400 || code == 252 || code == 214,
                    "{code} for {command:?}"
                );
            }
        }
    }
    // More replies than lines: a command answered twice.
    assert!(replies.next().is_none(), "more replies than command lines");
    if !closed && !reset {
        assert_eq!(unanswered, 0, "{unanswered} command lines got no reply");
    }
    // Alerts: exactly the accepted mails' (the creation time aside: it may be the clock's).
    let strip = |a: &Alert| (a.id.clone(), a.severity, a.title.clone(), a.summary.clone());
    let got: Vec<_> = delivered.iter().map(strip).collect();
    let want: Vec<_> = expected_alerts.iter().map(strip).collect();
    if reset {
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "alerts {got:?} vs {want:?}"
        );
    } else {
        assert_eq!(got, want, "delivered alerts");
    }
}
