//! `sync_dns`: the director's DNS records (the blob bosh-dns reads) saved on the VM, as
//! upstream's agent does it (`agent/action/sync_dns.go`, `SaveDNSRecords`):
//!
//! - the records live in `<base>/instance/dns/records.json`, the blob verbatim, mode 0640,
//!   owner root:vcap (root's group where there is no `vcap`);
//! - when that file already holds the version asked for, or a newer one, nothing is done and
//!   the answer is `"synced"` at once: a version never goes backwards;
//! - otherwise the blob's `version` must equal the one the director sent
//!   ([`VERSION_MISMATCH`]), then the hosts file is rewritten (upstream's localhost template
//!   with the agent id as the host name, then one `<ip> <name>` line per record) and the
//!   records file is replaced; both atomically (temporary file, fsync, rename, fsync of the
//!   directory).
//!
//! Fetching the blob and checking its digest is the caller's (the `blobstore` crate). Stricter
//! than upstream: every record's address must be an IP address and every name a plain host
//! name, so a record can never add other lines or fields to the hosts file; a blob with one
//! bad record is refused whole and nothing changes. Where the hosts file is a mount point (a
//! container's bind-mounted `/etc/hosts`) it cannot be renamed over and is rewritten in place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

/// The answer of `sync_dns`.
pub const SYNCED: &str = "synced";
/// Upstream's error when the blob's version is not the director's.
pub const VERSION_MISMATCH: &str =
    "version from unpacked dns blob does not match version supplied by director";
/// Mode of `records.json`.
pub const RECORDS_MODE: u32 = 0o640;
/// Mode of the hosts file.
pub const HOSTS_MODE: u32 = 0o644;
/// Longest host name accepted in a record (DNS's limit).
pub const MAX_NAME_LEN: usize = 253;

/// Why records could not be saved. Nothing was changed when this is returned, except for
/// [`DnsError::Write`] of the records file after the hosts file was written (the next
/// `sync_dns` writes both again, as the version on disk is still the old one).
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The blob is not JSON or not an object.
    #[error("unmarshalling DNS records: {0}")]
    Json(String),
    /// The blob's `version` is missing or not a non-negative integer.
    #[error("unmarshalling DNS records: 'version' must be a non-negative integer, not {0}")]
    Version(String),
    /// The blob's version is not the one the director sent.
    #[error("{VERSION_MISMATCH} (blob {blob}, director {director})")]
    VersionMismatch { blob: u64, director: u64 },
    /// A record that is not `[ip, name]` with a valid address and name.
    #[error("DNS record {index} {record}: {reason}")]
    Record {
        index: usize,
        record: String,
        reason: &'static str,
    },
    /// The host name for the localhost lines is unusable.
    #[error(
        "host name '{0}' is refused: it must be 1 to 253 characters without spaces or control characters"
    )]
    Hostname(String),
    /// Writing a file failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the records and the hosts file live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsPaths {
    /// `<base>/instance/dns/records.json`.
    pub records: PathBuf,
    /// `/etc/hosts`.
    pub hosts: PathBuf,
}

impl DnsPaths {
    /// Upstream's paths for base directory `base` (`/var/vcap` on a VM).
    pub fn new(base: &Path) -> Self {
        DnsPaths {
            records: base.join("instance/dns/records.json"),
            hosts: PathBuf::from("/etc/hosts"),
        }
    }
}

/// A records blob that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    pub version: u64,
    /// `(ip, name)` in the blob's order.
    pub records: Vec<(IpAddr, String)>,
}

/// What [`LocalDns::save`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// The records on disk were already this version or newer; nothing was written.
    AlreadySynced { on_disk: u64 },
    /// The hosts file and the records were written.
    Written { version: u64, records: usize },
}

