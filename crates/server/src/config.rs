//! Configuration (api.md §12): environment variables, optionally a TOML file; the
//! environment wins. Every value is checked at start and a bad one is reported by key.

use nexplane_domain::change_request::RequiredApprovals;
use nexplane_domain::SecretString;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {key}: {message}")]
pub struct ConfigError {
    /// The key (environment variable name).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `NEXPLANE_BIND`.
    pub bind: SocketAddr,
    /// `NEXPLANE_DATA_DIR`.
    pub data_dir: PathBuf,
    /// `NEXPLANE_DATABASE_URL`.
    pub database_url: String,
    /// `NEXPLANE_MASTER_KEY` (base64, 32 bytes).
    pub master_key: Option<SecretString>,
    /// `NEXPLANE_MASTER_KEY_FILE`.
    pub master_key_file: Option<PathBuf>,
    /// `NEXPLANE_JWT_KEY_FILE`.
    pub jwt_key_file: Option<PathBuf>,
    /// `NEXPLANE_ADMIN_EMAIL`.
    pub admin_email: String,
    /// `NEXPLANE_ADMIN_PASSWORD`.
    pub admin_password: Option<SecretString>,
    /// `NEXPLANE_RATE_LIMIT_PER_MINUTE`.
    pub rate_limit_per_minute: u32,
    /// `NEXPLANE_IP_RATE_LIMIT_PER_MINUTE` (unauthenticated requests per client IP).
    pub ip_rate_limit_per_minute: u32,
    /// `NEXPLANE_LOGIN_RATE_LIMIT_PER_MINUTE`.
    pub login_rate_limit_per_minute: u32,
    /// `NEXPLANE_ALLOW_SELF_APPROVAL`.
    pub allow_self_approval: bool,
    /// `NEXPLANE_SESSION_TTL_SECONDS` (default 12 h).
    pub session_ttl_secs: i64,
    /// `NEXPLANE_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `NEXPLANE_WORKERS` (default: number of CPUs).
    pub workers: usize,
    /// `NEXPLANE_DB_POOL_SIZE` (default 10).
    pub db_pool_size: u32,
    /// `NEXPLANE_DB_CONNECT_TIMEOUT_SECONDS` (default 5; at most 10).
    pub db_connect_timeout_secs: u64,
    /// `NEXPLANE_JOB_WORKERS`: jobs (discoveries) this server runs at once (default 2).
    pub job_workers: usize,
    /// `NEXPLANE_JOB_LEASE_SECONDS`: lease a worker holds on a job (default 60, at least 4);
    /// a job whose worker stops renewing it is resumed by another worker after this long.
    pub job_lease_secs: i64,
    /// `NEXPLANE_REQUIRED_APPROVALS_LOW`, `_MEDIUM`, `_HIGH`, `_CRITICAL` (defaults 1, 1,
    /// 2, 2): approvals a change request of that risk level needs.
    pub required_approvals: RequiredApprovals,
    /// `NEXPLANE_AGENT_COMMAND_TIMEOUT_SECONDS` (default 300): how long an execution waits
    /// for an agent's result before failing the step.
    pub agent_command_timeout_secs: u64,
    /// `NEXPLANE_AGENT_RATE_LIMIT_PER_MINUTE` (default 120): signed requests per agent.
    pub agent_rate_limit_per_minute: u32,
    /// `NEXPLANE_TEST_PAUSE_AT` (tests only): the job worker stops for good at this point of
    /// an execution or rollback (`<execution|rollback>:<step>:<started|called|journaled>`),
    /// after writing the point's name to `<data dir>/paused-at`, so a test can kill the
    /// process exactly there. Never set it in production.
    pub test_pause_at: Option<String>,
}

/// Keys a config file may set (the variable names without `NEXPLANE_`, lowercase).
const KEYS: &[&str] = &[
    "bind",
    "data_dir",
    "database_url",
    "master_key",
    "master_key_file",
    "jwt_key_file",
    "admin_email",
    "admin_password",
    "rate_limit_per_minute",
    "ip_rate_limit_per_minute",
    "login_rate_limit_per_minute",
    "allow_self_approval",
    "session_ttl_seconds",
    "log_format",
    "workers",
    "db_pool_size",
    "db_connect_timeout_seconds",
    "job_workers",
    "job_lease_seconds",
    "required_approvals_low",
    "required_approvals_medium",
    "required_approvals_high",
    "required_approvals_critical",
    "test_pause_at",
    "agent_command_timeout_seconds",
    "agent_rate_limit_per_minute",
];

