//! `bosh-agent`: argument parsing, argv[0] aliases and exit codes only; the work is in `agent`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use platform::firewall::jobs::AllowOutcome;
use platform::firewall::nft::run_dir;

/// The BOSH agent.
#[derive(Debug, Parser)]
#[command(name = "bosh-agent", disable_version_flag = true)]
struct Cli {
    /// Platform (upstream flag): ubuntu.
    #[arg(short = 'P', default_value = "ubuntu")]
    platform: String,
    /// Path to agent.json (upstream flag).
    #[arg(short = 'C', default_value = "/var/vcap/bosh/agent.json")]
    config: PathBuf,
    /// Base directory (upstream flag).
    #[arg(short = 'b', default_value = "/var/vcap")]
    base_dir: PathBuf,
    /// Job supervisor (upstream flag): monit.
    #[arg(short = 'M', default_value = "monit")]
    job_supervisor: String,
    /// Print the version and exit.
    #[arg(short = 'v')]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Allow the caller's cgroup (a job's) to reach a protected service (monit) or the ranges
    /// of the egress deny list (metadata). Exit 0: allowed, or
    /// no firewall installed (nothing to open); 1: nft or other failure; 2: usage;
    /// 3: not root; 4: the caller's cgroup cannot be used (root cgroup, a path nft cannot
    /// hold, undetectable) and there is no fallback.
    FirewallAllow {
        /// The service: monit, or metadata (through the egress deny list).
        service: String,
    },
    /// Inspect the agent's firewall.
    Firewall {
        #[command(subcommand)]
        command: FirewallCommand,
    },
}

