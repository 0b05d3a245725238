//! `nexplane`: the control-plane server and its administration commands.

use clap::{Parser, Subcommand};
use nexplane::config::{Config, LogFormat, Source};
use nexplane::{StartError, SystemClock};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "nexplane", version, about = "Nexplane control plane")]
struct Cli {
    /// Config file (TOML); environment variables win over it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a new token-signing key in the data dir. Tokens signed with the old key keep
    /// verifying, and the old key stays in the JWKS, until they have expired. Restart the
    /// servers to sign with the new key.
    RotateJwt,
    /// Re-seal every stored connector credential under a new master key (run it with the
    /// servers stopped). The old key is kept as `<key file>.previous-<id>` until you delete it.
    RotateMaster {
        /// The new key (a file holding 32 random bytes in base64); generated when omitted.
        /// Required when the key comes from NEXPLANE_MASTER_KEY.
        #[arg(long)]
        new_key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; the password is read from standard input.
    Create {
        /// Login email.
        #[arg(long)]
        email: String,
        /// admin, operator, approver or viewer.
        #[arg(long)]
        role: String,
        /// Display name (default: the email).
        #[arg(long)]
        name: Option<String>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The glibc tunable the server runs with: allocations of 1 MiB and more are mapped and
/// unmapped on their own.
const MALLOC_TUNABLE: &str = "glibc.malloc.mmap_threshold=1048576";

/// Restarts the process (same pid, arguments and environment) with [`MALLOC_TUNABLE`] unless it
/// is already set. Every login hashes with argon2 (19 MiB); glibc raises its mmap threshold to
/// the largest block freed, so later blocks come from the heap and stay resident: an idle
/// server grew by ~20 MB per concurrent login. A fixed threshold gives them back at once.
/// Tunables are read only at process start, hence the exec. Set `GLIBC_TUNABLES` yourself
/// (any value naming `glibc.malloc.mmap_threshold`) to choose otherwise.
#[cfg(target_os = "linux")]
fn ensure_malloc_tunable() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "GLIBC_TUNABLES";
    let current = std::env::var(VAR).unwrap_or_default();
    if current.contains("glibc.malloc.mmap_threshold") {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let value = if current.is_empty() {
        MALLOC_TUNABLE.to_owned()
    } else {
        format!("{current}:{MALLOC_TUNABLE}")
    };
    // Returns only when the exec failed; the server then runs with the default allocator
    // settings.
    let _ = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(VAR, value)
        .exec();
}

#[cfg(not(target_os = "linux"))]
fn ensure_malloc_tunable() {}

fn main() -> ExitCode {
    ensure_malloc_tunable();
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        let spec = nexplane_api::openapi::openapi_spec();
        println!(
            "{}",
            serde_json::to_string_pretty(&spec).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let cfg = match Source::load(cli.config.as_deref()).and_then(|s| Config::from_source(&s)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nexplane: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format);
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg),
        Command::Migrate => nexplane::open_database(&cfg).map(|_| {
            tracing::info!("database is up to date");
        }),
        Command::User {
            command: UserCommand::Create { email, role, name },
        } => create_user(&cfg, email, role, name),
        Command::Keys {
            command: KeysCommand::RotateMaster { new_key_file },
        } => rotate_master(&cfg, new_key_file),
        Command::Keys {
            command: KeysCommand::RotateJwt,
        } => nexplane::rotate_jwt_key(&cfg, nexplane_ports::Clock::now(&SystemClock)).map(
            |(old_kid, new_kid)| {
                println!(
                    "{}",
                    serde_json::json!({"old_kid": old_kid, "new_kid": new_kid})
                );
            },
        ),
        Command::Openapi => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("nexplane: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: Config) -> Result<(), StartError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let result = rt.block_on(async move {
        let running = nexplane::start(cfg, Arc::new(SystemClock)).await?;
        match running.task.await {
            Ok(Ok(())) => {
                tracing::info!("stopped");
                Ok(())
            }
            Ok(Err(e)) => Err(StartError::Other(e.to_string())),
            Err(e) => Err(StartError::Other(e.to_string())),
        }
    });
    // Idle blocking-pool threads would otherwise keep the process alive for a few seconds.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn rotate_master(cfg: &Config, new_key_file: Option<PathBuf>) -> Result<(), StartError> {
    let r = nexplane::rotate_master_key(cfg, Arc::new(SystemClock), new_key_file.as_deref())?;
    tracing::info!(
        resealed = r.resealed,
        new_key_id = %r.new_key_id,
        previous_key_id = %r.previous_key_id,
        "master key rotated"
    );
    println!(
        "{}",
        serde_json::json!({
            "resealed": r.resealed,
            "new_key_id": r.new_key_id,
            "previous_key_id": r.previous_key_id,
            "previous_key_file": r.previous_key_file.as_ref().map(|p| p.display().to_string()),
        })
    );
    match &r.previous_key_file {
        Some(p) => eprintln!(
            "nexplane: every credential is now sealed with key {}. The previous key is kept in {}; \
             delete that file once every server runs with the new key.",
            r.new_key_id,
            p.display()
        ),
        None => eprintln!(
            "nexplane: every credential is now sealed with key {}. Set NEXPLANE_MASTER_KEY to the \
             contents of the new key file before starting the servers.",
            r.new_key_id
        ),
    }
    Ok(())
}

fn create_user(
    cfg: &Config,
    email: String,
    role: String,
    name: Option<String>,
) -> Result<(), StartError> {
    let password = nexplane::read_password_stdin()
        .map_err(|e| StartError::Other(format!("reading the password from stdin: {e}")))?;
    let app = nexplane::build_app(cfg, Arc::new(SystemClock))?;
    let user = app
        .create_user_cli(nexplane_app::users::NewUser {
            name: name.unwrap_or_else(|| email.clone()),
            email,
            role,
            password,
        })
        .map_err(|e| match e {
            nexplane_app::AppError::Validation(errs) => StartError::Other(
                errs.iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            other => StartError::Other(other.to_string()),
        })?;
    println!(
        "{}",
        serde_json::json!({"id": user.id.to_string(), "email": user.email, "role": user.role.as_str()})
    );
    Ok(())
}