/// Where values come from: the environment first, then the file.
#[derive(Debug, Default)]
pub struct Source {
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
}

impl Source {
    /// Reads the process environment and, when given (or `nexplane.toml` exists in the
    /// working directory), the config file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::vars()
            .filter(|(k, _)| k.starts_with("NEXPLANE_"))
            .collect();
        let default = Path::new("nexplane.toml");
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None if default.exists() => Some(default.to_path_buf()),
            None => None,
        };
        let file = match path {
            Some(p) => parse_file(&p)?,
            None => BTreeMap::new(),
        };
        Ok(Self { env, file })
    }

    /// A source from explicit maps (tests).
    pub fn from_maps(env: BTreeMap<String, String>, file: BTreeMap<String, String>) -> Self {
        Self { env, file }
    }

    fn get(&self, key: &str) -> Option<(String, String)> {
        let var = format!("NEXPLANE_{}", key.to_uppercase());
        if let Some(v) = self.env.get(&var) {
            return Some((var, v.clone()));
        }
        self.file
            .get(key)
            .map(|v| (format!("{key} (config file)"), v.clone()))
    }
}

fn parse_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let key = "--config";
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| err(key, format!("{} is not valid TOML: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (k, v) in table {
        if !KEYS.contains(&k.as_str()) {
            return Err(err(&k, format!("unknown key in {}", path.display())));
        }
        let s = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(err(&k, format!("unsupported value {other}"))),
        };
        out.insert(k, s);
    }
    Ok(out)
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(
    src: &Source,
    key: &str,
    default: T,
) -> Result<T, ConfigError> {
    match src.get(key) {
        None => Ok(default),
        Some((name, v)) => match v.trim().parse::<T>() {
            Ok(n) if n > T::default() => Ok(n),
            _ => Err(err(&name, format!("must be a positive integer, got {v:?}"))),
        },
    }
}

