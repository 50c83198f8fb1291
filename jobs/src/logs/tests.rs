#![allow(clippy::unwrap_used)]

use super::*;
use blobstore::{Algorithm, Digest, Provider};
use std::os::unix::fs::{PermissionsExt, symlink};
use testkit::TempDir;

struct Fixture {
    tmp: TempDir,
    dirs: LogDirs,
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// job: nginx/{access,error}.log, a.txt, deep/x/y.log, .hidden, links out; agent: current;
/// system: syslog; a secret outside every log directory.
fn fixture() -> Fixture {
    let tmp = TempDir::new("logs").unwrap();
    let base = tmp.path().join("base");
    let dirs = LogDirs {
        job: base.join("sys/log"),
        agent: base.join("bosh/log"),
        system: tmp.path().join("var-log"),
    };
    write(&dirs.job.join("nginx/access.log"), "GET /\n");
    write(&dirs.job.join("nginx/error.log"), "oops\n");
    write(&dirs.job.join("a.txt"), "a\n");
    write(&dirs.job.join("deep/x/y.log"), "deep\n");
    write(&dirs.job.join(".hidden"), "h\n");
    write(&dirs.agent.join("current"), "agent log\n");
    write(&dirs.system.join("syslog"), "kernel\n");
    write(&tmp.path().join("secret/shadow"), "root:hash\n");
    symlink(
        tmp.path().join("secret/shadow"),
        dirs.job.join("nginx/shadow.log"),
    )
    .unwrap();
    symlink(tmp.path().join("secret"), dirs.job.join("secretdir")).unwrap();
    fs::set_permissions(dirs.job.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    Fixture { tmp, dirs }
}

fn paths(f: &Fixture, types: &str, filters: &[&str]) -> Vec<String> {
    let types = LogType::parse_list(types).unwrap();
    let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
    Plan::new(&f.dirs, &types, &filters).unwrap().paths()
}

/// (name, contents or None for a directory, mode)
fn unpack(bytes: &[u8]) -> Vec<(String, Option<String>, u32)> {
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            let body = if e.header().entry_type().is_dir() {
                None
            } else {
                assert!(e.header().entry_type().is_file(), "{name}");
                let mut s = String::new();
                e.read_to_string(&mut s).unwrap();
                Some(s)
            };
            (name, body, mode)
        })
        .collect()
}

#[test]
fn log_types_as_upstream() {
    assert_eq!(LogType::parse_list("job").unwrap(), vec![LogType::Job]);
    assert_eq!(
        LogType::parse_list("agent,job,system").unwrap(),
        vec![LogType::Agent, LogType::Job, LogType::System]
    );
    for bad in ["", "jobs", "job,", "job, agent", "JOB", "../etc"] {
        let e = LogType::parse_list(bad).unwrap_err();
        assert!(e.to_string().starts_with(INVALID_LOG_TYPE), "{bad}: {e}");
    }
    let d = LogDirs::new(Path::new("/var/vcap"));
    assert_eq!(d.job, Path::new("/var/vcap/sys/log"));
    assert_eq!(d.agent, Path::new("/var/vcap/bosh/log"));
    assert_eq!(d.system, Path::new("/var/log"));
}

#[test]
fn the_default_filter_takes_every_regular_file_and_no_link() {
    let f = fixture();
    assert_eq!(
        paths(&f, "job", &[]),
        vec![
            ".hidden",
            "a.txt",
            "deep/x/y.log",
            "nginx/access.log",
            "nginx/error.log"
        ]
    );
    assert_eq!(paths(&f, "agent", &[]), vec!["current"]);
    assert_eq!(paths(&f, "system", &[]), vec!["var/log/syslog"]);
}

