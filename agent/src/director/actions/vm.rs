//! What the director asks of the VM itself besides its jobs: persistent disks, `bosh ssh`
//! users, `bosh logs`, DNS records, ARP entries and power-off. Each handler is a thin call
//! into `platform` or `jobs`, run off the async threads (they run programs and wait).

use std::sync::Arc;

use platform::disk::{DiskEnv, SettingsDisks};
use serde_json::{Value, json};

use crate::director::Context;
use crate::director::tasks::TaskResult;

use super::deploy::blobs;

/// Runs blocking work on the blocking pool; a panic in it is an error, not a crash.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the action's worker failed: {e}"))?
}

fn settings_disks(ctx: &Context) -> SettingsDisks {
    disks_of(&ctx.settings)
}

/// The disk part of settings.json (`disks.persistent`, `env.persistent_disk_*`).
pub fn disks_of(settings: &crate::settings::Settings) -> SettingsDisks {
    let doc = settings.document();
    let env = &doc["env"];
    let mount_options = match &env["persistent_disk_mount_options"] {
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    };
    SettingsDisks {
        persistent: settings.disks.persistent.clone(),
        env: DiskEnv {
            filesystem: env["persistent_disk_fs"].as_str().unwrap_or("").to_string(),
            mount_options,
            partitioner: env["persistent_disk_partitioner"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        },
    }
}

/// `add_persistent_disk [cid, hint]`.
pub async fn add_persistent_disk(ctx: Arc<Context>, cid: String, hint: Value) -> TaskResult {
    let env = settings_disks(&ctx).env;
    blocking(move || {
        ctx.vm
            .disks
            .add_persistent_disk(&cid, &hint, &env)
            .map_err(|e| format!("Saving persistent disk hints: {e}"))
    })
    .await?;
    Ok(json!({}))
}

/// `remove_persistent_disk [cid]`.
pub async fn remove_persistent_disk(ctx: Arc<Context>, cid: String) -> TaskResult {
    blocking(move || {
        ctx.vm
            .disks
            .remove_persistent_disk(&cid)
            .map_err(|e| format!("Removing persistent disk hints: {e}"))
    })
    .await?;
    Ok(json!({}))
}

/// `list_disk`: the cids whose disk is mounted.
pub async fn list_disk(ctx: Arc<Context>) -> TaskResult {
    let settings = settings_disks(&ctx);
    let cids = blocking(move || {
        ctx.vm
            .disks
            .list_disk(&settings)
            .map_err(|e| format!("Refreshing the settings: {e}"))
    })
    .await?;
    Ok(json!(cids))
}

/// `mount_disk [cid]`.
pub async fn mount_disk(ctx: Arc<Context>, cid: String) -> TaskResult {
    let settings = settings_disks(&ctx);
    blocking(move || {
        ctx.vm
            .disks
            .mount_disk(&cid, &settings)
            .map_err(|e| format!("Mounting persistent disk: {e}"))
    })
    .await?;
    Ok(json!({}))
}

/// `unmount_disk [cid]`: upstream's `{"message": …}`.
pub async fn unmount_disk(ctx: Arc<Context>, cid: String) -> TaskResult {
    let settings = settings_disks(&ctx);
    let out = blocking(move || {
        ctx.vm
            .disks
            .unmount_disk(&cid, &settings)
            .map_err(|e| format!("Unmounting persistent disk: {e}"))
    })
    .await?;
    Ok(out.value())
}

/// `migrate_disk [old, new]`: the store moves to the disk on the migration target, once the
/// cids are checked to name the disks on the store and on the target.
pub async fn migrate_disk(ctx: Arc<Context>, old: String, new: String) -> TaskResult {
    let settings = settings_disks(&ctx);
    blocking(move || {
        ctx.vm
            .disks
            .migrate_disk(&old, &new, &settings)
            .map_err(|e| format!("Migrating persistent disk: {e}"))
    })
    .await?;
    Ok(json!({}))
}

/// `ssh [setup|cleanup, params]`.
pub async fn ssh(ctx: Arc<Context>, cmd: String, params: Value) -> TaskResult {
    let networks = ctx.settings.document()["networks"].clone();
    let cfg = ctx.vm.ssh.clone();
    let out = blocking(move || {
        platform::users::ssh(&cfg, &cmd, &params, &networks).map_err(|e| e.to_string())
    })
    .await?;
    Ok(serde_json::to_value(out).map_err(|e| format!("encoding the ssh result: {e}"))?)
}

/// `fetch_logs [types, filters]`: a gzipped tar streamed to the blobstore.
pub async fn fetch_logs(ctx: Arc<Context>, types: String, filters: Vec<String>) -> TaskResult {
    let blobs = blobs(&ctx)?;
    let dirs = ctx.vm.log_dirs.clone();
    let up = blocking(move || {
        jobs::logs::fetch_logs(&blobs, &dirs, &types, &filters).map_err(|e| e.to_string())
    })
    .await?;
    Ok(json!({"blobstore_id": up.blobstore_id, "sha1": up.sha1}))
}

/// The largest DNS records blob accepted (a 10,000-record blob is about 1 MB).
const DNS_BLOB_LIMIT: u64 = 64 << 20;

/// `sync_dns [blob_id, digest, version]`: `"synced"` at once when the records on disk are
/// this version or newer; otherwise the blob is fetched, verified and written.
pub async fn sync_dns(
    ctx: Arc<Context>,
    blob_id: String,
    digest: String,
    version: u64,
) -> TaskResult {
    if ctx.vm.dns.is_synced(version) {
        return Ok(json!("synced"));
    }
    let digest = blobstore::MultiDigest::parse(&digest).map_err(|e| e.to_string())?;
    let blobs = blobs(&ctx)?;
    blocking(move || {
        let bytes = blobs
            .read_verified(&blob_id, &digest, DNS_BLOB_LIMIT)
            .map_err(|e| format!("fetching the DNS records blob: {e}"))?;
        ctx.vm
            .dns
            .save(&bytes, version, &ctx.settings.agent_id)
            .map_err(|e| e.to_string())
    })
    .await?;
    Ok(json!("synced"))
}

/// `delete_arp_entries [{"ips": […]}]`.
pub async fn delete_arp_entries(ctx: Arc<Context>, arg: Value) -> TaskResult {
    let neighbours = ctx.vm.neighbours.clone();
    let out = blocking(move || {
        neighbours
            .delete_arp_entries(&arg)
            .map_err(|e| e.to_string())
    })
    .await?;
    for (ip, why) in &out.failed {
        tracing::warn!(%ip, %why, "deleting an ARP entry failed");
    }
    Ok(json!({}))
}

/// `shutdown`: powers the VM off (the director does not wait for the answer).
pub async fn shutdown(ctx: Arc<Context>) -> TaskResult {
    let power = ctx.vm.power_off.clone();
    blocking(move || power.run().map_err(|e| e.to_string())).await?;
    Ok(json!(""))
}

/// The parts the VM actions use, built once at start from agent.json and the environment.
///
/// Test overrides (never set on a stemcell): `BOSH_AGENT_HOSTS_FILE` (instead of
/// `/etc/hosts`), `BOSH_AGENT_SSH_HOST_KEY` (instead of `/etc/ssh/ssh_host_rsa_key.pub`),
/// `BOSH_AGENT_POWER_OFF` (a command line instead of `shutdown -P 0`),
/// `BOSH_AGENT_SYSTEM_LOG_DIR` (instead of `/var/log`), `BOSH_AGENT_DISK_BY_ID_DIR` (instead of
/// `/dev/disk/by-id`).
pub struct VmParts {
    /// Persistent disks (one operation at a time).
    pub disks: platform::disk::Disks,
    /// `ssh`'s homes, host key and passwd.
    pub ssh: platform::users::SshConfig,
    /// `fetch_logs`' directories.
    pub log_dirs: jobs::logs::LogDirs,
    /// records.json and the hosts file.
    pub dns: platform::dns::LocalDns,
    /// `delete_arp_entries`.
    pub neighbours: platform::arp::Neighbours,
    /// `shutdown`.
    pub power_off: platform::power::PowerOff,
}

/// An agent.json value the VM parts cannot use.
#[derive(Debug, thiserror::Error)]
#[error(
    "Platform.Linux.DiskIDTransformPattern {pattern:?} is not a valid regular expression: {source}"
)]
pub struct VmPartsError {
    pattern: String,
    #[source]
    source: regex::Error,
}

