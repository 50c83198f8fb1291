//! Talking to nf_tables over netlink in-process, for the two hot paths where spawning `nft`
//! (3–4 ms of process start-up, and ~10 µs of parsing per set element) dominated:
//! - reading the rules of one chain (kernel handle and comment): what `firewall-allow` and the
//!   prune plan with;
//! - adding elements to the NATS sets, one batch (one transaction), before a connection
//!   attempt: flat in the number of endpoints.
//!
//! Rules are still only ever written by `nft -f -` (the JSON API and netlink crates cannot
//! express `socket cgroupv2`, and nft validates what it writes); callers fall back to `nft` for
//! anything this module reports as an error.
//!
//! The messages are built and parsed by hand (no netlink crate in the tree): a GETCHAIN
//! request tells whether the chain exists, a GETRULE dump filtered by table and chain lists its
//! rules. Parsing is pure and bounds-checked; anything unexpected is an error the caller can
//! answer by falling back to `nft`.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;
/// Elements per NEWSETELEM message: keeps the nested list under netlink's 64 KiB attribute
/// length (an IPv6 element takes 32 bytes).
const ELEMENTS_PER_MESSAGE: usize = 1024;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFPROTO_INET: u8 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_USERDATA: u16 = 7;
/// libnftnl's tag for a rule comment inside the rule's user data.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const ENOENT: i32 = 2;
/// Bounds each read from the kernel.
const RECV_TIMEOUT_SECS: i64 = 2;
/// Bounds the messages read for one request (a chain of ~10,000 rules fits many times).
const MAX_DATAGRAMS: usize = 100_000;

/// A rule as the kernel holds it: its handle and its comment, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule {
    pub handle: u64,
    pub comment: Option<String>,
}

/// Why the netlink read failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[from] nix::Error),
    #[error("nf_tables answered error {0}")]
    Kernel(i32),
    #[error("unexpected netlink answer: {0}")]
    Protocol(&'static str),
}

/// Whether table `inet <table>` exists: one request, no process spawned.
pub fn table_exists(table: &str) -> Result<bool, NetlinkError> {
    let fd = open()?;
    send(
        &fd,
        &request(
            NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            1,
            &[(NFTA_TABLE_NAME, table)],
        ),
    )?;
    let mut found = false;
    match read_until_done(&fd, 1, |kind, _| {
        found |= kind == msg_type(NFT_MSG_NEWTABLE);
        Ok(())
    }) {
        Err(NetlinkError::Kernel(ENOENT)) => Ok(false),
        Err(e) => Err(e),
        Ok(()) if found => Ok(true),
        Ok(()) => Err(NetlinkError::Protocol("no table in the answer")),
    }
}

/// The rules of `chain` in table `inet <table>`, in chain order; `Ok(None)` when the table or
/// the chain does not exist.
pub fn chain_rules(table: &str, chain: &str) -> Result<Option<Vec<KernelRule>>, NetlinkError> {
    let fd = open()?;
    let get_chain = request(
        NFT_MSG_GETCHAIN,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        &[(NFTA_CHAIN_TABLE, table), (NFTA_CHAIN_NAME, chain)],
    );
    send(&fd, &get_chain)?;
    let mut chain_found = false;
    let exists = read_until_done(&fd, 1, |kind, _| {
        chain_found |= kind == msg_type(NFT_MSG_NEWCHAIN);
        Ok(())
    });
    match exists {
        Err(NetlinkError::Kernel(ENOENT)) => return Ok(None),
        Err(e) => return Err(e),
        Ok(()) if !chain_found => return Err(NetlinkError::Protocol("no chain in the answer")),
        Ok(()) => {}
    }
    let dump = request(
        NFT_MSG_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP,
        2,
        &[(NFTA_RULE_TABLE, table), (NFTA_RULE_CHAIN, chain)],
    );
    send(&fd, &dump)?;
    let mut rules = Vec::new();
    match read_until_done(&fd, 2, |kind, payload| {
        if kind == msg_type(NFT_MSG_NEWRULE) {
            rules.push(parse_rule(payload)?);
        }
        Ok(())
    }) {
        // The chain went away between the two requests.
        Err(NetlinkError::Kernel(ENOENT)) => Ok(None),
        Err(e) => Err(e),
        Ok(()) => Ok(Some(rules)),
    }
}

/// Adds `endpoints` to the `ipv4_addr . inet_service` / `ipv6_addr . inet_service` sets
/// `set_v4` / `set_v6` of table `inet <table>`, all in one batch: one kernel transaction, all
/// or nothing. Adding an element that exists is not an error. Nothing is deleted, so nothing
/// waits on the kernel.
pub fn add_endpoints(
    table: &str,
    set_v4: &str,
    set_v6: &str,
    endpoints: &[std::net::SocketAddr],
) -> Result<(), NetlinkError> {
    let batch = endpoint_batch(table, set_v4, set_v6, endpoints, 1);
    if batch.acks.is_empty() {
        return Ok(());
    }
    let fd = open()?;
    send(&fd, &batch.bytes)?;
    read_acks(&fd, batch.acks)
}

