//! The agent configuration file (api.md §7.4): TOML, mode 0600, written by `enroll` and read
//! by `run` and `status`.
//!
//! ```toml
//! server = "https://nexplane.example.com"
//! agent_id = "agt_01jd…"
//! agent_secret = "…"
//! allowed_paths = ["/etc/myapp"]
//! poll_wait_seconds = 30
//! heartbeat_seconds = 30
//! ```

use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{format_mode, TempFile};
use crate::paths::is_normalized_absolute;

/// Where `enroll` writes the configuration and `run` reads it unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nexplane-agent/agent.toml";
/// Default long-poll wait (seconds).
pub const DEFAULT_POLL_WAIT_SECONDS: u64 = 30;
/// Default heartbeat interval (seconds).
pub const DEFAULT_HEARTBEAT_SECONDS: u64 = 30;
/// The longest long poll the server accepts (api.md §7.2: `wait` max 30).
pub const MAX_POLL_WAIT_SECONDS: u64 = 30;
/// The longest heartbeat interval allowed: the server shows an agent `offline` after 90 s
/// without a heartbeat, so a longer interval would make a healthy agent look offline.
pub const MAX_HEARTBEAT_SECONDS: u64 = 60;

/// The agent secret. `Debug` and `Display` print `[redacted]`; the value is reachable only
/// through [`AgentSecret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentSecret(String);

impl AgentSecret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Self(value)
    }
    /// The secret value; use it only to sign requests or write the configuration.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for AgentSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

fn default_poll_wait() -> u64 {
    DEFAULT_POLL_WAIT_SECONDS
}

fn default_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_SECONDS
}

/// The configuration file's content. Unknown keys are refused (a typo such as
/// `allowed_path` must not silently leave the agent unable to write anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The control plane's base URL (`http://` or `https://`, optionally with a path prefix).
    pub server: String,
    /// The id the server gave at registration (`agt_…`).
    pub agent_id: String,
    /// The secret the server gave at registration; signs every request.
    pub agent_secret: AgentSecret,
    /// Directories below which commands may change files. Empty: nothing is writable.
    #[serde(default)]
    pub allowed_paths: Vec<PathBuf>,
    /// Long-poll wait in seconds (1..=30).
    #[serde(default = "default_poll_wait")]
    pub poll_wait_seconds: u64,
    /// Heartbeat interval in seconds (1..=60).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
}

/// Why a configuration file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, not permitted, …).
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is accessible by group or others; it holds the agent secret.
    #[error(
        "refusing the configuration {path}: it is accessible by group or others (mode {mode}) \
         and holds the agent secret; run `chmod 600 {path}`"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits, e.g. `0644`.
        mode: String,
    },
    /// The path is not a regular file.
    #[error("the configuration {path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (never quotes the file's lines, which may hold the secret).
        message: String,
    },
    /// A key has a value the agent cannot use.
    #[error("invalid configuration {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `enroll` found a configuration already there (and no `--force`).
    #[error("the configuration {path} already exists; pass --force to replace it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be written.
    #[error("cannot write the configuration {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

impl Config {
    /// A fresh configuration as `enroll` writes it: no allowed paths, default intervals.
    pub fn enrolled(server: String, agent_id: String, agent_secret: AgentSecret) -> Self {
        Self {
            server,
            agent_id,
            agent_secret,
            allowed_paths: Vec::new(),
            poll_wait_seconds: DEFAULT_POLL_WAIT_SECONDS,
            heartbeat_seconds: DEFAULT_HEARTBEAT_SECONDS,
        }
    }

