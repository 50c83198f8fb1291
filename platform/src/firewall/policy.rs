//! The workload policies: egress deny ranges, the ingress allow-list, the localhost guard and
//! the agent's alert listener. Values are validated and canonicalised here (pure, no I/O):
//! a policy that exists as a value can be rendered, and two configurations that mean the same
//! give equal values (and so byte-identical scripts).
//!
//! Canonical forms:
//! - a CIDR must have its host bits clear (`10.1.0.0/8` is refused, naming `10.0.0.0/8`):
//!   silently widening a typo would deny or allow more than was written; a bare address is a
//!   /32 or /128; an IPv4-mapped IPv6 range (`::ffff:a.b.c.d/n`, n ≥ 96) becomes its IPv4
//!   form, since such traffic leaves the host as IPv4;
//! - overlapping and adjacent ranges are merged (interval sets), so sets never hold
//!   overlapping elements (nft refuses those in concatenated interval sets).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Identity;

/// A transport protocol a policy entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// Both protocols, in the order sets list them.
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// `tcp` or `udp` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err("not a protocol: expected tcp or udp".into()),
        }
    }

    fn index(self) -> usize {
        match self {
            Proto::Tcp => 0,
            Proto::Udp => 1,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// An inclusive port range, 1 ≤ first ≤ last ≤ 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// `53` or `1000-2000`. Port 0 is refused (no service listens there).
    pub fn parse(text: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("{p:?} is not a port number"))?;
            if n == 0 || n > 65535 {
                return Err(format!("port {n} is outside 1-65535"));
            }
            Ok(n as u16)
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(text)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!("range {first}-{last} runs backwards"));
        }
        Ok(PortRange { first, last })
    }

    /// The single port `p` (0 is allowed only through [`PortRange::parse`]'s refusal).
    pub fn single(p: u16) -> Self {
        PortRange { first: p, last: p }
    }

    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn max(self) -> u128 {
        match self {
            Family::V4 => u128::from(u32::MAX),
            Family::V6 => u128::MAX,
        }
    }

    fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// A validated CIDR with its host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d[/n]` or `x::y[/n]`; see the module docs for the canonical form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (a, p) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let mut addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let mut prefix: u8 = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("prefix length {p:?} is not 0-{max}"))?,
            None => max,
        };
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
            && prefix >= 96
        {
            addr = IpAddr::V4(v4);
            prefix -= 96;
        }
        let (fam, value) = to_u128(addr);
        let mask = host_mask(fam, prefix);
        if value & mask != 0 {
            let net = from_u128(fam, value & !mask);
            return Err(format!(
                "host bits are set (the network is {net}/{prefix}; write that, or the single address)"
            ));
        }
        Ok(Cidr { addr, prefix })
    }

    /// A single address as a /32 or /128.
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }

    /// The family and the inclusive range of addresses.
    pub fn range(&self) -> (Family, u128, u128) {
        let (fam, lo) = to_u128(self.addr);
        (fam, lo, lo | host_mask(fam, self.prefix))
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (fam, lo, hi) = self.range();
        let (f, v) = to_u128(ip);
        f == fam && lo <= v && v <= hi
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn host_mask(fam: Family, prefix: u8) -> u128 {
    let host_bits = fam.bits() - u32::from(prefix);
    if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

fn to_u128(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

fn from_u128(fam: Family, v: u128) -> IpAddr {
    match fam {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// An inclusive address range of one family, printed as nft prints interval elements: a
/// single address, a prefix where the range is one, else `first-last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct AddrRange {
    pub family: Family,
    pub first: u128,
    pub last: u128,
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = from_u128(self.family, self.first);
        if self.first == self.last {
            return write!(f, "{a}");
        }
        let size = (self.last - self.first).checked_add(1);
        let full = self.first == 0 && self.last == self.family.max();
        let prefix = match size {
            _ if full => Some(0),
            Some(n) if n.is_power_of_two() && self.first.is_multiple_of(n) => {
                Some(self.family.bits() - n.trailing_zeros())
            }
            _ => None,
        };
        match prefix {
            Some(p) => write!(f, "{a}/{p}"),
            None => write!(f, "{a}-{}", from_u128(self.family, self.last)),
        }
    }
}

/// Ports per protocol, each a sorted list of disjoint, non-adjacent ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PortSet {
    ranges: [Vec<(u16, u16)>; 2],
}

impl PortSet {
    /// The set of the given (protocol, range) pairs, merged.
    pub fn of(items: impl IntoIterator<Item = (Proto, PortRange)>) -> Self {
        let mut s = PortSet::default();
        for (p, r) in items {
            s.ranges[p.index()].push((r.first, r.last));
        }
        for v in &mut s.ranges {
            *v = merge(std::mem::take(v));
        }
        s
    }

    /// Whether no port of either protocol is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.iter().all(Vec::is_empty)
    }

    /// Whether `port` of `proto` is in the set.
    pub fn contains(&self, proto: Proto, port: u16) -> bool {
        self.ranges[proto.index()]
            .iter()
            .any(|(a, b)| *a <= port && port <= *b)
    }

    /// The ranges, protocol by protocol.
    pub fn iter(&self) -> impl Iterator<Item = (Proto, PortRange)> + '_ {
        Proto::ALL.into_iter().flat_map(move |p| {
            self.ranges[p.index()].iter().map(move |(a, b)| {
                (
                    p,
                    PortRange {
                        first: *a,
                        last: *b,
                    },
                )
            })
        })
    }

    fn union(&self, other: &PortSet) -> PortSet {
        let mut s = self.clone();
        for (i, v) in s.ranges.iter_mut().enumerate() {
            v.extend_from_slice(&other.ranges[i]);
            *v = merge(std::mem::take(v));
        }
        s
    }

    fn intersection(&self, other: &PortSet) -> PortSet {
        let mut s = PortSet::default();
        for i in 0..2 {
            let (a, b) = (&self.ranges[i], &other.ranges[i]);
            let (mut x, mut y) = (0, 0);
            while x < a.len() && y < b.len() {
                let lo = a[x].0.max(b[y].0);
                let hi = a[x].1.min(b[y].1);
                if lo <= hi {
                    s.ranges[i].push((lo, hi));
                }
                if a[x].1 < b[y].1 { x += 1 } else { y += 1 }
            }
        }
        s
    }
}

