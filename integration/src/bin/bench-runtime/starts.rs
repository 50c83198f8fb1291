//! Section 1: exec → subscribed, firewall on and off, first boot and restart.

use super::*;

pub(crate) struct StartCond {
    pub(crate) name: &'static str,
    pub(crate) go: &'static str,
    pub(crate) nats_firewall: bool,
    pub(crate) first_boot: bool,
    pub(crate) took_ms: Vec<f64>,
    pub(crate) cpu_ms: Vec<f64>,
    pub(crate) children_ms: Vec<f64>,
    pub(crate) failures: usize,
}

/// exec → subscribed under four conditions, interleaved round by round.
pub(crate) fn exec_section(
    sb: &Sandbox,
    files: &AgentFiles,
    director: &Client,
    agent_cg: &CgroupDir,
    launch_cg: &CgroupDir,
    k: &Knobs,
) -> Res<()> {
    let cond = |name, go, nats_firewall, first_boot| StartCond {
        name,
        go,
        nats_firewall,
        first_boot,
        took_ms: vec![],
        cpu_ms: vec![],
        children_ms: vec![],
        failures: 0,
    };
    let mut conds = [
        cond(
            "NATS firewall on, first boot (no table)",
            "27.5 (first boot, with its firewall)",
            true,
            true,
        ),
        cond(
            "NATS firewall on, restart (table left by the previous run)",
            "40.1 (with its firewall)",
            true,
            false,
        ),
        cond(
            "NATS firewall off (monit firewall only), first boot",
            "19.3 (16.3–29.7) without any firewall",
            false,
            true,
        ),
        cond(
            "NATS firewall off (monit firewall only), restart",
            "19.3 (16.3–29.7) without any firewall",
            false,
            false,
        ),
    ];
    eprintln!(
        "bench-runtime: exec → subscribed, {} rounds x {} conditions",
        k.starts,
        conds.len()
    );
    let mut failures = 0usize;
    'rounds: for round in 0..k.starts {
        // Fixed order inside a round: each restart follows a first boot of the same kind.
        for c in conds.iter_mut() {
            if c.first_boot {
                first_boot(sb)?;
            }
            let exec = files.exec(sb, agent_cg, c.nats_firewall)?;
            match start_until_pong(sb, director, &exec, agent_cg) {
                Ok((mut agent, took)) => {
                    c.took_ms.push(ms(took));
                    if k.show_log {
                        let spawned = std::time::SystemTime::now() - took;
                        let since = spawned
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        eprintln!(
                            "--- {} ({:.1} ms; spawned at {}.{:06} s past the minute)\n{}",
                            c.name,
                            ms(took),
                            since.as_secs() % 60,
                            since.subsec_micros(),
                            agent.log()
                        );
                    }
                    if let (Ok(own), Ok((_, children))) =
                        (sched_ms(agent.pid()), cpu_ms(agent.pid()))
                    {
                        c.cpu_ms.push(own);
                        c.children_ms.push(children);
                    }
                    agent
                        .stop()
                        .map_err(|e| format!("stopping the agent: {e}"))?;
                }
                Err(e) => {
                    c.failures += 1;
                    failures += 1;
                    eprintln!("bench-runtime: round {round}, {}: {e}", c.name);
                    if failures >= 3 {
                        eprintln!("bench-runtime: 3 failed starts; giving up on this section");
                        break 'rounds;
                    }
                }
            }
        }
    }
    let wrappers = wrappers_median(sb, launch_cg, k.starts.max(11))?;
    println!(
        "\n## exec → subscribed (exec, after the cgroup placement, to the first `ping` answered; pings every {} ms; {} rounds, interleaved; ms)\n",
        POLL_EVERY.as_millis(),
        k.starts
    );
    println!(
        "| condition | this agent: median (min–max) | CPU until then, median: own (schedstat) + `nft` children (10 ms ticks) | failed | Go agent (doc), median |"
    );
    println!("|---|---|---|---|---|");
    for c in &conds {
        let (cpu, children) = (sorted(&c.cpu_ms), sorted(&c.children_ms));
        println!(
            "| {} | {} | {:.1} + {:.0} ms | {} | {} |",
            c.name,
            med_range(&c.took_ms, 1),
            pct(&cpu, 0.5),
            pct(&children, 0.5),
            c.failures,
            c.go
        );
    }
    println!(
        "| launch wrappers alone (release → `true` exited, placement done before), included above | {wrappers:.1} | — | — | — |"
    );
    Ok(())
}
