//! `fetch_logs` against the real parts: the logs tarball streamed (chunked) to Debian's nginx
//! configured as the director's DAV blobstore (TLS, Basic auth), then read back from nginx's
//! store and unpacked with the system's `tar`. No test skips: a missing nginx fails with the
//! reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use blobstore::{Algorithm, Blobs, Digest, Provider, ProviderEnv};
use integration::TempDir;
use integration::dav::DavServer;
use jobs::logs::{LogDirs, LogsError, fetch_logs};

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// Unpacks `bytes` with the system's tar; returns the files below the result, sorted, with
/// their contents.
fn untar(bytes: &[u8]) -> Vec<(String, String)> {
    let dir = TempDir::new("logs").unwrap();
    let tgz = dir.path().join("logs.tgz");
    fs::write(&tgz, bytes).unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "tar -xzf of the uploaded blob");
    let mut files = Vec::new();
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            assert!(!ft.is_symlink(), "no link in the archive: {:?}", e.path());
            if ft.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(&out).unwrap().display().to_string();
                files.push((rel, fs::read_to_string(e.path()).unwrap()));
            }
        }
    }
    files.sort();
    files
}

struct Setup {
    tmp: TempDir,
    dav: DavServer,
    blobs: Blobs,
    dirs: LogDirs,
}

