//! Machine vitals for heartbeats and `get_state` (`"full"`), in upstream's JSON shape.
//!
//! Upstream (`platform/vitals/service.go`) gets these numbers from gosigar; here the same
//! numbers are computed from procfs and `statvfs(3)`, with the same definitions:
//!
//! - **cpu**: `user` = (user + nice) / total, `sys` = system / total, `wait` = iowait / total,
//!   where total = user + nice + system + idle + iowait + irq + softirq + steal (gosigar's
//!   `Cpu.Total()`; guest time is already counted inside user by the kernel). Percentages with
//!   one decimal (`FormatFractionOf100(1)`), over the interval between two samples (see
//!   [`CpuSampler`]).
//! - **mem**: used = `MemTotal - MemAvailable` (gosigar's `ActualUsed`; on kernels without
//!   `MemAvailable`, `MemFree + Buffers + Cached` stands in for it, as gosigar does). `kb` is
//!   used in KiB, `percent` has no decimals.
//! - **swap**: used = `SwapTotal - SwapFree`; same formatting as mem.
//! - **load**: the three `/proc/loadavg` averages with two decimals (`%.2f`).
//! - **disk**: `percent` = (blocks - free blocks) / blocks, `inode_percent` = (files - free
//!   files) / files, no decimals (`FormatFractionOf100(0)`).
//! - **uptime**: whole seconds from `/proc/uptime` (truncated, as `uint64(float)` does).
//!
//! A ratio whose total is zero (no swap, a filesystem without inode accounting) is `0`, as
//! upstream's `Percentage.FractionOf100` returns for a zero total.
//!
//! The parsers are pure functions of text so that fixtures exercise them; the readers are thin.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where procfs is mounted on a real system.
pub const PROC_ROOT: &str = "/proc";

/// Shortest interval over which [`CpuSampler`] computes new CPU percentages. A request that
/// comes sooner (e.g. `get_state` right after a heartbeat) gets the previous figures instead
/// of percentages over a few jiffies, which would be mostly rounding noise.
pub const MIN_CPU_INTERVAL: Duration = Duration::from_secs(1);

/// Errors while reading vitals. Each names the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum VitalsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{file}: {detail}")]
    Parse { file: &'static str, detail: String },
    #[error("statvfs {path}: {source}")]
    Statvfs { path: PathBuf, source: nix::Error },
}

fn parse_err(file: &'static str, detail: impl Into<String>) -> VitalsError {
    VitalsError::Parse {
        file,
        detail: detail.into(),
    }
}

/// Upstream's `vitals.Vitals`: every value a string, empty ones left out (`omitempty`).
///
/// Serialises with the field order and names of upstream's Go struct, so the JSON is
/// byte-for-byte what upstream would send for the same numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vitals {
    #[serde(default)]
    pub cpu: CpuVitals,
    /// Left out when no disk is reported (Go's `omitempty` on an empty map).
    #[serde(default, skip_serializing_if = "DiskVitals::is_empty")]
    pub disk: DiskVitals,
    /// 1, 5 and 15 minute load averages; left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load: Vec<String>,
    #[serde(default)]
    pub mem: MemVitals,
    #[serde(default)]
    pub swap: MemVitals,
    #[serde(default)]
    pub uptime: UptimeVitals,
}

/// CPU percentages, one decimal each (`"12.3"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuVitals {
    /// Kernel time (system).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sys: String,
    /// User time, niced processes included.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Time idle while waiting for I/O.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub wait: String,
}

/// Upstream's `DiskVitals` map. Go sorts map keys when it marshals, so the field order here
/// (ephemeral, persistent, system) is the order upstream's JSON has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskVitals {
    /// `<base>/data`, only when it is a mount point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<DiskUsage>,
    /// `<base>/store`, only when it is a mount point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<DiskUsage>,
    /// `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<DiskUsage>,
}

impl DiskVitals {
    /// True when no disk is reported.
    pub fn is_empty(&self) -> bool {
        self.ephemeral.is_none() && self.persistent.is_none() && self.system.is_none()
    }
}

