//! The machine the figures were taken on.

use super::*;

pub(crate) fn disk_of(dir: &Path) -> String {
    let fs_line = Command::new("df")
        .arg("--output=source,fstype")
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".into());
    let dev = fs_line
        .split_whitespace()
        .next()
        .and_then(|s| s.strip_prefix("/dev/"))
        .unwrap_or("")
        .to_string();
    let sys = Path::new("/sys/block").join(&dev);
    let rot = fs::read_to_string(sys.join("queue/rotational"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let vendor = fs::read_to_string(sys.join("device/vendor"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let kind = if vendor == "0x1af4" {
        "virtio-blk (medium behind it unknown)".to_string()
    } else if vendor.is_empty() {
        "unknown".to_string()
    } else {
        format!("vendor {vendor}")
    };
    format!("{fs_line}, {kind}, rotational flag {rot}")
}

pub(crate) fn facts(w: &World) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| {
        flags
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|x| x == f))
    };
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1048576.0)
        });
    let agent = &w.sb.tools().agent;
    let agent_size = fs::metadata(agent).map(|m| m.len()).unwrap_or(0);
    println!("## bench-deploy — machine\n");
    println!("| fact | value |");
    println!("|---|---|");
    println!(
        "| date (UTC) | {} |",
        first_line_of("date", &["-u", "+%Y-%m-%d %H:%M"])
    );
    println!("| nproc | {} |", first_line_of("nproc", &[]));
    println!(
        "| CPU | {cpu} (sha_ni: {}, avx2: {}) |",
        if has("sha_ni") { "yes" } else { "no" },
        if has("avx2") { "yes" } else { "no" }
    );
    println!("| memory | {mem} |");
    println!("| kernel | {} |", first_line_of("uname", &["-r"]));
    println!(
        "| disk of the sandbox (and nginx's store) | {} |",
        disk_of(w.sb.dir())
    );
    println!(
        "| load average at start | {} |",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "| agent binary | {} ({:.1} MB) |",
        agent.display(),
        agent_size as f64 / 1e6
    );
    println!(
        "| nginx | {} |",
        first_line_of(integration::dav::NGINX, &["-v"])
    );
    println!("| curl | {} |", first_line_of("curl", &["--version"]));
    println!(
        "| tar / gzip | {} / {} |",
        first_line_of("tar", &["--version"]),
        first_line_of("gzip", &["--version"])
    );
    println!(
        "| nats-server | {} |",
        first_line_of(integration::nats::NATS_SERVER, &["--version"])
    );
}
