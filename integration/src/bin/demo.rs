//! `make demo`: the whole agent in a sandbox — a fresh network namespace and cgroups, a
//! nats-server with mutual TLS, a DNS server for the director's name, monit with a sample job —
//! with this program acting as the director (ping, get_state, stop, start), then
//! `bosh-agent firewall status`, and a process outside the agent's cgroup refused at the packet
//! level by both the monit and the NATS rules. Everything it creates is removed at the end.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use integration::monit::Monit;
use integration::nats::{
    DIRECTOR_NAME, DIRECTOR_SIDE, Director, Dns, NATS_CN, NatsServer, Pki, nats_url, settings,
    start_agent_with,
};
use integration::{MONIT_V4, NOBODY, Probe, Sandbox};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(15);

fn main() -> ExitCode {
    match demo() {
        Ok(()) => {
            println!("\ndemo finished; the sandbox is removed.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn step(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn demo() -> Result<(), String> {
    step("sandbox: a network namespace, cgroups, nats-server (mTLS), dnsmasq, monit");
    let sb = Sandbox::new("demo").map_err(|e| e.to_string())?;
    let pki = Pki::new("ca");
    let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
    let other = sb.cgroup("other").map_err(|e| e.to_string())?;
    let _nats = NatsServer::start(&sb, &pki, NATS_CN, "main", "0.0.0.0:4222", None);
    let _dns = Dns::start(
        &sb,
        DIRECTOR_NAME,
        "127.0.0.1".parse().map_err(|e| format!("{e}"))?,
    );
    let mut monit = Monit::prepare(&sb).map_err(|e| e.to_string())?;
    let agent_url = format!("{DIRECTOR_NAME}:4222");
    println!("  director's NATS: nats://{agent_url} (name served by the sandbox's dnsmasq)");

    step("the agent: bosh-agent -P ubuntu -C agent.json -b <base>, EnableNATSFirewall: true");
    let s = settings(&[nats_url(&agent_url)], &pki.ca_pem, &pki.client("agent"));
    let started = Instant::now();
    let mut agent = start_agent_with(
        &sb,
        &agent_cg,
        &s,
        true,
        &json!({"HeartbeatIntervalSeconds": 5}),
    );
    let director = Director::connect(&sb, &pki, DIRECTOR_SIDE);
    let rtt = director.wait_pong(LIMIT);
    println!(
        "  first pong {:?} after the agent's start (last round trip {rtt:?})",
        started.elapsed()
    );
    monit.start().map_err(|e| e.to_string())?;
    monit
        .wait_sample_running(LIMIT)
        .map_err(|e| e.to_string())?;

    step("director → agent");
    let call = |method: &str, args: Value| -> Result<Value, String> {
        let r = director.call(method, args.clone(), 3, LIMIT)?;
        println!("  {method} {args} → {}", short(&r));
        Ok(r)
    };
    call("ping", json!([]))?;
    let st = call("get_state", json!([]))?;
    println!("    job_state: {}", st["value"]["job_state"]);
    let task = call("stop", json!([]))?;
    let id = task["value"]["agent_task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_task(&director, &id)?;
    println!(
        "    job_state after stop: {}",
        call("get_state", json!([]))?["value"]["job_state"]
    );
    call("start", json!([]))?;
    let deadline = Instant::now() + LIMIT;
    loop {
        let st = director.call("get_state", json!([]), 3, LIMIT)?;
        if st["value"]["job_state"] == "running" || Instant::now() > deadline {
            println!("    job_state after start: {}", st["value"]["job_state"]);
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    call("frobnicate", json!([]))?;

    step("the table the agent installed");
    print_out(
        &sb.nft(["list", "table", "inet", "bosh_agent"])
            .map_err(|e| e.to_string())?,
    );

    step("bosh-agent firewall status");
    print_out(
        &sb.agent_cmd(["firewall", "status"])
            .output(LIMIT)
            .map_err(|e| e.to_string())?,
    );

    step("who gets through (non-root processes, uid 65534, unless said otherwise)");
    for (label, cg, uid, addr) in [
        (
            "the agent's cgroup → monit 127.0.0.1:2822",
            &agent_cg,
            Some(NOBODY),
            MONIT_V4,
        ),
        (
            "another cgroup → monit 127.0.0.1:2822",
            &other,
            Some(NOBODY),
            MONIT_V4,
        ),
        (
            "another cgroup → NATS 127.0.0.1:4222",
            &other,
            Some(NOBODY),
            "127.0.0.1:4222",
        ),
        (
            "root in another cgroup → NATS 127.0.0.1:4222",
            &other,
            None,
            "127.0.0.1:4222",
        ),
        (
            "the agent's cgroup → NATS 127.0.0.1:4222",
            &agent_cg,
            Some(NOBODY),
            "127.0.0.1:4222",
        ),
    ] {
        let p = sb.probe(cg, uid, addr).map_err(|e| e.to_string())?;
        let verdict = match p {
            Probe::Connected => "CONNECTED",
            Probe::TimedOut => "REFUSED (SYN dropped)",
            Probe::Refused => "connection refused (nothing listening)",
            _ => "probe failed",
        };
        println!("  {label:<48} {verdict}");
    }
    println!("  (and the director's own link, on another address, kept answering throughout)");
    call("ping", json!([]))?;

    step("SIGTERM: the agent stops, the firewall stays");
    drop(director);
    agent.stop().map_err(|e| e.to_string())?;
    let p = sb
        .probe(&other, Some(NOBODY), MONIT_V4)
        .map_err(|e| e.to_string())?;
    println!("  another cgroup → monit with the agent stopped: {p:?}");
    Ok(())
}

fn wait_task(d: &Director, id: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = d.call("get_task", json!([id]), 3, LIMIT)?;
        if r["value"]["state"] != "running" {
            println!("  get_task [{id}] → {}", short(&r));
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("task {id} still running"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s
    }
}

fn print_out(out: &std::process::Output) {
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {l}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        println!("  (stderr) {}", err.trim());
    }
}
