//! `delete_arp_entries` against a real neighbour table: a network namespace this test makes
//! (the test thread unshares its own, so the host's table is never touched), a veth pair with
//! stale IPv4 and IPv6 neighbour entries, the real `ip` command.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use platform::arp::{ArpError, Neighbours};
use serde_json::json;

fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split(' '))
        .output()
        .unwrap_or_else(|e| panic!("running ip {args} (package iproute2 is needed): {e}"));
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside a fresh network namespace of its own (gone when the thread
/// ends); fails with the reason when namespaces cannot be made (not root).
fn in_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET) failed ({e}): this test needs root"));
        f()
    })
    .join()
    .unwrap();
}

fn setup_neighbours() {
    ip("link add d0 type veth peer name d1");
    ip("link set d1 up");
    ip("link set d0 up");
    ip("addr add 10.9.0.1/24 dev d0");
    ip("-6 addr add fd00:9::1/64 dev d0 nodad");
    for (addr, mac) in [
        ("10.9.0.2", "02:00:00:00:00:02"),
        ("10.9.0.3", "02:00:00:00:00:03"),
        ("fd00:9::2", "02:00:00:00:00:12"),
    ] {
        ip(&format!("neigh add {addr} lladdr {mac} dev d0 nud stale"));
    }
}

fn table() -> String {
    ip("neigh show dev d0") + &ip("-6 neigh show dev d0")
}

#[test]
fn the_given_addresses_are_flushed_and_no_other() {
    in_netns(|| {
        setup_neighbours();
        let t = table();
        assert!(
            t.contains("10.9.0.2 ") && t.contains("10.9.0.3 ") && t.contains("fd00:9::2 "),
            "{t}"
        );
        let done = Neighbours::default()
            .delete_arp_entries(&json!({"ips": ["10.9.0.2", "fd00:9::2", "10.9.0.77"]}))
            .unwrap();
        assert_eq!(done.flushed.len(), 3, "{done:?}");
        assert!(done.failed.is_empty(), "{done:?}");
        let t = table();
        assert!(!t.contains("10.9.0.2 "), "{t}");
        assert!(!t.contains("fd00:9::2 "), "{t}");
        assert!(t.contains("10.9.0.3 "), "the other entry stays: {t}");
    });
    assert!(
        !ip("link show").contains(" d0:"),
        "the link lived in the test's namespace only"
    );
    let host_after = ip("neigh show");
    assert!(!host_after.contains("10.9.0."), "{host_after}");
}

#[test]
fn a_bad_address_refuses_the_request_and_flushes_nothing() {
    in_netns(|| {
        setup_neighbours();
        let before = table();
        for args in [
            json!({"ips": ["10.9.0.2", "0/0"]}),
            json!({"ips": ["10.9.0.2", "all"]}),
            json!({"ips": ["10.9.0.0/24"]}),
            json!({"ips": ["10.9.0.2 dev d0"]}),
            json!({"addresses": ["10.9.0.2"]}),
        ] {
            let e = Neighbours::default().delete_arp_entries(&args).unwrap_err();
            assert!(
                matches!(e, ArpError::InvalidIp { .. } | ArpError::Arguments(_)),
                "{e}"
            );
        }
        assert_eq!(table(), before, "nothing flushed");
        // A command that fails is reported per address, the others still tried.
        let broken = Neighbours {
            ip_command: "/nonexistent/ip".into(),
        };
        let done = broken
            .delete_arp_entries(&json!({"ips": ["10.9.0.2", "10.9.0.3"]}))
            .unwrap();
        assert_eq!(done.failed.len(), 2);
        assert!(done.flushed.is_empty());
        assert_eq!(table(), before);
    });
}