fn setup() -> Setup {
    let dav =
        DavServer::start().unwrap_or_else(|e| panic!("starting nginx as the DAV blobstore: {e}"));
    let tmp = TempDir::new("logs-tmp").unwrap();
    let provider = Provider::from_settings(
        &dav.agent_blobstore(),
        &ProviderEnv::new(tmp.path().join("base")),
    )
    .unwrap();
    let blobs = Blobs::new(provider, tmp.path().join("base/data"));
    // The stemcell layout: <base>/sys is a link to data/sys, the job logs below it.
    let base = tmp.path().join("base");
    fs::create_dir_all(base.join("data/sys/log")).unwrap();
    symlink(base.join("data/sys"), base.join("sys")).unwrap();
    let dirs = LogDirs {
        job: base.join("sys/log"),
        agent: base.join("bosh/log"),
        system: tmp.path().join("var-log"),
    };
    write(&dirs.job.join("web/web.stdout.log"), "started\n");
    write(&dirs.job.join("web/web.stderr.log"), "warning\n");
    write(&dirs.job.join("worker/worker.log"), "working\n");
    write(&dirs.agent.join("current"), "agent says hi\n");
    write(&dirs.system.join("syslog"), "kernel: up\n");
    write(&tmp.path().join("secret/shadow"), "root:$6$hash\n");
    symlink(
        tmp.path().join("secret/shadow"),
        dirs.job.join("web/shadow.log"),
    )
    .unwrap();
    symlink(tmp.path().join("secret"), dirs.job.join("secret")).unwrap();
    Setup {
        tmp,
        dav,
        blobs,
        dirs,
    }
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn job_logs_are_streamed_to_the_dav_blobstore_with_their_sha1() {
    let s = setup();
    let up = fetch_logs(&s.blobs, &s.dirs, "job", &[]).unwrap();
    uuid_like(&up.blobstore_id);
    let stored = fs::read(s.dav.object_path(&up.blobstore_id)).unwrap();
    assert_eq!(
        up.sha1,
        Digest::of(Algorithm::Sha1, &stored).hex,
        "sha1 of the stored bytes"
    );
    assert_eq!(
        untar(&stored),
        pairs(&[
            ("web/web.stderr.log", "warning\n"),
            ("web/web.stdout.log", "started\n"),
            ("worker/worker.log", "working\n"),
        ]),
        "every job log, no link and nothing from outside"
    );
    assert!(!stored.is_empty());
    // It went out chunked: nothing was spooled under the agent's data directory.
    assert!(
        fs::read_dir(s.tmp.path().join("base/data/tmp")).map_or(true, |mut d| d.next().is_none()),
        "no temporary file"
    );
    let path = s.dav.object_path(&up.blobstore_id);
    let prefix = path
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy();
    let log = s.dav.access_log();
    assert!(
        log.contains(&format!("PUT /{prefix}/{} HTTP/1.1\" 201", up.blobstore_id)),
        "{log}"
    );
}

#[test]
fn filters_and_types_select_what_is_uploaded() {
    let s = setup();
    let up = fetch_logs(
        &s.blobs,
        &s.dirs,
        "agent,job,system",
        &["web".to_string(), "current".into(), "sys*".into()],
    )
    .unwrap();
    let stored = fs::read(s.dav.object_path(&up.blobstore_id)).unwrap();
    assert_eq!(up.sha1, Digest::of(Algorithm::Sha1, &stored).hex);
    assert_eq!(
        untar(&stored),
        pairs(&[
            ("current", "agent says hi\n"),
            ("var/log/syslog", "kernel: up\n"),
            ("web/web.stderr.log", "warning\n"),
            ("web/web.stdout.log", "started\n"),
        ])
    );
    let up = fetch_logs(&s.blobs, &s.dirs, "job", &["**/*.stdout.log".to_string()]).unwrap();
    let stored = fs::read(s.dav.object_path(&up.blobstore_id)).unwrap();
    assert_eq!(
        untar(&stored),
        pairs(&[("web/web.stdout.log", "started\n")])
    );
    // Named links are still not followed.
    let up = fetch_logs(
        &s.blobs,
        &s.dirs,
        "job",
        &["secret/shadow".to_string(), "web/shadow.log".into()],
    )
    .unwrap();
    let stored = fs::read(s.dav.object_path(&up.blobstore_id)).unwrap();
    assert!(untar(&stored).is_empty());
    assert!(!stored.windows(4).any(|w| w == b"$6$h"));
}

#[test]
fn bad_types_filters_and_a_refusing_blobstore_fail_clearly() {
    let s = setup();
    let before = s.dav.access_log().lines().count();
    let e = fetch_logs(&s.blobs, &s.dirs, "jobs", &[]).unwrap_err();
    assert_eq!(e.to_string(), "Invalid log type 'jobs'");
    let e = fetch_logs(
        &s.blobs,
        &s.dirs,
        "job",
        &["../../secret/shadow".to_string()],
    )
    .unwrap_err();
    assert!(matches!(e, LogsError::Filter(_)), "{e}");
    assert_eq!(
        s.dav.access_log().lines().count(),
        before,
        "nothing was sent"
    );

    // The read-only user may not PUT: the upload error names the status.
    let (user, password) = s.dav.read_user();
    let provider = Provider::from_settings(
        &serde_json::json!({"provider": "dav", "options": {
            "endpoint": s.dav.url(), "user": user, "password": password,
            "tls": {"cert": {"ca": s.dav.ca_pem()}}, "retry_attempts": 1}}),
        &ProviderEnv::new(s.tmp.path().join("base")),
    )
    .unwrap();
    let blobs = Blobs::new(provider, s.tmp.path().join("base/data"));
    let e = fetch_logs(&blobs, &s.dirs, "job", &[]).unwrap_err();
    assert!(matches!(e, LogsError::Upload(_)), "{e:?}");
    assert!(e.to_string().contains("401"), "{e}");
}

#[test]
fn a_large_log_streams_through() {
    let s = setup();
    // 8 MiB of poorly compressible text: many pipe chunks, many HTTP chunks.
    let mut big = String::with_capacity(8 << 20);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while big.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.push_str(&format!("{x:016x}\n"));
    }
    write(&s.dirs.job.join("big/big.log"), &big);
    fs::set_permissions(
        s.dirs.job.join("big/big.log"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let up = fetch_logs(&s.blobs, &s.dirs, "job", &["big".to_string()]).unwrap();
    let stored = fs::read(s.dav.object_path(&up.blobstore_id)).unwrap();
    assert_eq!(up.sha1, Digest::of(Algorithm::Sha1, &stored).hex);
    let got = untar(&stored);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "big/big.log");
    assert!(got[0].1 == big, "the big file arrives whole");
}

fn uuid_like(id: &str) {
    let parts: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(parts, vec![8, 4, 4, 4, 12], "{id}");
    assert!(
        id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "{id}"
    );
}
