//! A real director blobstore: Debian's nginx with the DAV module, configured like the
//! director's `blobstore` job (TLS, Basic auth with a read users file for GET and a write
//! users file for everything else, `dav_methods DELETE PUT`, `create_full_put_path on`, the
//! two-hex-digit object location), on 127.0.0.1 with a free port.
//!
//! ```no_run
//! use testkit::dav::DavServer;
//! let dav = DavServer::start().expect("nginx");
//! dav.put_blob("some-id", b"bytes").expect("blob stored");
//! let (user, password) = dav.write_user();
//! let url = dav.url();
//! ```
//!
//! Everything lives in a temporary directory of its own: configuration, certificates, users
//! files, pid, temporary, log files and the object store (`<dir>/store/<prefix>/<id>`). nginx
//! runs in the foreground as one process (`master_process off`), so the one pid the harness
//! holds is all of it; [`DavServer::stop`] or drop sends it SIGTERM and kills it by that pid
//! if it does not exit.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result, io_ctx as io_err, wait_for};
use crate::pki::Pki;
use crate::process::{Exec, Proc, describe, run_with_timeout};
use crate::tempdir::TempDir;

/// Upper bound for `nginx -V` and `openssl passwd`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Debian's nginx (package `nginx`, built `--with-http_dav_module`).
pub const NGINX: &str = "/usr/sbin/nginx";
/// How long nginx may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The read-only user (in the read users file only).
pub const READ_USER: &str = "director-reader";
/// The agent's user: in both files, as the director's deployment manifest has it.
pub const WRITE_USER: &str = "agent";

