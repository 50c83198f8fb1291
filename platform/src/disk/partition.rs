//! One Linux partition per persistent disk: reading the table (`sfdisk --json`), deciding what
//! to do (pure: [`plan`]), and doing it.
//!
//! Upstream's choices are kept: `env.persistent_disk_partitioner` `""` means sfdisk (an MBR
//! table) for disks up to 2 TiB and parted (a GPT table, partition named `bosh-partition-0`,
//! 1 MiB aligned) above; `"sfdisk"` and `"parted"` force one; anything else is upstream's
//! "Unknown partitioner type". A single partition more than 100 MiB smaller than the disk is
//! grown with `growpart <dev> 1` (upstream's tool), whichever partitioner made it.
//!
//! Where upstream would rewrite a table it does not like (several partitions, a foreign type),
//! this agent refuses and says what it found: the data on a persistent disk is the one thing
//! the agent must never lose. A file system on the whole device (no table) is refused too.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::DiskError;
use super::runner::{Tool, Tools};

/// Upstream's slack when comparing a partition with the disk (100 MiB).
pub const DELTA_BYTES: u64 = 100 * 1024 * 1024;
/// Above this size upstream's default partitioner uses parted (2 TiB).
pub const MAX_SFDISK_BYTES: u64 = 2 * 1024 * 1024 * 1024 * 1024;

const LINUX_GPT: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// One partition as `sfdisk --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Part {
    /// Its device node.
    pub node: String,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub size: u64,
    /// The MBR id (`83`) or the GPT type GUID.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A partition table as `sfdisk --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Table {
    /// `dos` or `gpt`.
    pub label: String,
    /// Sector size in bytes (512 if absent).
    #[serde(default = "default_sector")]
    pub sectorsize: u64,
    /// The partitions.
    #[serde(default)]
    pub partitions: Vec<Part>,
}

fn default_sector() -> u64 {
    512
}

#[derive(Deserialize)]
struct Dump {
    partitiontable: Table,
}

/// Parses `sfdisk --json` output.
pub fn parse_sfdisk_json(device: &str, text: &str) -> Result<Table, DiskError> {
    serde_json::from_str::<Dump>(text)
        .map(|d| d.partitiontable)
        .map_err(|e| DiskError::Layout {
            device: device.to_string(),
            detail: format!("unreadable sfdisk --json output: {e}"),
        })
}

/// Which program creates the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioner {
    /// An MBR table with one Linux (83) partition.
    Sfdisk,
    /// A GPT table with one `bosh-partition-0`.
    Parted,
}

/// What the disk needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No table (or an empty one) and no file system: make one partition.
    Create(Partitioner),
    /// One Linux partition that fills the disk: nothing to do.
    Keep,
    /// One Linux partition more than 100 MiB smaller than the disk: grow it.
    Grow,
}

/// Picks the partitioner for a new table (upstream's `GetPersistentDevicePartitioner`).
pub fn choose_partitioner(setting: &str, device_bytes: u64) -> Result<Partitioner, DiskError> {
    match setting {
        "sfdisk" => Ok(Partitioner::Sfdisk),
        "parted" => Ok(Partitioner::Parted),
        "" if device_bytes > MAX_SFDISK_BYTES => Ok(Partitioner::Parted),
        "" => Ok(Partitioner::Sfdisk),
        other => Err(DiskError::Unsupported(format!(
            "Unknown partitioner type '{other}'"
        ))),
    }
}

fn is_linux(kind: &str) -> bool {
    kind == "83" || kind.eq_ignore_ascii_case(LINUX_GPT)
}

/// Decides what to do with a disk of `device_bytes` whose table is `table` (`None`: no
/// table) and whose whole device holds the file system `whole_fs` (blkid's TYPE), if any.
/// Pure; never plans anything that could overwrite data.
pub fn plan(
    device: &str,
    device_bytes: u64,
    table: Option<&Table>,
    whole_fs: Option<&str>,
    partitioner: &str,
) -> Result<Plan, DiskError> {
    let layout = |detail: String| DiskError::Layout {
        device: device.to_string(),
        detail,
    };
    let parts = table.map(|t| t.partitions.as_slice()).unwrap_or_default();
    match parts {
        [] => {
            if let Some(fs) = whole_fs {
                return Err(layout(format!(
                    "holds a {fs} file system on the whole device and no partition table; not partitioning it"
                )));
            }
            Ok(Plan::Create(choose_partitioner(partitioner, device_bytes)?))
        }
        [one] => {
            if !is_linux(&one.kind) {
                return Err(layout(format!(
                    "its only partition {} has type {}, not Linux; not repartitioning it",
                    one.node, one.kind
                )));
            }
            let sector = table.map(|t| t.sectorsize).unwrap_or(512);
            let bytes = one.size.saturating_mul(sector);
            if bytes < device_bytes.saturating_sub(DELTA_BYTES) {
                Ok(Plan::Grow)
            } else {
                Ok(Plan::Keep)
            }
        }
        many => Err(layout(format!(
            "Persistent disks with many partitions are not supported. Expected 1, got {}.",
            many.len()
        ))),
    }
}