/// One filesystem's usage, integer percentages (`"42"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    /// Inodes in use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub inode_percent: String,
    /// Blocks in use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub percent: String,
}

/// Memory or swap use: KiB used and an integer percentage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemVitals {
    /// KiB in use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kb: String,
    /// Percentage of the total in use.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub percent: String,
}

/// Seconds since boot; left out when zero (upstream's `omitempty` on an integer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UptimeVitals {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub secs: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// `part / total * 100` with `decimals` decimals; `0` for a zero total (upstream's
/// `Percentage.FormatFractionOf100`). A part above the total is reported as is.
pub fn format_percent(part: u64, total: u64, decimals: usize) -> String {
    let fraction = if total == 0 {
        0.0
    } else {
        // u64 → f64 loses precision only above 2^53, far beyond any counter's ratio error.
        part as f64 / total as f64 * 100.0
    };
    format!("{fraction:.decimals$}")
}

// ---------------------------------------------------------------------------------------------
// cpu

/// The aggregate `cpu` line of `/proc/stat`, in USER_HZ ticks since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Parses the aggregate `cpu` line of `/proc/stat` text.
    ///
    /// Needs at least user, nice, system and idle (every Linux since 2.4); the later columns
    /// are 0 when a kernel does not have them. Guest columns are ignored: the kernel already
    /// counts guest time inside user and nice. Errors name the offending field.
    pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, VitalsError> {
        const FILE: &str = "/proc/stat";
        let line = text
            .lines()
            .find(|l| l.split_ascii_whitespace().next() == Some("cpu"))
            .ok_or_else(|| parse_err(FILE, "no aggregate \"cpu\" line"))?;
        let mut values = [0u64; 8];
        let mut count = 0;
        for (i, field) in line.split_ascii_whitespace().skip(1).take(8).enumerate() {
            values[i] = field.parse().map_err(|_| {
                parse_err(
                    FILE,
                    format!("cpu column {} is not a tick count: {field:?}", i + 1),
                )
            })?;
            count = i + 1;
        }
        if count < 4 {
            return Err(parse_err(
                FILE,
                format!("cpu line has {count} columns, at least 4 needed: {line:?}"),
            ));
        }
        let [user, nice, system, idle, iowait, irq, softirq, steal] = values;
        Ok(CpuTimes {
            user,
            nice,
            system,
            idle,
            iowait,
            irq,
            softirq,
            steal,
        })
    }

    /// gosigar's `Cpu.Total()`. Saturates instead of overflowing on absurd input.
    pub fn total(&self) -> u64 {
        [
            self.user,
            self.nice,
            self.system,
            self.idle,
            self.iowait,
            self.irq,
            self.softirq,
            self.steal,
        ]
        .iter()
        .fold(0u64, |acc, v| acc.saturating_add(*v))
    }

    /// Ticks spent between `earlier` and `self`, column by column. A column that went
    /// backwards counts as 0: the kernel's aggregate iowait is known to decrease at times
    /// (and CPU hot-unplug can shrink any column), which must not wrap around.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    /// Upstream's percentages of these ticks: user (user + nice), sys, wait; one decimal.
    pub fn percentages(&self) -> CpuVitals {
        let total = self.total();
        CpuVitals {
            sys: format_percent(self.system, total, 1),
            user: format_percent(self.user.saturating_add(self.nice), total, 1),
            wait: format_percent(self.iowait, total, 1),
        }
    }
}

/// Keeps the previous `/proc/stat` sample so that each call reports CPU use over the interval
/// since the last one (upstream samples every 10 s in the background; we sample when asked,
/// so a heartbeat covers the 30 s since the previous heartbeat).
///
/// The first observation has no previous sample and reports the average since boot, which is
/// what upstream's first sample is too (gosigar's collector first emits the raw counters). It
/// never sleeps, so it is safe to call from async code.
#[derive(Debug, Clone, Default)]
pub struct CpuSampler {
    previous: Option<(CpuTimes, Instant)>,
    last: Option<CpuVitals>,
}

impl CpuSampler {
    /// A sampler with no history.
    pub fn new() -> CpuSampler {
        CpuSampler::default()
    }

