//! The `HTTP` and `InstanceMetadata` sources against a real HTTP server on
//! 169.254.169.254:80 in a network namespace the test makes (the client runs in it too).
#![allow(clippy::unwrap_used)]

mod settings_source_support;

use std::collections::BTreeMap;
use std::time::Duration;

use platform::settings_source::{
    self, Context, FileOptions, HttpOptions, InstanceMetadataOptions, Origin, SourceOptions,
    http::HttpSource,
};
use settings_source_support::*;

const SETTINGS: &str = r#"{"agent_id":"agent-1","mbus":"nats://nats:pw@10.0.0.6:4222"}"#;
const TOKEN: &str = "AQAEAtoken-s3cret==";

fn aws() -> HttpOptions {
    HttpOptions {
        uri: format!("http://{METADATA_IP}"),
        user_data_path: "/latest/user-data".into(),
        instance_id_path: "/latest/meta-data/instance-id".into(),
        ssh_keys_path: "/latest/meta-data/public-keys/0/openssh-key".into(),
        token_path: "/latest/api/token".into(),
        ..HttpOptions::default()
    }
}

fn ctx(dir: &std::path::Path, attempts: u32) -> Context {
    let mut c = Context::new(dir);
    c.http_retry = quick(attempts);
    c.http_timeout = Duration::from_millis(500);
    c.http_connect_timeout = Duration::from_millis(500);
    c
}

/// An AWS-like service: a token for a PUT with the TTL header, data only for that token.
fn imds(seen: &Seen) -> Answer {
    match (seen.method.as_str(), seen.path.as_str()) {
        ("PUT", "/latest/api/token") => {
            if seen.header("X-aws-ec2-metadata-token-ttl-seconds") == Some("300") {
                ok(TOKEN)
            } else {
                Answer::Reply(400, vec![])
            }
        }
        ("GET", path) => {
            if seen.header("X-aws-ec2-metadata-token") != Some(TOKEN) {
                return Answer::Reply(401, vec![]);
            }
            match path {
                "/latest/user-data" => ok(SETTINGS),
                "/latest/meta-data/instance-id" => ok("i-0123\n"),
                "/latest/meta-data/public-keys/0/openssh-key" => ok("ssh-ed25519 AAAA vcap\n"),
                _ => Answer::Reply(404, vec![]),
            }
        }
        _ => Answer::Reply(405, vec![]),
    }
}

#[test]
fn imdsv2_token_is_asked_for_with_its_ttl_and_sent_on_every_get() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let server = MetadataServer::start(imds);
        let mut options = aws();
        options
            .headers
            .insert("X-Custom".into(), "custom-value".into());
        let c = ctx(&base, 3);
        let sources = vec![SourceOptions::Http(options.clone())];
        let loaded = settings_source::load(&sources, &c).unwrap();
        assert_eq!(loaded.settings["agent_id"], "agent-1");
        assert!(matches!(
            loaded.origin,
            Origin::Source {
                index: 0,
                kind: "HTTP",
                ..
            }
        ));
        assert_eq!(
            settings_source::read_cache(&c.cache).unwrap(),
            loaded.settings
        );

        let src = HttpSource::new(&options, &c).unwrap();
        assert_eq!(src.instance_id().unwrap().as_deref(), Some("i-0123"));
        assert_eq!(
            settings_source::public_ssh_key(&sources, &c)
                .unwrap()
                .as_deref(),
            Some("ssh-ed25519 AAAA vcap")
        );

        let seen = server.seen();
        let order: Vec<(&str, &str)> = seen
            .iter()
            .map(|s| (s.method.as_str(), s.path.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("PUT", "/latest/api/token"),
                ("GET", "/latest/user-data"),
                ("PUT", "/latest/api/token"),
                ("GET", "/latest/meta-data/instance-id"),
                ("PUT", "/latest/api/token"),
                ("GET", "/latest/meta-data/public-keys/0/openssh-key"),
            ]
        );
        for s in &seen {
            if s.method == "PUT" {
                assert_eq!(
                    s.header("X-aws-ec2-metadata-token-ttl-seconds"),
                    Some("300")
                );
                // Upstream sends the configured headers with the GETs only.
                assert_eq!(s.header("X-Custom"), None);
                assert_eq!(s.header("X-aws-ec2-metadata-token"), None);
            } else {
                assert_eq!(s.header("X-aws-ec2-metadata-token"), Some(TOKEN));
                assert_eq!(s.header("X-Custom"), Some("custom-value"));
            }
        }
    });
}