/// Waits until every message in `pending` is acknowledged; an error for any of them (the
/// kernel then aborts the whole batch) is returned.
fn read_acks(fd: &OwnedFd, mut pending: Vec<u32>) -> Result<(), NetlinkError> {
    if pending.is_empty() {
        return Ok(());
    }
    read_messages(fd, |kind, seq, payload| {
        if kind != NLMSG_ERROR {
            return Ok(false);
        }
        ack_code(payload)?;
        pending.retain(|s| *s != seq);
        Ok(pending.is_empty())
    })
}

/// A batch and the sequence numbers of the messages to be acknowledged.
struct Batch {
    bytes: Vec<u8>,
    acks: Vec<u32>,
}

/// The batch for [`add_endpoints`], sequence numbers from `seq`. Pure.
fn endpoint_batch(
    table: &str,
    set_v4: &str,
    set_v6: &str,
    endpoints: &[std::net::SocketAddr],
    mut seq: u32,
) -> Batch {
    let mut bytes = Vec::new();
    let mut acks = Vec::new();
    let v4: Vec<Vec<u8>> = endpoints
        .iter()
        .filter(|e| e.is_ipv4())
        .map(endpoint_key)
        .collect();
    let v6: Vec<Vec<u8>> = endpoints
        .iter()
        .filter(|e| e.is_ipv6())
        .map(endpoint_key)
        .collect();
    if v4.is_empty() && v6.is_empty() {
        return Batch { bytes, acks };
    }
    bytes.extend(batch_marker(NFNL_MSG_BATCH_BEGIN, seq));
    seq += 1;
    for (set, keys) in [(set_v4, &v4), (set_v6, &v6)] {
        for chunk in keys.chunks(ELEMENTS_PER_MESSAGE) {
            let mut elements = Vec::new();
            for key in chunk {
                let value = attr(NFTA_DATA_VALUE, key);
                let key_nest = attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, &value);
                elements.extend(attr(NFTA_LIST_ELEM | NLA_F_NESTED, &key_nest));
            }
            let mut body = vec![NFPROTO_INET, 0, 0, 0];
            body.extend(attr(NFTA_SET_ELEM_LIST_TABLE, &c_string(table)));
            body.extend(attr(NFTA_SET_ELEM_LIST_SET, &c_string(set)));
            body.extend(attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &elements));
            bytes.extend(message(
                msg_type(NFT_MSG_NEWSETELEM),
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
                seq,
                &body,
            ));
            acks.push(seq);
            seq += 1;
        }
    }
    bytes.extend(batch_marker(NFNL_MSG_BATCH_END, seq));
    Batch { bytes, acks }
}

/// The key of a concatenation `addr . port`: each field padded to 4 bytes, network order.
fn endpoint_key(e: &std::net::SocketAddr) -> Vec<u8> {
    let mut k = match e.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    k.extend_from_slice(&e.port().to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    k
}

/// A batch begin or end: nfgenmsg with the subsystem in `res_id` (network order).
fn batch_marker(kind: u16, seq: u32) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
    message(kind, NLM_F_REQUEST, seq, &body)
}

/// nlmsghdr + body.
fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(16 + body.len()).unwrap_or(u32::MAX);
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

/// One attribute, padded to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
    let mut a = Vec::with_capacity(4 + value.len() + 3);
    a.extend_from_slice(&len.to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// An nfnetlink socket whose reads give up after [`RECV_TIMEOUT_SECS`] (the caller then falls back
/// to `nft`) instead of blocking forever.
fn open() -> Result<OwnedFd, NetlinkError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(RECV_TIMEOUT_SECS, 0),
    )?;
    Ok(fd)
}