    /// Records `times` taken at `now` and returns the percentages to report.
    ///
    /// Guarantees: with no history, the since-boot average; when less than
    /// [`MIN_CPU_INTERVAL`] has passed since the stored sample, the previous figures (the
    /// stored sample is kept, so the next interval is not shortened); otherwise the figures
    /// over the interval, which becomes the stored sample.
    pub fn observe(&mut self, times: CpuTimes, now: Instant) -> CpuVitals {
        if let (Some((_, at)), Some(last)) = (&self.previous, &self.last)
            && now.saturating_duration_since(*at) < MIN_CPU_INTERVAL
        {
            return last.clone();
        }
        let result = match &self.previous {
            Some((earlier, _)) => times.since(earlier).percentages(),
            None => times.percentages(),
        };
        self.previous = Some((times, now));
        self.last = Some(result.clone());
        result
    }

    /// Reads `<proc_root>/stat` and [`observe`](Self::observe)s it now.
    pub fn sample(&mut self, proc_root: &Path) -> Result<CpuVitals, VitalsError> {
        let path = proc_root.join("stat");
        let times = CpuTimes::parse_proc_stat(&read(&path)?)?;
        Ok(self.observe(times, Instant::now()))
    }
}

// ---------------------------------------------------------------------------------------------
// mem, swap

/// The `/proc/meminfo` values vitals need, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub mem_total: u64,
    /// `None` on kernels older than 3.14, which lack `MemAvailable`.
    pub mem_available: Option<u64>,
    pub mem_free: u64,
    pub buffers: u64,
    pub cached: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl MemInfo {
    /// Parses `/proc/meminfo` text (`Key:   123 kB` lines).
    ///
    /// `MemTotal` is required; the other keys are 0 when absent (as gosigar does). A key this
    /// needs whose value is not a number is an error naming the line; other lines are ignored.
    pub fn parse(text: &str) -> Result<MemInfo, VitalsError> {
        const FILE: &str = "/proc/meminfo";
        let mut info = MemInfo::default();
        let mut total = None;
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            if !matches!(
                key,
                "MemTotal"
                    | "MemAvailable"
                    | "MemFree"
                    | "Buffers"
                    | "Cached"
                    | "SwapTotal"
                    | "SwapFree"
            ) {
                continue;
            }
            let value: u64 = rest
                .split_ascii_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| parse_err(FILE, format!("value is not a number: {line:?}")))?;
            match key {
                "MemTotal" => total = Some(value),
                "MemAvailable" => info.mem_available = Some(value),
                "MemFree" => info.mem_free = value,
                "Buffers" => info.buffers = value,
                "Cached" => info.cached = value,
                "SwapTotal" => info.swap_total = value,
                _ => info.swap_free = value,
            }
        }
        info.mem_total = total.ok_or_else(|| parse_err(FILE, "no MemTotal line"))?;
        Ok(info)
    }

    /// KiB of memory in use: `MemTotal - MemAvailable` (gosigar's `ActualUsed`, which
    /// upstream reports), with `MemFree + Buffers + Cached` standing in for `MemAvailable`
    /// on kernels without it.
    pub fn mem_used(&self) -> u64 {
        let available = self.mem_available.unwrap_or_else(|| {
            self.mem_free
                .saturating_add(self.buffers)
                .saturating_add(self.cached)
        });
        self.mem_total.saturating_sub(available)
    }

    /// KiB of swap in use: `SwapTotal - SwapFree`.
    pub fn swap_used(&self) -> u64 {
        self.swap_total.saturating_sub(self.swap_free)
    }

    /// Upstream's `mem` vitals.
    pub fn mem_vitals(&self) -> MemVitals {
        let used = self.mem_used();
        MemVitals {
            kb: used.to_string(),
            percent: format_percent(used, self.mem_total, 0),
        }
    }

    /// Upstream's `swap` vitals (`"0"`/`"0"` without swap).
    pub fn swap_vitals(&self) -> MemVitals {
        let used = self.swap_used();
        MemVitals {
            kb: used.to_string(),
            percent: format_percent(used, self.swap_total, 0),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// load, uptime

fn parse_non_negative(
    file: &'static str,
    what: &str,
    field: Option<&str>,
) -> Result<f64, VitalsError> {
    let field = field.ok_or_else(|| parse_err(file, format!("no {what}")))?;
    match field.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(parse_err(
            file,
            format!("{what} is not a number: {field:?}"),
        )),
    }
}

/// Parses `/proc/loadavg` into upstream's three strings with two decimals
/// (`["0.52","0.58","0.59"]`). Errors name the missing or malformed average.
pub fn parse_loadavg(text: &str) -> Result<Vec<String>, VitalsError> {
    const FILE: &str = "/proc/loadavg";
    let mut fields = text.split_ascii_whitespace();
    ["1-minute load", "5-minute load", "15-minute load"]
        .iter()
        .map(|what| parse_non_negative(FILE, what, fields.next()).map(|v| format!("{v:.2}")))
        .collect()
}

/// Parses `/proc/uptime` into whole seconds since boot (truncated).
pub fn parse_uptime(text: &str) -> Result<u64, VitalsError> {
    let secs = parse_non_negative(
        "/proc/uptime",
        "uptime",
        text.split_ascii_whitespace().next(),
    )?;
    // Float → int `as` saturates, so even an absurd value cannot wrap.
    Ok(secs as u64)
}

// ---------------------------------------------------------------------------------------------
// disks

/// True when `path` is listed as a mount point in `/proc/mounts` text.
///
/// This is upstream's test (`linuxMounter.IsMountPoint`: the path equals a mount point of the
/// mount table), not "device differs from the parent's": a bind mount or a second mount of
/// the same filesystem is a mount point too. Paths compare component by component, so a
/// trailing slash does not matter; lines with fewer than two fields are skipped.
pub fn is_listed_mount_point(mounts: &str, path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    mounts.lines().any(|line| {
        let mut fields = line.split_ascii_whitespace();
        match (fields.next(), fields.next()) {
            (Some(_device), Some(mount_point)) => {
                let decoded = crate::mountinfo::unescape_field(mount_point);
                Path::new(std::ffi::OsStr::from_bytes(&decoded)) == path
            }
            _ => false,
        }
    })
}

/// Raw `statvfs` counts vitals need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsCounts {
    pub blocks: u64,
    pub blocks_free: u64,
    pub files: u64,
    pub files_free: u64,
}