/// Reads the table of `device`: `Ok(None)` when there is none.
pub fn read_table(tools: &Tools, device: &Path) -> Result<Option<Table>, DiskError> {
    let dev = device.to_string_lossy();
    let ran = tools.run_accepting(Tool::Sfdisk, &["--json", &dev], None, &[1])?;
    if ran.code != 0 {
        if ran
            .stderr
            .contains("does not contain a recognized partition table")
        {
            return Ok(None);
        }
        return Err(DiskError::Command {
            command: format!("sfdisk --json {dev}"),
            status: format!("exit status: {}", ran.code),
            stderr: ran.stderr,
        });
    }
    parse_sfdisk_json(&dev, &ran.stdout).map(Some)
}

/// The size of a block device in bytes, from sysfs (no program needed).
pub fn device_bytes(device: &Path) -> Result<u64, DiskError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(device).map_err(super::error::io_at(device))?;
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let sys = std::path::PathBuf::from(format!("/sys/dev/block/{major}:{minor}/size"));
    let text = std::fs::read_to_string(&sys).map_err(super::error::io_at(&sys))?;
    text.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| DiskError::Layout {
            device: device.display().to_string(),
            detail: format!("{}: {e}", sys.display()),
        })
}

/// Makes the kernel see the table as it is now, then waits (up to `wait`) for `part` to be
/// a block device.
pub fn settle_partition(
    tools: &Tools,
    device: &Path,
    part: &Path,
    wait: Duration,
) -> Result<(), DiskError> {
    use std::os::unix::fs::FileTypeExt;
    let dev = device.to_string_lossy();
    let is_block = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device());
    // partx --update adds missing partitions and resizes grown ones; --add is the fallback
    // for old util-linux. Errors are judged by whether the node appears.
    let _ = tools.run(Tool::Partx, &["--update", &dev]);
    if !is_block(part) {
        let _ = tools.run(Tool::Partx, &["--add", &dev]);
    }
    let deadline = Instant::now() + wait;
    while !is_block(part) {
        if Instant::now() >= deadline {
            return Err(DiskError::DeviceTimeout(part.display().to_string()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Creates the one partition.
pub fn create(
    tools: &Tools,
    device: &Path,
    with: Partitioner,
    device_bytes: u64,
) -> Result<(), DiskError> {
    let dev = device.to_string_lossy();
    match with {
        Partitioner::Sfdisk => {
            tools.run_accepting(
                Tool::Sfdisk,
                &["--quiet", "--wipe", "never", &dev],
                Some(",,L\n"),
                &[],
            )?;
        }
        Partitioner::Parted => {
            const MIB: u64 = 1024 * 1024;
            let end = (device_bytes.saturating_sub(1) / MIB * MIB).saturating_sub(1);
            tools.run(Tool::Parted, &["-s", &dev, "mklabel", "gpt"])?;
            tools.run(
                Tool::Parted,
                &[
                    "-s",
                    &dev,
                    "unit",
                    "B",
                    "mkpart",
                    "bosh-partition-0",
                    &MIB.to_string(),
                    &end.to_string(),
                ],
            )?;
        }
    }
    Ok(())
}

/// Grows partition 1 to the end of the disk (`growpart`, as upstream).
pub fn grow(tools: &Tools, device: &Path) -> Result<(), DiskError> {
    let dev = device.to_string_lossy();
    // Exit 1 with "NOCHANGE" means it already fills the disk.
    let ran = tools.run_accepting(Tool::Growpart, &[&dev, "1"], None, &[1])?;
    if ran.code == 1 && !ran.stdout.contains("NOCHANGE") {
        return Err(DiskError::Command {
            command: format!("growpart {dev} 1"),
            status: "exit status: 1".into(),
            stderr: format!("{} {}", ran.stdout.trim(), ran.stderr),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn dos(parts: &[(u64, u64, &str)]) -> String {
        let p: Vec<String> = parts
            .iter()
            .enumerate()
            .map(|(i, (start, size, kind))| {
                format!(
                    r#"{{"node":"/dev/sdb{}","start":{start},"size":{size},"type":"{kind}"}}"#,
                    i + 1
                )
            })
            .collect();
        format!(
            r#"{{"partitiontable":{{"label":"dos","id":"0x1","device":"/dev/sdb","unit":"sectors","sectorsize":512,"partitions":[{}]}}}}"#,
            p.join(",")
        )
    }

    fn plan_of(
        json: Option<&str>,
        bytes: u64,
        fs: Option<&str>,
        p: &str,
    ) -> Result<Plan, DiskError> {
        let table = json.map(|j| parse_sfdisk_json("/dev/sdb", j).unwrap());
        plan("/dev/sdb", bytes, table.as_ref(), fs, p)
    }

    #[test]
    fn a_blank_disk_gets_a_partition_from_the_chosen_partitioner() {
        assert_eq!(
            plan_of(None, 200 * MIB, None, "").unwrap(),
            Plan::Create(Partitioner::Sfdisk)
        );
        assert_eq!(
            plan_of(None, 3 << 40, None, "").unwrap(),
            Plan::Create(Partitioner::Parted)
        );
        assert_eq!(
            plan_of(None, 3 << 40, None, "sfdisk").unwrap(),
            Plan::Create(Partitioner::Sfdisk)
        );
        assert_eq!(
            plan_of(None, 200 * MIB, None, "parted").unwrap(),
            Plan::Create(Partitioner::Parted)
        );
        // An empty table counts as blank.
        assert_eq!(
            plan_of(Some(&dos(&[])), 200 * MIB, None, "").unwrap(),
            Plan::Create(Partitioner::Sfdisk)
        );
        let e = plan_of(None, MIB, None, "fdisk").unwrap_err().to_string();
        assert_eq!(e, "Unknown partitioner type 'fdisk'");
    }

    #[test]
    fn one_linux_partition_is_kept_or_grown_by_upstreams_delta() {
        // 200 MiB disk, partition from 1 MiB to the end: keep.
        let full = dos(&[(2048, 407552, "83")]);
        assert_eq!(
            plan_of(Some(&full), 200 * MIB, None, "").unwrap(),
            Plan::Keep
        );
        // The disk grew to 400 MiB: grow.
        assert_eq!(
            plan_of(Some(&full), 400 * MIB, None, "").unwrap(),
            Plan::Grow
        );
        // Grew by less than 100 MiB: keep (upstream's delta).
        assert_eq!(
            plan_of(Some(&full), 290 * MIB, None, "").unwrap(),
            Plan::Keep
        );
        // GPT's Linux type counts as Linux, any case.
        let gpt = r#"{"partitiontable":{"label":"gpt","sectorsize":512,"partitions":[{"node":"/dev/sdb1","start":2048,"size":2048,"type":"0fc63daf-8483-4772-8e79-3d69d8477de4","name":"bosh-partition-0"}]}}"#;
        assert_eq!(plan_of(Some(gpt), 400 * MIB, None, "").unwrap(), Plan::Grow);
    }

    #[test]
    fn layouts_that_could_hold_other_data_are_refused() {
        let two = dos(&[(2048, 2048, "83"), (4096, 2048, "83")]);
        let e = plan_of(Some(&two), 200 * MIB, None, "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Expected 1, got 2"), "{e}");
        let ntfs = dos(&[(2048, 2048, "7")]);
        let e = plan_of(Some(&ntfs), 200 * MIB, None, "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("type 7, not Linux"), "{e}");
        let e = plan_of(None, 200 * MIB, Some("ext4"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ext4 file system on the whole device"), "{e}");
    }

    #[test]
    fn sfdisk_output_that_is_not_a_table_is_an_error() {
        for bad in [
            "",
            "{}",
            "[]",
            r#"{"partitiontable":{"partitions":[]}}"#,
            "nonsense",
        ] {
            assert!(parse_sfdisk_json("/dev/sdb", bad).is_err(), "{bad}");
        }
        // Unknown keys (uuid, name, attrs) are fine; a missing sector size is 512.
        let t = parse_sfdisk_json(
            "/dev/sdb",
            r#"{"partitiontable":{"label":"gpt","firstlba":34,"partitions":[{"node":"/dev/sdb1","start":1,"size":2,"type":"x","uuid":"u"}]}}"#,
        )
        .unwrap();
        assert_eq!(t.sectorsize, 512);
        assert_eq!(t.partitions[0].size, 2);
    }
}
