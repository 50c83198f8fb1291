#![allow(clippy::unwrap_used)]
use super::*;

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).unwrap()
}

fn entry(dst: &str, except: &[(Proto, &str)]) -> EgressEntry {
    EgressEntry {
        destination: cidr(dst),
        except: except
            .iter()
            .map(|(p, r)| (*p, PortRange::parse(r).unwrap()))
            .collect(),
    }
}

fn deny(sets: &EgressSets, fi: usize) -> Vec<String> {
    sets.deny[fi].iter().map(ToString::to_string).collect()
}

fn except(sets: &EgressSets, fi: usize) -> Vec<String> {
    sets.except[fi]
        .iter()
        .map(|(a, p, r)| format!("{a} . {p} . {r}"))
        .collect()
}

#[test]
fn protocols() {
    assert_eq!(Proto::parse("tcp"), Ok(Proto::Tcp));
    assert_eq!(Proto::parse("UDP"), Ok(Proto::Udp));
    for bad in ["", "icmp", "sctp", "tcp ", "tc"] {
        assert!(Proto::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn port_ranges() {
    assert_eq!(PortRange::parse("53").unwrap(), PortRange::single(53));
    let r = PortRange::parse("1000-2000").unwrap();
    assert_eq!((r.first, r.last), (1000, 2000));
    assert_eq!(r.to_string(), "1000-2000");
    assert_eq!(PortRange::parse("5-5").unwrap().to_string(), "5");
    assert_eq!(PortRange::parse("1-65535").unwrap().last, 65535);
    for (bad, why) in [
        ("0", "outside"),
        ("65536", "outside"),
        ("2000-1000", "backwards"),
        ("", "not a port"),
        ("a", "not a port"),
        ("1-", "not a port"),
        ("-1", "not a port"),
        ("99999999999", "not a port"),
        ("1-2-3", "not a port"),
    ] {
        let e = PortRange::parse(bad).unwrap_err();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

#[test]
fn cidrs_parse_canonically_and_refuse_host_bits() {
    assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    assert_eq!(cidr("169.254.169.254").to_string(), "169.254.169.254/32");
    assert_eq!(cidr("fd00:ec2::254").to_string(), "fd00:ec2::254/128");
    assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
    assert_eq!(
        cidr("0.0.0.0/0").range(),
        (Family::V4, 0, u128::from(u32::MAX))
    );
    assert_eq!(cidr("::/0").range(), (Family::V6, 0, u128::MAX));
    // IPv4-mapped IPv6 leaves the host as IPv4.
    assert_eq!(cidr("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
    assert_eq!(cidr("::ffff:1.2.3.4").to_string(), "1.2.3.4/32");
    let e = Cidr::parse("10.1.0.0/8").unwrap_err();
    assert!(e.contains("10.0.0.0/8"), "{e}");
    let e = Cidr::parse("2001:db8::1/64").unwrap_err();
    assert!(e.contains("2001:db8::/64"), "{e}");
    for bad in [
        "10.0.0.0/33",
        "::/129",
        "10.0.0/8",
        "10.0.0.0/",
        "10.0.0.0/-1",
        "host.example",
        "",
        "0251.254.169.254",
        "1.2.3.4/8/8",
    ] {
        assert!(Cidr::parse(bad).is_err(), "{bad:?}");
    }
    assert!(cidr("10.0.0.0/8").contains("10.9.9.9".parse().unwrap()));
    assert!(!cidr("10.0.0.0/8").contains("11.0.0.0".parse().unwrap()));
    assert!(!cidr("::/0").contains("1.2.3.4".parse().unwrap()));
}

#[test]
fn ranges_print_as_nft_prints_them() {
    let r = |family, first, last| AddrRange {
        family,
        first,
        last,
    };
    assert_eq!(
        r(Family::V4, 0x0a00_0000, 0x0a00_0000).to_string(),
        "10.0.0.0"
    );
    assert_eq!(
        r(Family::V4, 0x0a00_0000, 0x0aff_ffff).to_string(),
        "10.0.0.0/8"
    );
    assert_eq!(
        r(Family::V4, 0x0a00_0000, 0x0a00_02ff).to_string(),
        "10.0.0.0-10.0.2.255"
    );
    // Power-of-two size but not aligned: a range.
    assert_eq!(
        r(Family::V4, 0x0a00_0100, 0x0a00_02ff).to_string(),
        "10.0.1.0-10.0.2.255"
    );
    assert_eq!(
        r(Family::V4, 0, u128::from(u32::MAX)).to_string(),
        "0.0.0.0/0"
    );
    assert_eq!(r(Family::V6, 0, u128::MAX).to_string(), "::/0");
    assert_eq!(r(Family::V6, 1 << 127, u128::MAX).to_string(), "8000::/1");
}

#[test]
fn merge_joins_overlapping_and_adjacent() {
    assert_eq!(merge::<u16>(vec![]), vec![]);
    assert_eq!(merge(vec![(5u16, 9), (1, 3), (4, 4)]), vec![(1, 9)]);
    assert_eq!(merge(vec![(1u16, 3), (5, 9)]), vec![(1, 3), (5, 9)]);
    assert_eq!(merge(vec![(1u16, 10), (2, 3)]), vec![(1, 10)]);
    assert_eq!(merge(vec![(1u16, 65535), (65535, 65535)]), vec![(1, 65535)]);
    assert_eq!(
        merge(vec![(0u128, u128::MAX), (5, 6)]),
        vec![(0, u128::MAX)]
    );
}

#[test]
fn egress_merges_overlapping_and_adjacent_destinations() {
    let sets = EgressSets::compile(&[
        entry("10.0.0.0/24", &[]),
        entry("10.0.1.0/24", &[]),
        entry("10.0.0.128/25", &[]),
        entry("10.0.2.0/24", &[]),
        entry("192.168.0.0/16", &[]),
        entry("2001:db8::/33", &[]),
        entry("2001:db8:8000::/33", &[]),
    ]);
    assert_eq!(deny(&sets, 0), ["10.0.0.0-10.0.2.255", "192.168.0.0/16"]);
    assert_eq!(deny(&sets, 1), ["2001:db8::/32"]);
    assert!(sets.except.iter().all(Vec::is_empty));
    // Order of entries does not matter.
    let again = EgressSets::compile(&[
        entry("192.168.0.0/16", &[]),
        entry("10.0.2.0/24", &[]),
        entry("10.0.0.0/23", &[]),
        entry("2001:db8::/32", &[]),
    ]);
    assert_eq!(again, sets);
}

#[test]
fn egress_exceptions_hold_only_where_every_covering_entry_excepts() {
    let sets = EgressSets::compile(&[
        entry("10.0.0.0/8", &[(Proto::Tcp, "53"), (Proto::Udp, "53")]),
        entry("10.1.0.0/16", &[(Proto::Udp, "50-60")]),
    ]);
    assert_eq!(deny(&sets, 0), ["10.0.0.0/8"]);
    assert_eq!(
        except(&sets, 0),
        [
            "10.0.0.0/16 . tcp . 53",
            "10.0.0.0/16 . udp . 53",
            "10.1.0.0/16 . udp . 53",
            "10.2.0.0-10.255.255.255 . tcp . 53",
            "10.2.0.0-10.255.255.255 . udp . 53",
        ]
    );
    // Except ranges merge within an entry.
    let s = EgressSets::compile(&[entry(
        "1.2.3.4",
        &[
            (Proto::Tcp, "1-10"),
            (Proto::Tcp, "11-20"),
            (Proto::Tcp, "5"),
        ],
    )]);
    assert_eq!(except(&s, 0), ["1.2.3.4 . tcp . 1-20"]);
    // Entries with equal exceptions side by side join.
    let s = EgressSets::compile(&[
        entry("10.0.0.0/24", &[(Proto::Udp, "53")]),
        entry("10.0.1.0/24", &[(Proto::Udp, "53")]),
    ]);
    assert_eq!(except(&s, 0), ["10.0.0.0/23 . udp . 53"]);
}

#[test]
fn cloud_metadata_entries_are_the_five_endpoints_with_dns_and_ntp_open() {
    let sets = EgressSets::compile(&cloud_metadata_entries());
    assert_eq!(
        deny(&sets, 0),
        ["168.63.129.16", "169.254.169.254", "169.254.170.23"]
    );
    assert_eq!(deny(&sets, 1), ["fd00:ec2::254", "fe80::a9fe:a9fe"]);
    let ex = except(&sets, 0);
    assert_eq!(ex.len(), 9);
    assert!(ex.contains(&"169.254.169.254 . udp . 53".to_string()));
    assert!(ex.contains(&"169.254.169.254 . tcp . 53".to_string()));
    assert!(ex.contains(&"169.254.169.254 . udp . 123".to_string()));
    assert!(!ex.iter().any(|e| e.contains("tcp . 80")));
    // Never a blanket link-local range: bosh-dns and AWS time sync stay reachable.
    for ip in ["169.254.0.2", "169.254.169.123"] {
        let v = u128::from(u32::from(ip.parse::<std::net::Ipv4Addr>().unwrap()));
        assert!(
            !sets.deny[0].iter().any(|r| r.first <= v && v <= r.last),
            "{ip}"
        );
    }
}

#[test]
fn ten_thousand_ranges_compile_merged_and_disjoint() {
    let entries: Vec<EgressEntry> = (0..10_000u32)
        .map(|i| {
            let a = 0x0a00_0000 + i * 512;
            entry(&format!("{}/24", std::net::Ipv4Addr::from(a)), &[])
        })
        .collect();
    let sets = EgressSets::compile(&entries);
    assert_eq!(sets.deny[0].len(), 10_000);
    assert!(sets.deny[0].windows(2).all(|w| w[0].last + 1 < w[1].first));
}

#[test]
fn ingress_sets_merge_and_answer() {
    let e = |p, r: &str, src: &[&str]| IngressEntry {
        proto: p,
        ports: PortRange::parse(r).unwrap(),
        sources: src.iter().map(|s| cidr(s)).collect(),
    };
    let sets = IngressSets::compile(&[
        e(Proto::Tcp, "22", &[]),
        e(Proto::Tcp, "8000-8499", &[]),
        e(Proto::Tcp, "8500-8999", &[]),
        e(Proto::Udp, "53", &["10.0.0.0/8"]),
        e(Proto::Udp, "50-60", &["10.1.0.0/16"]),
        e(Proto::Tcp, "9100", &["2001:db8::/32"]),
    ]);
    let any: Vec<String> = sets
        .any_source
        .iter()
        .map(|(p, r)| format!("{p} . {r}"))
        .collect();
    assert_eq!(any, ["tcp . 22", "tcp . 8000-8999"]);
    let v4: Vec<String> = sets.by_source[0]
        .iter()
        .map(|(a, p, r)| format!("{a} . {p} . {r}"))
        .collect();
    assert_eq!(
        v4,
        [
            "10.0.0.0/16 . udp . 53",
            "10.1.0.0/16 . udp . 50-60",
            "10.2.0.0-10.255.255.255 . udp . 53",
        ]
    );
    assert!(sets.allows(Proto::Tcp, 22, None));
    assert!(!sets.allows(Proto::Udp, 22, None));
    assert!(sets.allows(Proto::Udp, 55, Some("10.1.2.3".parse().unwrap())));
    assert!(!sets.allows(Proto::Udp, 55, Some("10.2.2.3".parse().unwrap())));
    assert!(sets.allows(Proto::Tcp, 9100, Some("2001:db8::7".parse().unwrap())));
    assert!(!sets.allows(Proto::Tcp, 9100, Some("10.1.2.3".parse().unwrap())));
    assert!(sets.mentions(Proto::Udp, 53) && !sets.mentions(Proto::Udp, 61));
}

#[test]
fn lockout_refuses_a_list_without_the_ssh_port() {
    let sets = IngressSets::compile(&[IngressEntry {
        proto: Proto::Tcp,
        ports: PortRange::single(8080),
        sources: vec![],
    }]);
    let ssh = RequiredInbound {
        what: "sshd".into(),
        proto: Proto::Tcp,
        port: 22,
    };
    let e = check_lockout(&sets, std::slice::from_ref(&ssh)).unwrap_err();
    assert!(e.contains("sshd (tcp/22)"), "{e}");
    let with_ssh = IngressSets::compile(&[IngressEntry {
        proto: Proto::Tcp,
        ports: PortRange::single(22),
        sources: vec![cidr("10.0.0.0/8")],
    }]);
    assert_eq!(check_lockout(&with_ssh, &[ssh]), Ok(()));
    assert_eq!(check_lockout(&sets, &[]), Ok(()));
}

#[test]
fn sshd_ports_from_config() {
    assert_eq!(sshd_ports(""), vec![22]);
    assert_eq!(
        sshd_ports("# Port 2222\nPasswordAuthentication no\n"),
        vec![22]
    );
    assert_eq!(
        sshd_ports("Port 2222\nport 22\nPort 2222\n"),
        vec![22, 2222]
    );
    assert_eq!(sshd_ports("Port nope\n"), vec![22]);
}

fn buckets_of(cidrs: &[&str]) -> [Vec<u16>; 2] {
    let sets = EgressSets::compile(&cidrs.iter().map(|c| entry(c, &[])).collect::<Vec<_>>());
    [0, 1].map(|fi| prefilter_buckets(&sets.deny[fi]))
}

#[test]
fn prefilter_buckets_at_the_edges() {
    let v4 = |c: &[&str]| buckets_of(c)[0].clone();
    let v6 = |c: &[&str]| buckets_of(c)[1].clone();
    // A /16 exactly, a /24 inside it, a single address: one bucket each.
    assert_eq!(v4(&["10.0.0.0/16"]), vec![0x0a00]);
    assert_eq!(v4(&["10.9.3.0/24"]), vec![0x0a09]);
    assert_eq!(v4(&["169.254.169.254"]), vec![0xa9fe]);
    assert_eq!(v4(&["0.0.0.0"]), vec![0]);
    assert_eq!(v4(&["255.255.255.255"]), vec![0xffff]);
    // A /15 spans two buckets; a /8 256.
    assert_eq!(v4(&["10.2.0.0/15"]), vec![0x0a02, 0x0a03]);
    let eight = v4(&["10.0.0.0/8"]);
    assert_eq!(eight.len(), 256);
    assert_eq!((eight[0], eight[255]), (0x0a00, 0x0aff));
    // A range crossing a bucket seam (two CIDRs merged into 10.0.255.0-10.1.0.255).
    assert_eq!(v4(&["10.0.255.0/24", "10.1.0.0/24"]), vec![0x0a00, 0x0a01]);
    // Two ranges in one bucket give it once; neighbours stay apart.
    assert_eq!(
        v4(&["10.9.1.0/24", "10.9.3.0/24", "10.10.0.0/24"]),
        vec![0x0a09, 0x0a0a]
    );
    // /0: every bucket, in order, each once.
    let all = v4(&["0.0.0.0/0"]);
    assert_eq!(all.len(), 65_536);
    assert!(all.iter().enumerate().all(|(i, b)| usize::from(*b) == i));
    // IPv6: the first 16 bits.
    assert_eq!(v6(&["2001:db8::/32"]), vec![0x2001]);
    assert_eq!(v6(&["fd00:ec2::254"]), vec![0xfd00]);
    let ll = v6(&["fe80::/10"]);
    assert_eq!(ll, (0xfe80..=0xfebf).collect::<Vec<u16>>());
    assert_eq!(v6(&["::/0"]).len(), 65_536);
    assert_eq!(v6(&["::1"]), vec![0]);
    assert_eq!(v6(&["ffff::/16"]), vec![0xffff]);
    // An IPv4-mapped range is IPv4 traffic: its buckets are IPv4's.
    assert_eq!(buckets_of(&["::ffff:10.9.0.0/112"]), [vec![0x0a09], vec![]]);
    assert_eq!(prefilter_buckets(&[]), Vec::<u16>::new());
}

#[test]
fn prefilter_buckets_hold_exactly_the_buckets_the_ranges_touch() {
    // A deterministic spread of ranges of every size, checked against a brute force over
    // every bucket: listed exactly when some range has an address in it.
    let mut x: u32 = 0x9e37_79b9;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for round in 0..40 {
        let cidrs: Vec<String> = (0..1 + round % 7)
            .map(|_| {
                let prefix = 8 + next() % 25;
                let addr = next() & !((1u64 << (32 - prefix)) - 1) as u32;
                format!("{}/{prefix}", std::net::Ipv4Addr::from(addr))
            })
            .collect();
        let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        let got = buckets_of(&refs)[0].clone();
        let want: Vec<u16> = (0..=u16::MAX)
            .filter(|b| {
                let (lo, hi) = (u32::from(*b) << 16, (u32::from(*b) << 16) | 0xffff);
                refs.iter().any(|c| {
                    let (_, a, z) = cidr(c).range();
                    a <= u128::from(hi) && u128::from(lo) <= z
                })
            })
            .collect();
        assert_eq!(got, want, "{cidrs:?}");
    }
}

#[test]
fn the_prefilter_is_left_out_beyond_its_bucket_cap() {
    let sets = EgressSets::compile(&[
        entry("10.0.0.0/8", &[]),
        entry("fe80::/10", &[]),
        entry("2001:db8::/32", &[]),
    ]);
    assert_eq!(sets.prefilter[0].as_ref().map(Vec::len), Some(256));
    assert_eq!(sets.prefilter[1].as_ref().map(Vec::len), Some(65));
    // 4,096 buckets (a /4) still have one; one more bucket and the family has none.
    let at_cap = EgressSets::compile(&[entry("16.0.0.0/4", &[])]);
    assert_eq!(
        at_cap.prefilter[0].as_ref().map(Vec::len),
        Some(PREFILTER_MAX_BUCKETS)
    );
    let over = EgressSets::compile(&[entry("16.0.0.0/4", &[]), entry("1.2.3.4", &[])]);
    assert_eq!(over.prefilter[0], None);
    // The other family keeps its own.
    let mixed = EgressSets::compile(&[entry("0.0.0.0/0", &[]), entry("fd00::/8", &[])]);
    assert_eq!(mixed.prefilter[0], None);
    assert_eq!(mixed.prefilter[1].as_ref().map(Vec::len), Some(256));
    // No ranges of a family: an empty prefilter (nothing of that family is denied).
    assert_eq!(sets_v4_only().prefilter[1], Some(vec![]));
}

fn sets_v4_only() -> EgressSets {
    EgressSets::compile(&[entry("10.0.0.0/8", &[])])
}