#[test]
fn filters_select_as_upstream() {
    let f = fixture();
    assert_eq!(
        paths(&f, "job", &["nginx"]),
        vec!["nginx/access.log", "nginx/error.log"],
        "a directory means everything below it"
    );
    assert_eq!(paths(&f, "job", &["nginx/"]), paths(&f, "job", &["nginx"]));
    assert_eq!(paths(&f, "job", &["*.txt"]), vec!["a.txt"]);
    assert_eq!(
        paths(&f, "job", &["**/*.log"]),
        vec!["deep/x/y.log", "nginx/access.log", "nginx/error.log"]
    );
    assert_eq!(
        paths(&f, "job", &["nginx/a*", "/a.txt"]),
        vec!["a.txt", "nginx/access.log"]
    );
    assert_eq!(
        paths(&f, "job", &["{a.txt,deep/**}"]),
        vec!["a.txt", "deep/x/y.log"]
    );
    assert!(paths(&f, "job", &["nothing*"]).is_empty());
    // Links are never followed, also when named.
    assert!(paths(&f, "job", &["secretdir/shadow"]).is_empty());
    assert!(paths(&f, "job", &["secretdir"]).is_empty());
    assert!(paths(&f, "job", &["nginx/shadow.log"]).is_empty());
    // Hostile filters fail before anything is read.
    for bad in ["../../secret/shadow", "nginx/../../x", "[", "{a"] {
        let e = Plan::new(&f.dirs, &[LogType::Job], &[bad.to_string()]).unwrap_err();
        assert!(matches!(e, LogsError::Filter(_)), "{bad}: {e}");
    }
}

#[test]
fn several_types_merge_and_the_later_wins() {
    let f = fixture();
    write(&f.dirs.agent.join("a.txt"), "from agent\n");
    let plan = Plan::new(
        &f.dirs,
        &LogType::parse_list("job,agent,system").unwrap(),
        &["a.txt".to_string(), "current".into(), "syslog".into()],
    )
    .unwrap();
    assert_eq!(plan.paths(), vec!["a.txt", "current", "var/log/syslog"]);
    let mut out = Vec::new();
    write_archive(&plan, &mut out).unwrap();
    let got = unpack(&out);
    assert!(
        got.contains(&("a.txt".into(), Some("from agent\n".into()), 0o644)),
        "{got:?}"
    );
    // A missing directory contributes nothing.
    fs::remove_dir_all(&f.dirs.system).unwrap();
    assert!(paths(&f, "system", &[]).is_empty());
}

#[test]
fn the_archive_holds_the_files_their_modes_and_parent_directories() {
    let f = fixture();
    let plan = Plan::new(&f.dirs, &[LogType::Job, LogType::System], &[]).unwrap();
    let mut out = Vec::new();
    let written = write_archive(&plan, &mut out).unwrap();
    assert_eq!(
        written,
        Written {
            files: 6,
            vanished: 0
        }
    );
    let got = unpack(&out);
    let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "./",
            ".hidden",
            "a.txt",
            "deep/",
            "deep/x/",
            "deep/x/y.log",
            "nginx/",
            "nginx/access.log",
            "nginx/error.log",
            "var/",
            "var/log/",
            "var/log/syslog"
        ]
    );
    assert!(got.contains(&("a.txt".into(), Some("a\n".into()), 0o640)));
    assert!(got.contains(&("nginx/access.log".into(), Some("GET /\n".into()), 0o644)));
    assert!(got.contains(&("deep/".into(), None, 0o755)));
    assert!(!out.windows(9).any(|w| w == b"root:hash"), "no secret");
}

#[test]
fn a_link_swapped_in_after_listing_is_not_followed() {
    let f = fixture();
    let plan = Plan::new(&f.dirs, &[LogType::Job], &[]).unwrap();
    // A job replaces a listed directory and a listed file with links to the secret.
    fs::remove_dir_all(f.dirs.job.join("deep/x")).unwrap();
    symlink(f.tmp.path().join("secret"), f.dirs.job.join("deep/x")).unwrap();
    fs::rename(
        f.tmp.path().join("secret/shadow"),
        f.tmp.path().join("secret/y.log"),
    )
    .unwrap();
    fs::remove_file(f.dirs.job.join("a.txt")).unwrap();
    symlink(f.tmp.path().join("secret/y.log"), f.dirs.job.join("a.txt")).unwrap();
    let mut out = Vec::new();
    let written = write_archive(&plan, &mut out).unwrap();
    assert_eq!(
        written,
        Written {
            files: 3,
            vanished: 2
        }
    );
    let got = unpack(&out);
    assert!(
        got.iter().all(|(n, b, _)| n != "a.txt"
            && n != "deep/x/y.log"
            && b.as_deref() != Some("root:hash\n")),
        "{got:?}"
    );
}

