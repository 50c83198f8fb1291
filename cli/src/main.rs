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
    /// Allow the caller's cgroup (a job's) to reach a protected service. Exit 0: allowed, or
    /// no firewall installed (nothing to open); 1: nft or other failure; 2: usage;
    /// 3: not root; 4: the caller's cgroup cannot be used (root cgroup, a path nft cannot
    /// hold, undetectable) and there is no fallback.
    FirewallAllow {
        /// The service: monit.
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
    /// Mode, protected endpoints, allowed job cgroups, and whether the live table matches the
    /// desired state. Exit 0 when it matches, 1 otherwise.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
/// `RUST_LOG` filters (default info).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("BOSH_AGENT_LOG_FORMAT").as_deref() == Ok("json") {
        b.json().init();
    } else {
        b.with_ansi(false).init();
    }
}

fn firewall_allow(service: &str) -> ExitCode {
    match agent::commands::firewall_allow(service, &run_dir()) {
        Ok(AllowOutcome::Added { rule, replaced }) => {
            println!("monit access granted ({replaced} stale rule(s) replaced): {rule}");
            ExitCode::SUCCESS
        }
        Ok(AllowOutcome::AlreadyAllowed { rule, duplicates }) => {
            println!("monit access already granted ({duplicates} duplicate(s) removed): {rule}");
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

fn status(json: bool) -> ExitCode {
    match agent::commands::firewall_status(&run_dir()) {
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