/// Merges overlapping and adjacent inclusive ranges; the result is sorted and disjoint.
pub fn merge<T: Copy + Ord + Adjacent>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 || last.1.next() == Some(a) => {
                if b > last.1 {
                    last.1 = b;
                }
            }
            _ => out.push((a, b)),
        }
    }
    out
}

/// The successor of a value, if any: what "adjacent" means for [`merge`].
pub trait Adjacent: Sized {
    fn next(self) -> Option<Self>;
}

impl Adjacent for u16 {
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Adjacent for u128 {
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
}

/// Sweeps address ranges, each carrying ports: every stretch of the address line covered by
/// at least one range gets `combine` of the ports of the ranges covering it; neighbouring
/// stretches with equal ports are joined. The output is sorted and disjoint.
fn sweep(
    family: Family,
    items: &[(u128, u128, PortSet)],
    combine: fn(&PortSet, &PortSet) -> PortSet,
) -> Vec<(AddrRange, PortSet)> {
    // Events: (point, is_start, item). An end event sits at last + 1 (none at the maximum).
    let mut events: Vec<(u128, bool, usize)> = Vec::with_capacity(items.len() * 2);
    for (i, (a, b, _)) in items.iter().enumerate() {
        events.push((*a, true, i));
        if let Some(e) = b.checked_add(1) {
            events.push((e, false, i));
        }
    }
    events.sort_unstable();
    let mut active: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    let mut out: Vec<(AddrRange, PortSet)> = Vec::new();
    let mut k = 0;
    while k < events.len() {
        let point = events[k].0;
        while k < events.len() && events[k].0 == point {
            let (_, start, i) = events[k];
            if start {
                active.insert(i);
            } else {
                active.remove(&i);
            }
            k += 1;
        }
        if active.is_empty() {
            continue;
        }
        let last = match events.get(k) {
            Some((next, _, _)) => next - 1,
            None => family.max(),
        };
        let mut it = active.iter();
        let Some(first) = it.next() else { continue };
        let ports = it.fold(items[*first].2.clone(), |acc, i| {
            combine(&acc, &items[*i].2)
        });
        match out.last_mut() {
            Some((r, p)) if r.last.checked_add(1) == Some(point) && *p == ports => r.last = last,
            _ => out.push((
                AddrRange {
                    family,
                    first: point,
                    last,
                },
                ports,
            )),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Egress

/// What happens to a denied packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressAction {
    /// Silently dropped: the caller times out.
    #[default]
    Drop,
    /// TCP answered with a reset, anything else with ICMP administratively prohibited: the
    /// caller fails at once.
    Reject,
}

/// One egress deny entry: traffic to `destination` is denied except to these ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct EgressEntry {
    pub destination: Cidr,
    pub except: Vec<(Proto, PortRange)>,
}

/// The cloud credential endpoints `DenyCloudMetadata` denies (AWS IMDS v4 and v6, OpenStack's
/// IPv6 metadata, EKS Pod Identity, Azure WireServer).
pub const CLOUD_METADATA: [&str; 5] = [
    "169.254.169.254",
    "fd00:ec2::254",
    "fe80::a9fe:a9fe",
    "169.254.170.23",
    "168.63.129.16",
];

/// The ports left open on the cloud endpoints: DNS (GCP, Azure) and NTP (GCP).
pub const CLOUD_METADATA_EXCEPT: [(Proto, u16); 3] =
    [(Proto::Udp, 53), (Proto::Tcp, 53), (Proto::Udp, 123)];

/// The entries `DenyCloudMetadata: true` adds.
pub fn cloud_metadata_entries() -> Vec<EgressEntry> {
    CLOUD_METADATA
        .iter()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| EgressEntry {
            destination: Cidr::host(ip),
            except: CLOUD_METADATA_EXCEPT
                .iter()
                .map(|(p, port)| (*p, PortRange::single(*port)))
                .collect(),
        })
        .collect()
}

/// The egress rules in set form: what the renderer writes. A packet is denied when some
/// entry covers its destination and that entry does not except its (protocol, port); where
/// entries overlap, only ports every covering entry excepts stay open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct EgressSets {
    /// Denied destinations per family (IPv4 first), merged.
    pub deny: [Vec<AddrRange>; 2],
    /// Excepted (destination range, protocol, ports) per family, disjoint.
    pub except: [Vec<(AddrRange, Proto, PortRange)>; 2],
    /// Per family, the prefilter: the first 16 bits of every destination some deny range
    /// holds ([`prefilter_buckets`]), or `None` when they are more than
    /// [`PREFILTER_MAX_BUCKETS`] (the rule then looks the interval set up directly).
    pub prefilter: [Option<Vec<u16>>; 2],
}