impl VmParts {
    /// Builds the parts for `base_dir` from `linux` (agent.json's `Platform.Linux`). A damaged
    /// DNS records file is logged as a warning (with its path, what is wrong and the fallback)
    /// and left as it is.
    pub fn new(
        base_dir: &std::path::Path,
        linux: &crate::config::LinuxOptions,
    ) -> Result<VmParts, VmPartsError> {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let mut cfg = platform::disk::DiskConfig::new(base_dir);
        cfg.resolver.resolution =
            platform::disk::Resolution::from_config(&linux.device_path_resolution_type);
        cfg.resolver.bind_mount = linux.bind_mount_persistent_disk;
        cfg.use_preformatted = linux.use_preformatted_persistent_disk;
        if !linux.disk_id_transform_pattern.is_empty() {
            let re = regex::Regex::new(&linux.disk_id_transform_pattern).map_err(|source| {
                VmPartsError {
                    pattern: linux.disk_id_transform_pattern.clone(),
                    source,
                }
            })?;
            cfg.resolver.id_transform = Some((re, linux.disk_id_transform_replacement.clone()));
        }
        if let Some(d) = env("BOSH_AGENT_DISK_BY_ID_DIR") {
            cfg.resolver.by_id_dir = d.into();
        }
        let mut ssh = platform::users::SshConfig::new(base_dir);
        if let Some(k) = env("BOSH_AGENT_SSH_HOST_KEY") {
            ssh.host_public_key = k.into();
        }
        let mut log_dirs = jobs::logs::LogDirs::new(base_dir);
        if let Some(d) = env("BOSH_AGENT_SYSTEM_LOG_DIR") {
            log_dirs.system = d.into();
        }
        let mut dns_paths = platform::dns::DnsPaths::new(base_dir);
        if let Some(h) = env("BOSH_AGENT_HOSTS_FILE") {
            dns_paths.hosts = h.into();
        }
        let mut power_off = platform::power::PowerOff::default();
        if let Some(cmd) = env("BOSH_AGENT_POWER_OFF") {
            let argv: Vec<std::ffi::OsString> = cmd
                .to_string_lossy()
                .split_whitespace()
                .map(Into::into)
                .collect();
            if !argv.is_empty() {
                power_off.argv = argv;
            }
        }
        let dns = platform::dns::LocalDns::new(dns_paths);
        // bosh-dns reads the records file, not the agent; a damaged one is said at start so
        // that an operator sees it before the next sync_dns repairs it.
        if let Some(e) = dns.check() {
            tracing::warn!(error = %e, "the DNS records file is damaged; {}", platform::dns::DAMAGED_FALLBACK);
        }
        Ok(VmParts {
            disks: platform::disk::Disks::new(cfg),
            ssh,
            log_dirs,
            dns,
            neighbours: platform::arp::Neighbours::default(),
            power_off,
        })
    }
}