    /// Parses and validates configuration text. `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // `message()` only: the full Display quotes the offending line, which may be the
            // secret's.
            message: locate_error(text, e.span(), e.message()),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Reads the configuration file: refuses one that group or others can access, then parses
    /// and validates it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if !meta.is_file() {
            return Err(ConfigError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(ConfigError::Permissions {
                path: path.to_path_buf(),
                mode: format_mode(meta.mode()),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::parse(&text, path)
    }

    /// Checks every value; the error says which key is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        server_url(&self.server).map_err(|e| format!("server: {e}"))?;
        if self.agent_id.is_empty()
            || !self
                .agent_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(
                "agent_id: must be a non-empty id made of letters, digits, `_` and `-`".into(),
            );
        }
        if self.agent_secret.expose().is_empty() {
            return Err("agent_secret: must not be empty".into());
        }
        for dir in &self.allowed_paths {
            let shown = dir.display();
            let Some(text) = dir.to_str() else {
                return Err(format!("allowed_paths: {shown} is not valid UTF-8"));
            };
            if !is_normalized_absolute(text) {
                return Err(format!(
                    "allowed_paths: {shown} must be an absolute, normalized directory path \
                     (no `.`, `..`, `//` or trailing `/`)"
                ));
            }
        }
        if !(1..=MAX_POLL_WAIT_SECONDS).contains(&self.poll_wait_seconds) {
            return Err(format!(
                "poll_wait_seconds: must be between 1 and {MAX_POLL_WAIT_SECONDS}"
            ));
        }
        if !(1..=MAX_HEARTBEAT_SECONDS).contains(&self.heartbeat_seconds) {
            return Err(format!(
                "heartbeat_seconds: must be between 1 and {MAX_HEARTBEAT_SECONDS} (the server \
                 shows an agent offline after 90 s without a heartbeat)"
            ));
        }
        Ok(())
    }

    /// The file's text: a short header, then the keys.
    pub fn to_toml(&self) -> Result<String, String> {
        let body = toml::to_string(self).map_err(|e| e.to_string())?;
        Ok(format!(
            "# nexplane-agent configuration (api.md §7.4), written by `nexplane-agent enroll`.\n\
             # Keep it mode 0600: it holds the agent secret.\n\
             # allowed_paths: the directories below which the agent may change files, e.g.\n\
             # allowed_paths = [\"/etc/myapp\"]. Empty: nothing is writable.\n\
             {body}"
        ))
    }
}

/// The keys of the file, in order.
const KEYS: [&str; 6] = [
    "server",
    "agent_id",
    "agent_secret",
    "allowed_paths",
    "poll_wait_seconds",
    "heartbeat_seconds",
];

/// `line N (`key`): message`. The key is named only when it is one of [`KEYS`]: the line's
/// text is never quoted, since it may hold the secret.
fn locate_error(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let Some(span) = span else {
        return message.to_string();
    };
    let before = text.get(..span.start).unwrap_or_default();
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text
        .get(line_start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_default();
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| KEYS.contains(key));
    match key {
        // The message may quote the value ("invalid type: integer `…`").
        Some("agent_secret") => {
            format!("line {line_no} (`agent_secret`): must be a string (value not shown)")
        }
        Some(key) => format!("line {line_no} (`{key}`): {message}"),
        None => format!("line {line_no}: {message}"),
    }
}

