//! Reloading the firewall policies of a running agent (SIGHUP, `bosh-agent firewall reload`):
//! the real agent, real nft in the sandbox's network namespace, a real nats-server for the
//! NATS rules. Run as root: `cargo test -p integration --test reload`. A test that cannot run
//! (not root, no nft, no cgroup2, no nats-server) fails with the reason.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use integration::nats::*;
use integration::{COMMAND_TIMEOUT, Sandbox, describe};
use serde_json::{Value, json};

/// agent.json with the NATS firewall on, the settings file of the sandbox, and `firewall`
/// as `Platform.Linux.Firewall` (the reconcile interval added); `linux` adds other keys.
fn agent_json(settings: &Path, firewall: Value, linux: Value) -> String {
    let mut fw = json!({"ReconcileIntervalSeconds": 1});
    for (k, v) in firewall.as_object().unwrap() {
        fw[k] = v.clone();
    }
    let mut l = json!({"EnableNATSFirewall": true, "Firewall": fw});
    for (k, v) in linux.as_object().unwrap() {
        l[k] = v.clone();
    }
    json!({
        "Platform": {"Linux": l},
        "Infrastructure": {"Settings": {"Sources": [
            {"Type": "File", "SettingsPath": settings.display().to_string()}]}}
    })
    .to_string()
}

/// Egress deny entries and an ingress allow-list: tcp/22 (sshd, whatever the host's
/// sshd_config says) stays in every variant, so the lock-out check never refuses them.
fn policies(deny: &[&str], ports: &[&str]) -> Value {
    json!({
        "EgressDeny": deny.iter().map(|d| json!({"Destination": d})).collect::<Vec<_>>(),
        "IngressAllow": ports.iter().map(|p| json!({"Protocol": "tcp", "Ports": p})).collect::<Vec<_>>(),
    })
}

fn reload(sb: &Sandbox) -> Output {
    sb.agent_cmd(["firewall", "reload", "--timeout-seconds", "30"])
        .output(COMMAND_TIMEOUT)
        .unwrap()
}

/// `nft list <what…>` in the sandbox, as text ("" when absent).
fn list(sb: &Sandbox, what: &[&str]) -> String {
    let mut args = vec!["list"];
    args.extend_from_slice(what);
    let out = sb.nft(args).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn table(sb: &Sandbox) -> String {
    list(sb, &["table", "inet", "bosh_agent"])
}

/// The monit and NATS rules: what a reload of the workload policies must leave alone.
fn monit_and_nats(sb: &Sandbox) -> String {
    let mut s = String::new();
    for chain in ["monit_access", "monit_guard", "nats_access", "nats_guard"] {
        s += &list(sb, &["chain", "inet", "bosh_agent", chain]);
    }
    for set in ["nats_v4", "nats_v6"] {
        s += &list(sb, &["set", "inet", "bosh_agent", set]);
    }
    s
}

fn names(sb: &Sandbox, kind: &str) -> Vec<String> {
    let v = sb
        .nft_json(&["table", "inet", "bosh_agent"])
        .unwrap()
        .unwrap_or(Value::Null);
    let mut n: Vec<String> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o[kind]["name"].as_str().map(str::to_string))
        .collect();
    n.sort();
    n
}

