//! The agent's two disk files under `<base>/bosh`:
//!
//! - `persistent_disk_hints.json`: `{cid: DiskSettings}` (upstream's format: a JSON object of
//!   Go-named settings, keys sorted). Upstream writes it 0644; this agent writes it 0600,
//!   because a hint may carry an iSCSI password and only the agent reads the file.
//! - `managed_disk_settings.json`: the cid of the disk mounted last, as bare text (no JSON
//!   quoting, no newline), 0644 as upstream.
//!
//! Both are replaced atomically and durably ([`crate::files`]); a file that cannot be parsed is
//! reported with its path and never overwritten, so a hand-edited or damaged file loses
//! nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{DiskError, DiskSettings};

/// Mode of `managed_disk_settings.json` (upstream's: 0666 less the agent's umask 022).
pub const MANAGED_MODE: u32 = 0o644;

/// `<base>/bosh/persistent_disk_hints.json`.
pub fn hints_path(base: &Path) -> PathBuf {
    base.join("bosh/persistent_disk_hints.json")
}

/// `<base>/bosh/managed_disk_settings.json`.
pub fn managed_path(base: &Path) -> PathBuf {
    base.join("bosh/managed_disk_settings.json")
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> DiskError {
    DiskError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Parses the text of a hints file. Pure: the unit tests feed it hostile text.
pub fn parse_hints(path: &Path, text: &[u8]) -> Result<BTreeMap<String, DiskSettings>, DiskError> {
    // Go's agent writes `null` for an empty map it never filled; read that as empty.
    if text.iter().all(u8::is_ascii_whitespace) || text == b"null" {
        return Ok(BTreeMap::new());
    }
    serde_json::from_slice(text).map_err(|e| file_err(path, format!("not a hints file: {e}")))
}

/// Reads the hints file; a missing file is an empty map.
pub fn read_hints(base: &Path) -> Result<BTreeMap<String, DiskSettings>, DiskError> {
    let path = hints_path(base);
    match fs::read(&path) {
        Ok(text) => parse_hints(&path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(file_err(&path, e)),
    }
}

fn write_hints(base: &Path, hints: &BTreeMap<String, DiskSettings>) -> Result<(), DiskError> {
    let path = hints_path(base);
    let text = serde_json::to_vec(hints).map_err(|e| file_err(&path, e))?;
    crate::files::write_private(&path, &text).map_err(|e| file_err(&path, e))
}

/// Adds (or replaces) one disk's entry. The old file is read first: a damaged one is an
/// error and stays as it was.
pub fn save_hint(base: &Path, settings: DiskSettings) -> Result<(), DiskError> {
    let mut hints = read_hints(base)?;
    hints.insert(settings.id.clone(), settings);
    write_hints(base, &hints)
}

/// Removes one disk's entry (none is fine, as upstream).
pub fn remove_hint(base: &Path, cid: &str) -> Result<(), DiskError> {
    let mut hints = read_hints(base)?;
    if hints.remove(cid).is_none() && !hints_path(base).exists() {
        return Ok(());
    }
    write_hints(base, &hints)
}

/// Longest cid accepted from `managed_disk_settings.json`. IaaS volume ids are well under
/// 256 bytes; a longer file is not one the agent wrote.
pub const MAX_MANAGED_CID: usize = 1024;

/// Parses the text of `managed_disk_settings.json`: `None` when it is empty (or only white
/// space: a file cut before its first byte), else the cid, trimmed. Text that no write of the
/// agent's can leave is an error naming `path`: bytes that are not UTF-8, control characters
/// (a power loss can leave a file of NUL bytes whose data never reached the disk), more than
/// [`MAX_MANAGED_CID`] bytes. Pure: the unit tests feed it hostile text.
pub fn parse_managed(path: &Path, text: &[u8]) -> Result<Option<String>, DiskError> {
    let Ok(text) = std::str::from_utf8(text) else {
        return Err(file_err(path, "not a disk cid: the file is not UTF-8 text"));
    };
    let cid = text.trim();
    if cid.is_empty() {
        return Ok(None);
    }
    if cid.len() > MAX_MANAGED_CID {
        return Err(file_err(
            path,
            format!(
                "not a disk cid: {} bytes, more than {MAX_MANAGED_CID}",
                cid.len()
            ),
        ));
    }
    if let Some(c) = cid.chars().find(|c| c.is_control()) {
        return Err(file_err(
            path,
            format!("not a disk cid: it holds the control character {c:?}"),
        ));
    }
    Ok(Some(cid.to_string()))
}

/// The cid in `managed_disk_settings.json`: `None` when the file is missing or empty; see
/// [`parse_managed`] for what is refused.
pub fn read_managed(base: &Path) -> Result<Option<String>, DiskError> {
    let path = managed_path(base);
    match fs::read(&path) {
        Ok(text) => parse_managed(&path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(&path, e)),
    }
}

/// Records `cid` as the disk mounted last.
pub fn write_managed(base: &Path, cid: &str) -> Result<(), DiskError> {
    let path = managed_path(base);
    crate::files::write_durable(&path, cid.as_bytes(), MANAGED_MODE).map_err(|e| file_err(&path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::disk::DiskEnv;
    use std::os::unix::fs::PermissionsExt;

    fn base(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("platform-disk-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn settings(cid: &str, path: &str) -> DiskSettings {
        DiskSettings::from_hint(cid, &serde_json::json!(path), &DiskEnv::default()).unwrap()
    }

    #[test]
    fn hints_are_added_replaced_and_removed() {
        let b = base("hints");
        save_hint(&b, settings("a", "/dev/sdb")).unwrap();
        save_hint(&b, settings("b", "/dev/sdc")).unwrap();
        save_hint(&b, settings("a", "/dev/sdd")).unwrap();
        let h = read_hints(&b).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h["a"].path, "/dev/sdd");
        let mode = fs::metadata(hints_path(&b)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        remove_hint(&b, "a").unwrap();
        remove_hint(&b, "never").unwrap();
        assert_eq!(
            read_hints(&b).unwrap().keys().collect::<Vec<_>>(),
            vec!["b"]
        );
        // The file is a JSON object keyed by cid, with Go's field names.
        let text = fs::read_to_string(hints_path(&b)).unwrap();
        assert!(
            text.starts_with(r#"{"b":{"ID":"b","DeviceID":"""#),
            "{text}"
        );
        fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn a_damaged_hints_file_is_reported_and_kept() {
        let b = base("damaged");
        fs::create_dir_all(b.join("bosh")).unwrap();
        for bad in [
            &b"{not json"[..],
            b"[1,2]",
            b"{\"a\":{\"Path\":7}}",
            b"\"x\"",
        ] {
            fs::write(hints_path(&b), bad).unwrap();
            let e = save_hint(&b, settings("a", "/dev/sdb"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("persistent_disk_hints.json"), "{e}");
            assert_eq!(fs::read(hints_path(&b)).unwrap(), bad);
            assert!(remove_hint(&b, "a").is_err());
            assert_eq!(fs::read(hints_path(&b)).unwrap(), bad);
        }
        for empty in [&b""[..], b"null", b" \n"] {
            assert!(parse_hints(Path::new("x"), empty).unwrap().is_empty());
        }
        fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn managed_disk_settings_hold_the_bare_cid() {
        let b = base("managed");
        assert_eq!(read_managed(&b).unwrap(), None);
        write_managed(&b, "vol-9").unwrap();
        assert_eq!(fs::read_to_string(managed_path(&b)).unwrap(), "vol-9");
        assert_eq!(read_managed(&b).unwrap().as_deref(), Some("vol-9"));
        let mode = fs::metadata(managed_path(&b)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        fs::write(managed_path(&b), "").unwrap();
        assert_eq!(read_managed(&b).unwrap(), None);
        fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn damaged_managed_disk_settings_are_refused_with_the_path() {
        let p = Path::new("/b/bosh/managed_disk_settings.json");
        for (text, why) in [
            (&b"\0\0\0\0\0\0"[..], "control character '\\0'"),
            (b"vol-\x009", "control character '\\0'"),
            (b"vol\n9", "control character '\\n'"),
            (b"vol-\xff\xfe", "not UTF-8"),
            (b"\xc3", "not UTF-8"),
        ] {
            let e = parse_managed(p, text).unwrap_err().to_string();
            assert!(
                e.starts_with("/b/bosh/managed_disk_settings.json: not a disk cid: "),
                "{e}"
            );
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let long = vec![b'v'; MAX_MANAGED_CID + 1];
        let e = parse_managed(p, &long).unwrap_err().to_string();
        assert!(e.contains("1025 bytes, more than 1024"), "{e}");
        let longest = vec![b'v'; MAX_MANAGED_CID];
        assert_eq!(parse_managed(p, &longest).unwrap().unwrap().len(), 1024);
        // Empty, white space, and what upstream writes (or a hand edit with a newline) are fine.
        for (text, cid) in [
            (&b""[..], None),
            (b" \n\t", None),
            (b"vol-9", Some("vol-9")),
            (b"vol-9\n", Some("vol-9")),
            (b"  disk \xc3\xa9 1 ", Some("disk \u{e9} 1")),
        ] {
            assert_eq!(parse_managed(p, text).unwrap().as_deref(), cid, "{text:?}");
        }
        // Every prefix of a cid the agent wrote is a cid or nothing, never a panic.
        let written = "vol-\u{e9}0123456789abcdef".as_bytes();
        for n in 0..=written.len() {
            match parse_managed(p, &written[..n]) {
                Ok(Some(c)) => assert!("vol-\u{e9}0123456789abcdef".starts_with(&c)),
                Ok(None) => assert_eq!(n, 0),
                Err(e) => assert!(e.to_string().contains("not UTF-8"), "{n}: {e}"),
            }
        }
    }
}