impl Config {
    /// Builds and checks the configuration.
    pub fn from_source(src: &Source) -> Result<Config, ConfigError> {
        let bind = match src.get("bind") {
            None => SocketAddr::from(([127, 0, 0, 1], 8000)),
            Some((name, v)) => v.trim().parse().map_err(|_| {
                err(
                    &name,
                    format!("must be an address such as 127.0.0.1:8000, got {v:?}"),
                )
            })?,
        };
        let data_dir = PathBuf::from(
            src.get("data_dir")
                .map(|(_, v)| v)
                .unwrap_or_else(|| "./data".into()),
        );
        let database_url = match src.get("database_url") {
            None => format!("sqlite://{}", data_dir.join("nexplane.db").display()),
            Some((name, v)) => {
                let ok = ["sqlite://", "postgres://", "postgresql://"]
                    .iter()
                    .any(|p| v.starts_with(p));
                if !ok {
                    return Err(err(&name, "must start with sqlite:// or postgres://"));
                }
                v
            }
        };
        let log_format = match src.get("log_format") {
            None => LogFormat::Text,
            Some((name, v)) => match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(err(&name, format!("must be text or json, got {v:?}"))),
            },
        };
        let allow_self_approval = match src.get("allow_self_approval") {
            None => false,
            Some((name, v)) => match v.to_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => return Err(err(&name, format!("must be true or false, got {v:?}"))),
            },
        };
        let admin_email = src
            .get("admin_email")
            .map(|(_, v)| v)
            .unwrap_or_else(|| "admin@example.com".into());
        if let Err(e) = nexplane_domain::user::normalize_email("email", &admin_email) {
            return Err(err("NEXPLANE_ADMIN_EMAIL", e.message));
        }
        let admin_password = src.get("admin_password").map(|(_, v)| SecretString::new(v));
        if let Some(p) = &admin_password {
            if let Err(e) = nexplane_domain::user::validate_password("password", p) {
                return Err(err("NEXPLANE_ADMIN_PASSWORD", e.message));
            }
        }
        let connect_timeout: u64 = positive(src, "db_connect_timeout_seconds", 5)?;
        if connect_timeout > 10 {
            return Err(err(
                "NEXPLANE_DB_CONNECT_TIMEOUT_SECONDS",
                "must be at most 10",
            ));
        }
        let workers = positive(
            src,
            "workers",
            std::thread::available_parallelism().map_or(2, usize::from),
        )?;
        let job_lease_secs: i64 = positive(src, "job_lease_seconds", 60)?;
        if job_lease_secs < 4 {
            return Err(err("NEXPLANE_JOB_LEASE_SECONDS", "must be at least 4"));
        }
        let defaults = RequiredApprovals::default();
        let required_approvals = RequiredApprovals {
            low: positive(src, "required_approvals_low", defaults.low)?,
            medium: positive(src, "required_approvals_medium", defaults.medium)?,
            high: positive(src, "required_approvals_high", defaults.high)?,
            critical: positive(src, "required_approvals_critical", defaults.critical)?,
        };
        Ok(Config {
            required_approvals,
            test_pause_at: src.get("test_pause_at").map(|(_, v)| v),
            agent_command_timeout_secs: positive(src, "agent_command_timeout_seconds", 300)?,
            agent_rate_limit_per_minute: positive(src, "agent_rate_limit_per_minute", 120)?,
            job_workers: positive(src, "job_workers", 2)?,
            job_lease_secs,
            bind,
            database_url,
            master_key: src.get("master_key").map(|(_, v)| SecretString::new(v)),
            master_key_file: src.get("master_key_file").map(|(_, v)| PathBuf::from(v)),
            jwt_key_file: src.get("jwt_key_file").map(|(_, v)| PathBuf::from(v)),
            admin_email,
            admin_password,
            rate_limit_per_minute: positive(src, "rate_limit_per_minute", 100)?,
            ip_rate_limit_per_minute: positive(src, "ip_rate_limit_per_minute", 600)?,
            login_rate_limit_per_minute: positive(src, "login_rate_limit_per_minute", 10)?,
            allow_self_approval,
            session_ttl_secs: positive(src, "session_ttl_seconds", 12 * 3600)?,
            log_format,
            workers,
            db_pool_size: positive(src, "db_pool_size", 10)?,
            db_connect_timeout_secs: connect_timeout,
            data_dir,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(env: &[(&str, &str)], file: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        Config::from_source(&Source::from_maps(m(env), m(file)))
    }

    #[test]
    fn defaults() {
        let c = cfg(&[], &[]).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8000");
        assert_eq!(c.rate_limit_per_minute, 100);
        assert_eq!(c.login_rate_limit_per_minute, 10);
        assert!(c.database_url.starts_with("sqlite://"));
        assert!(!c.allow_self_approval);
    }

    #[test]
    fn env_wins_over_file_and_bad_values_name_their_key() {
        let c = cfg(
            &[("NEXPLANE_RATE_LIMIT_PER_MINUTE", "7")],
            &[("rate_limit_per_minute", "9")],
        )
        .unwrap();
        assert_eq!(c.rate_limit_per_minute, 7);
        let c = cfg(&[], &[("rate_limit_per_minute", "9")]).unwrap();
        assert_eq!(c.rate_limit_per_minute, 9);
        let e = cfg(&[("NEXPLANE_RATE_LIMIT_PER_MINUTE", "lots")], &[]).unwrap_err();
        assert!(
            e.to_string().contains("NEXPLANE_RATE_LIMIT_PER_MINUTE"),
            "{e}"
        );
        let e = cfg(&[("NEXPLANE_BIND", "nowhere")], &[]).unwrap_err();
        assert!(e.to_string().contains("NEXPLANE_BIND"));
        let e = cfg(&[("NEXPLANE_LOG_FORMAT", "xml")], &[]).unwrap_err();
        assert!(e.to_string().contains("NEXPLANE_LOG_FORMAT"));
        let e = cfg(&[("NEXPLANE_DATABASE_URL", "mysql://x")], &[]).unwrap_err();
        assert!(e.to_string().contains("NEXPLANE_DATABASE_URL"));
        let e = cfg(&[("NEXPLANE_ADMIN_PASSWORD", "short")], &[]).unwrap_err();
        assert!(e.to_string().contains("NEXPLANE_ADMIN_PASSWORD"));
        assert!(!e.to_string().contains("short"));
    }
}
