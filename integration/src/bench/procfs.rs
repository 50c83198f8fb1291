//! What `/proc` says about a process: memory, CPU time, threads.

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Res;

/// Memory of a process from `/proc/<pid>/status`, kB (threads: a count).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss_kb: u64,
    pub anon_kb: u64,
    pub file_kb: u64,
    pub shmem_kb: u64,
    pub hwm_kb: u64,
    pub threads: u64,
}

/// The number after `key` (e.g. `VmRSS:`) in a `/proc/<pid>/status` text; 0 when absent.
pub fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One field of `/proc/<pid>/status` (0 when the process or the field is gone).
pub fn status_kb(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|t| status_field(&t, key))
        .unwrap_or(0)
}

/// The memory of `pid`.
pub fn mem(pid: u32) -> Res<Mem> {
    let t = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    Ok(Mem {
        rss_kb: status_field(&t, "VmRSS:"),
        anon_kb: status_field(&t, "RssAnon:"),
        file_kb: status_field(&t, "RssFile:"),
        shmem_kb: status_field(&t, "RssShmem:"),
        hwm_kb: status_field(&t, "VmHWM:"),
        threads: status_field(&t, "Threads:"),
    })
}

/// kB as MB.
pub fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// CPU time in ms: (the process's own utime + stime, its exited threads included; its
/// waited-for children's).
pub fn cpu_ms(pid: u32) -> Res<(f64, f64)> {
    let t = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let rest = t
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat: no ')'"))?;
    // Fields after the command: state(3) ... utime(14) stime(15) cutime(16) cstime(17).
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 15 {
        return Err(format!("/proc/{pid}/stat: too few fields"));
    }
    let hz = clock_ticks();
    Ok(((f[11] + f[12]) * 1000.0 / hz, (f[13] + f[14]) * 1000.0 / hz))
}

/// On-CPU time in ms of the process's live threads, from the scheduler's nanosecond clock
/// (`/proc/<pid>/task/*/schedstat`): precise where utime/stime count 10 ms ticks, but blind
/// to threads that have exited, so only for short windows.
pub fn sched_ms(pid: u32) -> Res<f64> {
    let dir = format!("/proc/{pid}/task");
    let rd = fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut ns = 0u64;
    for e in rd.flatten() {
        if let Ok(t) = fs::read_to_string(e.path().join("schedstat")) {
            ns += t
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(ns as f64 / 1e6)
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|v| v as f64)
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// CPU ms of this process's waited-for descendants so far.
pub fn children_cpu_ms() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                tv.tv_sec() as f64 * 1000.0 + tv.tv_usec() as f64 / 1000.0
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(f64::NAN)
}

/// Samples VmRSS and RssAnon of a process every `poll` on a thread of its own until
/// [`RssSampler::finish`]; returns the maxima (kB).
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64)>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32, poll: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut rss, mut anon) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                rss = rss.max(status_kb(pid, "VmRSS:"));
                anon = anon.max(status_kb(pid, "RssAnon:"));
                std::thread::sleep(poll);
            }
            (rss, anon)
        });
        RssSampler { stop, handle }
    }

    /// Stops sampling; the peak VmRSS and RssAnon seen (kB).
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_and_this_process() {
        let text = "Name:\tx\nVmRSS:\t  1234 kB\nThreads:\t3\n";
        assert_eq!(status_field(text, "VmRSS:"), 1234);
        assert_eq!(status_field(text, "Threads:"), 3);
        assert_eq!(status_field(text, "RssAnon:"), 0);
        let me = mem(std::process::id()).expect("own status");
        assert!(me.rss_kb > 0 && me.threads >= 1, "{me:?}");
        assert!(cpu_ms(std::process::id()).is_ok());
        assert!(cpu_ms(u32::MAX).is_err());
    }
}
