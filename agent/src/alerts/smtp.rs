//! The SMTP receiver monit mails its alerts to; see the parent module for the bounds it keeps.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::date::now_unix;
use super::mail::{Alert, MailParser, to_alert};
use super::severity::severity_for_event;

/// Where upstream's agent listens for monit's mails (`jobSupervisorListenPort`).
pub const LISTEN_ADDR: &str = "127.0.0.1:2825";

/// Largest mail accepted, counted as received (each line plus CRLF, after dot-unstuffing).
/// Monit's alerts are well under 1 KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Longest command line kept (RFC 5321 allows 512 octets; a longer one is answered with a
/// 500 and its excess discarded unread into memory).
pub const MAX_COMMAND_LINE: usize = 1024;

/// Sessions served at once; a connection beyond this evicts the session idle longest (else
/// the oldest), which gets `421` and is closed.
pub const MAX_SESSIONS: usize = 32;

/// How long the server waits for a line from, or a reply to, a client before closing it.
/// Monit sends each command as soon as it has the previous reply.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a session may last, however busy, so no client keeps a session slot long. Monit
/// delivers an alert in milliseconds.
pub const MAX_SESSION_TIME: Duration = Duration::from_secs(60);

/// First pause before the listener's bind is tried again; it doubles up to
/// [`BIND_RETRY_MAX`].
pub const BIND_RETRY_INITIAL: Duration = Duration::from_millis(250);

/// Longest pause between two tries of the listener's bind.
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(30);

/// The bounds a server applies to its sessions (the constants above; tests shorten them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_sessions: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) session_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: MAX_SESSIONS,
            idle_timeout: IDLE_TIMEOUT,
            session_time: MAX_SESSION_TIME,
        }
    }
}

/// Erroneous commands tolerated in one session before it is closed with `421`.
pub const MAX_ERRORS: u32 = 20;

/// Recipients accepted per mail (the agent ignores them; the bound only stops a flood).
const MAX_RECIPIENTS: usize = 100;

/// Bytes of an oversized mail read and thrown away while waiting for its final `.`; beyond
/// this the session gets `552` at once and is closed, so a sender that never stops is cut off.
const MAX_DISCARD_BYTES: usize = 1024 * 1024;

/// Name the server gives itself in its replies.
const SERVER_NAME: &str = "127.0.0.1";

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error("accepting SMTP connections on {addr}: {source}")]
    Accept { addr: String, source: io::Error },
}

/// Outcome of reading one line with a bound.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line: `len` bytes were received before its LF (a trailing CR is dropped and not
    /// counted); `truncated` when more than the bound arrived, the excess being discarded.
    Line { len: usize, truncated: bool },
    /// The peer closed the connection (a partial last line is dropped).
    Eof,
}

/// Reads one LF-terminated line into `buf`, keeping at most `cap` bytes of it.
///
/// Guarantees `buf.len() <= cap` whatever the peer sends: the excess is consumed from the
/// reader and dropped, never stored.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<LineRead> {
    buf.clear();
    let mut len = 0usize;
    let mut truncated = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(LineRead::Eof);
        }
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = match newline {
            Some(i) => available.get(..i).unwrap_or_default(),
            None => available,
        };
        let room = cap.saturating_sub(buf.len());
        let keep = chunk.get(..room).unwrap_or(chunk);
        buf.extend_from_slice(keep);
        truncated |= keep.len() < chunk.len();
        len = len.saturating_add(chunk.len());
        let consumed = chunk.len() + usize::from(newline.is_some());
        reader.consume(consumed);
        if newline.is_some() {
            break;
        }
    }
    if !truncated && buf.last() == Some(&b'\r') {
        buf.pop();
        len -= 1;
    }
    Ok(LineRead::Line { len, truncated })
}

/// Binds the alert listener on `addr`, trying again with a doubling pause (from `initial` up
/// to `max`, each failure logged) until the bind succeeds: a port held by another process at
/// boot (e.g. a previous agent still exiting) must not leave monit without a listener for the
/// agent's lifetime. It returns only with a listener; it stops with the task that awaits it.
pub async fn bind_with_retry(addr: &str, initial: Duration, max: Duration) -> TcpListener {
    let mut pause = initial;
    let mut failures = 0u32;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                if failures > 0 {
                    info!(%addr, failures, "listening for monit alerts after retrying the bind");
                }
                return listener;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(error = %e, %addr, retry_in = ?pause, "cannot listen for monit alerts; retrying");
                tokio::time::sleep(pause).await;
                pause = pause.saturating_mul(2).min(max);
            }
        }
    }
}

