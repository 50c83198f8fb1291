//! Section 4: failover in a three-server cluster, hot and after an outage.

use super::*;

pub(crate) fn failover_section(pki: &Pki, k: &Knobs) -> Res<()> {
    let sb = Guarded::new("bench-runtime-failover")?;
    let agent_cg = sb.cgroup("agent").map_err(|e| e.to_string())?;
    // The agent's two servers (127.0.0.1 and 127.0.0.2, port 4222: the name's port cannot
    // change) and the director's (127.0.0.3), one cluster, so that the director stays
    // connected while the agent's server goes away.
    let route = |n: u8| format!("127.0.0.{n}:6222");
    let cluster = |me: u8| {
        Some((
            route(me),
            (1..=3u8)
                .filter(|n| *n != me)
                .map(route)
                .collect::<Vec<_>>(),
        ))
    };
    let ip = |n: usize| -> IpAddr { IpAddr::from([127, 0, 0, n as u8 + 1]) };
    let mut servers = [
        Server::new(&sb, pki, "one", "127.0.0.1:4222", cluster(1))?,
        Server::new(&sb, pki, "two", "127.0.0.2:4222", cluster(2))?,
    ];
    let mut dserver = Server::new(&sb, pki, "director", DIRECTOR_SIDE, cluster(3))?;
    for s in servers.iter_mut() {
        s.start()?;
    }
    dserver.start()?;
    let dns = Dns::start(&sb, DIRECTOR_NAME, ip(0));
    let director = Client::connect(&sb, pki, "director", DIRECTOR_SIDE)?;
    director.ns.wait_answer(DIRECTOR_NAME, ip(0));
    let files = AgentFiles::write(
        &sb,
        &settings(
            &[nats_url(&format!("{DIRECTOR_NAME}:4222"))],
            &pki.ca_pem,
            &pki.client("agent"),
        ),
    )?;
    let exec = files.exec(&sb, &agent_cg, true)?;
    let (mut agent, took) = start_until_pong(&sb, &director, &exec, &agent_cg)?;
    let mut connected_at = Instant::now();
    eprintln!(
        "bench-runtime: failover: agent subscribed {:.0} ms after exec; {} runs per scenario, outages {:?}",
        ms(took),
        k.failover_runs,
        k.outages
    );

    let mut cur = 0usize;
    let mut hot_sigterm = Vec::new();
    let mut hot_exit = Vec::new();
    let mut stop_ms = Vec::new();
    let mut cold: Vec<(Duration, Vec<f64>, Vec<f64>)> = k
        .outages
        .iter()
        .map(|g| (*g, Vec::new(), Vec::new()))
        .collect();
    let mut failed = 0usize;
    let settle = |servers: &[Server; 2], other: usize, connected_at: Instant| -> Res<()> {
        dns.point(DIRECTOR_NAME, ip(other));
        director.ns.wait_answer(DIRECTOR_NAME, ip(other));
        // The agent's connection counts as stable, and a just-restarted server has its routes.
        let mut until = connected_at + STABLE;
        if let Some(st) = servers[other].started {
            until = until.max(st + Duration::from_millis(500));
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        Ok(())
    };
    for _round in 0..k.failover_runs {
        // Hot standby: the other server is up; the name moves to it; the current one stops.
        let other = 1 - cur;
        if !servers[other].running() {
            servers[other].start()?;
        }
        settle(&servers, other, connected_at)?;
        // Pings start once the old server has exited: until then the agent still answers
        // through it.
        let t0 = Instant::now();
        let exited = servers[cur].stop()?;
        let pong = director.next_pong(PONG_LIMIT)?;
        match pong {
            Some(t) => {
                hot_sigterm.push(ms(t.saturating_duration_since(t0)));
                hot_exit.push(ms(t.saturating_duration_since(exited)));
                stop_ms.push(ms(exited.saturating_duration_since(t0)));
                connected_at = t;
                cur = other;
            }
            None => {
                failed += 1;
                eprintln!("bench-runtime: hot failover without a pong within {PONG_LIMIT:?}");
                break;
            }
        }

        // Cold: the other server is down; the name moves to it; the current one stops; the
        // other comes up after the outage.
        for (gap, from_ready, from_loss) in cold.iter_mut() {
            let other = 1 - cur;
            if servers[other].running() {
                servers[other].stop()?;
            }
            settle(&servers, other, connected_at)?;
            let lost = servers[cur].stop()?;
            std::thread::sleep((lost + *gap).saturating_duration_since(Instant::now()));
            servers[other].spawn()?;
            let ready = servers[other].wait_ready()?;
            match director.next_pong(PONG_LIMIT)? {
                Some(t) => {
                    from_ready.push(ms(t.saturating_duration_since(ready)));
                    from_loss.push(ms(t.saturating_duration_since(lost)));
                    connected_at = t;
                    cur = other;
                }
                None => {
                    failed += 1;
                    eprintln!(
                        "bench-runtime: cold failover ({gap:?} outage) without a pong within {PONG_LIMIT:?}"
                    );
                }
            }
        }
        if failed > 0 {
            eprintln!("bench-runtime: agent log tail:\n{}", tail(&agent.log(), 20));
            break;
        }
    }
    agent
        .stop()
        .map_err(|e| format!("stopping the agent: {e}"))?;
    drop(agent);

    println!(
        "\n## Failover: the name re-pointed to the other server of the cluster (ms; target ≤ 2 s median)\n"
    );
    println!(
        "The director pings every {} ms through a third server of the cluster (127.0.0.3), so the figure \
         includes the agent's resolve + rules + TLS dial + subscribe and the cluster routing the ping to it. \
         Each run starts from a connection older than {:.1} s (backoff reset), alternating between 127.0.0.1 and 127.0.0.2.\n",
        POLL_EVERY.as_millis(),
        STABLE.as_secs_f64()
    );
    println!("| scenario | from | median (min–max) | runs | samples |");
    println!("|---|---|---|---|---|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| hot standby: new server already up, old one stopped | SIGTERM to the old server | {} | {} | {} |",
        med_range(&hot_sigterm, 0),
        hot_sigterm.len(),
        list(&hot_sigterm)
    );
    println!(
        "| hot standby (same runs) | the old server's exit (SIGTERM → exit: {}) | {} | {} | {} |",
        med_range(&stop_ms, 0),
        med_range(&hot_exit, 0),
        hot_exit.len(),
        list(&hot_exit)
    );
    for (gap, from_ready, from_loss) in &cold {
        println!(
            "| cold: new server starts {:.1} s after the old one exited | the new server's \"Server is ready\" | {} | {} | {} |",
            gap.as_secs_f64(),
            med_range(from_ready, 0),
            from_ready.len(),
            list(from_ready)
        );
        println!(
            "| cold, {:.1} s outage (same runs) | the old server's exit | {} | {} | {} |",
            gap.as_secs_f64(),
            med_range(from_loss, 0),
            from_loss.len(),
            list(from_loss)
        );
    }
    println!("\nGo agent: no failover figure in the baseline.");
    if failed > 0 {
        println!("\n{failed} failover run(s) got no pong within {PONG_LIMIT:?} (see stderr).");
    }
    drop(director);
    drop(dns);
    for s in servers.iter_mut() {
        s.stop()?;
    }
    dserver.stop()?;
    Ok(())
}