#[test]
fn without_a_token_path_or_when_the_token_is_refused_the_gets_go_without_one() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        // An IMDSv1-only service (OpenStack's): no token endpoint.
        let server = MetadataServer::start(|s| match (s.method.as_str(), s.path.as_str()) {
            ("GET", "/latest/user-data") if s.header("X-aws-ec2-metadata-token").is_none() => {
                ok(SETTINGS)
            }
            _ => Answer::Reply(404, vec![]),
        });
        let c = ctx(&base, 3);
        let mut o = aws();
        let v = HttpSource::new(&o, &c).unwrap().settings().unwrap();
        assert_eq!(v["agent_id"], "agent-1");
        o.token_path.clear();
        let v = HttpSource::new(&o, &c).unwrap().settings().unwrap();
        assert_eq!(v["agent_id"], "agent-1");
        let seen: Vec<(String, String)> = server
            .seen()
            .into_iter()
            .map(|s| (s.method, s.path))
            .collect();
        assert_eq!(
            seen,
            [
                ("PUT".into(), "/latest/api/token".into()),
                ("GET".into(), "/latest/user-data".into()),
                ("GET".into(), "/latest/user-data".into()),
            ]
        );
        // No key on the service: none, as upstream.
        assert_eq!(
            HttpSource::new(&o, &c).unwrap().public_ssh_key().unwrap(),
            None
        );
    });
}

#[test]
fn a_failing_service_is_retried_a_bounded_number_of_times_then_the_cache_is_used() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let server = MetadataServer::start(|_| Answer::Reply(500, b"down".to_vec()));
        let c = ctx(&base, 4);
        platform::files::write_private(&c.cache, br#"{"agent_id":"cached"}"#).unwrap();
        let mut o = aws();
        o.token_path.clear();
        let loaded = settings_source::load(&[SourceOptions::Http(o.clone())], &c).unwrap();
        assert_eq!(loaded.settings["agent_id"], "cached");
        let Origin::Cache { failures, .. } = &loaded.origin else {
            panic!("{:?}", loaded.origin)
        };
        let m = failures.to_string();
        assert!(
            m.contains("GET http://169.254.169.254/latest/user-data: HTTP status 500 (gave up after 4 attempts)"),
            "{m}"
        );
        assert_eq!(server.seen().len(), 4, "exactly the policy's attempts");

        // With IMDSv2, a token endpoint answering 500 is retried as part of each try, and
        // the GET never goes out without the token it failed to get.
        let before = server.seen().len();
        let e = HttpSource::new(&aws(), &c).unwrap().settings().unwrap_err();
        assert!(e.to_string().contains("PUT http://169.254.169.254/latest/api/token: HTTP status 500"), "{e}");
        let seen = server.seen();
        assert_eq!(seen.len() - before, 4);
        assert!(seen[before..].iter().all(|s| s.method == "PUT"));
    });
}

#[test]
fn a_service_that_recovers_is_used_on_the_try_that_works() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let n = std::sync::atomic::AtomicUsize::new(0);
        let server = MetadataServer::start(move |_| {
            if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                Answer::Reply(503, vec![])
            } else {
                ok(SETTINGS)
            }
        });
        let mut o = aws();
        o.token_path.clear();
        let v = HttpSource::new(&o, &ctx(&base, 10))
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(v["agent_id"], "agent-1");
        assert_eq!(server.seen().len(), 3);
    });
}

#[test]
fn bad_answers_fail_at_once_with_the_url_and_the_next_source_is_used() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let server = MetadataServer::start(|s| match s.path.as_str() {
            "/malformed" => ok(r#"{"agent_id":"x","password":"pw-s3cret""#),
            "/registry" => {
                ok(r#"{"registry":{"endpoint":"http://r:25777"},"server":{"name":"vm-1"}}"#)
            }
            "/base64" => ok("\"eyJhZ2VudF9pZCI6ImI2NCJ9\""),
            _ => Answer::Reply(404, vec![]),
        });
        let c = ctx(&base, 5);
        let file = base.join("fallback.json");
        std::fs::write(&file, r#"{"agent_id":"from-file"}"#).unwrap();
        let http = |path: &str| {
            SourceOptions::Http(HttpOptions {
                uri: format!("http://{METADATA_IP}"),
                user_data_path: path.into(),
                ..HttpOptions::default()
            })
        };
        let sources = vec![
            http("/malformed"),
            http("/registry"),
            http("/missing"),
            SourceOptions::File(FileOptions {
                settings_path: file.display().to_string(),
                ..FileOptions::default()
            }),
        ];
        let loaded = settings_source::load(&sources, &c).unwrap();
        assert_eq!(loaded.settings["agent_id"], "from-file");
        let Origin::Source {
            index: 3,
            earlier_failures,
            ..
        } = &loaded.origin
        else {
            panic!("{:?}", loaded.origin)
        };
        let m = earlier_failures.to_string();
        assert!(
            m.contains("http://169.254.169.254/malformed: user data is neither JSON nor base64"),
            "{m}"
        );
        assert!(
            m.contains("http://169.254.169.254/registry: metadata does not provide settings"),
            "{m}"
        );
        assert!(
            m.contains("GET http://169.254.169.254/missing: HTTP status 404"),
            "{m}"
        );
        assert!(!m.contains("s3cret"), "{m}");
        // Final answers are not retried: one request each.
        assert_eq!(server.seen().len(), 3);

        // Base64 user data (quoted, as some CPIs send it) is decoded.
        let v = settings_source::fetch(&http("/base64"), &c).unwrap();
        assert_eq!(v["agent_id"], "b64");
    });
}