/// One live session, as the accept loop sees it.
struct Entry {
    started: Instant,
    /// Since when the session waits for the client's next command (`None` while it works).
    idle_since: Option<Instant>,
    evict: Arc<Notify>,
}

/// The live sessions: what a new connection beyond the bound evicts from.
#[derive(Default)]
struct Sessions {
    next_id: u64,
    live: HashMap<u64, Entry>,
}

/// A session's place in [`Sessions`]; leaving it (drop) frees the place.
struct Seat {
    id: u64,
    sessions: Arc<Mutex<Sessions>>,
    evict: Arc<Notify>,
}

impl Seat {
    /// Admits a new session. Beyond `max` sessions, the one idle longest — else the oldest —
    /// is told to close and loses its place at once, so the count never exceeds `max` and a
    /// new connection is always served.
    fn admit(sessions: &Arc<Mutex<Sessions>>, max: usize) -> Seat {
        let now = Instant::now();
        let mut s = sessions.lock().unwrap_or_else(|e| e.into_inner());
        while s.live.len() >= max.max(1) {
            let victim = s
                .live
                .iter()
                .filter_map(|(id, e)| e.idle_since.map(|t| (t, *id)))
                .min()
                .or_else(|| s.live.iter().map(|(id, e)| (e.started, *id)).min())
                .map(|(_, id)| id);
            let Some(entry) = victim.and_then(|id| s.live.remove(&id)) else {
                break;
            };
            debug!(
                idle = ?entry.idle_since.map(|t| now.saturating_duration_since(t)),
                "SMTP sessions at the bound: evicting one"
            );
            entry.evict.notify_one();
        }
        let id = s.next_id;
        s.next_id = s.next_id.wrapping_add(1);
        let evict = Arc::new(Notify::new());
        s.live.insert(
            id,
            Entry {
                started: now,
                idle_since: None,
                evict: Arc::clone(&evict),
            },
        );
        Seat {
            id,
            sessions: Arc::clone(sessions),
            evict,
        }
    }

    /// Records whether the session now waits for the client's next command.
    fn set_idle(&self, idle: bool) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = s.live.get_mut(&self.id) {
            e.idle_since = idle.then(Instant::now);
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.live.remove(&self.id);
    }
}

/// Accepts monit's SMTP connections on `listener` and sends each mail's alert to `tx`.
///
/// Guarantees: one session's failure, garbage or stall never stops the server or another
/// session; at most [`MAX_SESSIONS`] sessions are served at once, and a connection beyond
/// that still gets its `220` at once: it evicts the session idle longest, else the oldest
/// (TCP gives no peer uid to bound per user, so sessions are bounded by count and time: each
/// waits at most [`IDLE_TIMEOUT`] for a command and lasts at most [`MAX_SESSION_TIME`]); a
/// mail whose event is ignored, or which has no monit field, is accepted (`250`) and not sent;
/// an alert is acknowledged with `250` only once `tx` has taken it. `ips` are this VM's
/// addresses for alert titles, as the caller knows them when calling.
///
/// Returns `Ok(())` when the receiving end of `tx` is gone (nothing could be delivered any
/// more), and an error only for an accept failure that retrying cannot cure (the listener
/// itself is unusable). Transient accept errors (a connection aborted before it was accepted,
/// running out of file descriptors or memory) are logged and retried after a short pause.
pub async fn serve(
    listener: TcpListener,
    ips: Vec<String>,
    tx: mpsc::Sender<Alert>,
) -> Result<(), AlertsError> {
    serve_with(listener, ips, tx, Limits::default()).await
}

