//! The machine the figures were taken on.

use super::*;

/// Median wall time of `argv` from spawn to reaped, over `n` runs (blocking wait, no polling).
pub(crate) fn spawn_wait_median(mut make: impl FnMut() -> Command, n: usize) -> Res<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = make();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let t = Instant::now();
        let st = cmd
            .spawn()
            .and_then(|mut c| c.wait())
            .map_err(|e| format!("spawn: {e}"))?;
        v.push(ms(t.elapsed()));
        if !st.success() {
            return Err(format!("{cmd:?} failed: {st}"));
        }
    }
    Ok(pct(&sorted(&v), 0.5))
}

pub(crate) fn facts() -> Res<()> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mount = integration::cgroup2_mount().map_err(|e| e.to_string())?;
    let layout = if mount.ends_with("unified") {
        "hybrid (cgroup2 at /sys/fs/cgroup/unified)"
    } else {
        "unified (cgroup2 at /sys/fs/cgroup)"
    };
    let tools = integration::Tools::get().map_err(|e| e.to_string())?;
    let size = std::fs::metadata(&tools.agent).map_or(0, |m| m.len());
    let true_ms = spawn_wait_median(|| Command::new("/bin/true"), 21)?;
    println!("\n## bench-runtime: the whole agent against real nats-server — machine\n");
    println!("| fact | value |");
    println!("|---|---|");
    println!(
        "| date (UTC) | {} |",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    println!("| nproc | {nproc} |");
    println!("| CPU | {cpu} |");
    println!("| kernel | {} |", read("/proc/sys/kernel/osrelease").trim());
    println!("| nft | {} |", first_line_of("nft", &["--version"]));
    println!(
        "| nats-server | {} |",
        first_line_of(NATS_SERVER, &["--version"])
    );
    println!("| cgroups | {layout} |");
    println!(
        "| load average at start | {} |",
        read("/proc/loadavg").trim()
    );
    println!(
        "| agent binary | {} ({:.1} MB) |",
        tools.agent.display(),
        size as f64 / 1e6
    );
    println!(
        "| `/bin/true` spawn → reaped, median of 21 (noise reference; ~4 ms where the Go figures were taken) | {true_ms:.2} ms |"
    );
    println!(
        "\nThe Go agent's figures are from shared/reference/go-agent-baseline.md (another machine of the same \
         kind, 2 vCPU, Linux 6.18); they were not re-measured here."
    );
    Ok(())
}
