//! `sync_dns`'s records and hosts file: parsing and checking hostile blobs, upstream's hosts
//! layout, the version rule (never backwards), modes, atomic replacement, 10,000 records.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use platform::dns::{
    DnsError, DnsPaths, LocalDns, Records, Saved, VERSION_MISMATCH, bench_sync_dns, parse_records,
    records_on_disk, render_hosts, synthetic_blob, version_on_disk,
};

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "platform-dns-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn dns(d: &Dir) -> LocalDns {
    LocalDns::new(DnsPaths {
        records: d.0.join("instance/dns/records.json"),
        hosts: d.0.join("etc/hosts"),
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const BLOB_V5: &str = r#"{"records":[["10.0.0.5","a.web.default.d.bosh"],["fd00::6","b.web.default.d.bosh"]],"version":5,"record_keys":["id"],"record_infos":[["x"]],"aliases":{"q.bosh":["a"]}}"#;

#[test]
fn upstream_paths() {
    let p = DnsPaths::new(Path::new("/var/vcap"));
    assert_eq!(p.records, Path::new("/var/vcap/instance/dns/records.json"));
    assert_eq!(p.hosts, Path::new("/etc/hosts"));
}

#[test]
fn parses_the_directors_blob() {
    let r = parse_records(BLOB_V5.as_bytes()).unwrap();
    assert_eq!(
        r,
        Records {
            version: 5,
            records: vec![
                (ip("10.0.0.5"), "a.web.default.d.bosh".into()),
                (ip("fd00::6"), "b.web.default.d.bosh".into())
            ]
        }
    );
    // Go's key matching; records may be absent.
    assert_eq!(parse_records(br#"{"Version":3}"#).unwrap().version, 3);
    assert!(
        parse_records(br#"{"version":3,"records":null}"#)
            .unwrap()
            .records
            .is_empty()
    );
}

#[test]
fn hostile_blobs_are_refused_with_the_reason() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "unmarshalling DNS records"),
        (b"not json", "unmarshalling DNS records"),
        (b"[1,2]", "expected an object"),
        (br#"{"records":[]}"#, "'version'"),
        (br#"{"version":-1}"#, "'version'"),
        (br#"{"version":1.5}"#, "'version'"),
        (br#"{"version":"7"}"#, "'version'"),
        (br#"{"version":1,"records":{}}"#, "must be an array"),
        (br#"{"version":1,"records":[["10.0.0.1"]]}"#, "two strings"),
        (
            br#"{"version":1,"records":[["10.0.0.1","a","b"]]}"#,
            "two strings",
        ),
        (br#"{"version":1,"records":[[1,"a"]]}"#, "two strings"),
        (
            br#"{"version":1,"records":[["0/0","a"]]}"#,
            "not an IP address",
        ),
        (
            br#"{"version":1,"records":[["10.0.0.1 evil","a"]]}"#,
            "not an IP address",
        ),
        (
            br#"{"version":1,"records":[["10.0.0.1","a\n1.2.3.4 bank.com"]]}"#,
            "the name",
        ),
        (
            br#"{"version":1,"records":[["10.0.0.1","a b"]]}"#,
            "the name",
        ),
        (
            br#"{"version":1,"records":[["10.0.0.1","a#c"]]}"#,
            "the name",
        ),
        (br#"{"version":1,"records":[["10.0.0.1",""]]}"#, "the name"),
    ];
    for (blob, want) in cases {
        let e = parse_records(blob).unwrap_err();
        assert!(
            e.to_string().contains(want),
            "{}: {e}",
            String::from_utf8_lossy(blob)
        );
    }
    let long = format!(
        r#"{{"version":1,"records":[["10.0.0.1","{}"]]}}"#,
        "a".repeat(254)
    );
    assert!(parse_records(long.as_bytes()).is_err());
    // The record is named by its index.
    let e = parse_records(br#"{"version":1,"records":[["10.0.0.1","ok"],["x","y"]]}"#).unwrap_err();
    assert!(matches!(e, DnsError::Record { index: 1, .. }), "{e}");
}

#[test]
fn the_hosts_file_is_upstreams_template_plus_the_records() {
    let text = render_hosts(
        "agent-1",
        &[
            (ip("10.0.0.5"), "a.bosh".into()),
            (ip("fd00::6"), "b.bosh".into()),
        ],
    )
    .unwrap();
    assert_eq!(
        text,
        "127.0.0.1 agent-1 localhost\n\
         \n\
         # The following lines are desirable for IPv6 capable hosts\n\
         ::1 agent-1 localhost ip6-localhost ip6-loopback\n\
         fe00::0 ip6-localnet\n\
         ff00::0 ip6-mcastprefix\n\
         ff02::1 ip6-allnodes\n\
         ff02::2 ip6-allrouters\n\
         ff02::3 ip6-allhosts\n\
         10.0.0.5 a.bosh\n\
         fd00::6 b.bosh\n"
    );
    for bad in ["", "a b", "a\nb", "a#b", "a\tb"] {
        assert!(
            matches!(render_hosts(bad, &[]), Err(DnsError::Hostname(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn save_writes_both_files_and_never_goes_backwards() {
    let d = Dir::new("save");
    let dns = dns(&d);
    assert!(!dns.is_synced(5));
    assert_eq!(
        dns.save(BLOB_V5.as_bytes(), 5, "agent-1").unwrap(),
        Saved::Written {
            version: 5,
            records: 2
        }
    );
    let records = &dns.paths().records;
    assert_eq!(
        fs::read_to_string(records).unwrap(),
        BLOB_V5,
        "the blob verbatim"
    );
    let meta = fs::metadata(records).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.uid(), 0);
    if let Some(g) = platform::datadir::vcap_gid() {
        assert_eq!(meta.gid(), g.as_raw());
    }
    let hosts = fs::read_to_string(&dns.paths().hosts).unwrap();
    assert!(
        hosts.starts_with("127.0.0.1 agent-1 localhost\n"),
        "{hosts}"
    );
    assert!(
        hosts.ends_with("10.0.0.5 a.web.default.d.bosh\nfd00::6 b.web.default.d.bosh\n"),
        "{hosts}"
    );
    assert_eq!(
        fs::metadata(&dns.paths().hosts)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    assert_eq!(version_on_disk(records), Some(5));

    // Same or older version: synced at once, nothing touched (not even parsed).
    for v in [5, 4, 0] {
        assert!(dns.is_synced(v));
        assert_eq!(
            dns.save(b"garbage", v, "agent-1").unwrap(),
            Saved::AlreadySynced { on_disk: 5 }
        );
    }
    assert_eq!(fs::read_to_string(records).unwrap(), BLOB_V5);

    // A newer version replaces both.
    let v6 = r#"{"version":6,"records":[["10.0.0.9","c.bosh"]]}"#;
    assert!(!dns.is_synced(6));
    dns.save(v6.as_bytes(), 6, "agent-1").unwrap();
    assert_eq!(fs::read_to_string(records).unwrap(), v6);
    assert!(
        fs::read_to_string(&dns.paths().hosts)
            .unwrap()
            .ends_with("ip6-allhosts\n10.0.0.9 c.bosh\n")
    );
    // No temporaries are left.
    for dir in [
        records.parent().unwrap(),
        dns.paths().hosts.parent().unwrap(),
    ] {
        let names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
}

#[test]
fn bad_blobs_change_nothing() {
    let d = Dir::new("bad");
    let dns = dns(&d);
    dns.save(BLOB_V5.as_bytes(), 5, "agent-1").unwrap();
    let hosts_before = fs::read(&dns.paths().hosts).unwrap();
    // The director says 7, the blob says 6.
    let e = dns
        .save(br#"{"version":6,"records":[]}"#, 7, "agent-1")
        .unwrap_err();
    assert!(e.to_string().starts_with(VERSION_MISMATCH), "{e}");
    assert!(matches!(
        e,
        DnsError::VersionMismatch {
            blob: 6,
            director: 7
        }
    ));
    for blob in [
        &b"{"[..],
        br#"{"version":7,"records":[["10.0.0.1","x\n6.6.6.6 evil"]]}"#,
        br#"{"version":7,"records":[["999.0.0.1","x"]]}"#,
    ] {
        assert!(dns.save(blob, 7, "agent-1").is_err());
    }
    assert!(dns.save(br#"{"version":7}"#, 7, "bad host").is_err());
    assert_eq!(fs::read_to_string(&dns.paths().records).unwrap(), BLOB_V5);
    assert_eq!(fs::read(&dns.paths().hosts).unwrap(), hosts_before);
    // A records file that is not one counts as absent (upstream: "needs update").
    fs::write(&dns.paths().records, "junk").unwrap();
    assert_eq!(version_on_disk(&dns.paths().records), None);
    assert!(!dns.is_synced(1));
}

#[test]
fn a_damaged_records_file_says_what_is_wrong_and_is_rewritten_by_the_next_sync() {
    let d = Dir::new("damaged");
    let dns = dns(&d);
    let path = dns.paths().records.clone();
    assert_eq!(
        records_on_disk(&path),
        Ok(None),
        "no file: no version, no damage"
    );
    assert_eq!(dns.check(), None);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    for (text, why) in [
        (&b""[..], "cut short: the JSON ends at line 1 column 0"),
        (
            b"{\"records\":[[\"10.0.0.5\",\"a.",
            "cut short: the JSON ends at line 1",
        ),
        (b"\0\0\0\0\0\0\0\0", "not JSON: "),
        (b"junk", "not JSON: "),
        (b"{\"version\":5}x", "not JSON: trailing characters"),
        (b"[5]", "not a records file: invalid type: sequence"),
        (b"{}", "not a records file: it has no 'version'"),
        (b"{\"records\":[]}", "it has no 'version'"),
        (
            b"{\"version\":-1}",
            "'version' must be a non-negative integer, not -1",
        ),
        (
            b"{\"version\":\"5\"}",
            "'version' must be a non-negative integer, not \"5\"",
        ),
        (
            b"{\"version\":5.5}",
            "'version' must be a non-negative integer, not 5.5",
        ),
    ] {
        fs::write(&path, text).unwrap();
        let e = records_on_disk(&path).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}: ", path.display())) && shown.contains(why),
            "{text:?}: {shown}"
        );
        assert_eq!(dns.check(), Some(e));
        assert!(
            !dns.is_synced(0),
            "{text:?}: a damaged file is never synced"
        );
        assert_eq!(version_on_disk(&path), None);
    }
    // Every prefix of a good file but the whole one is damaged, and says so.
    for n in 0..BLOB_V5.len() {
        fs::write(&path, &BLOB_V5.as_bytes()[..n]).unwrap();
        assert!(records_on_disk(&path).is_err(), "{n} bytes");
    }
    // Go's decoding: the key in another case is still the version; the exact key wins.
    for (text, v) in [
        (r#"{"Version":7}"#, 7),
        (r#"{"VERSION":7,"version":8}"#, 8),
        (r#"{"version":8,"Version":7}"#, 8),
    ] {
        fs::write(&path, text).unwrap();
        assert_eq!(records_on_disk(&path), Ok(Some(v)), "{text}");
    }
    // A directory where the file should be: unreadable, named.
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    let e = records_on_disk(&path).unwrap_err().to_string();
    assert!(e.contains("cannot be read"), "{e}");
    fs::remove_dir(&path).unwrap();
    // The next sync_dns replaces a damaged file whole (upstream's fallback).
    fs::write(&path, &BLOB_V5.as_bytes()[..40]).unwrap();
    assert_eq!(
        dns.save(BLOB_V5.as_bytes(), 5, "agent-1").unwrap(),
        Saved::Written {
            version: 5,
            records: 2
        }
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), BLOB_V5);
    assert_eq!(dns.check(), None);
    assert!(dns.is_synced(5));
}

#[test]
fn ten_thousand_records() {
    let d = Dir::new("10k");
    let dns = dns(&d);
    let blob = synthetic_blob(42, 10_000);
    let parsed = parse_records(&blob).unwrap();
    assert_eq!(parsed.records.len(), 10_000);
    assert_eq!(
        dns.save(&blob, 42, "agent-1").unwrap(),
        Saved::Written {
            version: 42,
            records: 10_000
        }
    );
    let hosts = fs::read_to_string(&dns.paths().hosts).unwrap();
    assert_eq!(hosts.lines().count(), 9 + 10_000);
    assert!(
        hosts.contains("\n10.0.39.15 0000270f-aaaa-bbbb-cccc-00000000270f.web.default.dep.bosh\n")
    );
    assert_eq!(fs::read(&dns.paths().records).unwrap(), blob);
    assert!(dns.is_synced(42));
    // The benchmark entry point does the same work and reports a time.
    let b = Dir::new("bench");
    let took = bench_sync_dns(&b.0, 10_000).unwrap();
    assert!(took.as_nanos() > 0);
    assert_eq!(
        version_on_disk(&b.0.join("instance/dns/records.json")),
        Some(2)
    );
}

/// Set in the child of [`a_bind_mounted_hosts_file_is_rewritten_in_place`].
const CHILD_ENV: &str = "PLATFORM_DNS_TEST_DIR";

#[test]
fn a_bind_mounted_hosts_file_is_rewritten_in_place() {
    let name = "a_bind_mounted_hosts_file_is_rewritten_in_place";
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        // The parent: run this test again in a private mount namespace.
        let d = Dir::new("bind");
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &d.0)
            .output()
            .unwrap_or_else(|e| panic!("running unshare (util-linux): {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    };
    // The child: a hosts file that is a mount point, like a container's /etc/hosts.
    let dir = PathBuf::from(dir);
    fs::create_dir_all(dir.join("etc")).unwrap();
    let hosts = dir.join("etc/hosts");
    let source = dir.join("hosts.source");
    fs::write(&hosts, "old\n").unwrap();
    fs::write(&source, "old\n").unwrap();
    let st = Command::new("mount")
        .arg("--bind")
        .arg(&source)
        .arg(&hosts)
        .status()
        .unwrap();
    assert!(st.success(), "mount --bind (needs root)");
    let dns = LocalDns::new(DnsPaths {
        records: dir.join("instance/dns/records.json"),
        hosts: hosts.clone(),
    });
    dns.save(BLOB_V5.as_bytes(), 5, "agent-1").unwrap();
    let text = fs::read_to_string(&hosts).unwrap();
    assert!(text.ends_with("fd00::6 b.web.default.d.bosh\n"), "{text}");
    assert_eq!(
        fs::read_to_string(&source).unwrap(),
        text,
        "written through the mount"
    );
}