/// [`serve`] with explicit bounds.
pub(crate) async fn serve_with(
    listener: TcpListener,
    ips: Vec<String>,
    tx: mpsc::Sender<Alert>,
    limits: Limits,
) -> Result<(), AlertsError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".to_string());
    let mut ips = ips;
    ips.sort();
    let ips: Arc<[String]> = ips.into();
    let sessions = Arc::new(Mutex::new(Sessions::default()));
    // The sessions are owned by the listener: when it stops (the agent's shutdown drops it),
    // the set aborts them; finished ones are reaped as the loop goes.
    let mut running = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
            () = tx.closed() => return Ok(()),
        };
        match accepted {
            Ok((stream, peer)) => {
                let seat = Seat::admit(&sessions, limits.max_sessions);
                let ips = Arc::clone(&ips);
                let tx = tx.clone();
                let span = info_span!("smtp", %peer);
                running.spawn(
                    async move {
                        let ctx = Ctx {
                            ips: &ips,
                            tx: &tx,
                            limits,
                            seat: &seat,
                        };
                        if let Err(e) = session(stream, &ctx).await {
                            debug!(error = %e, "SMTP session ended with an error");
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) if accept_error_is_fatal(&e) => {
                return Err(AlertsError::Accept { addr, source: e });
            }
            Err(e) => {
                warn!(error = %e, "accepting an SMTP connection failed, retrying");
                // Without a pause, EMFILE would spin: the pending connection stays queued.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What every step of a session needs.
struct Ctx<'a> {
    ips: &'a [String],
    tx: &'a mpsc::Sender<Alert>,
    limits: Limits,
    seat: &'a Seat,
}

/// Errors that mean the listening socket itself is broken, so retrying cannot help.
fn accept_error_is_fatal(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EBADF | Errno::EINVAL | Errno::ENOTSOCK | Errno::EOPNOTSUPP | Errno::EFAULT)
    )
}

/// How a command was answered, for the session's bookkeeping.
enum Next {
    Continue,
    Error,
    Close,
}

/// The SMTP transaction state of one session.
#[derive(Default)]
struct Transaction {
    greeted: bool,
    mail_from: bool,
    recipients: usize,
}

async fn reply(writer: &mut OwnedWriteHalf, text: &str, idle: Duration) -> io::Result<()> {
    match timeout(idle, writer.write_all(text.as_bytes())).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client did not read its reply",
        )),
    }
}

/// Stops sending and, briefly and boundedly, reads and drops what the client still sends.
///
/// Closing a socket with unread input makes the kernel reset the connection, and a reset can
/// reach the client before it has read the last reply; a sender that was flooding the server
/// would then never learn why it was cut off.
async fn linger_close<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    writer: &mut OwnedWriteHalf,
    idle: Duration,
) {
    let _ = timeout(idle, writer.shutdown()).await;
    let _ = timeout(Duration::from_secs(2), async {
        let mut discarded = 0usize;
        while discarded < MAX_DISCARD_BYTES {
            match reader.fill_buf().await {
                Ok(bytes) if !bytes.is_empty() => {
                    let n = bytes.len();
                    reader.consume(n);
                    discarded += n;
                }
                _ => break,
            }
        }
    })
    .await;
}

/// Why a session stopped waiting for a line.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The idle timeout or the session deadline passed.
    TimedOut,
    /// A new connection took the session's place.
    Evicted,
}

/// Reads a line within both the idle timeout and the session deadline, unless the session is
/// evicted first.
async fn read_line_timed<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
    deadline: Instant,
    ctx: &Ctx<'_>,
) -> Result<io::Result<LineRead>, Stop> {
    let until = deadline.min(Instant::now() + ctx.limits.idle_timeout);
    tokio::select! {
        read = timeout_at(until, read_line_bounded(reader, buf, cap)) => read.map_err(|_| Stop::TimedOut),
        () = ctx.seat.evict.notified() => Err(Stop::Evicted),
    }
}