/// Parses and checks a control-plane URL: `http` or `https`, a host, no query or fragment.
pub fn server_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{text}` must be an http:// or https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{text}` has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{text}` must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("`{text}` must not carry credentials"));
    }
    Ok(url)
}

/// A configuration file being written: the temporary file is created up front (with the
/// parent directory, mode 0700, if missing), so an unwritable location is reported before the
/// enrollment token is spent. [`PendingConfig::write`] finishes the job atomically.
#[derive(Debug)]
pub struct PendingConfig {
    path: PathBuf,
    temp: TempFile,
}

impl PendingConfig {
    /// Prepares to write `path`. Without `force`, an existing file is an error.
    pub fn prepare(path: &Path, force: bool) -> Result<Self, ConfigError> {
        let write_err = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(ConfigError::NotAFile {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) if !force => {
                return Err(ConfigError::Exists {
                    path: path.to_path_buf(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_err(e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(write_err)?;
            }
        }
        let temp = TempFile::beside(path).map_err(write_err)?;
        Ok(Self {
            path: path.to_path_buf(),
            temp,
        })
    }

    /// Writes `config` with mode 0600 and renames it into place.
    pub fn write(self, config: &Config) -> Result<(), ConfigError> {
        let text = config.to_toml().map_err(|message| ConfigError::Invalid {
            path: self.path.clone(),
            message,
        })?;
        let path = self.path;
        self.temp
            .commit(text.as_bytes(), 0o600)
            .map_err(|source| ConfigError::Write { path, source })
    }
}

/// Writes `config` to `path` atomically with mode 0600 (creating the parent directory if
/// missing). Without `force`, an existing file is an error.
pub fn write_config(path: &Path, config: &Config, force: bool) -> Result<(), ConfigError> {
    PendingConfig::prepare(path, force)?.write(config)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &str = "s3cr3t-agent-secret-value";

    fn sample() -> Config {
        Config::enrolled(
            "http://127.0.0.1:8000".into(),
            "agt_01abc".into(),
            AgentSecret::new(SECRET.into()),
        )
    }

    #[test]
    fn written_config_is_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/agent.toml");
        write_config(&path, &sample(), false).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("allowed_paths = []"), "{text}");
        assert!(text.contains("poll_wait_seconds = 30"), "{text}");
        assert!(text.contains("heartbeat_seconds = 30"), "{text}");
        let back = Config::load(&path).unwrap();
        assert_eq!(back, sample());
        // No temporary file left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn existing_config_is_kept_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        write_config(&path, &sample(), false).unwrap();
        let mut other = sample();
        other.agent_id = "agt_other".into();
        let err = write_config(&path, &other, false).unwrap_err();
        assert!(matches!(err, ConfigError::Exists { .. }), "{err}");
        assert_eq!(Config::load(&path).unwrap().agent_id, "agt_01abc");
        write_config(&path, &other, true).unwrap();
        assert_eq!(Config::load(&path).unwrap().agent_id, "agt_other");
        assert_eq!(
            std::fs::metadata(&path).unwrap().mode() & 0o777,
            0o600,
            "a forced rewrite is 0600 too"
        );
    }

    #[test]
    fn group_or_world_accessible_config_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        write_config(&path, &sample(), false).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Config::load(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::Permissions { .. }), "{msg}");
            assert!(msg.contains("chmod 600"), "{msg}");
            assert!(!msg.contains(SECRET));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        Config::load(&path).unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!(
            "server = \"http://h\"\nagent_id = \"agt_1\"\nagent_secret = \"{SECRET}\"\n\
             allowed_path = [\"/etc\"]\n"
        );
        let err = Config::parse(&text, Path::new("a.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `allowed_path`"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(!msg.contains(SECRET), "{msg}");
    }

    #[test]
    fn parse_errors_never_quote_the_secret() {
        // An unquoted secret is a TOML syntax error on the secret's own line.
        let text =
            format!("server = \"http://h\"\nagent_id = \"agt_1\"\nagent_secret = {SECRET}\n");
        let msg = Config::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 3 (`agent_secret`)"), "{msg}");
        assert!(!msg.contains(SECRET), "{msg}");
        let text = "server = \"http://h\"\nagent_id = \"agt_1\"\nagent_secret = 987654321\n";
        let msg = Config::parse(text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("987654321"), "{msg}");
    }

    #[test]
    fn defaults_apply_and_values_are_validated() {
        let base = format!(
            "server = \"http://h:8000\"\nagent_id = \"agt_1\"\nagent_secret = \"{SECRET}\"\n"
        );
        let c = Config::parse(&base, Path::new("a.toml")).unwrap();
        assert_eq!(c.poll_wait_seconds, 30);
        assert_eq!(c.heartbeat_seconds, 30);
        assert!(c.allowed_paths.is_empty());

        let bad = [
            ("allowed_paths = [\"etc/app\"]", "allowed_paths"),
            ("allowed_paths = [\"/etc/../root\"]", "allowed_paths"),
            ("allowed_paths = [\"/etc/app/\"]", "allowed_paths"),
            ("poll_wait_seconds = 0", "poll_wait_seconds"),
            ("poll_wait_seconds = 31", "poll_wait_seconds"),
            ("heartbeat_seconds = 0", "heartbeat_seconds"),
            ("heartbeat_seconds = 120", "heartbeat_seconds"),
            ("poll_wait_seconds = \"30\"", "poll_wait_seconds"),
        ];
        for (line, key) in bad {
            let msg = Config::parse(&format!("{base}{line}\n"), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{line}: {msg}");
        }
        for server in ["ftp://h", "not a url", "http://h/?x=1", "http://u:p@h"] {
            let text = base.replace("http://h:8000", server);
            let msg = Config::parse(&text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(msg.contains("server"), "{server}: {msg}");
        }
        let text = base.replace("agt_1", "agt 1");
        assert!(Config::parse(&text, Path::new("a.toml")).is_err());
        let text = base.replace(SECRET, "");
        assert!(Config::parse(&text, Path::new("a.toml")).is_err());
        let ok = Config::parse(
            &format!("{base}allowed_paths = [\"/etc/app\", \"/srv\"]\npoll_wait_seconds = 5\n"),
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(ok.allowed_paths.len(), 2);
        assert_eq!(ok.poll_wait_seconds, 5);
    }

    #[test]
    fn the_secret_is_redacted_in_debug_output() {
        let c = sample();
        let shown = format!("{c:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("[redacted]"));
    }
}