fn get_ci<'v>(obj: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 100 {
        format!("{}…", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Parses and checks a records blob: an object with `version` (a non-negative integer) and
/// `records` (`[[ip, name], …]`; absent or null means none). Other keys are not looked at:
/// the blob is kept verbatim. Keys match as Go's decoding matches them (exactly, else
/// ignoring case).
pub fn parse_records(blob: &[u8]) -> Result<Records, DnsError> {
    let value: Value = serde_json::from_slice(blob).map_err(|e| DnsError::Json(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(DnsError::Json(format!(
            "expected an object, not {}",
            shown(&value)
        )));
    };
    let version = match get_ci(&obj, "version") {
        Some(v) => v.as_u64().ok_or_else(|| DnsError::Version(shown(v)))?,
        None => return Err(DnsError::Version("nothing".into())),
    };
    let list = match get_ci(&obj, "records") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(other) => {
            return Err(DnsError::Json(format!(
                "'records' must be an array, not {}",
                shown(other)
            )));
        }
    };
    let mut records = Vec::with_capacity(list.len());
    for (index, r) in list.iter().enumerate() {
        let refuse = |reason| DnsError::Record {
            index,
            record: shown(r),
            reason,
        };
        let (ip, name) = match r.as_array().map(Vec::as_slice) {
            Some([Value::String(ip), Value::String(name)]) => (ip, name),
            _ => return Err(refuse("expected [ip, name], two strings")),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| refuse("the address is not an IP address"))?;
        if !valid_name(name) {
            return Err(refuse(
                "the name must be 1 to 253 characters of A-Z, a-z, 0-9, '.', '-' and '_'",
            ));
        }
        records.push((ip, name.clone()));
    }
    Ok(Records { version, records })
}

/// Upstream's hosts file: the localhost lines (with `hostname`, the agent id) and one
/// `<ip> <name>` line per record.
pub fn render_hosts(hostname: &str, records: &[(IpAddr, String)]) -> Result<String, DnsError> {
    if hostname.is_empty()
        || hostname.len() > MAX_NAME_LEN
        || hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(DnsError::Hostname(hostname.chars().take(100).collect()));
    }
    let mut out = String::with_capacity(300 + records.len() * 64);
    out.push_str(&format!(
        "127.0.0.1 {hostname} localhost\n\
         \n\
         # The following lines are desirable for IPv6 capable hosts\n\
         ::1 {hostname} localhost ip6-localhost ip6-loopback\n\
         fe00::0 ip6-localnet\n\
         ff00::0 ip6-mcastprefix\n\
         ff02::1 ip6-allnodes\n\
         ff02::2 ip6-allrouters\n\
         ff02::3 ip6-allhosts\n"
    ));
    for (ip, name) in records {
        out.push_str(&format!("{ip} {name}\n"));
    }
    Ok(out)
}

/// A records file that exists but gives no version: cut short, not JSON, no usable
/// `version`, or unreadable. Upstream treats it as "needs an update" without a word; so does
/// this agent, but it says so (see [`LocalDns::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", path.display())]
pub struct DamagedRecords {
    /// The records file.
    pub path: PathBuf,
    /// What is wrong with it, in words.
    pub detail: String,
}

/// What the agent does with a damaged records file, for the log lines that report one.
pub const DAMAGED_FALLBACK: &str = "treated as holding no version: the next sync_dns fetches \
     the director's records and rewrites the file (until then bosh-dns cannot load it)";

/// The version in a records file, reading nothing else of it into memory: `Ok(None)` when
/// there is no file, the version when there is one, [`DamagedRecords`] when the file gives
/// none (saying why: cut short, not JSON, no usable `version`, unreadable). The key matches
/// as Go's decoding matches it (`version`, else any case).
pub fn records_on_disk(records: &Path) -> Result<Option<u64>, DamagedRecords> {
    let damaged = |detail: String| DamagedRecords {
        path: records.to_path_buf(),
        detail,
    };
    let file = match File::open(records) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(damaged(format!("cannot be read: {e}"))),
    };
    let value: VersionOnly = serde_json::from_reader(io::BufReader::new(file)).map_err(|e| {
        damaged(match e.classify() {
            serde_json::error::Category::Eof => format!(
                "cut short: the JSON ends at line {} column {}",
                e.line(),
                e.column()
            ),
            serde_json::error::Category::Io => format!("cannot be read: {e}"),
            serde_json::error::Category::Syntax => format!("not JSON: {e}"),
            serde_json::error::Category::Data => format!("not a records file: {e}"),
        })
    })?;
    match value.0 {
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(other) => Err(damaged(format!(
            "not a records file: 'version' must be a non-negative integer, not {}",
            shown(&other)
        ))),
        None => Err(damaged("not a records file: it has no 'version'".into())),
    }
}

/// The version in a records file (`None`: no file, or a damaged one, which upstream treats
/// as "needs an update"); [`records_on_disk`] says which.
pub fn version_on_disk(records: &Path) -> Option<u64> {
    records_on_disk(records).ok().flatten()
}

/// A JSON object's `version` (exact key first, else any case, as Go decodes), every other
/// value skipped without being kept.
struct VersionOnly(Option<Value>);