async fn session(stream: TcpStream, ctx: &Ctx<'_>) -> io::Result<()> {
    let idle = ctx.limits.idle_timeout;
    let deadline = Instant::now() + ctx.limits.session_time;
    let (read_half, mut writer) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    let mut state = Transaction::default();
    let mut errors = 0u32;
    reply(
        &mut writer,
        &format!("220 {SERVER_NAME} ESMTP bosh-agent\r\n"),
        idle,
    )
    .await?;
    loop {
        ctx.seat.set_idle(true);
        let read = read_line_timed(&mut reader, &mut line, MAX_COMMAND_LINE, deadline, ctx).await;
        ctx.seat.set_idle(false);
        let read = match read {
            Err(Stop::TimedOut) => {
                return reply(&mut writer, "421 timeout, closing connection\r\n", idle).await;
            }
            Err(Stop::Evicted) => {
                return reply(
                    &mut writer,
                    "421 too many connections, closing an idle one\r\n",
                    idle,
                )
                .await;
            }
            Ok(read) => read?,
        };
        // Checked when the next command arrives, so that every command gets exactly one reply.
        if errors >= MAX_ERRORS && read != LineRead::Eof {
            return reply(
                &mut writer,
                "421 too many errors, closing connection\r\n",
                idle,
            )
            .await;
        }
        let next = match read {
            LineRead::Eof => return Ok(()),
            LineRead::Line {
                truncated: true, ..
            } => {
                reply(&mut writer, "500 line too long\r\n", idle).await?;
                Next::Error
            }
            LineRead::Line { .. } => {
                let command = String::from_utf8_lossy(&line).into_owned();
                command_reply(
                    &command,
                    &mut state,
                    &mut reader,
                    &mut writer,
                    &mut line,
                    deadline,
                    ctx,
                )
                .await?
            }
        };
        match next {
            Next::Continue => {}
            Next::Close => return Ok(()),
            Next::Error => errors += 1,
        }
    }
}