impl FsCounts {
    /// Upstream's disk vitals: used blocks and used inodes as integer percentages of the
    /// totals (`df` would divide by used + available instead; upstream does not).
    pub fn usage(&self) -> DiskUsage {
        DiskUsage {
            inode_percent: format_percent(
                self.files.saturating_sub(self.files_free),
                self.files,
                0,
            ),
            percent: format_percent(self.blocks.saturating_sub(self.blocks_free), self.blocks, 0),
        }
    }

    /// `statvfs(path)`.
    // fsblkcnt_t/fsfilcnt_t are u32 on some 32-bit targets: the conversions are not useless
    // everywhere.
    #[allow(clippy::useless_conversion)]
    pub fn statvfs(path: &Path) -> Result<FsCounts, VitalsError> {
        let st = nix::sys::statvfs::statvfs(path).map_err(|source| VitalsError::Statvfs {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FsCounts {
            blocks: u64::from(st.blocks()),
            blocks_free: u64::from(st.blocks_free()),
            files: u64::from(st.files()),
            files_free: u64::from(st.files_free()),
        })
    }
}

/// Usage of `<base>/<dir>` when it is a mount point, `None` otherwise.
///
/// The path is canonicalised first (the mount table lists resolved paths), so a `base` given
/// with `..` or through a symlink still matches. A directory that does not exist, is not a
/// mount point, or whose `statvfs` fails is not reported (upstream skips such disks too).
fn mounted_disk(mounts: &str, path: &Path) -> Option<DiskUsage> {
    let resolved = fs::canonicalize(path).ok()?;
    if !is_listed_mount_point(mounts, &resolved) {
        return None;
    }
    match FsCounts::statvfs(&resolved) {
        Ok(counts) => Some(counts.usage()),
        Err(e) => {
            tracing::debug!(error = %e, "disk left out of vitals");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// readers

fn read(path: &Path) -> Result<String, VitalsError> {
    fs::read_to_string(path).map_err(|source| VitalsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the vitals of this machine: procfs at `/proc`, disks `/` (system), `<base>/data`
/// (ephemeral) and `<base>/store` (persistent).
///
/// Guarantees: `system` is always present (a failing `statvfs("/")` is an error, as
/// upstream's); ephemeral and persistent are present only when their directory is a mount
/// point (upstream reports only mounted disks), and a missing one is left out, not an error.
/// Never sleeps (see [`CpuSampler`]).
pub fn read_vitals(base: &Path, cpu: &mut CpuSampler) -> Result<Vitals, VitalsError> {
    read_vitals_from(Path::new(PROC_ROOT), base, cpu)
}

/// [`read_vitals`] with procfs files (`stat`, `meminfo`, `loadavg`, `uptime`, `mounts`)
/// read from `proc_root`, so tests can use fixture files.
pub fn read_vitals_from(
    proc_root: &Path,
    base: &Path,
    cpu: &mut CpuSampler,
) -> Result<Vitals, VitalsError> {
    let load = parse_loadavg(&read(&proc_root.join("loadavg"))?)?;
    let cpu = cpu.sample(proc_root)?;
    let meminfo = MemInfo::parse(&read(&proc_root.join("meminfo"))?)?;
    let mounts = read(&proc_root.join("mounts"))?;
    let disk = DiskVitals {
        ephemeral: mounted_disk(&mounts, &base.join("data")),
        persistent: mounted_disk(&mounts, &base.join("store")),
        system: Some(FsCounts::statvfs(Path::new("/"))?.usage()),
    };
    let uptime = parse_uptime(&read(&proc_root.join("uptime"))?)?;
    Ok(Vitals {
        cpu,
        disk,
        load,
        mem: meminfo.mem_vitals(),
        swap: meminfo.swap_vitals(),
        uptime: UptimeVitals { secs: uptime },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 20 30 800 40 5 5 0 7 0\n\
                        cpu0 50 10 15 400 20 2 3 0 0 0\n\
                        intr 12345\nctxt 999\nbtime 1700000000\n";

    const MEMINFO: &str = "MemTotal:        2000000 kB\n\
                           MemFree:          300000 kB\n\
                           MemAvailable:     500000 kB\n\
                           Buffers:           10000 kB\n\
                           Cached:           400000 kB\n\
                           SwapCached:            0 kB\n\
                           SwapTotal:       1000000 kB\n\
                           SwapFree:         750000 kB\n\
                           HugePages_Total:       0\n";

    #[test]
    fn cpu_line_parses_and_totals_like_gosigar() {
        let t = CpuTimes::parse_proc_stat(STAT).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 100,
                nice: 20,
                system: 30,
                idle: 800,
                iowait: 40,
                irq: 5,
                softirq: 5,
                steal: 0
            }
        );
        // guest (7) is not added: the kernel already counts it in user.
        assert_eq!(t.total(), 1000);
        let p = t.percentages();
        assert_eq!(
            (p.user.as_str(), p.sys.as_str(), p.wait.as_str()),
            ("12.0", "3.0", "4.0")
        );
    }

    #[test]
    fn cpu_line_of_an_old_kernel_has_four_columns() {
        let t = CpuTimes::parse_proc_stat("cpu 1 2 3 4\n").unwrap();
        assert_eq!(t.total(), 10);
        assert_eq!(t.iowait, 0);
    }

    #[test]
    fn malformed_cpu_lines_are_errors_naming_the_value() {
        for bad in [
            "",
            "cpu0 1 2 3 4\n",
            "cpu 1 2 3\n",
            "cpu 1 2 x 4\n",
            "cpu -1 2 3 4\n",
            "cpu 1 2 3 99999999999999999999999\n",
        ] {
            let err = CpuTimes::parse_proc_stat(bad).unwrap_err().to_string();
            assert!(err.starts_with("/proc/stat: "), "{bad:?}: {err}");
        }
        let err = CpuTimes::parse_proc_stat("cpu 1 2 x 4")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"x\""), "{err}");
    }

    #[test]
    fn sampler_reports_since_boot_then_intervals() {
        let t0 = Instant::now();
        let mut s = CpuSampler::new();
        let first = CpuTimes {
            user: 100,
            system: 100,
            idle: 800,
            ..CpuTimes::default()
        };
        assert_eq!(s.observe(first, t0).user, "10.0");

        // 30 s later: 200 more ticks, 150 of them user+nice, 50 iowait.
        let second = CpuTimes {
            user: 200,
            nice: 50,
            system: 100,
            idle: 800,
            iowait: 50,
            ..CpuTimes::default()
        };
        let p = s.observe(second, t0 + Duration::from_secs(30));
        assert_eq!(
            (p.user.as_str(), p.sys.as_str(), p.wait.as_str()),
            ("75.0", "0.0", "25.0")
        );

        // Asked again too soon: same figures, baseline unchanged.
        let third = CpuTimes {
            user: 201,
            ..second
        };
        assert_eq!(s.observe(third, t0 + Duration::from_millis(30_100)), p);
        let later = CpuTimes { idle: 900, ..third };
        let q = s.observe(later, t0 + Duration::from_secs(60));
        // Interval from `second`: 1 user tick and 100 idle ticks.
        assert_eq!(q.user, "1.0");
    }

    #[test]
    fn counters_going_backwards_do_not_wrap() {
        let t0 = Instant::now();
        let mut s = CpuSampler::new();
        s.observe(
            CpuTimes {
                iowait: 500,
                idle: 100,
                ..CpuTimes::default()
            },
            t0,
        );
        let p = s.observe(
            CpuTimes {
                iowait: 400,
                idle: 200,
                ..CpuTimes::default()
            },
            t0 + Duration::from_secs(10),
        );
        assert_eq!(p.wait, "0.0");
        // No ticks at all: 0, not NaN.
        let q = s.observe(
            CpuTimes {
                iowait: 400,
                idle: 200,
                ..CpuTimes::default()
            },
            t0 + Duration::from_secs(20),
        );
        assert_eq!((q.user.as_str(), q.wait.as_str()), ("0.0", "0.0"));
        assert_eq!(
            CpuTimes {
                user: u64::MAX,
                nice: u64::MAX,
                ..CpuTimes::default()
            }
            .total(),
            u64::MAX
        );
    }

    #[test]
    fn meminfo_uses_mem_available() {
        let m = MemInfo::parse(MEMINFO).unwrap();
        assert_eq!(m.mem_used(), 1_500_000);
        assert_eq!(
            m.mem_vitals(),
            MemVitals {
                kb: "1500000".into(),
                percent: "75".into()
            }
        );
        assert_eq!(
            m.swap_vitals(),
            MemVitals {
                kb: "250000".into(),
                percent: "25".into()
            }
        );
    }

    #[test]
    fn meminfo_without_mem_available_falls_back_like_gosigar() {
        let text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 150 kB\n";
        let m = MemInfo::parse(text).unwrap();
        assert_eq!(m.mem_used(), 700);
        // No swap configured: 0 and 0, not a division by zero.
        assert_eq!(
            m.swap_vitals(),
            MemVitals {
                kb: "0".into(),
                percent: "0".into()
            }
        );
    }

    #[test]
    fn malformed_meminfo_is_an_error() {
        assert!(MemInfo::parse("").is_err());
        assert!(MemInfo::parse("MemFree: 1 kB\n").is_err());
        let err = MemInfo::parse("MemTotal: lots kB\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lots"), "{err}");
        assert!(MemInfo::parse("MemTotal:\n").is_err());
        // Unrelated garbage lines are ignored.
        assert!(MemInfo::parse("garbage\nFoo: bar\nMemTotal: 5 kB\n").is_ok());
        // Available above total cannot underflow.
        let m = MemInfo::parse("MemTotal: 5 kB\nMemAvailable: 9 kB\n").unwrap();
        assert_eq!(m.mem_vitals().kb, "0");
    }

    #[test]
    fn loadavg_and_uptime() {
        assert_eq!(
            parse_loadavg("0.52 0.5 12.345 1/389 12345\n").unwrap(),
            ["0.52", "0.50", "12.35"]
        );
        for bad in ["", "0.5 0.5", "0.5 x 0.5", "nan 1 1", "-1 1 1", "inf 1 1"] {
            assert!(parse_loadavg(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_uptime("2858.61 3993.94\n").unwrap(), 2858);
        assert_eq!(parse_uptime("1e300 0").unwrap(), u64::MAX);
        for bad in ["", "abc 1", "-5 1", "NaN"] {
            assert!(parse_uptime(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn percent_formatting_matches_go() {
        assert_eq!(format_percent(1, 3, 1), "33.3");
        assert_eq!(format_percent(2, 3, 0), "67");
        assert_eq!(format_percent(0, 0, 0), "0");
        assert_eq!(format_percent(0, 0, 1), "0.0");
        // Go's %.0f rounds halves to even on the exact binary value; so does Rust.
        assert_eq!(format_percent(1, 8, 0), "12");
        assert_eq!(format_percent(5, 1000, 0), "0");
        assert_eq!(format_percent(25, 10_000, 1), "0.2");
    }

    #[test]
    fn disk_usage_is_used_over_total() {
        let c = FsCounts {
            blocks: 1000,
            blocks_free: 250,
            files: 100,
            files_free: 99,
        };
        assert_eq!(
            c.usage(),
            DiskUsage {
                inode_percent: "1".into(),
                percent: "75".into()
            }
        );
        // A filesystem without inode accounting (btrfs reports 0 files).
        let c = FsCounts {
            blocks: 10,
            blocks_free: 10,
            files: 0,
            files_free: 0,
        };
        assert_eq!(c.usage().inode_percent, "0");
    }

    #[test]
    fn mount_points_come_from_the_mount_table() {
        let mounts = "/dev/sda1 / ext4 rw 0 0\n\
                      /dev/sdb2 /var/vcap/data ext4 rw 0 0\n\
                      /dev/sdc1 /var/vcap/store\\040disk ext4 rw 0 0\n\
                      garbage\n\n";
        assert!(is_listed_mount_point(mounts, Path::new("/")));
        assert!(is_listed_mount_point(mounts, Path::new("/var/vcap/data")));
        assert!(is_listed_mount_point(mounts, Path::new("/var/vcap/data/")));
        assert!(is_listed_mount_point(
            mounts,
            Path::new("/var/vcap/store disk")
        ));
        assert!(!is_listed_mount_point(mounts, Path::new("/var/vcap/store")));
        assert!(!is_listed_mount_point(mounts, Path::new("/var/vcap")));
        assert!(!is_listed_mount_point("", Path::new("/")));
        assert_eq!(
            crate::mountinfo::unescape_field("a\\134b\\9\\"),
            b"a\\b\\9\\"
        );
        assert_eq!(crate::mountinfo::unescape_field("\\777"), b"\\777");
    }

    #[test]
    fn json_shape_is_upstreams() {
        let v = Vitals {
            cpu: CpuVitals {
                sys: "1.5".into(),
                user: "12.3".into(),
                wait: "0.0".into(),
            },
            disk: DiskVitals {
                ephemeral: None,
                persistent: Some(DiskUsage {
                    inode_percent: "1".into(),
                    percent: "2".into(),
                }),
                system: Some(DiskUsage {
                    inode_percent: "3".into(),
                    percent: "4".into(),
                }),
            },
            load: vec!["0.10".into(), "0.20".into(), "0.30".into()],
            mem: MemVitals {
                kb: "100".into(),
                percent: "5".into(),
            },
            swap: MemVitals {
                kb: "0".into(),
                percent: "0".into(),
            },
            uptime: UptimeVitals { secs: 123 },
        };
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"cpu":{"sys":"1.5","user":"12.3","wait":"0.0"},"disk":{"persistent":{"inode_percent":"1","percent":"2"},"system":{"inode_percent":"3","percent":"4"}},"load":["0.10","0.20","0.30"],"mem":{"kb":"100","percent":"5"},"swap":{"kb":"0","percent":"0"},"uptime":{"secs":123}}"#
        );
        // Everything empty: Go's omitempty output.
        assert_eq!(
            serde_json::to_string(&Vitals::default()).unwrap(),
            r#"{"cpu":{},"mem":{},"swap":{},"uptime":{}}"#
        );
        let back: Vitals = serde_json::from_str(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }

    fn fake_proc(dir: &Path, mounts: &str) {
        fs::write(dir.join("stat"), STAT).unwrap();
        fs::write(dir.join("meminfo"), MEMINFO).unwrap();
        fs::write(dir.join("loadavg"), "1.00 2.00 3.00 1/100 42\n").unwrap();
        fs::write(dir.join("uptime"), "77.9 10.0\n").unwrap();
        fs::write(dir.join("mounts"), mounts).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vitals-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn read_vitals_from_fixture_files() {
        let root = temp_dir("fixture");
        let proc_root = root.join("proc");
        let base = root.join("vcap");
        fs::create_dir_all(&proc_root).unwrap();
        fs::create_dir_all(base.join("data")).unwrap();
        fs::create_dir_all(base.join("store")).unwrap();
        let store = fs::canonicalize(base.join("store")).unwrap();
        // Only store is listed as a mount point: data is an ordinary directory.
        fake_proc(
            &proc_root,
            &format!(
                "rootfs / rootfs rw 0 0\nfake {} ext4 rw 0 0\n",
                store.display()
            ),
        );

        let mut cpu = CpuSampler::new();
        let v = read_vitals_from(&proc_root, &base, &mut cpu).unwrap();
        assert_eq!(v.cpu.user, "12.0");
        assert_eq!(v.load, ["1.00", "2.00", "3.00"]);
        assert_eq!(v.mem.kb, "1500000");
        assert_eq!(v.uptime.secs, 77);
        assert!(v.disk.system.is_some());
        assert!(v.disk.persistent.is_some());
        assert!(v.disk.ephemeral.is_none());

        // A base without data/ and store/ simply has no such disks.
        let v = read_vitals_from(&proc_root, &root.join("nowhere"), &mut cpu).unwrap();
        assert!(v.disk.persistent.is_none() && v.disk.ephemeral.is_none());

        // A malformed or missing file is an error naming it; never a panic.
        fs::write(proc_root.join("meminfo"), "MemTotal: ???\n").unwrap();
        let err = read_vitals_from(&proc_root, &base, &mut cpu).unwrap_err();
        assert!(err.to_string().contains("/proc/meminfo"), "{err}");
        fs::remove_file(proc_root.join("uptime")).unwrap();
        fs::write(proc_root.join("meminfo"), MEMINFO).unwrap();
        let err = read_vitals_from(&proc_root, &base, &mut cpu).unwrap_err();
        assert!(matches!(err, VitalsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("uptime"), "{err}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn read_vitals_from_the_real_proc() {
        let base = temp_dir("real");
        let mut cpu = CpuSampler::new();
        let v = read_vitals(&base, &mut cpu).unwrap();
        for p in [&v.cpu.user, &v.cpu.sys, &v.cpu.wait] {
            let x: f64 = p.parse().unwrap();
            assert!((0.0..=100.0).contains(&x), "{v:?}");
            assert_eq!(p.split('.').nth(1).map(str::len), Some(1), "{v:?}");
        }
        let mem: u64 = v.mem.percent.parse().unwrap();
        assert!(mem <= 100, "{v:?}");
        let _: u64 = v.mem.kb.parse().unwrap();
        let _: u64 = v.swap.kb.parse().unwrap();
        assert_eq!(v.load.len(), 3);
        assert!(v.uptime.secs > 0);
        let system = v.disk.system.clone().unwrap();
        let _: u64 = system.percent.parse().unwrap();
        // The temporary base's data/ and store/ are not mount points.
        assert!(v.disk.ephemeral.is_none() && v.disk.persistent.is_none());
        let json = serde_json::to_value(&v).unwrap();
        assert!(json["disk"]["system"]["percent"].is_string());
        assert!(json["uptime"]["secs"].is_u64());
        let _ = fs::remove_dir_all(&base);
    }
}