#[derive(Debug, Subcommand)]
enum FirewallCommand {
    /// Mode, protected endpoints, allowed job cgroups, the workload policies with their sizes
    /// and counters, conntrack usage, and whether the live table matches the desired state.
    /// Exit 0 when it matches, 1 otherwise.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the running agent reload its firewall policies (egress, ingress, the guards,
    /// allowed cgroups, MonitAllowRoot) from agent.json, as SIGHUP does, and wait for the
    /// outcome. Exit 0: the policies are in force; 1: the agent changed nothing (its error
    /// names the file and the value), or no running agent, or no outcome in time.
    Reload {
        /// How long to wait for the agent's outcome.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().map(PathBuf::from);
    let applet = argv0
        .as_deref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    if applet == Some("bosh-enable-monit-access") {
        // The name existing job releases call; it takes no arguments.
        return firewall_allow("monit");
    }
    let cli = Cli::parse();
    if cli.version {
        println!("bosh-agent {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.platform, cli.config, cli.base_dir, cli.job_supervisor),
        Command::FirewallAllow { service } => firewall_allow(&service),
        Command::Firewall {
            command: FirewallCommand::Status { json },
        } => status(json),
        Command::Firewall {
            command: FirewallCommand::Reload { timeout_seconds },
        } => reload(timeout_seconds),
    }
}

fn run(platform: String, config: PathBuf, base_dir: PathBuf, job_supervisor: String) -> ExitCode {
    init_logging();
    match agent::run(agent::RunOptions {
        platform,
        config,
        base_dir,
        job_supervisor,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "bosh-agent stopped");
            eprintln!("bosh-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Human logs on stderr by default; `BOSH_AGENT_LOG_FORMAT=json` for JSON lines;
/// `RUST_LOG` filters (default info), except that [`PROTOCOL_TARGETS`] never log below info.
fn init_logging() {
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG").unwrap_or_default();
    let json = std::env::var("BOSH_AGENT_LOG_FORMAT").as_deref() == Ok("json");
    // A second subscriber cannot be installed; there is none before this one.
    let _ = subscriber(&filter, json, std::io::stderr).try_init();
    tracing::debug!(rust_log = %filter, capped_at_info = ?PROTOCOL_TARGETS, "log filter");
}

/// Targets of libraries that log whole protocol lines or handshakes at debug and trace:
/// async-nats prints the NATS `CONNECT` line (the URL's user and password) and every message
/// (`update_settings` carries the mTLS private key); rustls and hickory log handshake and DNS
/// details. They are capped at info whatever `RUST_LOG` says, so no log level prints a secret.
pub const PROTOCOL_TARGETS: [&str; 5] = [
    "async_nats",
    "rustls",
    "tokio_rustls",
    "hickory_proto",
    "hickory_resolver",
];

/// Whether `target` is one of [`PROTOCOL_TARGETS`] or a module below one.
fn is_protocol_target(target: &str) -> bool {
    PROTOCOL_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// The agent's subscriber: `filter` as `RUST_LOG` (default info when empty or invalid), human
/// or JSON lines to `writer`, and [`PROTOCOL_TARGETS`] capped at info.
fn subscriber<W>(
    filter: &str,
    json: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync + 'static>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{EnvFilter, Layer, filter::filter_fn};
    let env = EnvFilter::try_new(filter)
        .ok()
        .filter(|_| !filter.trim().is_empty())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let cap = filter_fn(|meta| {
        !(is_protocol_target(meta.target()) && *meta.level() > tracing::Level::INFO)
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let layer = if json {
        fmt.json().boxed()
    } else {
        fmt.with_ansi(false).boxed()
    };
    Box::new(tracing_subscriber::registry().with(layer.with_filter(cap).with_filter(env)))
}

fn firewall_allow(service: &str) -> ExitCode {
    match agent::firewall::commands::firewall_allow(service, &run_dir()) {
        Ok(AllowOutcome::Added { rule, replaced }) => {
            println!("{service} access granted ({replaced} stale rule(s) replaced): {rule}");
            ExitCode::SUCCESS
        }
        Ok(AllowOutcome::AlreadyAllowed { rule, duplicates }) => {
            println!(
                "{service} access already granted ({duplicates} duplicate(s) removed): {rule}"
            );
            ExitCode::SUCCESS
        }
        Ok(AllowOutcome::CoveredByAncestor { comment }) => {
            println!(
                "{service} access already granted: the rule of an ancestor cgroup covers this one ({comment})"
            );
            ExitCode::SUCCESS
        }
        Ok(AllowOutcome::NotInstalled) if service == "metadata" => {
            eprintln!(
                "bosh-agent: no egress deny list is installed (table inet bosh_agent or chain egress_access_jobs absent): nothing to open"
            );
            ExitCode::SUCCESS
        }
        Ok(AllowOutcome::NotInstalled) => {
            eprintln!(
                "bosh-agent: no monit firewall is installed (table inet bosh_agent or chain monit_access_jobs absent, or the agent runs with UseMonitIptablesFirewall): nothing to open"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bosh-agent: firewall-allow {service}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn reload(timeout_seconds: u64) -> ExitCode {
    let wait = std::time::Duration::from_secs(timeout_seconds);
    match agent::firewall::commands::firewall_reload(&run_dir(), wait) {
        Ok(r) => {
            println!(
                "the agent (pid {}) applied the firewall policies of agent.json (reload {})",
                r.pid, r.reloads
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bosh-agent: firewall reload: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(json: bool) -> ExitCode {
    match agent::firewall::commands::firewall_status(&run_dir()) {
        Ok(s) => {
            if json {
                match serde_json::to_string_pretty(&s) {
                    Ok(t) => println!("{t}"),
                    Err(e) => {
                        eprintln!("bosh-agent: firewall status: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{s}");
            }
            if s.matches_desired {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("bosh-agent: firewall status: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Buf {
        type Writer = Buf;
        fn make_writer(&'w self) -> Buf {
            self.clone()
        }
    }

    fn logged(filter: &str, json: bool) -> String {
        let buf = Buf::default();
        tracing::subscriber::with_default(subscriber(filter, json, buf.clone()), || {
            tracing::trace!(target: "async_nats::connection", "CONNECT {{\"pass\":\"s3cret-pw\"}}");
            tracing::debug!(target: "async_nats", "MSG agent.a1 PRIVATE KEY");
            tracing::trace!(target: "rustls::client", "rustls-secret");
            tracing::debug!(target: "hickory_proto::udp", "hickory-detail");
            tracing::info!(target: "async_nats", "nats-info-kept");
            tracing::trace!(target: "agent", "agent-trace-kept");
            tracing::trace!(target: "async_natsx", "not-a-protocol-target");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn protocol_targets_never_log_below_info() {
        for filter in ["trace", "async_nats=trace,rustls=trace,trace", "debug"] {
            for json in [false, true] {
                let log = logged(filter, json);
                for secret in [
                    "s3cret-pw",
                    "PRIVATE KEY",
                    "rustls-secret",
                    "hickory-detail",
                ] {
                    assert!(!log.contains(secret), "{filter} {json}: {log}");
                }
                assert!(log.contains("nats-info-kept"), "{filter}: {log}");
            }
        }
        let log = logged("trace", false);
        assert!(
            log.contains("agent-trace-kept") && log.contains("not-a-protocol-target"),
            "{log}"
        );
        // RUST_LOG still lowers them.
        assert!(!logged("warn", false).contains("nats-info-kept"));
        assert!(logged("", false).contains("nats-info-kept"));
    }
}