fn send(fd: &OwnedFd, msg: &[u8]) -> Result<(), NetlinkError> {
    sendto(
        fd.as_raw_fd(),
        msg,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    Ok(())
}

/// One request: nlmsghdr, nfgenmsg (family inet), and NUL-terminated string attributes.
fn request(msg: u16, flags: u16, seq: u32, attrs: &[(u16, &str)]) -> Vec<u8> {
    let mut body = vec![NFPROTO_INET, 0, 0, 0]; // nfgenmsg: family, version 0, res_id 0
    for (kind, value) in attrs {
        body.extend(attr(*kind, &c_string(value)));
    }
    message(msg_type(msg), flags, seq, &body)
}

/// Reads answers to request `seq` until its end (an ack, `NLMSG_DONE`, or an error), handing
/// every other message (type, payload after the 16-byte header) to `each`.
fn read_until_done(
    fd: &OwnedFd,
    seq: u32,
    mut each: impl FnMut(u16, &[u8]) -> Result<(), NetlinkError>,
) -> Result<(), NetlinkError> {
    read_messages(fd, |kind, msg_seq, payload| {
        if msg_seq != seq {
            return Ok(false);
        }
        match kind {
            NLMSG_ERROR => ack_code(payload).map(|()| true),
            // A dump that failed midway says so here.
            NLMSG_DONE => ack_code(payload)
                .or_else(|e| match e {
                    NetlinkError::Protocol(_) => Ok(()),
                    e => Err(e),
                })
                .map(|()| true),
            _ => each(kind, payload).map(|()| false),
        }
    })
}

/// Reads datagrams, handing each message (type, seq, payload) to `on` until it says the
/// answer is complete. Messages sharing a datagram are all seen; reads are bounded.
fn read_messages(
    fd: &OwnedFd,
    mut on: impl FnMut(u16, u32, &[u8]) -> Result<bool, NetlinkError>,
) -> Result<(), NetlinkError> {
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_DATAGRAMS {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut rest = buf.get(..n).ok_or(NetlinkError::Protocol("short read"))?;
        while !rest.is_empty() {
            let (kind, seq, payload, next) = split_message(rest)?;
            rest = next;
            if on(kind, seq, payload)? {
                return Ok(());
            }
        }
    }
    Err(NetlinkError::Protocol("the answer did not end"))
}

/// The errno in an `NLMSG_ERROR` / `NLMSG_DONE` payload: 0 is success.
fn ack_code(payload: &[u8]) -> Result<(), NetlinkError> {
    match read_i32(payload, 0)? {
        0 => Ok(()),
        code => Err(NetlinkError::Kernel(code.saturating_neg())),
    }
}

/// One message split off a datagram: type, sequence number, payload, and what follows.
type Split<'a> = (u16, u32, &'a [u8], &'a [u8]);

/// Splits one message off `buf`. Pure.
fn split_message(buf: &[u8]) -> Result<Split<'_>, NetlinkError> {
    let len = read_u32(buf, 0)? as usize;
    if len < 16 || len > buf.len() {
        return Err(NetlinkError::Protocol("bad message length"));
    }
    let kind = read_u16(buf, 4)?;
    let seq = read_u32(buf, 8)?;
    let next = len.next_multiple_of(4).min(buf.len());
    Ok((kind, seq, &buf[16..len], &buf[next..]))
}