/// The most /16 buckets (first 16 bits of a destination) a family's prefilter set holds.
/// The kernel keeps a 16-bit set as a bitmap, whose lookup costs the same for any size, but
/// inserting an element walks the elements already there: a commit of n elements costs
/// O(n²) — measured on kernel 6.18, 4,096 take 0.09 s fresh and 0.27 s as a flush and
/// refill, 16,384 take 1.7 s and 5.1 s, 65,536 (a /0) over a minute. A deny list touching
/// more buckets than this covers so much of the address space that most traffic meets the
/// interval lookup anyway.
pub const PREFILTER_MAX_BUCKETS: usize = 4096;

/// The first 16 bits of every address in `ranges` (all of one family), sorted, each once:
/// an address is in some range only if its bucket is listed. Pure.
pub fn prefilter_buckets(ranges: &[AddrRange]) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::new();
    for r in ranges {
        let shift = r.family.bits() - 16;
        // Both fit in 16 bits: the shift leaves the top 16 of a 32- or 128-bit value.
        let (a, b) = (
            u16::try_from(r.first >> shift).unwrap_or(u16::MAX),
            u16::try_from(r.last >> shift).unwrap_or(u16::MAX),
        );
        // Ranges are sorted and disjoint, so a bucket repeats only at the seam of two.
        let from = match out.last() {
            Some(&l) if l >= a => match l.checked_add(1) {
                Some(n) => n,
                None => continue,
            },
            _ => a,
        };
        if from <= b {
            out.extend(from..=b);
        }
    }
    out
}

