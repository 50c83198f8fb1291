//! Sections 2 and 3 on one agent: steady-state RSS and CPU, then `ping` round trips beside
//! the bare echo responder.

use super::*;

pub(crate) fn single_server_sections(pki: &Pki, k: &Knobs) -> Res<()> {
    let sb = Guarded::new("bench-runtime")?;
    let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
    let launch_cg = sb.cgroup("launch").map_err(|e| e.to_string())?;
    let mut server = Server::new(&sb, pki, "main", "0.0.0.0:4222", None)?;
    server.start()?;
    let director = Client::connect(&sb, pki, "director", DIRECTOR_SIDE)?;
    let echo = Client::connect(&sb, pki, "echo", DIRECTOR_SIDE)?;
    echo.serve_echo()?;
    let files = AgentFiles::write(
        &sb,
        &settings(&[nats_url(AGENT_SIDE)], &pki.ca_pem, &pki.client("agent")),
    )?;

    if k.runs("starts") {
        exec_section(&sb, &files, &director, &agent_cg, &launch_cg, k)?;
    }
    if !k.runs("steady") {
        return Ok(());
    }

    // --- steady state: a fresh agent, firewall on, default intervals, nobody talking to it
    eprintln!(
        "bench-runtime: steady state, {:.0} s idle",
        k.idle.as_secs_f64()
    );
    first_boot(&sb)?;
    let exec = files.exec(&sb, &agent_cg, true)?;
    let (mut agent, took) = start_until_pong(&sb, &director, &exec, &agent_cg)?;
    let pid = agent.pid();
    let connected = Instant::now();
    let spawned = connected - took;
    let cpu_start = cpu_ms(pid)?;
    let sched_start = sched_ms(pid)?;
    std::thread::sleep(
        (spawned + Duration::from_secs(3)).saturating_duration_since(Instant::now()),
    );
    let mem3 = mem(pid)?;
    std::thread::sleep((connected + k.idle).saturating_duration_since(Instant::now()));
    let idle_for = connected.elapsed();
    let cpu_end = cpu_ms(pid)?;
    let mem_idle = mem(pid)?;
    let idle_own = cpu_end.0 - cpu_start.0;
    let idle_children = cpu_end.1 - cpu_start.1;

    // --- ping round trips on the same agent, beside the bare echo responder
    eprintln!(
        "bench-runtime: ping round trips ({} sequential, then {:?} in flight)",
        k.pings, CONCURRENCY
    );
    let agent_subject = format!("agent.{AGENT_ID}");
    let agent_subject = agent_subject.as_str();
    director.sequential(agent_subject, 200)?;
    director.sequential(ECHO_SUBJECT, 200)?;
    let blocks = 8usize;
    let per = k.pings.div_ceil(blocks);
    let (mut seq_agent, mut seq_echo) = (Vec::new(), Vec::new());
    let (mut lost_agent, mut lost_echo, mut bad) = (0, 0, 0);
    let mut agent_cpu = 0.0;
    let mut agent_wall = Duration::ZERO;
    for _ in 0..blocks {
        let c0 = sched_ms(pid)?;
        let s = director.sequential(agent_subject, per)?;
        let c1 = sched_ms(pid)?;
        agent_cpu += c1 - c0;
        agent_wall += s.elapsed;
        seq_agent.extend(s.lat_us);
        lost_agent += s.lost;
        bad += s.bad;
        let e = director.sequential(ECHO_SUBJECT, per)?;
        seq_echo.extend(e.lat_us);
        lost_echo += e.lost;
        bad += e.bad;
    }
    let mut bursts = Vec::new();
    for &c in &CONCURRENCY {
        let a = director.burst(agent_subject, c, BURST)?;
        let e = director.burst(ECHO_SUBJECT, c, BURST)?;
        bad += a.bad + e.bad;
        bursts.push((c, a, e));
    }
    let mem_load = mem(pid)?;
    // Then a burst of get_state, which reads the spec and monit's status for every request:
    // what the agent holds on to afterwards is what a flood of heavier requests leaves
    // behind. monit starts only now (with the monit.user the agent wrote at boot), so the
    // figures above have no monit in them, as before.
    eprintln!("bench-runtime: {GET_STATE_BURST} get_state, 16 in flight");
    let mut monit = integration::monit::Monit::prepare(&sb).map_err(|e| e.to_string())?;
    monit.start().map_err(|e| e.to_string())?;
    let gs = director.burst_of(agent_subject, "get_state", 16, GET_STATE_BURST)?;
    bad += gs.bad;
    std::thread::sleep(Duration::from_secs(2));
    let mem_gs = mem(pid)?;
    monit.stop();
    agent
        .stop()
        .map_err(|e| format!("stopping the agent: {e}"))?;
    drop(agent);

    println!(
        "\n## Steady state (NATS firewall on, heartbeat and reconcile every 30 s, connected and idle for {:.0} s)\n",
        idle_for.as_secs_f64()
    );
    println!("| figure | this agent | target | Go agent (doc) |");
    println!("|---|---|---|---|");
    println!(
        "| VmRSS 3 s after exec | {} | — | 17.3 MB |",
        mb(mem3.rss_kb)
    );
    println!(
        "| VmRSS after {:.0} s connected | {} | ≤ 8 MB | 17.6 MB at 90 s |",
        idle_for.as_secs_f64(),
        mb(mem_idle.rss_kb)
    );
    println!(
        "| RssAnon / RssFile / RssShmem | {} / {} / {} | — | 2.7 MB anonymous |",
        mb(mem_idle.anon_kb),
        mb(mem_idle.file_kb),
        mb(mem_idle.shmem_kb)
    );
    println!(
        "| VmHWM (peak RSS so far) / threads | {} / {} | — | — |",
        mb(mem_idle.hwm_kb),
        mem_idle.threads
    );
    println!(
        "| CPU (utime + stime) while idle, {:.0} s | {:.0} ms (≈ {:.1} ms per 90 s) | — | ~20 ms over 90 s |",
        idle_for.as_secs_f64(),
        idle_own,
        idle_own * 90.0 / idle_for.as_secs_f64()
    );
    println!(
        "| CPU of its children (`nft`) in the same window | {idle_children:.0} ms | — | — (Go uses netlink, no children) |"
    );
    println!(
        "| CPU from exec to subscribed | {sched_start:.1} ms own (schedstat) + {:.0} ms children (`nft`) | — | — |",
        cpu_start.1
    );
    println!(
        "| VmRSS / VmHWM after the ping runs below | {} / {} | — | — |",
        mb(mem_load.rss_kb),
        mb(mem_load.hwm_kb)
    );
    println!(
        "| VmRSS / VmHWM 2 s after {GET_STATE_BURST} get_state, 16 in flight ({:.0}/s, {} lost) | {} / {} | — | — |",
        gs.lat_us.len() as f64 / gs.elapsed.as_secs_f64(),
        gs.lost,
        mb(mem_gs.rss_kb),
        mb(mem_gs.hwm_kb)
    );

    println!(
        "\n## `ping` through nats-server (director → nats-server → responder → nats-server → director; µs)\n"
    );
    println!(
        "The bare echo responder is an async-nats client in this process that decodes the request and \
         publishes `{{\"value\":\"pong\"}}` to its `reply_to`: the path without the agent. Sequential runs \
         are interleaved in {blocks} blocks.\n"
    );
    println!("| figure | this agent | bare NATS echo | Go agent |");
    println!("|---|---|---|---|");
    let (sa, se) = (sorted(&seq_agent), sorted(&seq_echo));
    println!(
        "| sequential round trip p50 / p99 / max ({} pings) | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | not in the baseline |",
        sa.len(),
        pct(&sa, 0.5),
        pct(&sa, 0.99),
        sa.last().copied().unwrap_or(f64::NAN),
        pct(&se, 0.5),
        pct(&se, 0.99),
        se.last().copied().unwrap_or(f64::NAN),
    );
    println!(
        "| lost (no reply within {} s) | {lost_agent} | {lost_echo} | — |",
        REPLY_LIMIT.as_secs()
    );
    println!(
        "| agent CPU per sequential ping | {:.0} µs ({:.0} % of one core while pinged) | — | — |",
        agent_cpu * 1000.0 / sa.len().max(1) as f64,
        agent_cpu / ms(agent_wall).max(1e-9) * 100.0
    );
    for (c, a, e) in &bursts {
        let (sa, se) = (sorted(&a.lat_us), sorted(&e.lat_us));
        let rate = |s: &Series| s.lat_us.len() as f64 / s.elapsed.as_secs_f64();
        println!(
            "| {c} in flight, {BURST} pings: replies/s; p50 / p99 | {:.0}/s; {:.0} / {:.0}{} | {:.0}/s; {:.0} / {:.0}{} | — |",
            rate(a),
            pct(&sa, 0.5),
            pct(&sa, 0.99),
            if a.lost > 0 {
                format!(" ({} lost)", a.lost)
            } else {
                String::new()
            },
            rate(e),
            pct(&se, 0.5),
            pct(&se, 0.99),
            if e.lost > 0 {
                format!(" ({} lost)", e.lost)
            } else {
                String::new()
            },
        );
    }
    if bad > 0 {
        println!("\n{bad} replies were not `{{\"value\":\"pong\"}}` or not matched to a request.");
    }
    drop(echo);
    drop(director);
    server.stop()?;
    Ok(())
}
