//! Reading what the fleet did, as pure functions over what the parts print: nats-server's
//! `/connz` (who is connected where, since when, subscribed to what), the audit set and the
//! agent's NATS sets from `nft -j list ruleset`, RFC 3339 times, and connect-rate buckets.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// One client connection of a node's `/connz?subs=1` that holds an `agent.<id>` subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConn {
    /// The `<id>` of its `agent.<id>` subscription.
    pub agent_id: String,
    /// The client's address as the server saw it.
    pub ip: IpAddr,
    /// When the server accepted the connection (`start`).
    pub start: SystemTime,
}

/// The agents' connections in a `/connz?subs=1` answer; connections without an `agent.<id>`
/// subscription (the director) are left out. An error names what is malformed.
pub fn agent_conns(connz: &Value) -> Result<Vec<AgentConn>, String> {
    let list = connz["connections"]
        .as_array()
        .ok_or_else(|| format!("connz without a connections list: {connz}"))?;
    let mut out = Vec::new();
    for c in list {
        let subs = c["subscriptions_list"].as_array();
        let Some(agent_id) = subs.into_iter().flatten().find_map(|s| {
            s.as_str()?
                .strip_prefix("agent.")
                .filter(|id| !id.is_empty())
                .map(str::to_string)
        }) else {
            continue;
        };
        let ip = c["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("connection without a usable ip: {c}"))?;
        let start = c["start"]
            .as_str()
            .and_then(parse_rfc3339)
            .ok_or_else(|| format!("connection without a usable start: {c}"))?;
        out.push(AgentConn {
            agent_id,
            ip,
            start,
        });
    }
    Ok(out)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (what nats-server prints, Go's RFC3339Nano) as
/// a time; `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let mut n: u32 = frac[..digits].parse().ok()?;
        for _ in digits..9 {
            n *= 10;
        }
        nanos = n;
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let t = rest.get(1..)?;
            if t.len() != 5 || t.as_bytes()[2] != b':' {
                return None;
            }
            let h: i64 = t[0..2].parse().ok()?;
            let m: i64 = t[3..5].parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The elements of set `set` of table `inet <table>` in an `nft -j list ruleset` answer, as
/// (address, port) pairs, sorted; empty when the set is absent or empty. An error names an
/// element that is not an (address, port) concatenation.
pub fn set_elements(ruleset: &Value, table: &str, set: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for obj in ruleset["nftables"].as_array().into_iter().flatten() {
        let Some(s) = obj.get("set") else { continue };
        if s["table"] != table || s["name"] != set || s["family"] != "inet" {
            continue;
        }
        for e in s["elem"].as_array().into_iter().flatten() {
            // Plain `{"concat": [addr, port]}`, or wrapped as `{"elem": {"val": …}}` (with
            // counters or timeouts).
            let c = e
                .get("concat")
                .or_else(|| e.get("elem").and_then(|x| x.get("val")?.get("concat")))
                .ok_or_else(|| format!("element {e} of {table}/{set} is not a concatenation"))?;
            let ip: IpAddr = c[0]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad address in {e} of {table}/{set}"))?;
            let port = c[1]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("bad port in {e} of {table}/{set}"))?;
            out.push(SocketAddr::new(ip, port));
        }
    }
    out.sort();
    Ok(out)
}

/// What one agent's namespace recorded: every (address, port) its TCP SYNs left the namespace
/// for, and the endpoints its NATS rules guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialAudit {
    /// The agent.
    pub agent_id: String,
    /// Where it dialled (the audit sets).
    pub dialled: Vec<SocketAddr>,
    /// What its table guards (`nats_v4` and `nats_v6`).
    pub ruled: Vec<SocketAddr>,
}

impl DialAudit {
    /// Reads the audit from an `nft -j list ruleset` of the agent's namespace.
    pub fn from_ruleset(agent_id: &str, ruleset: &Value) -> Result<Self, String> {
        let mut dialled = set_elements(ruleset, super::AUDIT_TABLE, "dials4")?;
        dialled.extend(set_elements(ruleset, super::AUDIT_TABLE, "dials6")?);
        let mut ruled = set_elements(ruleset, "bosh_agent", "nats_v4")?;
        ruled.extend(set_elements(ruleset, "bosh_agent", "nats_v6")?);
        dialled.sort();
        ruled.sort();
        Ok(DialAudit {
            agent_id: agent_id.to_string(),
            dialled,
            ruled,
        })
    }

    /// The addresses dialled that no rule guards.
    pub fn unruled(&self) -> Vec<SocketAddr> {
        let ruled: BTreeSet<&SocketAddr> = self.ruled.iter().collect();
        self.dialled
            .iter()
            .filter(|a| !ruled.contains(a))
            .copied()
            .collect()
    }
}

/// Connects per `width` bucket from `from` on, up to the last of `times` (times before
/// `from` are left out). Empty when no time is at or after `from`.
pub fn buckets(times: &[SystemTime], from: SystemTime, width: Duration) -> Vec<usize> {
    let w = width.as_nanos().max(1);
    let idx: Vec<usize> = times
        .iter()
        .filter_map(|t| t.duration_since(from).ok())
        .map(|d| usize::try_from(d.as_nanos() / w).unwrap_or(usize::MAX))
        .collect();
    let Some(&last) = idx.iter().max() else {
        return Vec::new();
    };
    let mut out = vec![0usize; last.saturating_add(1).min(1 << 20)];
    for i in idx {
        if let Some(b) = out.get_mut(i) {
            *b += 1;
        }
    }
    out
}

/// Peak, mean and their ratio of a bucket series (the mean over every bucket of the series,
/// empty ones included); zeros for an empty series.
pub fn peak_and_mean(b: &[usize]) -> (usize, f64, f64) {
    if b.is_empty() {
        return (0, 0.0, 0.0);
    }
    let peak = b.iter().copied().max().unwrap_or(0);
    let mean = b.iter().sum::<usize>() as f64 / b.len() as f64;
    let ratio = if mean > 0.0 { peak as f64 / mean } else { 0.0 };
    (peak, mean, ratio)
}

/// Lines of `text` from byte `from` on that contain `needle`: what a log gained since its
/// length was noted. The whole text counts when `from` is past its end or not on a char
/// boundary (the log was rewritten meanwhile).
pub fn count_since(text: &str, from: usize, needle: &str) -> usize {
    text.get(from..)
        .unwrap_or(text)
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// A bucket series as text, one line per bucket: its start in seconds, its count and a bar
/// (one `#` per `per_mark` connects, rounded up, so a non-empty bucket always shows). Empty
/// buckets after the last non-empty one are not in a series ([`buckets`] ends there).
pub fn histogram(b: &[usize], width: Duration, per_mark: usize) -> String {
    let per_mark = per_mark.max(1);
    let mut out = String::new();
    for (i, n) in b.iter().enumerate() {
        let start = width.as_secs_f64() * i as f64;
        let bar = "#".repeat(n.div_ceil(per_mark));
        out.push_str(&format!("{start:6.1} s {n:4} {bar}\n"));
    }
    out
}

/// The times of the SYN-ACKs in `text`, tcpdump's `-tt -n` lines (`<epoch seconds> IP
/// <src>.<port> > <dst>.<port>: Flags [S.], …`), except those sent to `skip` (the director's
/// own connections). A SYN-ACK is the moment the kernel answers a connect, before the server
/// process accepts it. Lines of any other shape are left out.
pub fn syn_ack_times(text: &str, skip: IpAddr) -> Vec<SystemTime> {
    text.lines()
        .filter_map(|line| {
            let mut w = line.split_whitespace();
            let when = epoch_time(w.next()?)?;
            let (_ip, _src, arrow, dst, flags_word, flags) = (
                w.next()?,
                w.next()?,
                w.next()?,
                w.next()?,
                w.next()?,
                w.next()?,
            );
            if arrow != ">" || flags_word != "Flags" || flags != "[S.]," {
                return None;
            }
            let (addr, _port) = dst.strip_suffix(':')?.rsplit_once('.')?;
            if addr.parse::<IpAddr>().ok()? == skip {
                return None;
            }
            Some(when)
        })
        .collect()
}

/// `<seconds>[.<fraction>]` since the epoch, exactly (no float rounding), up to nanoseconds.
fn epoch_time(text: &str) -> Option<SystemTime> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs.parse().ok()?, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn rfc3339_times_parse_with_fractions_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(at(0, 0)));
        // 2026-12-01T15:50:00Z = 1796140200.
        assert_eq!(
            parse_rfc3339("2026-12-01T15:50:00.123456789Z"),
            Some(at(1_796_140_200, 123_456_789))
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T15:50:00.5Z"),
            Some(at(1_796_140_200, 500_000_000))
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T16:50:00.25+01:00"),
            Some(at(1_796_140_200, 250_000_000))
        );
        assert_eq!(
            parse_rfc3339("2026-12-01T14:20:00-01:30"),
            Some(at(1_796_140_200, 0))
        );
        // Leap day and the end of a year.
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(at(1_709_164_800, 0))
        );
        assert_eq!(
            parse_rfc3339("1999-12-31T23:59:59Z"),
            Some(at(946_684_799, 0))
        );
    }

    #[test]
    fn malformed_times_are_refused() {
        for bad in [
            "",
            "2026-12-01",
            "2026-12-01T15:50:00",
            "2026-13-01T15:50:00Z",
            "2026-12-00T15:50:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T15:60:00Z",
            "2026-12-01T15:50:00.Z",
            "2026-12-01T15:50:00.1234567890Z",
            "2026-12-01T15:50:00+0100",
            "2026-12-01T15:50:00+25:00",
            "2026-12-01T15:50:00Q",
            "+026-12-01T15:50:00Z",
            "1969-12-31T23:59:59Z",
            "2026-12-01T15:50:00Zjunk",
            "２０26-12-01T15:50:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn connz_yields_agent_connections_only() {
        let v = json!({"connections": [
            {"cid": 1, "ip": "10.77.1.1", "start": "2026-12-01T15:50:00Z",
             "subscriptions_list": ["_INBOX.x", "agent.fleet-000"]},
            {"cid": 2, "ip": "10.77.0.1", "start": "2026-12-01T15:50:00Z",
             "subscriptions_list": ["hm.agent.heartbeat.*"]},
            {"cid": 3, "ip": "10.77.1.2", "start": "2026-12-01T15:50:01Z"}
        ]});
        let got = agent_conns(&v).expect("parses");
        assert_eq!(
            got,
            vec![AgentConn {
                agent_id: "fleet-000".into(),
                ip: "10.77.1.1".parse().expect("ip"),
                start: at(1_796_140_200, 0),
            }]
        );
        assert!(agent_conns(&json!({})).is_err());
        let bad_start = json!({"connections": [{"ip": "10.77.1.1", "start": "yesterday",
            "subscriptions_list": ["agent.a"]}]});
        let e = agent_conns(&bad_start).expect_err("bad start");
        assert!(e.contains("start"), "{e}");
        let bad_ip = json!({"connections": [{"ip": "x", "start": "2026-12-01T15:50:00Z",
            "subscriptions_list": ["agent.a"]}]});
        assert!(agent_conns(&bad_ip).expect_err("bad ip").contains("ip"));
    }

    fn ruleset() -> Value {
        json!({"nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"set": {"family": "inet", "table": "fleet_audit", "name": "dials4",
                     "elem": [{"concat": ["10.77.0.11", 4222]},
                              {"concat": ["10.78.0.12", 4222]}]}},
            {"set": {"family": "inet", "table": "fleet_audit", "name": "dials6"}},
            {"set": {"family": "inet", "table": "bosh_agent", "name": "nats_v4",
                     "elem": [{"elem": {"val": {"concat": ["10.77.0.12", 4222]}}},
                              {"concat": ["10.77.0.11", 4222]}]}},
            {"set": {"family": "ip", "table": "bosh_agent", "name": "nats_v4",
                     "elem": [{"concat": ["10.78.0.12", 4222]}]}}
        ]})
    }

    #[test]
    fn audit_names_dials_without_a_rule() {
        let a = DialAudit::from_ruleset("fleet-000", &ruleset()).expect("parses");
        assert_eq!(a.dialled.len(), 2);
        assert_eq!(
            a.ruled,
            vec![
                "10.77.0.11:4222".parse().expect("addr"),
                "10.77.0.12:4222".parse().expect("addr")
            ]
        );
        // The `ip` family's set is not the agent's.
        assert_eq!(
            a.unruled(),
            vec!["10.78.0.12:4222".parse::<SocketAddr>().expect("addr")]
        );
        let bad = json!({"nftables": [{"set": {"family": "inet", "table": "fleet_audit",
            "name": "dials4", "elem": ["10.0.0.1"]}}]});
        assert!(DialAudit::from_ruleset("x", &bad).is_err());
    }

    #[test]
    fn buckets_count_from_the_start_and_rate_the_peak() {
        let from = at(100, 0);
        let times = [
            at(99, 0),
            at(100, 0),
            at(100, 50_000_000),
            at(100, 150_000_000),
            at(100, 450_000_000),
        ];
        let b = buckets(&times, from, Duration::from_millis(100));
        assert_eq!(b, vec![2, 1, 0, 0, 1]);
        let (peak, mean, ratio) = peak_and_mean(&b);
        assert_eq!(peak, 2);
        assert!((mean - 0.8).abs() < 1e-9);
        assert!((ratio - 2.5).abs() < 1e-9);
        assert!(buckets(&[at(1, 0)], from, Duration::from_millis(100)).is_empty());
        assert_eq!(peak_and_mean(&[]), (0, 0.0, 0.0));
    }

    #[test]
    fn histograms_show_every_bucket_and_round_bars_up() {
        let h = histogram(&[3, 0, 1], Duration::from_millis(100), 2);
        assert_eq!(h, "   0.0 s    3 ##\n   0.1 s    0 \n   0.2 s    1 #\n");
        assert_eq!(histogram(&[], Duration::from_millis(100), 1), "");
        // A zero scale counts as one connect a mark.
        assert_eq!(
            histogram(&[2], Duration::from_secs(1), 0),
            "   0.0 s    2 ##\n"
        );
    }

    #[test]
    fn counting_lines_since_an_offset() {
        let log = "a dial failed\nok\nb dial failed\nc dial failed\n";
        assert_eq!(count_since(log, 0, "dial failed"), 3);
        let offset = log.find("ok").expect("ok");
        assert_eq!(count_since(log, offset, "dial failed"), 2);
        assert_eq!(count_since(log, log.len(), "dial failed"), 0);
        // An offset past the end (the log was rotated or rewritten) counts the whole text.
        assert_eq!(count_since(log, log.len() + 5, "dial failed"), 3);
        assert_eq!(count_since("é dial failed", 1, "dial failed"), 1);
    }

    #[test]
    fn syn_acks_are_read_from_tcpdump_lines() {
        let text = "\
1764633600.250000 IP 10.77.0.11.4222 > 10.77.1.5.40112: Flags [S.], seq 1, ack 2, win 65160, length 0
1764633600.375500 IP 10.77.0.12.4222 > 10.77.0.1.50000: Flags [S.], seq 1, ack 2, length 0
1764633600.400000 IP 10.77.0.13.4222 > 10.77.2.9.40200: Flags [S], seq 1, length 0
1764633600.500000 IP 10.77.0.13.4222 > 10.77.2.9.40200: Flags [R.], seq 0, length 0
tcpdump: listening on br0, link-type EN10MB (Ethernet), snapshot length 262144 bytes
garbage [S.],
1764633601.000001 IP 10.77.0.13.4222 > 10.77.2.9.40201: Flags [S.], seq 1, ack 2, length 0
";
        let skip = IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 1));
        let got: Vec<Duration> = syn_ack_times(text, skip)
            .into_iter()
            .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default())
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].as_millis(), 1_764_633_600_250);
        assert_eq!(got[1].as_micros(), 1_764_633_601_000_001);
        assert!(syn_ack_times("", skip).is_empty());
    }
}
