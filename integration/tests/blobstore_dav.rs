//! The blobstore crate against real parts: Debian's nginx as the director's DAV blobstore
//! (TLS with a test CA, Basic auth, the prefix layout) and a `bosh-blobstore-stub` command
//! line that honours the stemcell CLIs' argv contract. No test skips: a missing nginx or
//! openssl fails with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use blobstore::{
    Algorithm, BlobError, Blobs, Digest, MultiDigest, Provider, ProviderEnv, ProviderError, Select,
};
use integration::TempDir;
use integration::dav::DavServer;
use integration::nats::Pki;
use serde_json::json;

fn start() -> DavServer {
    DavServer::start().unwrap_or_else(|e| panic!("starting nginx as the DAV blobstore: {e}"))
}

fn dav_provider(dav: &DavServer, user: &str, password: &str, ca: &str) -> Provider {
    Provider::from_settings(
        &json!({"provider": "dav", "options": {
            "endpoint": dav.url(),
            "user": user,
            "password": password,
            "tls": {"cert": {"ca": ca}},
            "retry_attempts": 1,
        }}),
        &ProviderEnv::new("/nonexistent-base"),
    )
    .unwrap()
}

/// A tgz like the director's: `./`-prefixed entries, made by the system's tar.
fn tgz(files: &[(&str, &str)]) -> Vec<u8> {
    let src = TempDir::new("bosh-agent-test").unwrap();
    for (name, text) in files {
        let p = src.path().join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
    }
    fs::set_permissions(
        src.path().join(files[0].0),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let out = TempDir::new("bosh-agent-test").unwrap();
    let file = out.path().join("a.tgz");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&file)
        .arg("-C")
        .arg(src.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar -czf");
    fs::read(file).unwrap()
}

struct Agent {
    tmp: TempDir,
    blobs: Blobs,
}

fn agent(provider: Provider) -> Agent {
    let tmp = TempDir::new("bosh-agent-test").unwrap();
    let blobs = Blobs::new(provider, tmp.path().join("data"));
    Agent { tmp, blobs }
}

impl Agent {
    fn dest(&self, name: &str) -> PathBuf {
        self.tmp.path().join("installed").join(name)
    }
    /// Everything in the parent of the destinations (no temporary left over).
    fn installed(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.tmp.path().join("installed"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[test]
fn get_and_unpack_through_nginx_with_sha1_and_sha256() {
    let dav = start();
    let blob = tgz(&[("bin/run", "#!/bin/sh\n"), ("lib/data", "data")]);
    dav.put_blob("pkg-blob", &blob).unwrap();
    let (user, password) = dav.write_user();
    let a = agent(dav_provider(&dav, user, password, dav.ca_pem()));

    let sha1 = MultiDigest::parse(&Digest::of(Algorithm::Sha1, &blob).hex).unwrap();
    a.blobs
        .unpack("pkg-blob", &sha1, &a.dest("one"), &Select::All)
        .unwrap();
    assert_eq!(fs::read_to_string(a.dest("one/lib/data")).unwrap(), "data");
    assert_eq!(
        fs::metadata(a.dest("one/bin/run")).unwrap().mode() & 0o777,
        0o750
    );

    // The read-only user can GET too; the strongest piece is checked.
    let (ru, rp) = dav.read_user();
    let reader = agent(dav_provider(&dav, ru, rp, dav.ca_pem()));
    let sha256 = MultiDigest::parse(&format!(
        "{};{}",
        Digest::of(Algorithm::Sha1, &blob),
        Digest::of(Algorithm::Sha256, &blob)
    ))
    .unwrap();
    reader
        .blobs
        .unpack("pkg-blob", &sha256, &reader.dest("two"), &Select::All)
        .unwrap();
    assert_eq!(
        fs::read_to_string(reader.dest("two/bin/run")).unwrap(),
        "#!/bin/sh\n"
    );
    assert_eq!(reader.installed(), vec!["two"]);

    // A job out of a rendered templates archive (`./<job>/` prefix).
    let templates = tgz(&[("web/monit", "check"), ("db/monit", "other")]);
    dav.put_blob("templates", &templates).unwrap();
    let d = MultiDigest::parse(&Digest::of(Algorithm::Sha1, &templates).hex).unwrap();
    a.blobs
        .unpack("templates", &d, &a.dest("web"), &Select::Job("web".into()))
        .unwrap();
    assert_eq!(fs::read_to_string(a.dest("web/monit")).unwrap(), "check");
    assert!(!a.dest("web/db").exists());

    // download: the blob as a file.
    let file = a.tmp.path().join("blob.tgz");
    a.blobs.download("pkg-blob", &sha256, &file).unwrap();
    assert_eq!(fs::read(&file).unwrap(), blob);
    assert!(dav.access_log().contains("GET /"), "{}", dav.access_log());
}

#[test]
fn digest_mismatch_leaves_nothing() {
    let dav = start();
    let blob = tgz(&[("f", "x")]);
    dav.put_blob("b1", &blob).unwrap();
    let (user, password) = dav.write_user();
    let a = agent(dav_provider(&dav, user, password, dav.ca_pem()));
    let wrong = Digest::of(Algorithm::Sha256, b"something else");
    let d = MultiDigest::single(wrong.clone());
    let e = a
        .blobs
        .unpack("b1", &d, &a.dest("pkg"), &Select::All)
        .unwrap_err();
    assert!(e.is_mismatch(), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("b1"), "{msg}");
    assert!(msg.contains(&wrong.to_string()), "{msg}");
    assert!(
        msg.contains(&Digest::of(Algorithm::Sha256, &blob).to_string()),
        "{msg}"
    );
    assert!(a.installed().is_empty(), "left behind: {:?}", a.installed());
    let file = a.tmp.path().join("blob");
    assert!(a.blobs.download("b1", &d, &file).unwrap_err().is_mismatch());
    assert!(!file.exists());
}

#[test]
fn not_found_names_the_url_without_the_password() {
    let dav = start();
    let (user, password) = dav.write_user();
    let a = agent(dav_provider(&dav, user, password, dav.ca_pem()));
    let d = MultiDigest::parse(&"0".repeat(40)).unwrap();
    let e = a
        .blobs
        .unpack("missing-blob", &d, &a.dest("pkg"), &Select::All)
        .unwrap_err();
    let BlobError::Provider { source, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(source.status(), Some(404), "{e}");
    let msg = e.to_string();
    let prefix = &Digest::of(Algorithm::Sha1, b"missing-blob").hex[..2];
    assert!(
        msg.contains(&format!("{}/{prefix}/missing-blob", dav.url())),
        "{msg}"
    );
    assert!(msg.contains("404"), "{msg}");
    assert!(!msg.contains(password), "{msg}");
    assert!(a.installed().is_empty());
}

#[test]
fn wrong_password_is_401_and_reader_cannot_put() {
    let dav = start();
    dav.put_blob("b1", b"x").unwrap();
    let a = agent(dav_provider(&dav, "agent", "wrong-password", dav.ca_pem()));
    let d = MultiDigest::parse(&Digest::of(Algorithm::Sha1, b"x").hex).unwrap();
    let e = a
        .blobs
        .unpack("b1", &d, &a.dest("pkg"), &Select::All)
        .unwrap_err();
    let BlobError::Provider { source, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(source.status(), Some(401), "{e}");
    assert!(!e.to_string().contains("wrong-password"), "{e}");

    let (ru, rp) = dav.read_user();
    let reader = agent(dav_provider(&dav, ru, rp, dav.ca_pem()));
    let file = reader.tmp.path().join("up");
    fs::write(&file, b"data").unwrap();
    let e = reader.blobs.upload(&file).unwrap_err();
    let BlobError::Provider { source, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(source.status(), Some(401), "{e}");
}

#[test]
fn wrong_ca_is_a_tls_error() {
    let dav = start();
    dav.put_blob("b1", b"x").unwrap();
    let other = Pki::new("another CA");
    let (user, password) = dav.write_user();
    let a = agent(dav_provider(&dav, user, password, &other.ca_pem));
    let d = MultiDigest::parse(&Digest::of(Algorithm::Sha1, b"x").hex).unwrap();
    let e = a
        .blobs
        .unpack("b1", &d, &a.dest("pkg"), &Select::All)
        .unwrap_err();
    let BlobError::Provider {
        source: ProviderError::Transport { message, url, .. },
        ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert!(url.starts_with(&dav.url()), "{url}");
    let lower = message.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("tls"),
        "{message}"
    );
    assert!(a.installed().is_empty());
}

#[test]
fn upload_puts_under_a_uuid_at_the_prefix_path() {
    let dav = start();
    let (user, password) = dav.write_user();
    let a = agent(dav_provider(&dav, user, password, dav.ca_pem()));
    let file = a.tmp.path().join("compiled.tgz");
    let blob = tgz(&[("bin/x", "compiled")]);
    fs::write(&file, &blob).unwrap();
    let up = a.blobs.upload(&file).unwrap();
    uuid_like(&up.blobstore_id);
    assert_eq!(up.sha1, Digest::of(Algorithm::Sha1, &blob).hex);
    let stored = dav.object_path(&up.blobstore_id);
    assert_eq!(fs::read(&stored).unwrap(), blob, "{}", stored.display());
    // And it reads back, verified.
    let d = MultiDigest::parse(&up.sha1).unwrap();
    a.blobs
        .unpack(&up.blobstore_id, &d, &a.dest("back"), &Select::All)
        .unwrap();
    assert_eq!(
        fs::read_to_string(a.dest("back/bin/x")).unwrap(),
        "compiled"
    );
    assert!(dav.access_log().contains("PUT /"), "{}", dav.access_log());
}

fn uuid_like(s: &str) {
    let parts: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    assert_eq!(lens, vec![8, 4, 4, 4, 12], "{s}");
    assert!(s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{s}");
    assert_eq!(parts[2].as_bytes()[0], b'4', "version 4: {s}");
}

#[test]
fn local_sources_take_precedence_over_the_provider() {
    let dav = start();
    let remote = tgz(&[("which", "remote")]);
    let local = tgz(&[("which", "local")]);
    dav.put_blob("b1", &remote).unwrap();
    let (user, password) = dav.write_user();
    let a = agent(dav_provider(&dav, user, password, dav.ca_pem()));
    let blobs_dir = a.tmp.path().join("data/blobs");
    fs::create_dir_all(&blobs_dir).unwrap();
    fs::write(blobs_dir.join("b1"), &local).unwrap();
    let d = MultiDigest::parse(&Digest::of(Algorithm::Sha1, &local).hex).unwrap();
    a.blobs
        .unpack("b1", &d, &a.dest("pkg"), &Select::All)
        .unwrap();
    assert_eq!(fs::read_to_string(a.dest("pkg/which")).unwrap(), "local");
    assert!(!dav.access_log().contains("/b1"), "{}", dav.access_log());
    // Without the local copy, the remote one (and its digest).
    fs::remove_file(blobs_dir.join("b1")).unwrap();
    let d = MultiDigest::parse(&Digest::of(Algorithm::Sha1, &remote).hex).unwrap();
    a.blobs
        .unpack("b1", &d, &a.dest("pkg2"), &Select::All)
        .unwrap();
    assert_eq!(fs::read_to_string(a.dest("pkg2/which")).unwrap(), "remote");
}

/// A stub of the stemcell's CLIs: `-c <cfg> get <id> <file>` and `-c <cfg> put <file> <id>`,
/// serving from the directory named in its config (`{"dir": ...}`); it refuses a config that
/// is not mode 0600 and logs each call.
const STUB: &str = r#"#!/bin/sh
set -eu
[ "$1" = "-c" ] || { echo "stub: expected -c, got $1" >&2; exit 2; }
cfg=$2; shift 2
mode=$(stat -c %a "$cfg")
[ "$mode" = 600 ] || { echo "stub: $cfg has mode $mode" >&2; exit 3; }
store=$(sed -n 's/.*"dir":"\([^"]*\)".*/\1/p' "$cfg")
[ -d "$store" ] || { echo "stub: no dir in $cfg" >&2; exit 4; }
echo "$*" >> "$store/calls.log"
case "$1" in
  get) [ -f "$store/$2" ] || { echo "stub: no blob $2" >&2; exit 5; }; cp "$store/$2" "$3" ;;
  put) case "$2" in /*) ;; *) echo "stub: relative $2" >&2; exit 6 ;; esac; cp "$2" "$store/$3" ;;
  *) echo "stub: unknown command $1" >&2; exit 7 ;;
esac
"#;

#[test]
fn external_cli_delegation() {
    let tmp = TempDir::new("bosh-agent-test").unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let stub = bin.join("bosh-blobstore-stub");
    fs::write(&stub, STUB).unwrap();
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    let store = tmp.path().join("store");
    fs::create_dir(&store).unwrap();
    let base = tmp.path().join("base");
    let env = ProviderEnv {
        base_dir: base.clone(),
        search_path: Some(
            std::env::join_paths([bin.as_path(), Path::new("/usr/bin"), Path::new("/bin")])
                .unwrap(),
        ),
    };
    let options = json!({"dir": store.to_str().unwrap(), "secret_key": "s3cr3t"});
    let provider =
        Provider::from_settings(&json!({"provider": "stub", "options": options}), &env).unwrap();
    let cfg = base.join("bosh/etc/blobstore-stub.json");
    let written: serde_json::Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(written, options);
    assert_eq!(fs::metadata(&cfg).unwrap().mode() & 0o777, 0o600);

    let data = tmp.path().join("data");
    let blobs = Blobs::new(provider, &data);
    let blob = tgz(&[("bin/run", "from the cli")]);
    fs::write(store.join("cli-blob"), &blob).unwrap();
    let d = MultiDigest::parse(&format!(
        "sha256:{}",
        Digest::of(Algorithm::Sha256, &blob).hex
    ))
    .unwrap();
    let dest = tmp.path().join("installed/pkg");
    blobs.unpack("cli-blob", &d, &dest, &Select::All).unwrap();
    assert_eq!(
        fs::read_to_string(dest.join("bin/run")).unwrap(),
        "from the cli"
    );
    // The temporary download is gone.
    let leftovers: Vec<_> = fs::read_dir(data.join("tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A mismatch through the CLI: nothing installed, no temporary left.
    let wrong = MultiDigest::single(Digest::of(Algorithm::Sha1, b"nope"));
    let e = blobs
        .unpack(
            "cli-blob",
            &wrong,
            &tmp.path().join("installed/bad"),
            &Select::All,
        )
        .unwrap_err();
    assert!(e.is_mismatch(), "{e:?}");
    assert!(!tmp.path().join("installed/bad").exists());
    assert_eq!(fs::read_dir(data.join("tmp")).unwrap().count(), 0);

    // A CLI failure names the command, the arguments and what it printed.
    let e = blobs
        .unpack(
            "no-such-blob",
            &wrong,
            &tmp.path().join("installed/x"),
            &Select::All,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("bosh-blobstore-stub") && msg.contains("stub: no blob no-such-blob"),
        "{msg}"
    );
    assert_eq!(fs::read_dir(data.join("tmp")).unwrap().count(), 0);

    // put: absolute file, new uuid, sha1.
    let up_file = tmp.path().join("up.tgz");
    fs::write(&up_file, b"uploaded bytes").unwrap();
    let up = blobs.upload(&up_file).unwrap();
    uuid_like(&up.blobstore_id);
    assert_eq!(up.sha1, Digest::of(Algorithm::Sha1, b"uploaded bytes").hex);
    assert_eq!(
        fs::read(store.join(&up.blobstore_id)).unwrap(),
        b"uploaded bytes"
    );

    let calls = fs::read_to_string(store.join("calls.log")).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 4, "{calls}");
    assert!(
        lines[0].starts_with(&format!("get cli-blob {}/", data.join("tmp").display())),
        "{calls}"
    );
    assert_eq!(
        lines[3],
        format!("put {} {}", up_file.display(), up.blobstore_id)
    );
}

/// A small tmpfs mounted on a directory of a [`TempDir`] for one test, unmounted on drop.
struct SmallFs {
    dir: PathBuf,
    _tmp: TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let tmp = TempDir::new("bosh-agent-test").unwrap();
        let dir = tmp.path().join("small");
        fs::create_dir(&dir).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (the ENOSPC test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir, _tmp: tmp }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

#[test]
fn no_space_left_removes_the_partial_unpack() {
    let dav = start();
    // 2 MiB of zeros compress to a few KiB; the tmpfs holds 256 KiB.
    let zeros = "\0".repeat(2 << 20);
    let blob = tgz(&[("big", zeros.as_str()), ("small", "s")]);
    dav.put_blob("big-blob", &blob).unwrap();
    let (user, password) = dav.write_user();
    let provider = dav_provider(&dav, user, password, dav.ca_pem());
    let small = SmallFs::mount("256k");
    let data = TempDir::new("bosh-agent-test").unwrap();
    let blobs = Blobs::new(provider, data.path());
    let d = MultiDigest::parse(&Digest::of(Algorithm::Sha1, &blob).hex).unwrap();
    let dest = small.dir.join("pkg");
    let e = blobs
        .unpack("big-blob", &d, &dest, &Select::All)
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("big-blob"), "{msg}");
    assert!(msg.to_lowercase().contains("no space"), "{msg}");
    let left: Vec<_> = fs::read_dir(&small.dir).unwrap().collect();
    assert!(left.is_empty(), "partial unpack left behind: {left:?}");
}