impl EgressSets {
    /// Compiles entries into sets.
    pub fn compile(entries: &[EgressEntry]) -> Self {
        let mut out = EgressSets::default();
        for (fi, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
            let items: Vec<(u128, u128, PortSet)> = entries
                .iter()
                .filter_map(|e| {
                    let (f, a, b) = e.destination.range();
                    (f == fam).then(|| (a, b, PortSet::of(e.except.iter().copied())))
                })
                .collect();
            for (range, ports) in sweep(fam, &items, PortSet::intersection) {
                for (p, r) in ports.iter() {
                    out.except[fi].push((range, p, r));
                }
                match out.deny[fi].last_mut() {
                    Some(d) if d.last.checked_add(1) == Some(range.first) => d.last = range.last,
                    _ => out.deny[fi].push(range),
                }
            }
            let buckets = prefilter_buckets(&out.deny[fi]);
            out.prefilter[fi] = (buckets.len() <= PREFILTER_MAX_BUCKETS).then_some(buckets);
        }
        out
    }
}

/// The egress policy of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EgressPolicy {
    /// No deny entries: no egress rules exist (upstream's behaviour).
    #[default]
    Disabled,
    /// Workloads are denied the ranges; the agent, `allowed` and job rules are not.
    Enabled(Egress),
}

/// How the egress guard tells replies from new traffic (`EgressTracking`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressTracking {
    /// `ct state established,related` is accepted first: replies of every protocol to a
    /// denied range pass, and a flow opened before its range was denied lives on. Any `ct`
    /// expression switches connection tracking on for the whole VM.
    #[default]
    Conntrack,
    /// No `ct` expression: TCP to a denied range is judged only when it opens a connection
    /// (SYN without ACK), so a server on the VM still answers TCP clients there; UDP and
    /// every other protocol to a denied range are dropped, replies included.
    Stateless,
}

/// An enabled egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Egress {
    pub sets: EgressSets,
    pub action: EgressAction,
    pub tracking: EgressTracking,
    /// Identities besides the agent's allowed through (`EgressAllowCgroups`).
    pub allowed: Vec<Identity>,
}

// ---------------------------------------------------------------------------------------------
// Ingress

/// One ingress allow entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct IngressEntry {
    pub proto: Proto,
    pub ports: PortRange,
    /// Empty: from anywhere.
    pub sources: Vec<Cidr>,
}

/// What the ingress chain does with packets conntrack marks invalid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CtInvalid {
    /// Dropped (and counted) before the allow-list (firewalld's and ufw's choice).
    #[default]
    Drop,
    /// Judged by the allow-list like new packets: an out-of-window segment to an allowed port
    /// passes (for asymmetric routing or `nf_conntrack_tcp_be_liberal` setups).
    AllowList,
}

/// The ingress allow-list in set form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct IngressSets {
    /// Ports open to every source.
    pub any_source: PortSet,
    /// (source range, protocol, ports) per family, disjoint.
    pub by_source: [Vec<(AddrRange, Proto, PortRange)>; 2],
}

impl IngressSets {
    /// Compiles entries into sets.
    pub fn compile(entries: &[IngressEntry]) -> Self {
        let any_source = PortSet::of(
            entries
                .iter()
                .filter(|e| e.sources.is_empty())
                .map(|e| (e.proto, e.ports)),
        );
        let mut by_source: [Vec<(AddrRange, Proto, PortRange)>; 2] = Default::default();
        for (fi, fam) in [Family::V4, Family::V6].into_iter().enumerate() {
            let items: Vec<(u128, u128, PortSet)> = entries
                .iter()
                .flat_map(|e| {
                    e.sources.iter().filter_map(move |c| {
                        let (f, a, b) = c.range();
                        (f == fam).then(|| (a, b, PortSet::of([(e.proto, e.ports)])))
                    })
                })
                .collect();
            for (range, ports) in sweep(fam, &items, PortSet::union) {
                for (p, r) in ports.iter() {
                    by_source[fi].push((range, p, r));
                }
            }
        }
        IngressSets {
            any_source,
            by_source,
        }
    }

