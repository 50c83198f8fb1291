//! Real parts for the settings source tests: a network namespace with the metadata address,
//! an HTTP server on 169.254.169.254:80 inside it that records what it was asked, loop
//! devices on small filesystem images, and threads in a private mount namespace. Everything
//! is removed on drop; a missing tool or a non-root run fails and says why.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::sched::CloneFlags;

pub const METADATA_IP: &str = "169.254.169.254";

/// Fails the test, saying why, unless it runs as root with `tools` on the PATH.
pub fn require(tools: &[&str]) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests need root (network namespaces, loop devices, mounts); run them as root"
    );
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            .unwrap_or(false);
        assert!(found, "{t} is missing: run scripts/deps.sh");
    }
}

fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let d = std::env::temp_dir().join(unique("settings-source-test"));
        fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `ip netns add`, with `lo` up holding 169.254.169.254/32 besides 127.0.0.1.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("bosh-settings");
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        // On `lo`: it needs no kernel module (dummy and veth may be missing) and the address
        // is local to the namespace either way.
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{METADATA_IP}/32"),
            "dev",
            "lo",
        ]);
        ns
    }

    /// Runs `f` on a thread that has entered the namespace (threads it starts are in it too);
    /// a panic in `f` is the caller's.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(format!("/run/netns/{}", self.name)).unwrap();
        let h = thread::spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the server does with a request.
pub enum Answer {
    /// Status and body.
    Reply(u16, Vec<u8>),
    /// Never answer (the connection stays open until the server stops).
    Hang,
}

pub fn ok(body: &str) -> Answer {
    Answer::Reply(200, body.as_bytes().to_vec())
}

type Handler = dyn Fn(&Seen) -> Answer + Send + Sync;

/// An HTTP/1.1 server on 169.254.169.254:80 (start it inside the namespace).
pub struct MetadataServer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl MetadataServer {
    pub fn start(handler: impl Fn(&Seen) -> Answer + Send + Sync + 'static) -> MetadataServer {
        let listener = TcpListener::bind((METADATA_IP, 80)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let (s, st) = (seen.clone(), stop.clone());
        let accept = thread::spawn(move || {
            let mut conns = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (s, h, st) = (s.clone(), handler.clone(), st.clone());
                        conns.push(thread::spawn(move || serve(stream, &s, &*h, &st)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        MetadataServer {
            seen,
            stop,
            accept: Some(accept),
        }
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(stream: TcpStream, seen: &Mutex<Vec<Seen>>, handler: &Handler, stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    // One request per connection: every answer says `Connection: close`.
    {
        let mut line = String::new();
        // Wait for the next request, or the end.
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => break,
                Err(_) => continue,
            }
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) => return,
                Ok(_) => {}
                Err(_) => {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                }
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        let _ = reader.read_exact(&mut body);
        let req = Seen {
            method,
            path,
            headers,
        };
        seen.lock().unwrap().push(req.clone());
        match handler(&req) {
            Answer::Reply(status, body) => {
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(&body);
            }
            Answer::Hang => {
                while !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// A read-only loop device on an image file; detached (and the image removed) on drop.
pub struct LoopDevice {
    pub device: PathBuf,
    image: PathBuf,
}

impl LoopDevice {
    pub fn attach(image: &Path) -> LoopDevice {
        let dev = run(&[
            "losetup",
            "--find",
            "--show",
            "--read-only",
            image.to_str().unwrap(),
        ]);
        LoopDevice {
            device: PathBuf::from(dev),
            image: image.to_path_buf(),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = fs::remove_file(&self.image);
    }
}

/// A small ext2 image labelled `label` holding `files` (relative path → content), filled by
/// mke2fs itself (no mount needed). ext2 stands in for the vfat and ISO 9660 of real config
/// drives and CD-ROMs: the sources leave the type to mount(8), and the kernels these tests
/// run on may lack vfat and iso9660 (no modules) while every Linux has ext2.
pub fn ext2_image(dir: &Path, label: &str, files: &[(&str, &str)]) -> PathBuf {
    let content = dir.join(format!("{label}.content"));
    write_tree(&content, files);
    let image = dir.join(format!("{label}.img"));
    run(&[
        "mke2fs",
        "-q",
        "-t",
        "ext2",
        "-L",
        label,
        "-d",
        content.to_str().unwrap(),
        image.to_str().unwrap(),
        "1M",
    ]);
    image
}

pub fn write_tree(root: &Path, files: &[(&str, &str)]) {
    for (rel, body) in files {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
    }
}

/// Runs `f` on a thread in a new mount namespace whose mounts do not propagate to the host;
/// commands it runs inherit that namespace.
pub fn in_private_mount_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let h = thread::spawn(move || {
        nix::sched::unshare(CloneFlags::CLONE_NEWNS).unwrap();
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        f()
    });
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Mount points (in this thread's namespace) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let prefix = dir.display().to_string();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// A quick policy for tests: `attempts` tries, millisecond waits.
pub fn quick(attempts: u32) -> platform::settings_source::RetryPolicy {
    platform::settings_source::RetryPolicy {
        attempts,
        initial_delay: Duration::from_millis(2),
        max_delay: Duration::from_millis(8),
        max_elapsed: Duration::from_secs(20),
    }
}
