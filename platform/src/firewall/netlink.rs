//! Reading the rules of one chain (kernel handle and comment) straight from nf_tables over
//! netlink, in-process: what `firewall-allow` and the prune need, without spawning `nft` (a
//! listing costs 3–4 ms in process start-up alone; this round trip costs microseconds).
//! Writes still go through `nft -f -` only.
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
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NFPROTO_INET: u8 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_USERDATA: u16 = 7;
/// libnftnl's tag for a rule comment inside the rule's user data.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
const ENOENT: i32 = 2;
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

/// The rules of `chain` in table `inet <table>`, in chain order; `Ok(None)` when the table or
/// the chain does not exist.
pub fn chain_rules(table: &str, chain: &str) -> Result<Option<Vec<KernelRule>>, NetlinkError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
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

fn msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
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
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    m.extend_from_slice(&msg_type(msg).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[NFPROTO_INET, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
    for (kind, value) in attrs {
        let len = 4 + value.len() + 1;
        // Names are short (nft limits them to 255 bytes); longer ones cannot exist anyway.
        let len16 = u16::try_from(len).unwrap_or(u16::MAX);
        m.extend_from_slice(&len16.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(value.as_bytes());
        m.push(0);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let total = u32::try_from(m.len()).unwrap_or(u32::MAX);
    m[..4].copy_from_slice(&total.to_ne_bytes());
    m
}

/// Reads answers to request `seq` until its end (an ack, `NLMSG_DONE`, or an error), handing
/// every other message (type, payload after the 16-byte header) to `each`.
fn read_until_done(
    fd: &OwnedFd,
    seq: u32,
    mut each: impl FnMut(u16, &[u8]) -> Result<(), NetlinkError>,
) -> Result<(), NetlinkError> {
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_DATAGRAMS {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut rest = buf.get(..n).ok_or(NetlinkError::Protocol("short read"))?;
        while !rest.is_empty() {
            let (kind, msg_seq, payload, next) = split_message(rest)?;
            rest = next;
            if msg_seq != seq {
                continue;
            }
            match kind {
                NLMSG_ERROR => {
                    let code = read_i32(payload, 0)?;
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(NetlinkError::Kernel(code.saturating_neg()))
                    };
                }
                NLMSG_DONE => {
                    // A dump that failed midway says so here.
                    let code = read_i32(payload, 0).unwrap_or(0);
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(NetlinkError::Kernel(code.saturating_neg()))
                    };
                }
                _ => each(kind, payload)?,
            }
        }
    }
    Err(NetlinkError::Protocol("the answer did not end"))
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

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

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