    /// Whether a new inbound connection to `port` of `proto` from `from` (any source when
    /// `None`, which only the any-source set answers) is allowed by the list.
    pub fn allows(&self, proto: Proto, port: u16, from: Option<IpAddr>) -> bool {
        if self.any_source.contains(proto, port) {
            return true;
        }
        let Some(ip) = from else { return false };
        let (fam, v) = to_u128(ip);
        let fi = usize::from(fam == Family::V6);
        self.by_source[fi]
            .iter()
            .any(|(r, p, ports)| *p == proto && r.first <= v && v <= r.last && ports.contains(port))
    }

    /// Whether any entry, from any source, opens `port` of `proto`.
    pub fn mentions(&self, proto: Proto, port: u16) -> bool {
        self.any_source.contains(proto, port)
            || self
                .by_source
                .iter()
                .flatten()
                .any(|(_, p, r)| *p == proto && r.contains(port))
    }
}

/// The ingress policy of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IngressPolicy {
    /// No allow-list: no ingress filtering at all (upstream's behaviour).
    #[default]
    Disabled,
    /// Inbound traffic is accepted only by the prologue and the list.
    Enabled(Ingress),
}

/// An enabled ingress policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Ingress {
    pub sets: IngressSets,
    /// ICMP echo-request, destination-unreachable and time-exceeded (and their ICMPv6
    /// counterparts) are accepted.
    pub allow_icmp: bool,
    pub ct_invalid: CtInvalid,
}

// ---------------------------------------------------------------------------------------------
// The localhost guard and the alert listener

/// Who may reach the agent's monit-alert listener on 127.0.0.1:2825.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AlertListenerPolicy {
    /// Every local process (upstream's behaviour).
    #[default]
    Open,
    /// Only the agent and `monit` (monit's cgroup; where that cannot be known the caller
    /// passes a uid identity with the reason, which `firewall status` shows).
    Guarded { monit: Identity },
}

/// The policies that keep workloads in their place, all off by default: the table is then
/// exactly what it is without them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub struct WorkloadPolicy {
    pub egress: EgressPolicy,
    pub ingress: IngressPolicy,
    /// Drop packets to 127.0.0.0/8 and ::1 that did not arrive on loopback.
    pub localhost_guard: bool,
    pub alert_listener: AlertListenerPolicy,
}

/// A requirement the ingress list must not break: an SSH port, an mbus listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredInbound {
    /// What it is, for the error (`sshd`, `mbus listener`).
    pub what: String,
    pub proto: Proto,
    pub port: u16,
}

/// Refuses an allow-list that would cut a required inbound path. A port counts as kept when
/// some entry opens it, from any source (an operator who limits SSH to some sources chose
/// that). Outbound links (the director's NATS connection) need nothing here: their replies
/// are `ct state established`, which the prologue accepts before the list.
pub fn check_lockout(ingress: &IngressSets, required: &[RequiredInbound]) -> Result<(), String> {
    let cut: Vec<String> = required
        .iter()
        .filter(|r| !ingress.mentions(r.proto, r.port))
        .map(|r| format!("{} ({}/{})", r.what, r.proto, r.port))
        .collect();
    if cut.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the ingress allow-list would cut {}: add it to IngressAllow",
            cut.join(", ")
        ))
    }
}

/// The ports sshd listens on, from its configuration text (`Port` lines; 22 when none). Pure.
pub fn sshd_ports(config: &str) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let key = w.next()?;
            key.eq_ignore_ascii_case("port")
                .then(|| w.next()?.parse().ok())
                .flatten()
        })
        .collect();
    if ports.is_empty() {
        ports.push(22);
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