/// A running nginx blobstore; see the module documentation.
#[derive(Debug)]
pub struct DavServer {
    dir: TempDir,
    addr: SocketAddr,
    ca_pem: String,
    read_password: String,
    write_password: String,
    proc: Option<Proc>,
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Checks that nginx is installed and has the DAV module; says how to get it otherwise.
pub fn check_nginx() -> Result<()> {
    if !Path::new(NGINX).exists() {
        return Err(Error(format!(
            "{NGINX} is missing: the DAV blobstore tests need Debian's nginx (scripts/deps.sh, or apt-get install nginx)"
        )));
    }
    let out = run_with_timeout(
        {
            let mut c = Command::new(NGINX);
            c.arg("-V");
            c
        },
        COMMAND_TIMEOUT,
        "nginx -V",
    )?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    for module in ["--with-http_dav_module", "--with-http_ssl_module"] {
        if !text.contains(module) {
            return Err(Error(format!(
                "{NGINX} was built without {module}; the DAV blobstore tests need it (nginx -V: {text})"
            )));
        }
    }
    Ok(())
}

/// An `htpasswd` line (`user:$apr1$…`) from `openssl passwd -apr1`.
fn htpasswd_line(user: &str, password: &str) -> Result<String> {
    let mut c = Command::new("openssl");
    c.args(["passwd", "-apr1", password]);
    let out = run_with_timeout(c, COMMAND_TIMEOUT, "openssl passwd")?;
    if !out.status.success() {
        return Err(Error(format!("openssl passwd -apr1: {}", describe(&out))));
    }
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !hash.starts_with("$apr1$") {
        return Err(Error(format!("openssl passwd -apr1 printed {hash:?}")));
    }
    Ok(format!("{user}:{hash}\n"))
}

fn random_password() -> Result<String> {
    let mut buf = [0u8; 12];
    use std::io::Read;
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl DavServer {
    /// Starts nginx with a fresh CA, certificate (for the IP 127.0.0.1), users and store, in
    /// this process's network namespace.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// [`DavServer::start`] inside the network namespace pinned at `netns` (a sandbox's), on
    /// 127.0.0.1:25250 there, the director's blobstore port.
    pub fn start_in(netns: &Path) -> Result<Self> {
        Self::start_with(Some(netns))
    }

    fn start_with(netns: Option<&Path>) -> Result<Self> {
        check_nginx()?;
        let dir = TempDir::new("testkit-dav")?;
        let d = dir.path();
        for sub in ["store", "tmp", "logs"] {
            fs::create_dir(d.join(sub)).map_err(io_err(format!("mkdir {sub}")))?;
        }
        let pki = Pki::new("blobstore test CA")?;
        let leaf = pki.server("127.0.0.1")?;
        write(&d.join("server.pem"), &leaf.cert_pem, 0o644)?;
        write(&d.join("server.key"), &leaf.key_pem, 0o600)?;
        let read_password = random_password()?;
        let write_password = random_password()?;
        let agent_line = htpasswd_line(WRITE_USER, &write_password)?;
        write(
            &d.join("read.htpasswd"),
            &(htpasswd_line(READ_USER, &read_password)? + &agent_line),
            0o644,
        )?;
        write(&d.join("write.htpasswd"), &agent_line, 0o644)?;
        let port = match netns {
            Some(_) => 25250,
            None => crate::net::free_port(&[[127, 0, 0, 1].into()])?,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let p = d.display();
        let conf = format!(
            r#"pid {p}/nginx.pid;
error_log {p}/logs/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {p}/logs/access.log;
  client_body_temp_path {p}/tmp/client_body;
  proxy_temp_path {p}/tmp/proxy;
  fastcgi_temp_path {p}/tmp/fastcgi;
  uwsgi_temp_path {p}/tmp/uwsgi;
  scgi_temp_path {p}/tmp/scgi;
  client_max_body_size 0;
  server {{
    listen {addr} ssl;
    server_name blobstore;
    ssl_certificate {p}/server.pem;
    ssl_certificate_key {p}/server.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    root {p}/store;
    location ~* ^/(?<object_id>[a-fA-F0-9][a-fA-F0-9]/.+) {{
      dav_methods DELETE PUT;
      create_full_put_path on;
      auth_basic "Blobstore Read";
      auth_basic_user_file {p}/read.htpasswd;
      limit_except GET {{
        auth_basic "Blobstore Write";
        auth_basic_user_file {p}/write.htpasswd;
      }}
    }}
    location / {{ return 404; }}
  }}
}}
"#
        );
        let conf_path = d.join("nginx.conf");
        write(&conf_path, &conf, 0o644)?;
        let log = d.join("logs/stderr.log");
        let argv: Vec<std::ffi::OsString> = vec![
            NGINX.into(),
            "-p".into(),
            d.into(),
            "-e".into(),
            d.join("logs/error.log").into(),
            "-c".into(),
            conf_path.clone().into(),
            "-g".into(),
            "daemon off; master_process off;".into(),
        ];
        let mut exec = Exec::new(argv).log(&log);
        if let Some(ns) = netns {
            exec = exec.netns(ns);
        }
        let proc = exec.spawn()?;
        let ns = netns.map(Path::to_path_buf);
        let mut server = DavServer {
            dir,
            addr,
            ca_pem: pki.ca_pem.clone(),
            read_password,
            write_password,
            proc: Some(proc),
        };
        let ready = wait_for("nginx to accept connections", START_TIMEOUT, || {
            if let Some(p) = server.proc.as_mut()
                && let Some(status) = p.try_status()?
            {
                return Err(Error(format!(
                    "nginx exited with {status}: {} {}",
                    p.log_text(),
                    fs::read_to_string(server.dir.path().join("logs/error.log"))
                        .unwrap_or_default()
                )));
            }
            let up = match &ns {
                None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
                // Inside the namespace: bash's /dev/tcp connects from there.
                Some(ns) => Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .args(["bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            Ok(up.then_some(()))
        });
        ready.map(|()| server)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA that signed the server's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The agent's blobstore settings for this server, as a director gives them
    /// (`env.bosh.blobstores[0]`): provider `dav`, the endpoint, the agent's user, the CA.
    pub fn agent_blobstore(&self) -> serde_json::Value {
        serde_json::json!({"provider": "dav", "options": {
            "endpoint": self.url(), "user": WRITE_USER, "password": self.write_password,
            "tls": {"cert": {"ca": self.ca_pem}}}})
    }

    /// A user allowed GET only.
    pub fn read_user(&self) -> (&str, &str) {
        (READ_USER, &self.read_password)
    }

    /// The agent's user: GET and PUT.
    pub fn write_user(&self) -> (&str, &str) {
        (WRITE_USER, &self.write_password)
    }

    /// Where blob `id` is stored: `<store>/<first two hex of sha1(id)>/<id>`.
    pub fn object_path(&self, id: &str) -> PathBuf {
        use sha1::Digest as _;
        let first = sha1::Sha1::digest(id.as_bytes())[0];
        self.dir
            .path()
            .join("store")
            .join(format!("{first:02x}"))
            .join(id)
    }

    /// Stores blob `id` directly in the store (as the director would have).
    pub fn put_blob(&self, id: &str, bytes: &[u8]) -> Result<()> {
        let path = self.object_path(id);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("mkdir {}", parent.display())))?;
        }
        fs::write(&path, bytes).map_err(io_err(format!("writing {}", path.display())))
    }

    /// nginx's access log so far (for assertions on what was asked).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("logs/access.log")).unwrap_or_default()
    }

    /// Stops nginx (SIGTERM, then SIGKILL by pid after 5 s).
    pub fn stop(&mut self) -> Result<()> {
        // Dropping the Proc afterwards kills it by pid and reaps it if SIGTERM was not enough.
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(5))?;
        }
        Ok(())
    }
}

impl Drop for DavServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
