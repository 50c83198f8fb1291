//! `MonitClient` against a tiny scripted HTTP server: framing, auth, retries, redirects, errors.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobs::{
    ClientOptions, Credentials, JobState, JobSupervisor, MonitClient, RetryPolicy,
    SupervisorOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STATUS_XML: &str = include_str!("fixtures/monit-5.33-status.xml");

/// What the server does with one connection.
#[derive(Clone)]
enum Reply {
    Raw(Vec<u8>),
    /// Accept, read the request, never answer.
    Hang,
}

fn reply(status: &str, body: &str) -> Reply {
    Reply::Raw(
        format!(
            "HTTP/1.0 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn chunked(body: &str) -> Reply {
    let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for piece in body.as_bytes().chunks(333) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    Reply::Raw(raw)
}

/// Serves `replies` in order (the last one repeats) and records every request.
struct Server {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(replies: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let reply = replies[n.min(replies.len() - 1)].clone();
                n += 1;
                let request = read_request(&mut stream).await;
                seen.lock().unwrap().push(request);
                match reply {
                    Reply::Raw(bytes) => {
                        let _ = stream.write_all(&bytes).await;
                        let _ = stream.shutdown().await;
                    }
                    Reply::Hang => {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            drop(stream);
                        });
                    }
                }
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn client(&self, short: RetryPolicy, long: RetryPolicy) -> MonitClient {
        client_for(self.addr, short, long)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn client_for(addr: SocketAddr, short: RetryPolicy, long: RetryPolicy) -> MonitClient {
    MonitClient::new(
        ClientOptions {
            endpoint: addr,
            short_retry: short,
            long_retry: long,
            request_timeout: Duration::from_millis(500),
        },
        Credentials {
            user: "vcap".into(),
            password: "random-password".into(),
        },
    )
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> String {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&raw).to_string()
}

fn fast(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_unavailable_attempts: 0,
        max_other_attempts: attempts,
        delay: Duration::from_millis(5),
    }
}

#[tokio::test]
async fn status_sends_auth_and_parses_content_length_body() {
    let server = Server::start(vec![reply("200 OK", STATUS_XML)]).await;
    let status = server.client(fast(3), fast(3)).status().await.unwrap();
    assert_eq!(status.group_members("vcap"), ["sample", "failer"]);
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert!(
        r.starts_with("GET /_status2?format=xml HTTP/1.1\r\n"),
        "{r}"
    );
    // base64("vcap:random-password")
    assert!(
        r.contains("Authorization: Basic dmNhcDpyYW5kb20tcGFzc3dvcmQ=\r\n"),
        "{r}"
    );
    assert!(r.contains("Connection: close\r\n"), "{r}");
}

#[tokio::test]
async fn status_reads_chunked_body() {
    let server = Server::start(vec![chunked(STATUS_XML)]).await;
    let status = server.client(fast(1), fast(1)).status().await.unwrap();
    assert_eq!(status.services.len(), 3);
    assert_eq!(status.version, "5.33.0");
}

#[tokio::test]
async fn short_policy_retries_a_503_then_succeeds() {
    let server = Server::start(vec![
        reply("503 Service Unavailable", "busy"),
        reply("200 OK", STATUS_XML),
    ])
    .await;
    let status = server.client(fast(20), fast(1)).status().await.unwrap();
    assert_eq!(status.services.len(), 3);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn non_200_is_an_error_with_status_and_body_after_the_retries() {
    let server = Server::start(vec![reply("401 Unauthorized", "You are not authorized")]).await;
    let err = server.client(fast(3), fast(3)).status().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Getting monit status: Request failed with 401 Unauthorized: You are not authorized"
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_2xx_other_than_200_stops_retrying_but_fails() {
    let server = Server::start(vec![reply("204 No Content", "")]).await;
    let err = server
        .client(fast(5), fast(5))
        .start_service("nats")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Starting Monit service nats: Request failed with 204 No Content: "
    );
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn actions_post_the_form_and_follow_monits_redirect() {
    let redirect = Reply::Raw(
        b"HTTP/1.0 302 Moved Temporarily\r\nLocation: /nats\r\nContent-Length: 4\r\n\r\nmove"
            .to_vec(),
    );
    let server = Server::start(vec![redirect, reply("200 OK", "<html/>")]).await;
    server
        .client(fast(1), fast(1))
        .stop_service("nats")
        .await
        .unwrap();
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let post = &requests[0];
    assert!(post.starts_with("POST /nats HTTP/1.1\r\n"), "{post}");
    assert!(
        post.contains("Content-Type: application/x-www-form-urlencoded\r\n"),
        "{post}"
    );
    assert!(
        post.contains("Cookie: securitytoken=bosh-agent\r\n"),
        "{post}"
    );
    assert!(
        post.ends_with("\r\n\r\naction=stop&securitytoken=bosh-agent"),
        "{post}"
    );
    assert!(
        requests[1].starts_with("GET /nats HTTP/1.1\r\n"),
        "{}",
        requests[1]
    );
    assert!(requests[1].contains("Authorization: Basic "));
}

#[tokio::test]
async fn redirect_elsewhere_is_not_followed() {
    let redirect = Reply::Raw(
        b"HTTP/1.0 302 Found\r\nLocation: http://example.invalid/x\r\nContent-Length: 0\r\n\r\n"
            .to_vec(),
    );
    let server = Server::start(vec![redirect]).await;
    let err = server
        .client(fast(1), fast(1))
        .unmonitor_service("nats")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unmonitoring Monit service nats: Request failed with 302 Found: "
    );
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn long_policy_waits_out_503s_then_counts_other_errors() {
    let long = RetryPolicy {
        max_unavailable_attempts: 6,
        max_other_attempts: 2,
        delay: Duration::from_millis(2),
    };
    // Five 503s fit the unavailable budget; the sixth answer succeeds.
    let mut replies = vec![reply("503 Service Unavailable", "busy"); 5];
    replies.push(reply("200 OK", ""));
    let server = Server::start(replies).await;
    server
        .client(fast(1), long)
        .stop_service("a")
        .await
        .unwrap();
    assert_eq!(server.requests().len(), 6);

    // After a non-503 failure, everything counts against the other budget (2).
    let server = Server::start(vec![
        reply("503 Service Unavailable", "busy"),
        reply("500 Internal Server Error", "boom"),
        reply("503 Service Unavailable", "busy again"),
    ])
    .await;
    let err = server
        .client(fast(1), long)
        .stop_service("a")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Stopping Monit service 'a': Request failed with 503 Service Unavailable: busy again"
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn unreachable_monit_is_a_transport_error_and_unknown_state() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = client_for(addr, fast(2), fast(2));
    let err = client.status().await.unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "Sending status request to monit: connecting to {addr}"
        )),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("jobs-client-unknown-{}", std::process::id()));
    let supervisor = JobSupervisor::new(client, &dir, SupervisorOptions::default());
    assert_eq!(supervisor.job_state().await, JobState::Unknown);
    let err = supervisor.processes().await.unwrap_err().to_string();
    assert!(
        err.starts_with("Getting service status: Sending status request"),
        "{err}"
    );
    let err = supervisor.start().await.unwrap_err().to_string();
    assert!(err.starts_with("Getting vcap services: "), "{err}");
}

#[tokio::test]
async fn a_silent_monit_times_out_as_request_canceled() {
    let server = Server::start(vec![Reply::Hang]).await;
    let started = std::time::Instant::now();
    let err = server
        .client(fast(1), fast(1))
        .status()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("request canceled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn garbage_answers_are_errors() {
    let server = Server::start(vec![Reply::Raw(b"SSH-2.0-OpenSSH_9\r\n\r\n".to_vec())]).await;
    let err = server.client(fast(1), fast(1)).status().await.unwrap_err();
    assert!(err.to_string().contains("malformed HTTP response"), "{err}");

    let server = Server::start(vec![reply("200 OK", "<html>not monit</html>")]).await;
    let err = server.client(fast(1), fast(1)).status().await.unwrap_err();
    assert!(err.to_string().contains("expected <monit>"), "{err}");
}

#[tokio::test]
async fn supervisor_state_and_processes_from_a_status() {
    let server = Server::start(vec![reply("200 OK", STATUS_XML)]).await;
    let dir = std::env::temp_dir().join(format!("jobs-client-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let supervisor = JobSupervisor::new(
        server.client(fast(1), fast(1)),
        &dir,
        SupervisorOptions::default(),
    );
    // The fixture has a failing passive service.
    assert_eq!(supervisor.job_state().await, JobState::Failing);
    let processes = supervisor.processes().await.unwrap();
    let json = serde_json::to_value(&processes).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"name":"sample","state":"running","uptime":{"secs":172},"mem":{"kb":1424,"percent":0.0},"cpu":{"total":0.0}},
            {"name":"failer","state":"failing","uptime":{},"mem":{"percent":0.0},"cpu":{"total":0.0}}
        ])
    );
    std::fs::create_dir_all(dir.join("monit")).unwrap();
    std::fs::write(dir.join("monit/stopped"), "").unwrap();
    assert_eq!(supervisor.job_state().await, JobState::Stopped);
    let _ = std::fs::remove_dir_all(&dir);
}