#[test]
fn a_hanging_service_times_out_and_the_next_source_is_used() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let server = MetadataServer::start(|_| Answer::Hang);
        let mut c = ctx(&base, 2);
        c.http_timeout = Duration::from_millis(300);
        let file = base.join("fallback.json");
        std::fs::write(&file, r#"{"agent_id":"from-file"}"#).unwrap();
        let mut o = aws();
        o.token_path.clear();
        let sources = vec![
            SourceOptions::Http(o),
            SourceOptions::File(FileOptions {
                settings_path: file.display().to_string(),
                ..FileOptions::default()
            }),
        ];
        let loaded = settings_source::load(&sources, &c).unwrap();
        assert_eq!(loaded.settings["agent_id"], "from-file");
        let Origin::Source {
            earlier_failures, ..
        } = &loaded.origin
        else {
            panic!()
        };
        let m = earlier_failures.to_string();
        assert!(
            m.contains("GET http://169.254.169.254/latest/user-data: timed out"),
            "{m}"
        );
        assert!(m.contains("gave up after 2 attempts"), "{m}");
        assert_eq!(server.seen().len(), 2);
    });
}

#[test]
fn nothing_listening_is_a_connection_error_retried_then_reported() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let mut o = aws();
        o.token_path.clear();
        let e = HttpSource::new(&o, &ctx(&base, 3))
            .unwrap()
            .settings()
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("GET http://169.254.169.254/latest/user-data: "),
            "{m}"
        );
        assert!(m.ends_with("(gave up after 3 attempts)"), "{m}");
    });
}

#[test]
fn instance_metadata_sends_its_headers_and_reads_one_value() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let server = MetadataServer::start(|s| {
            if s.header("Metadata-Flavor") != Some("Google") {
                return Answer::Reply(403, vec![]);
            }
            match s.path.as_str() {
                "/computeMetadata/v1/instance/attributes/bosh_settings" => ok(SETTINGS),
                "/computeMetadata/v1/instance/attributes/broken" => ok("not json"),
                _ => Answer::Reply(404, vec![]),
            }
        });
        let c = ctx(&base, 3);
        let gcp = |path: &str, flavor: bool| {
            let mut headers = BTreeMap::new();
            if flavor {
                headers.insert("Metadata-Flavor".to_string(), "Google".to_string());
            }
            SourceOptions::InstanceMetadata(InstanceMetadataOptions {
                uri: format!("http://{METADATA_IP}"),
                headers,
                settings_path: path.into(),
            })
        };
        let path = "/computeMetadata/v1/instance/attributes/bosh_settings";
        let v = settings_source::fetch(&gcp(path, true), &c).unwrap();
        assert_eq!(v["agent_id"], "agent-1");
        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].path, path);
        assert_eq!(seen[0].header("Metadata-Flavor"), Some("Google"));

        let e = settings_source::fetch(&gcp(path, false), &c)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("GET http://{METADATA_IP}{path}: HTTP status 403")),
            "{e}"
        );
        let e = settings_source::fetch(
            &gcp("/computeMetadata/v1/instance/attributes/broken", true),
            &c,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/broken: invalid JSON"), "{e}");
        // 403 and bad JSON are final: one request each.
        assert_eq!(server.seen().len(), 3);
    });
}

#[test]
fn an_oversized_answer_is_refused_without_retries() {
    require(&["ip"]);
    let ns = Netns::new();
    let dir = TempDir::new();
    let base = dir.path().to_path_buf();
    ns.run(move || {
        let server = MetadataServer::start(|_| Answer::Reply(200, vec![b' '; 5 * 1024 * 1024]));
        let mut o = aws();
        o.token_path.clear();
        let e = HttpSource::new(&o, &ctx(&base, 3))
            .unwrap()
            .settings()
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("/latest/user-data: answer larger than 4194304 bytes"),
            "{m}"
        );
        assert_eq!(server.seen().len(), 1);
    });
}