#[test]
fn sighup_reloads_the_policies_refuses_bad_values_and_removes_what_is_switched_off() {
    let sb = Sandbox::new("reload").unwrap_or_else(|e| panic!("sandbox: {e}"));
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").unwrap();
    let _server = NatsServer::start(&sb, &pki, NATS_CN, "main", "127.0.0.1:4222", None);
    let settings_path: PathBuf = sb.dir().join("settings.json");
    let s = settings(
        &[nats_url("127.0.0.1:4222")],
        &pki.ca_pem,
        &pki.client("agent"),
    );
    std::fs::write(&settings_path, serde_json::to_vec(&s).unwrap()).unwrap();

    // No agent yet: nothing to signal.
    let out = reload(&sb);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running agent"),
        "{}",
        describe(&out)
    );

    let first = policies(
        &["192.0.2.0/24", "198.51.100.0/24"],
        &["22", "8080", "9090"],
    );
    let conf = sb
        .write_agent_config(&agent_json(&settings_path, first, json!({})))
        .unwrap();
    let mut agent = sb
        .spawn_agent(&sb.agent_exec_with(&agent_cg, &conf).unwrap())
        .unwrap();
    agent.wait_ready(integration::READY_TIMEOUT).unwrap();
    wait_endpoints(&sb, &[addr("127.0.0.1:4222")], Duration::from_secs(15));
    let pid_file = sb.run_dir().join("bosh-agent.pid");
    integration::wait_for("the pid file", Duration::from_secs(10), || {
        Ok(
            (std::fs::read_to_string(&pid_file).ok() == Some(format!("{}\n", agent.pid())))
                .then_some(()),
        )
    })
    .unwrap();
    let deny = list(&sb, &["set", "inet", "bosh_agent", "egress_deny_v4"]);
    assert!(deny.contains("198.51.100.0/24"), "{deny}");
    // A few single ports are compares in the ingress chain (more would fill its bitmap set).
    let ports = list(&sb, &["chain", "inet", "bosh_agent", "ingress_filter"]);
    assert!(ports.contains("tcp dport 9090 accept"), "{ports}");
    let guarded = monit_and_nats(&sb);
    assert!(guarded.contains("127.0.0.1 . 4222"), "{guarded}");

    // (a) An entry of each removed (and a key a reload cannot apply changed): their rules go.
    let fewer = policies(&["192.0.2.0/24"], &["22", "8080"]);
    std::fs::write(
        &conf,
        agent_json(
            &settings_path,
            fewer,
            json!({"HeartbeatIntervalSeconds": 7}),
        ),
    )
    .unwrap();
    let out = reload(&sb);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", agent.pid())),
        "{}",
        describe(&out)
    );
    let deny = list(&sb, &["set", "inet", "bosh_agent", "egress_deny_v4"]);
    assert!(
        deny.contains("192.0.2.0/24") && !deny.contains("198.51.100"),
        "{deny}"
    );
    let ports = list(&sb, &["chain", "inet", "bosh_agent", "ingress_filter"]);
    assert!(
        ports.contains("tcp dport 8080 accept") && !ports.contains("9090"),
        "{ports}"
    );
    assert_eq!(
        monit_and_nats(&sb),
        guarded,
        "monit and NATS rules untouched"
    );
    let log = agent.log();
    assert!(
        log.contains("Platform.Linux.HeartbeatIntervalSeconds")
            && log.contains("take effect at the next start"),
        "{log}"
    );
    let state = agent.state().unwrap();
    assert_eq!(state["reloads"], 1, "{state:#}");
    assert_eq!(
        state["workload"]["egress"]["deny_ranges_v4"], 1,
        "{state:#}"
    );
    // The reloaded table is the drift reference: status matches.
    let (code, status) = sb.status().unwrap();
    assert_eq!(code, 0, "{status:#}");

    // (b) A bad CIDR, and a file that does not parse: nothing changes live, byte for byte,
    // and `firewall reload` says why with exit 1.
    let before = table(&sb);
    let good = std::fs::read_to_string(&conf).unwrap();
    let bad = policies(&["192.0.2.0/24", "10.0.0.300/8"], &["22"]);
    std::fs::write(&conf, agent_json(&settings_path, bad, json!({}))).unwrap();
    let out = reload(&sb);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("EgressDeny[1].Destination") && err.contains("10.0.0.300/8"),
        "{err}"
    );
    assert_eq!(table(&sb), before, "the live table is unchanged");
    assert!(agent.log().contains("10.0.0.300/8"), "{}", agent.log());
    std::fs::write(&conf, &good[..good.len() / 2]).unwrap();
    let out = reload(&sb);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains(&conf.display().to_string()) && err.contains("line 1"),
        "{err}"
    );
    assert_eq!(table(&sb), before, "the live table is unchanged");
    // The agent keeps serving, and says the last reload changed nothing.
    assert!(
        agent.proc_mut().try_status().unwrap().is_none(),
        "the agent runs"
    );
    let (code, status) = sb.status().unwrap();
    assert_eq!(code, 0, "{status:#}");
    assert!(
        status["warnings"].to_string().contains("the last reload"),
        "{status:#}"
    );
    // Still the policies of (a): a reconcile finds no drift and keeps them.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(table(&sb), before);
    assert_eq!(agent.state().unwrap()["repairs"], 0);

    // (c) Egress switched off entirely: its chains and sets go, monit and NATS stay.
    let no_egress = json!({"IngressAllow": [{"Protocol": "tcp", "Ports": "22"}]});
    std::fs::write(&conf, agent_json(&settings_path, no_egress, json!({}))).unwrap();
    let out = reload(&sb);
    assert!(out.status.success(), "{}", describe(&out));
    let chains = names(&sb, "chain");
    assert!(
        !chains
            .iter()
            .any(|c| c.starts_with("egress_") && c != "egress_access_jobs"),
        "{chains:?}"
    );
    assert!(chains.iter().any(|c| c == "ingress_filter"), "{chains:?}");
    let sets = names(&sb, "set");
    assert!(!sets.iter().any(|s| s.starts_with("egress_")), "{sets:?}");
    assert_eq!(
        monit_and_nats(&sb),
        guarded,
        "monit and NATS rules untouched"
    );
    let (code, status) = sb.status().unwrap();
    assert_eq!(code, 0, "{status:#}");
    assert_eq!(status["agent"]["workload"]["egress"]["state"], "disabled");
    assert_eq!(status["agent"]["reload_error"], Value::Null);

    // SIGTERM still stops the agent, and its pid file goes with it.
    let st = agent.stop().unwrap();
    assert!(st.success(), "{st}");
    assert!(!pid_file.exists(), "the pid file is removed at stop");
}