/// Answers one command line.
#[allow(clippy::too_many_arguments)]
async fn command_reply<R: AsyncBufRead + Unpin>(
    command: &str,
    state: &mut Transaction,
    reader: &mut R,
    writer: &mut OwnedWriteHalf,
    line: &mut Vec<u8>,
    deadline: Instant,
    ctx: &Ctx<'_>,
) -> io::Result<Next> {
    let idle = ctx.limits.idle_timeout;
    let (verb, args) = match command.split_once(' ') {
        Some((verb, args)) => (verb, args.trim()),
        None => (command.trim(), ""),
    };
    let (text, next): (String, Next) = match verb.to_ascii_uppercase().as_str() {
        "HELO" | "EHLO" if args.is_empty() => ("501 domain name required".into(), Next::Error),
        "HELO" => {
            *state = Transaction {
                greeted: true,
                ..Transaction::default()
            };
            (format!("250 {SERVER_NAME}"), Next::Continue)
        }
        "EHLO" => {
            *state = Transaction {
                greeted: true,
                ..Transaction::default()
            };
            (
                format!("250-{SERVER_NAME}\r\n250-8BITMIME\r\n250 SIZE {MAX_MESSAGE_BYTES}"),
                Next::Continue,
            )
        }
        "MAIL" if !state.greeted => ("503 send HELO or EHLO first".into(), Next::Error),
        "MAIL" if state.mail_from => ("503 nested MAIL command".into(), Next::Error),
        "MAIL" => match strip_prefix_ignore_case(args, "FROM:") {
            None => ("501 syntax: MAIL FROM:<address>".into(), Next::Error),
            Some(rest) if declared_size(rest).is_some_and(|n| n > MAX_MESSAGE_BYTES) => (
                format!("552 message size exceeds {MAX_MESSAGE_BYTES} bytes"),
                Next::Error,
            ),
            Some(_) => {
                state.mail_from = true;
                state.recipients = 0;
                ("250 OK".into(), Next::Continue)
            }
        },
        "RCPT" if !state.mail_from => ("503 need MAIL before RCPT".into(), Next::Error),
        "RCPT" => match strip_prefix_ignore_case(args, "TO:") {
            None => ("501 syntax: RCPT TO:<address>".into(), Next::Error),
            Some(_) if state.recipients >= MAX_RECIPIENTS => {
                ("452 too many recipients".into(), Next::Continue)
            }
            Some(_) => {
                state.recipients += 1;
                ("250 OK".into(), Next::Continue)
            }
        },
        "DATA" if !args.is_empty() => ("501 DATA takes no argument".into(), Next::Error),
        "DATA" if state.recipients == 0 => ("503 need RCPT before DATA".into(), Next::Error),
        "DATA" => {
            reply(writer, "354 end data with <CR><LF>.<CR><LF>\r\n", idle).await?;
            let outcome = receive_mail(reader, line, deadline, ctx).await?;
            state.mail_from = false;
            state.recipients = 0;
            // The buffer may have grown to a long DATA line; give that memory back.
            line.shrink_to(MAX_COMMAND_LINE);
            match outcome {
                DataOutcome::Accepted => ("250 OK".into(), Next::Continue),
                DataOutcome::TooBig => (
                    format!("552 message exceeds {MAX_MESSAGE_BYTES} bytes"),
                    Next::Error,
                ),
                DataOutcome::Runaway => {
                    reply(
                        writer,
                        &format!("552 message exceeds {MAX_MESSAGE_BYTES} bytes, closing\r\n"),
                        idle,
                    )
                    .await?;
                    linger_close(reader, writer, idle).await;
                    return Ok(Next::Close);
                }
                DataOutcome::Undeliverable => {
                    reply(
                        writer,
                        "451 alerts cannot be delivered now, closing\r\n",
                        idle,
                    )
                    .await?;
                    return Ok(Next::Close);
                }
                DataOutcome::TimedOut => {
                    reply(writer, "421 timeout, closing connection\r\n", idle).await?;
                    return Ok(Next::Close);
                }
                DataOutcome::Evicted => {
                    reply(
                        writer,
                        "421 too many connections, closing the oldest\r\n",
                        idle,
                    )
                    .await?;
                    return Ok(Next::Close);
                }
                DataOutcome::Eof => return Ok(Next::Close),
            }
        }
        "RSET" => {
            state.mail_from = false;
            state.recipients = 0;
            ("250 OK".into(), Next::Continue)
        }
        "NOOP" => ("250 OK".into(), Next::Continue),
        "VRFY" => ("252 cannot verify, send some mail".into(), Next::Continue),
        "HELP" => (
            "214 commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT".into(),
            Next::Continue,
        ),
        "QUIT" => {
            reply(
                writer,
                &format!("221 {SERVER_NAME} closing connection\r\n"),
                idle,
            )
            .await?;
            return Ok(Next::Close);
        }
        _ => ("500 command not recognized".into(), Next::Error),
    };
    reply(writer, &format!("{text}\r\n"), idle).await?;
    Ok(next)
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

/// The `SIZE=n` parameter of a `MAIL FROM:<addr> SIZE=n` command (RFC 1870), if any.
fn declared_size(mail_args: &str) -> Option<usize> {
    mail_args
        .split_ascii_whitespace()
        .skip(1)
        .find_map(|p| strip_prefix_ignore_case(p, "SIZE="))
        // A size too large for usize is surely too large for us.
        .map(|n| n.parse::<usize>().unwrap_or(usize::MAX))
}

enum DataOutcome {
    Accepted,
    TooBig,
    Runaway,
    Undeliverable,
    TimedOut,
    Evicted,
    Eof,
}

/// Reads one mail up to its final `.` line, parsing it line by line.
async fn receive_mail<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    deadline: Instant,
    ctx: &Ctx<'_>,
) -> io::Result<DataOutcome> {
    let (ips, tx) = (ctx.ips, ctx.tx);
    let mut parser = MailParser::new();
    let mut size = 0usize;
    loop {
        // No single line may hold more than the whole message may.
        let read = match read_line_timed(reader, line, MAX_MESSAGE_BYTES, deadline, ctx).await {
            Err(Stop::TimedOut) => return Ok(DataOutcome::TimedOut),
            Err(Stop::Evicted) => return Ok(DataOutcome::Evicted),
            Ok(read) => read?,
        };
        let (len, truncated) = match read {
            LineRead::Eof => return Ok(DataOutcome::Eof),
            LineRead::Line { len, truncated } => (len, truncated),
        };
        if !truncated && line.as_slice() == b"." {
            break;
        }
        // Dot-unstuffing (RFC 5321 §4.5.2): a leading dot was added by the sender.
        let content = match line.first() {
            Some(b'.') => line.get(1..).unwrap_or_default(),
            _ => line.as_slice(),
        };
        size = size.saturating_add(len.saturating_sub(line.len() - content.len()) + 2);
        if size > MAX_MESSAGE_BYTES {
            if size > MAX_MESSAGE_BYTES + MAX_DISCARD_BYTES {
                return Ok(DataOutcome::Runaway);
            }
            continue;
        }
        parser.feed_line(&String::from_utf8_lossy(content));
    }
    if size > MAX_MESSAGE_BYTES {
        debug!(size, "oversized mail rejected");
        return Ok(DataOutcome::TooBig);
    }
    let Some(mail) = parser.finish() else {
        debug!("mail without monit fields ignored");
        return Ok(DataOutcome::Accepted);
    };
    let (severity, known) = severity_for_event(&mail.event);
    if !known {
        error!(
            event = %mail.event,
            severity = severity.code(),
            "unknown monit event name, using the default severity"
        );
    }
    let Some(alert) = to_alert(&mail, ips, now_unix()) else {
        debug!(event = %mail.event, "ignored monit event");
        return Ok(DataOutcome::Accepted);
    };
    match tx.send(alert).await {
        Ok(()) => Ok(DataOutcome::Accepted),
        Err(_) => Ok(DataOutcome::Undeliverable),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::alerts::mail::MAIL;

    #[tokio::test]
    async fn bounded_reader_never_stores_more_than_its_cap() {
        let mut input: Vec<u8> = vec![b'x'; 1 << 20];
        input.extend_from_slice(b"\r\nshort\r\nbare\nlast");
        let mut reader = BufReader::new(input.as_slice());
        let mut buf = Vec::new();
        let first = read_line_bounded(&mut reader, &mut buf, 100).await.unwrap();
        assert_eq!(
            first,
            LineRead::Line {
                len: (1 << 20) + 1,
                truncated: true
            }
        );
        assert_eq!(buf.len(), 100);
        let second = read_line_bounded(&mut reader, &mut buf, 100).await.unwrap();
        assert_eq!(
            second,
            LineRead::Line {
                len: 5,
                truncated: false
            }
        );
        assert_eq!(buf, b"short");
        read_line_bounded(&mut reader, &mut buf, 100).await.unwrap();
        assert_eq!(buf, b"bare");
        // A last line without LF is the peer closing mid-line.
        assert_eq!(
            read_line_bounded(&mut reader, &mut buf, 100).await.unwrap(),
            LineRead::Eof
        );
    }

    struct Client {
        reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
        writer: OwnedWriteHalf,
    }

    impl Client {
        async fn connect(addr: std::net::SocketAddr) -> Client {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (r, w) = stream.into_split();
            Client {
                reader: BufReader::new(r),
                writer: w,
            }
        }

        /// Reads one reply (all its lines); returns the code of the last line and the text.
        async fn reply(&mut self) -> (u16, String) {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                let n = timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "server closed the connection; so far {all:?}");
                all.push_str(&line);
                if line.as_bytes().get(3) != Some(&b'-') {
                    return (line.get(..3).unwrap().parse().unwrap(), all);
                }
            }
        }

        async fn send(&mut self, raw: &[u8]) {
            self.writer.write_all(raw).await.unwrap();
        }

        async fn cmd(&mut self, line: &str) -> u16 {
            self.send(format!("{line}\r\n").as_bytes()).await;
            self.reply().await.0
        }

        async fn mail(&mut self, body: &str) -> u16 {
            assert_eq!(self.cmd("MAIL FROM:<monit@localhost>").await, 250);
            assert_eq!(self.cmd("RCPT TO:<agent@local>").await, 250);
            assert_eq!(self.cmd("DATA").await, 354);
            let mut data = String::new();
            for line in body.lines() {
                // Dot-stuffing, as a client must.
                if line.starts_with('.') {
                    data.push('.');
                }
                data.push_str(line);
                data.push_str("\r\n");
            }
            data.push_str(".\r\n");
            self.send(data.as_bytes()).await;
            self.reply().await.0
        }
    }

    async fn start(ips: Vec<String>) -> (std::net::SocketAddr, mpsc::Receiver<Alert>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve(listener, ips, tx));
        (addr, rx)
    }

    async fn next_alert(rx: &mut mpsc::Receiver<Alert>) -> Alert {
        timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn two_mails_in_one_session_become_two_alerts() {
        let (addr, mut rx) = start(vec!["10.0.0.5".into(), "10.0.0.10".into()]).await;
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        c.send(b"EHLO monit\r\n").await;
        let (code, text) = c.reply().await;
        assert_eq!(code, 250);
        assert!(text.contains("SIZE 65536"), "{text}");

        assert_eq!(c.mail(MAIL).await, 250);
        let second = "Message-id: <2@localhost>\n\
                      Service: web\n\
                      Event: Execution failed\n\
                      Action: alert\n\
                      Date: not a date\n\
                      ..dotted line that must not confuse the parser\n\
                      Description: failed to start\n";
        assert_eq!(c.mail(second).await, 250);
        // An ignored event is accepted and not sent.
        assert_eq!(c.mail("Service: web\nEvent: action done\n").await, 250);
        assert_eq!(c.cmd("NOOP").await, 250);
        assert_eq!(c.cmd("RSET").await, 250);
        assert_eq!(c.cmd("QUIT").await, 221);

        let a = next_alert(&mut rx).await;
        assert_eq!(a.id, "1304319946.0@localhost");
        assert_eq!(a.severity, 1);
        assert_eq!(
            a.title,
            "nats (10.0.0.10, 10.0.0.5) - does not exist - restart"
        );
        assert_eq!(a.summary, "process is not running");
        assert_eq!(a.created_at, 1_795_316_400);
        let b = next_alert(&mut rx).await;
        assert_eq!(b.id, "2@localhost");
        assert_eq!(b.severity, 1);
        assert_eq!(
            b.title,
            "web (10.0.0.10, 10.0.0.5) - Execution failed - alert"
        );
        assert!((b.created_at - now_unix()).abs() < 60, "{b:?}");
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn garbage_gets_5xx_and_the_server_keeps_serving() {
        let (addr, mut rx) = start(vec![]).await;
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        assert_eq!(c.cmd("MAIL FROM:<x>").await, 503); // before HELO
        assert_eq!(c.cmd("FOO bar").await, 500);
        assert_eq!(c.cmd("").await, 500);
        c.send(b"\xff\xfe\x00binary\r\n").await;
        assert_eq!(c.reply().await.0, 500);
        assert_eq!(c.cmd("HELO").await, 501);
        assert_eq!(c.cmd("helo monit").await, 250);
        assert_eq!(c.cmd("RCPT TO:<x>").await, 503);
        assert_eq!(c.cmd("DATA").await, 503);
        assert_eq!(c.cmd("MAIL TO:<x>").await, 501);
        assert_eq!(c.cmd("MAIL FROM:<x> SIZE=999999999").await, 552);
        assert_eq!(c.cmd("MAIL FROM:<x>").await, 250);
        assert_eq!(c.cmd("MAIL FROM:<x>").await, 503);
        assert_eq!(c.cmd(&"A".repeat(100_000)).await, 500);
        assert_eq!(c.cmd("NOOP").await, 250);
        // Too many errors: the session is closed with 421.
        let mut last = 0;
        for _ in 0..MAX_ERRORS {
            last = c.cmd("BOGUS").await;
            if last == 421 {
                break;
            }
        }
        assert_eq!(last, 421);

        // A client that connects and vanishes.
        drop(TcpStream::connect(addr).await.unwrap());

        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        assert_eq!(c.cmd("HELO monit").await, 250);
        assert_eq!(
            c.mail("Service: s\nEvent: pid failed\nAction: alert\n")
                .await,
            250
        );
        assert_eq!(next_alert(&mut rx).await.title, "s - pid failed - alert");
    }

    #[tokio::test]
    async fn oversized_mail_is_rejected_and_the_session_goes_on() {
        let (addr, mut rx) = start(vec![]).await;
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        assert_eq!(c.cmd("EHLO monit").await, 250);
        assert_eq!(c.cmd("MAIL FROM:<m>").await, 250);
        assert_eq!(c.cmd("RCPT TO:<a>").await, 250);
        assert_eq!(c.cmd("DATA").await, 354);
        let mut big = String::from("Service: big\r\nEvent: pid failed\r\n");
        for _ in 0..200 {
            big.push_str(&"y".repeat(999));
            big.push_str("\r\n");
        }
        // One line longer than the whole limit too.
        big.push_str(&"z".repeat(MAX_MESSAGE_BYTES * 2));
        big.push_str("\r\n.\r\n");
        c.send(big.as_bytes()).await;
        assert_eq!(c.reply().await.0, 552);
        assert_eq!(c.cmd("NOOP").await, 250);
        assert_eq!(
            c.mail("Service: small\nEvent: pid failed\nAction: a\n")
                .await,
            250
        );
        assert_eq!(next_alert(&mut rx).await.title, "small - pid failed - a");
        assert!(rx.try_recv().is_err());

        // A sender that never ends its mail is cut off after a bounded amount.
        assert_eq!(c.cmd("MAIL FROM:<m>").await, 250);
        assert_eq!(c.cmd("RCPT TO:<a>").await, 250);
        assert_eq!(c.cmd("DATA").await, 354);
        let chunk = format!("{}\r\n", "w".repeat(8190));
        let mut writer = c.writer;
        let flood = tokio::spawn(async move {
            let mut sent = 0;
            while sent < 4 * (MAX_MESSAGE_BYTES + MAX_DISCARD_BYTES) {
                if writer.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
        });
        let mut line = String::new();
        timeout(Duration::from_secs(10), c.reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert!(line.starts_with("552"), "{line:?}");
        flood.abort();
    }

    async fn start_with(limits: Limits) -> (std::net::SocketAddr, mpsc::Receiver<Alert>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(serve_with(listener, vec![], tx, limits));
        (addr, rx)
    }

    #[tokio::test]
    async fn held_idle_sessions_cannot_lock_monit_out() {
        let (addr, mut rx) = start(vec![]).await;
        let mut held = Vec::new();
        for _ in 0..MAX_SESSIONS + 8 {
            let mut c = Client::connect(addr).await;
            assert_eq!(c.reply().await.0, 220);
            held.push(c);
        }
        // A new session beyond the bound is greeted (not refused with 421) and delivers its mail.
        let mut monit = Client::connect(addr).await;
        assert_eq!(monit.reply().await.0, 220);
        assert_eq!(monit.cmd("HELO monit").await, 250);
        assert_eq!(
            monit
                .mail("Service: web\nEvent: pid failed\nAction: alert\n")
                .await,
            250
        );
        assert_eq!(next_alert(&mut rx).await.title, "web - pid failed - alert");
        // The evicted sessions were the idle ones, told why; never more than the bound live.
        let mut evicted = 0;
        for c in &mut held {
            let mut line = String::new();
            if let Ok(Ok(n)) =
                timeout(Duration::from_millis(200), c.reader.read_line(&mut line)).await
                && n > 0
            {
                assert!(line.starts_with("421"), "{line:?}");
                evicted += 1;
            }
        }
        assert_eq!(evicted, 9, "8 held beyond the bound and one for monit");
        assert_eq!(monit.cmd("QUIT").await, 221);
    }

    #[tokio::test]
    async fn an_idle_session_is_closed_after_the_idle_timeout() {
        let limits = Limits {
            max_sessions: 4,
            idle_timeout: Duration::from_millis(300),
            session_time: Duration::from_secs(30),
        };
        let (addr, _rx) = start_with(limits).await;
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        let begun = std::time::Instant::now();
        let (code, text) = c.reply().await;
        assert_eq!(code, 421, "{text}");
        let waited = begun.elapsed();
        // Not before the idle timeout (how much later depends on the machine's load).
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        let mut rest = String::new();
        let n = timeout(Duration::from_secs(2), c.reader.read_line(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "closed after the 421: {rest:?}");
    }

    #[tokio::test]
    async fn a_busy_session_is_closed_at_the_session_bound() {
        let limits = Limits {
            max_sessions: 4,
            idle_timeout: Duration::from_millis(300),
            session_time: Duration::from_millis(800),
        };
        let (addr, _rx) = start_with(limits).await;
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
        let begun = std::time::Instant::now();
        let last = loop {
            let code = c.cmd("NOOP").await;
            if code != 250 || begun.elapsed() > Duration::from_secs(5) {
                break code;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // A busy session is cut by the session bound, not by the idle timeout.
        assert_eq!(last, 421);
    }

    #[tokio::test]
    async fn a_failed_bind_is_retried_until_the_listener_comes_up() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        let binding = tokio::spawn(async move {
            bind_with_retry(
                &addr.to_string(),
                Duration::from_millis(50),
                Duration::from_millis(200),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !binding.is_finished(),
            "the port is held: the bind cannot succeed yet"
        );
        drop(holder);
        let listener = timeout(Duration::from_secs(3), binding)
            .await
            .expect("the bind is retried after the port is released")
            .unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        let (tx, _rx) = mpsc::channel(1);
        tokio::spawn(serve(listener, vec![], tx));
        let mut c = Client::connect(addr).await;
        assert_eq!(c.reply().await.0, 220);
    }

    #[tokio::test]
    async fn serve_returns_when_the_receiver_is_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let result = timeout(Duration::from_secs(5), serve(listener, vec![], tx))
            .await
            .unwrap();
        assert!(result.is_ok());
    }
}
