//! `nexplane-agent`: enroll this host with a Nexplane control plane, run the agent, or check
//! its status. See the library documentation (`nexplane_agent`) and api.md §7.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use nexplane_agent::client::{self, RegisterRequest};
use nexplane_agent::config::{server_url, PendingConfig};
use nexplane_agent::{exit, AgentClient, ApiError, Config, ConfigError, RunError};

/// The Nexplane host agent: applies approved file changes on this host, reaching the control
/// plane by outbound HTTP(S) only.
#[derive(Debug, Parser)]
#[command(name = "nexplane-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Register this host with an enrollment token and write the agent configuration (0600).
    Enroll {
        /// The control plane's URL, e.g. https://nexplane.example.com
        #[arg(long)]
        server: String,
        /// The enrollment token (from `POST /agents/enrollment-tokens`). Tokens are base64url
        /// and may start with `-`, so a value that looks like an option is taken as the token.
        #[arg(
            long,
            env = "NEXPLANE_ENROLLMENT_TOKEN",
            hide_env_values = true,
            allow_hyphen_values = true
        )]
        token: String,
        /// Where to write the configuration.
        #[arg(long, default_value = nexplane_agent::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// A label for this agent (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Replace an existing configuration.
        #[arg(long)]
        force: bool,
    },
    /// Run the agent: heartbeat, poll for commands, execute them, report their results.
    Run {
        /// The configuration file.
        #[arg(long, default_value = nexplane_agent::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Show the agent's identity and whether the server accepts it (exit 0 only if it does).
    Status {
        /// The configuration file.
        #[arg(long, default_value = nexplane_agent::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // No colour codes in the journal or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let code = match cli.command {
        Cmd::Enroll {
            server,
            token,
            config,
            labels,
            force,
        } => enroll(&server, token, &config, labels, force),
        Cmd::Run { config } => run(&config),
        Cmd::Status { config } => status(&config),
    };
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("nexplane-agent: cannot start the async runtime: {e}");
            exit::FAILURE
        })
}

fn load(path: &Path) -> Result<Config, u8> {
    Config::load(path).map_err(|e: ConfigError| {
        eprintln!("nexplane-agent: {e}");
        exit::CONFIG
    })
}

fn enroll(
    server: &str,
    token: String,
    path: &Path,
    labels: Vec<(String, String)>,
    force: bool,
) -> u8 {
    if let Err(e) = server_url(server) {
        eprintln!("nexplane-agent: --server: {e}");
        return exit::FAILURE;
    }
    let server = server.trim_end_matches('/').to_string();
    let mut label_map = BTreeMap::new();
    for (key, value) in labels {
        if label_map.insert(key.clone(), value).is_some() {
            eprintln!("nexplane-agent: --label {key} is given twice");
            return exit::FAILURE;
        }
    }
    if token.trim().is_empty() {
        eprintln!("nexplane-agent: --token is empty");
        return exit::FAILURE;
    }
    // Before spending the token: refuse to overwrite, and make sure the file can be written.
    let pending = match PendingConfig::prepare(path, force) {
        Ok(pending) => pending,
        Err(e) => {
            eprintln!("nexplane-agent: {e}");
            return exit::FAILURE;
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let request = RegisterRequest::for_this_host(token, label_map);
    let registration = match rt.block_on(client::register(&server, &request)) {
        Ok(registration) => registration,
        Err(ApiError::Unauthorized(detail)) => {
            eprintln!("nexplane-agent: enrollment refused by the server: {detail}");
            return exit::REJECTED;
        }
        Err(e) => {
            eprintln!("nexplane-agent: enrollment failed: {e}");
            return exit::FAILURE;
        }
    };
    let agent_id = registration.agent_id.clone();
    let config = Config::enrolled(server.clone(), agent_id.clone(), registration.agent_secret);
    let written = config
        .validate()
        .map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
        .and_then(|()| pending.write(&config));
    if let Err(e) = written {
        eprintln!(
            "nexplane-agent: registered as {agent_id}, but {e}. Revoke this agent \
             (DELETE /agents/{agent_id}) and enroll again with a new token."
        );
        return exit::FAILURE;
    }
    println!("enrolled with {server} as {agent_id}");
    println!("configuration written to {} (mode 0600)", path.display());
    println!(
        "next: list the directories the agent may change in allowed_paths, then start it \
         (systemctl enable --now nexplane-agent)"
    );
    exit::OK
}

fn run(path: &Path) -> u8 {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let outcome = rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let signals = match Signals::register() {
            Ok(signals) => signals,
            Err(e) => {
                error!(error = %e, "cannot install the signal handlers");
                return Err(exit::FAILURE);
            }
        };
        tokio::spawn(async move {
            let name = signals.wait().await;
            info!(signal = name, "stopping");
            let _ = stop_tx.send(true);
        });
        nexplane_agent::run(config, stop_rx)
            .await
            .map_err(|e| match e {
                RunError::Rejected(_) => exit::REJECTED,
                RunError::Client(_) => exit::FAILURE,
            })
    });
    match outcome {
        Ok(()) => exit::OK,
        Err(code) => code,
    }
}

/// SIGTERM and SIGINT, registered before the agent starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

fn status(path: &Path) -> u8 {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!("agent_id: {}", config.agent_id);
    println!("server: {}", config.server);
    if config.allowed_paths.is_empty() {
        println!("allowed_paths: (none: every file command is refused)");
    } else {
        let list: Vec<String> = config
            .allowed_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        println!("allowed_paths: {}", list.join(", "));
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let beat = rt.block_on(async {
        let client = AgentClient::new(&config)?;
        client.heartbeat(&nexplane_agent::hostname()).await
    });
    match beat {
        Ok(beat) => {
            println!(
                "accepted: yes (server_time {})",
                beat.server_time.as_deref().unwrap_or("not given")
            );
            exit::OK
        }
        Err(ApiError::Unauthorized(detail)) => {
            println!("accepted: no, the server rejects the agent: {detail}");
            exit::REJECTED
        }
        Err(e) => {
            println!("accepted: unknown, {e}");
            exit::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_token_that_starts_with_a_dash_is_taken_as_the_token() {
        let cli = Cli::try_parse_from([
            "nexplane-agent",
            "enroll",
            "--server",
            "http://127.0.0.1:8000",
            "--token",
            "-Gx2_token",
            "--config",
            "/tmp/agent.toml",
        ])
        .unwrap();
        match cli.command {
            Cmd::Enroll { token, .. } => assert_eq!(token, "-Gx2_token"),
            other => panic!("{other:?}"),
        }
    }
}