/// Handle and comment of a NEWRULE message's payload (nfgenmsg + attributes). Pure.
fn parse_rule(payload: &[u8]) -> Result<KernelRule, NetlinkError> {
    let mut attrs = payload
        .get(4..)
        .ok_or(NetlinkError::Protocol("rule without nfgenmsg"))?;
    let (mut handle, mut comment) = (None, None);
    while attrs.len() >= 4 {
        let len = usize::from(read_u16(attrs, 0)?);
        let kind = read_u16(attrs, 2)? & 0x3fff; // without the nested / byte-order flags
        if len < 4 || len > attrs.len() {
            return Err(NetlinkError::Protocol("bad attribute length"));
        }
        let value = &attrs[4..len];
        match kind {
            NFTA_RULE_HANDLE => {
                let b: [u8; 8] = value
                    .try_into()
                    .map_err(|_| NetlinkError::Protocol("handle is not 8 bytes"))?;
                handle = Some(u64::from_be_bytes(b));
            }
            NFTA_RULE_USERDATA => comment = udata_comment(value),
            _ => {}
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    Ok(KernelRule {
        handle: handle.ok_or(NetlinkError::Protocol("rule without a handle"))?,
        comment,
    })
}

/// The comment in a rule's user data (libnftnl's TLVs: type, length, value). Pure.
fn udata_comment(mut udata: &[u8]) -> Option<String> {
    while udata.len() >= 2 {
        let (kind, len) = (udata[0], usize::from(udata[1]));
        let value = udata.get(2..2 + len)?;
        if kind == NFTNL_UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = &udata[2 + len..];
    }
    None
}

fn read_u16(b: &[u8], at: usize) -> Result<u16, NetlinkError> {
    b.get(at..at + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
        .ok_or(NetlinkError::Protocol("truncated"))
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, NetlinkError> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(NetlinkError::Protocol("truncated"))
}

fn read_i32(b: &[u8], at: usize) -> Result<i32, NetlinkError> {
    read_u32(b, at).map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rule_payload(handle: u64, comment: Option<&str>) -> Vec<u8> {
        let mut p = vec![NFPROTO_INET, 0, 0, 0];
        p.extend(attr(NFTA_RULE_TABLE, b"bosh_agent\0"));
        p.extend(attr(NFTA_RULE_HANDLE, &handle.to_be_bytes()));
        p.extend(attr(NFTA_RULE_CHAIN | 0x8000, b"x\0"));
        if let Some(c) = comment {
            let mut u = vec![NFTNL_UDATA_RULE_COMMENT, (c.len() + 1) as u8];
            u.extend_from_slice(c.as_bytes());
            u.push(0);
            p.extend(attr(NFTA_RULE_USERDATA, &u));
        }
        p
    }

    #[test]
    fn rules_give_their_handle_and_comment() {
        let r = parse_rule(&rule_payload(42, Some("bosh-monit-access:web cgid=7"))).unwrap();
        assert_eq!(
            r,
            KernelRule {
                handle: 42,
                comment: Some("bosh-monit-access:web cgid=7".into())
            }
        );
        assert_eq!(parse_rule(&rule_payload(3, None)).unwrap().comment, None);
    }

    #[test]
    fn malformed_rules_are_errors_not_panics() {
        assert!(parse_rule(&[]).is_err());
        assert!(parse_rule(&[1, 0, 0, 0]).is_err(), "no handle");
        let mut p = rule_payload(1, None);
        p.truncate(p.len() - 3);
        assert!(parse_rule(&p).is_err(), "truncated attribute");
        let mut bad_len = vec![1, 0, 0, 0];
        bad_len.extend(attr(NFTA_RULE_HANDLE, &[1, 2, 3]));
        assert!(parse_rule(&bad_len).is_err(), "handle of 3 bytes");
        assert_eq!(udata_comment(&[0, 200, b'a']), None, "overlong comment");
        assert_eq!(
            udata_comment(&[5, 1, b'a', 0, 2, b'h', 0]),
            Some("h".into())
        );
    }

    #[test]
    fn endpoint_keys_pad_each_field_to_four_bytes() {
        let v4: std::net::SocketAddr = "10.0.0.5:4222".parse().unwrap();
        assert_eq!(endpoint_key(&v4), [10, 0, 0, 5, 0x10, 0x7e, 0, 0]);
        let v6: std::net::SocketAddr = "[2001:db8::1]:4223".parse().unwrap();
        let k = endpoint_key(&v6);
        assert_eq!(k.len(), 20);
        assert_eq!(&k[16..], [0x10, 0x7f, 0, 0]);
    }

    #[test]
    fn endpoint_batches_are_framed_and_chunked() {
        let none = endpoint_batch("t", "a", "b", &[], 1);
        assert!(none.bytes.is_empty() && none.acks.is_empty());
        let eps: Vec<std::net::SocketAddr> = (0..2500u32)
            .map(|i| std::net::SocketAddr::from((i.to_be_bytes(), 4222)))
            .chain(std::iter::once("[::1]:4222".parse().unwrap()))
            .collect();
        let b = endpoint_batch("bosh_agent", "nats_v4", "nats_v6", &eps, 7);
        // 2,500 IPv4 elements in 3 messages, 1 IPv6 message, between begin (7) and end.
        assert_eq!(b.acks, vec![8, 9, 10, 11]);
        let mut rest = &b.bytes[..];
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let (kind, seq, payload, next) = split_message(rest).unwrap();
            kinds.push((kind, seq));
            if kind == msg_type(NFT_MSG_NEWSETELEM) {
                // The nested element list stays under the 64 KiB attribute limit.
                assert!(payload.len() < 65_535, "{}", payload.len());
            }
            rest = next;
        }
        assert_eq!(kinds.first(), Some(&(NFNL_MSG_BATCH_BEGIN, 7)));
        assert_eq!(kinds.last(), Some(&(NFNL_MSG_BATCH_END, 12)));
        assert_eq!(kinds.len(), 6);
    }

    #[test]
    fn messages_split_on_their_length() {
        let mut m = request(NFT_MSG_GETRULE, NLM_F_REQUEST, 9, &[(1, "bosh_agent")]);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(read_u32(&m, 0).unwrap() as usize, m.len());
        let first = m.len();
        m.extend(request(NFT_MSG_GETCHAIN, NLM_F_REQUEST, 10, &[]));
        let (kind, seq, payload, rest) = split_message(&m).unwrap();
        assert_eq!((kind, seq), (msg_type(NFT_MSG_GETRULE), 9));
        assert_eq!(payload.len(), first - 16);
        let (_, seq2, _, rest2) = split_message(rest).unwrap();
        assert_eq!((seq2, rest2.len()), (10, 0));
        assert!(split_message(&m[..10]).is_err());
        let mut short = m.clone();
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(split_message(&short).is_err(), "length below the header");
    }
}