#[test]
fn a_file_that_grows_or_vanishes_keeps_the_archive_well_formed() {
    let f = fixture();
    let plan = Plan::new(
        &f.dirs,
        &[LogType::Job],
        &["nginx".to_string(), "a.txt".into()],
    )
    .unwrap();
    fs::remove_file(f.dirs.job.join("nginx/error.log")).unwrap();
    let mut out = Vec::new();
    let w = write_archive(&plan, &mut out).unwrap();
    assert_eq!(
        w,
        Written {
            files: 2,
            vanished: 1
        }
    );
    assert_eq!(unpack(&out).len(), 4, "./, a.txt, nginx/, nginx/access.log");
}

#[test]
fn fetch_logs_uploads_the_archive_with_its_sha1() {
    let f = fixture();
    let store = f.tmp.path().join("store");
    let blobs = Blobs::new(
        Provider::Local { dir: store.clone() },
        f.tmp.path().join("data"),
    );
    let up = fetch_logs(&blobs, &f.dirs, "job", &["nginx".to_string()]).unwrap();
    let bytes = fs::read(store.join(&up.blobstore_id)).unwrap();
    assert_eq!(up.sha1, Digest::of(Algorithm::Sha1, &bytes).hex);
    let names: Vec<String> = unpack(&bytes).into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(
        names,
        vec!["./", "nginx/", "nginx/access.log", "nginx/error.log"]
    );

    let e = fetch_logs(&blobs, &f.dirs, "jobs", &[]).unwrap_err();
    assert_eq!(e.to_string(), "Invalid log type 'jobs'");
    let e = fetch_logs(&blobs, &f.dirs, "job", &["../x".to_string()]).unwrap_err();
    assert!(matches!(e, LogsError::Filter(_)), "{e}");
    assert_eq!(
        fs::read_dir(&store).unwrap().count(),
        1,
        "nothing more stored"
    );
}

#[test]
fn an_archive_that_fails_uploads_nothing_and_says_why() {
    let f = fixture();
    // A socket where the log directory should be: opening it fails (not "not found").
    let sock = f.tmp.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let dirs = LogDirs {
        job: sock.clone(),
        ..f.dirs.clone()
    };
    let plan = Plan {
        roots: vec![sock.clone()],
        entries: BTreeMap::from([(
            b"x".to_vec(),
            Entry {
                root: 0,
                components: vec!["x".into()],
            },
        )]),
    };
    let mut out = Vec::new();
    assert!(matches!(
        write_archive(&plan, &mut out),
        Err(LogsError::Io { .. })
    ));

    let store = f.tmp.path().join("store");
    let blobs = Blobs::new(
        Provider::Local { dir: store.clone() },
        f.tmp.path().join("data"),
    );
    // Through the stream: the writer's error comes back, and no blob is left.
    let failure = Arc::new(Mutex::new(None));
    let e = blobs
        .upload_stream(|| archive_stream(Arc::new(plan.clone()), failure.clone()))
        .unwrap_err();
    assert!(e.to_string().contains("sock"), "{e}");
    assert_eq!(fs::read_dir(&store).map(|d| d.count()).unwrap_or(0), 0);
    // fetch_logs itself lists nothing there (a socket is no directory), so it succeeds empty.
    let up = fetch_logs(&blobs, &dirs, "job", &[]).unwrap();
    let bytes = fs::read(store.join(&up.blobstore_id)).unwrap();
    assert_eq!(unpack(&bytes).len(), 1, "just ./");
}