impl<'de> serde::Deserialize<'de> for VersionOnly {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = VersionOnly;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object with a 'version'")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<VersionOnly, A::Error> {
                let (mut exact, mut folded) = (None, None);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "version" {
                        exact = Some(map.next_value::<Value>()?);
                    } else if folded.is_none() && key.eq_ignore_ascii_case("version") {
                        folded = Some(map.next_value::<Value>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(VersionOnly(exact.or(folded)))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The VM's DNS records; one per agent (its lock orders concurrent `sync_dns` calls).
#[derive(Debug)]
pub struct LocalDns {
    paths: DnsPaths,
    lock: Mutex<()>,
}

impl LocalDns {
    pub fn new(paths: DnsPaths) -> Self {
        LocalDns {
            paths,
            lock: Mutex::new(()),
        }
    }

    pub fn paths(&self) -> &DnsPaths {
        &self.paths
    }

    /// Whether the records on disk are already `version` or newer: then the action answers
    /// [`SYNCED`] without fetching anything. A damaged records file is not synced (upstream's
    /// rule) and is reported as a warning naming the file, what is wrong and
    /// [`DAMAGED_FALLBACK`].
    pub fn is_synced(&self, version: u64) -> bool {
        match records_on_disk(&self.paths.records) {
            Ok(on_disk) => on_disk.is_some_and(|v| v >= version),
            Err(e) => {
                tracing::warn!(error = %e, "the DNS records file is damaged; {DAMAGED_FALLBACK}");
                false
            }
        }
    }

    /// The records file as it is now, for a check at start: `Some` when it exists and is
    /// damaged (the caller reports it; nothing is changed).
    pub fn check(&self) -> Option<DamagedRecords> {
        records_on_disk(&self.paths.records).err()
    }

    /// Saves the fetched (and digest-checked) blob as version `version`; see the module
    /// documentation. Checked again under the lock, so of two concurrent calls the older
    /// version never overwrites the newer.
    pub fn save(&self, blob: &[u8], version: u64, hostname: &str) -> Result<Saved, DnsError> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(on_disk) = version_on_disk(&self.paths.records)
            && on_disk >= version
        {
            return Ok(Saved::AlreadySynced { on_disk });
        }
        let parsed = parse_records(blob)?;
        if parsed.version != version {
            return Err(DnsError::VersionMismatch {
                blob: parsed.version,
                director: version,
            });
        }
        let hosts = render_hosts(hostname, &parsed.records)?;
        write_hosts(&self.paths.hosts, hosts.as_bytes())?;
        write_records(&self.paths.records, blob)?;
        Ok(Saved::Written {
            version,
            records: parsed.records.len(),
        })
    }
}

fn werr(path: &Path) -> impl FnOnce(io::Error) -> DnsError + '_ {
    move |source| DnsError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn write_hosts(path: &Path, bytes: &[u8]) -> Result<(), DnsError> {
    match crate::files::write_durable(path, bytes, HOSTS_MODE) {
        Ok(()) => Ok(()),
        // A bind-mounted file cannot be renamed over: rewrite it in place.
        Err(e) if e.source.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
            let mut f = OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(werr(path))?;
            f.write_all(bytes).map_err(werr(path))?;
            f.sync_all().map_err(werr(path))
        }
        Err(e) => Err(DnsError::Write {
            path: e.path,
            source: e.source,
        }),
    }
}

/// The blob verbatim, 0640 root:vcap, atomically: the temporary file has its owner and mode
/// before it is filled and renamed, so bosh-dns never finds a file it cannot read.
fn write_records(path: &Path, bytes: &[u8]) -> Result<(), DnsError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(werr(dir))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr(&tmp))?;
        let gid = crate::datadir::vcap_gid().map(|g| g.as_raw());
        std::os::unix::fs::fchown(&f, Some(0), gid).map_err(werr(&tmp))?;
        f.set_permissions(fs::Permissions::from_mode(RECORDS_MODE))
            .map_err(werr(&tmp))?;
        f.write_all(bytes).map_err(werr(&tmp))?;
        f.sync_all().map_err(werr(&tmp))?;
        fs::rename(&tmp, path).map_err(werr(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(werr(dir))
}

/// A records blob like the director's with `records` entries (for tests and the benchmark):
/// `version`, `records`, `record_keys`, `record_infos`, `aliases`.
pub fn synthetic_blob(version: u64, records: usize) -> Vec<u8> {
    let mut rec = Vec::with_capacity(records);
    let mut infos = Vec::with_capacity(records);
    for i in 0..records {
        let ip = format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
        let name = format!("{:08x}-aaaa-bbbb-cccc-{:012x}.web.default.dep.bosh", i, i);
        rec.push(serde_json::json!([ip, name]));
        infos.push(serde_json::json!([
            format!("{i:08x}-aaaa-bbbb-cccc-{i:012x}"),
            "web",
            "z1",
            "default",
            "dep",
            ip,
            "bosh",
            i,
            i
        ]));
    }
    serde_json::to_vec(&serde_json::json!({
        "version": version,
        "records": rec,
        "record_keys": ["id", "instance_group", "az", "network", "deployment", "ip", "domain", "az_id", "instance_index"],
        "record_infos": infos,
        "aliases": {},
    }))
    .unwrap_or_default()
}

/// The benchmark of `sync_dns`'s own work (everything after the fetch): checks the version on
/// disk, parses and checks a `records`-entry blob, rewrites a hosts file and records.json
/// under `dir`. Returns the time it took; the files are left in `dir` for the caller to
/// remove.
pub fn bench_sync_dns(dir: &Path, records: usize) -> Result<std::time::Duration, DnsError> {
    let dns = LocalDns::new(DnsPaths {
        records: dir.join("instance/dns/records.json"),
        hosts: dir.join("hosts"),
    });
    let blob = synthetic_blob(2, records);
    // A previous version on disk, as on a running VM.
    write_records(&dns.paths.records, &synthetic_blob(1, records))?;
    let start = std::time::Instant::now();
    let synced = dns.is_synced(2);
    let saved = dns.save(&blob, 2, "bench-agent-id")?;
    let took = start.elapsed();
    debug_assert!(!synced && matches!(saved, Saved::Written { .. }));
    Ok(took)
}
