//! The commands the agent executes (api.md §7.3) and the results it reports.
//!
//! | type | params | output | snapshot |
//! |---|---|---|---|
//! | `write_file` | `{path, content, mode?}` | `{path, bytes, mode}` | `{existed, content_base64?, mode?}` |
//! | `set_file_mode` | `{path, mode}` | `{path, mode}` | `{existed: true, mode}` |
//! | `restore_file` | `{path, snapshot}` (a `write_file` snapshot) | `{path, restored: "written"\|"removed"\|"absent", bytes?, mode?}` | — |
//! | `restore_file_mode` | `{path, mode}` | `{path, mode}` | — |
//!
//! A failed command reports `{"error": "<reason>"}` as its output. Modes are octal strings of
//! three or four digits (`"0644"`); outputs always use four. Every path goes through
//! [`check_path`] before anything is read or changed, so a refused command has no effect.
//! Unknown fields in `params` are ignored (the server may pass its whole change target).

use std::fs::{self, File, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fsutil::{format_mode, TempFile};
use crate::paths::{check_path, CheckedPath};

/// `write_file`: snapshot, then write a file atomically.
pub const WRITE_FILE: &str = "write_file";
/// `set_file_mode`: snapshot the mode, then chmod.
pub const SET_FILE_MODE: &str = "set_file_mode";
/// `restore_file`: put back what a `write_file` snapshot recorded.
pub const RESTORE_FILE: &str = "restore_file";
/// `restore_file_mode`: chmod back.
pub const RESTORE_FILE_MODE: &str = "restore_file_mode";

/// The mode of a file `write_file` creates when the command gives none. (An existing file
/// keeps its mode unless the command gives one.)
pub const DEFAULT_NEW_FILE_MODE: u32 = 0o644;

/// The largest existing file `write_file` replaces: its old content travels base64-encoded in
/// the result, and the server refuses bodies over 1 MiB (api.md §1).
pub const MAX_SNAPSHOT_BYTES: u64 = 512 * 1024;

/// A command received from `GET /agent/commands/next`.
#[derive(Clone, PartialEq)]
pub struct Command {
    /// The command id (`cmd_…`).
    pub id: String,
    /// Its type, e.g. `write_file`.
    pub kind: String,
    /// Its parameters.
    pub params: Value,
}

impl std::fmt::Debug for Command {
    // The params may carry file content: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Command {
    /// Reads `{id, type, params}`. A missing `type` becomes the empty type (reported as
    /// unknown); missing `params` become `null`.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        let id = value
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or("the command has no string `id`")?;
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("the command id {id:?} is not a plain id"));
        }
        Ok(Self {
            id: id.to_string(),
            kind: value
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            params: value.get("params").cloned().unwrap_or(Value::Null),
        })
    }

    /// The `path` parameter, for logs.
    pub fn path(&self) -> Option<&str> {
        self.params.get("path").and_then(Value::as_str)
    }
}

/// The result status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The command did what it was asked.
    Succeeded,
    /// It did not; `output.error` says why.
    Failed,
}

/// A command's result; serializes as the body of `POST /agent/commands/{id}/result`.
#[derive(Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// `succeeded` or `failed`.
    pub status: Status,
    /// What the command did, or `{"error": …}`.
    pub output: Value,
    /// What it replaced, when it took a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Value>,
}

impl std::fmt::Debug for Outcome {
    // Snapshots may carry old file content: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("status", &self.status)
            .field("output", &self.output)
            .field("snapshot", &self.snapshot.as_ref().map(|_| "[omitted]"))
            .finish()
    }
}

impl Outcome {
    /// The failure reason, for a failed outcome.
    pub fn error(&self) -> Option<&str> {
        self.output.get("error").and_then(Value::as_str)
    }
}

/// What `write_file` recorded before writing; `restore_file` takes it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSnapshot {
    /// Whether the file existed.
    pub existed: bool,
    /// Its old content, base64 (standard alphabet, padded), when it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Its old mode (`"0644"`), when it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// Executes one command. Never panics; every refusal or error is a failed outcome.
pub fn execute(kind: &str, params: &Value, allowed_paths: &[PathBuf]) -> Outcome {
    let result = match kind {
        WRITE_FILE => write_file(params, allowed_paths),
        SET_FILE_MODE => set_file_mode(params, allowed_paths),
        RESTORE_FILE => restore_file(params, allowed_paths),
        RESTORE_FILE_MODE => restore_file_mode(params, allowed_paths),
        other => Err(Failure::new(format!("unknown command type {other}"))),
    };
    match result {
        Ok(done) => Outcome {
            status: Status::Succeeded,
            output: done.output,
            snapshot: done.snapshot,
        },
        Err(failure) => Outcome {
            status: Status::Failed,
            output: json!({ "error": failure.error }),
            snapshot: failure.snapshot,
        },
    }
}

/// Parses an octal mode string of three or four digits (`"644"`, `"0644"`, `"2775"`).
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits_ok = (3..=4).contains(&text.len()) && text.bytes().all(|b| matches!(b, b'0'..=b'7'));
    if !digits_ok {
        return Err(format!(
            "mode {text:?} is not an octal mode such as \"0644\""
        ));
    }
    u32::from_str_radix(text, 8).map_err(|e| format!("mode {text:?}: {e}"))
}

/// [`parse_mode`] for modes a command sets (not restores): setuid and setgid are refused.
fn parse_settable_mode(text: &str) -> Result<u32, String> {
    let mode = parse_mode(text)?;
    if mode & 0o6000 != 0 {
        return Err(format!(
            "mode {text} sets the setuid or setgid bit, which the agent refuses"
        ));
    }
    Ok(mode)
}

struct Done {
    output: Value,
    snapshot: Option<Value>,
}

struct Failure {
    error: String,
    snapshot: Option<Value>,
}

impl Failure {
    fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            snapshot: None,
        }
    }
}

impl From<String> for Failure {
    fn from(error: String) -> Self {
        Self::new(error)
    }
}

impl From<&str> for Failure {
    fn from(error: &str) -> Self {
        Self::new(error)
    }
}

impl From<crate::paths::PathError> for Failure {
    fn from(e: crate::paths::PathError) -> Self {
        Self::new(e.to_string())
    }
}

fn parse_params<T: serde::de::DeserializeOwned>(kind: &str, params: &Value) -> Result<T, Failure> {
    serde_json::from_value(params.clone())
        .map_err(|e| Failure::new(format!("invalid params for {kind}: {e}")))
}

#[derive(Deserialize)]
struct WriteFileParams {
    path: String,
    content: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
struct ModeParams {
    path: String,
    mode: String,
}

#[derive(Deserialize)]
struct RestoreFileParams {
    path: String,
    snapshot: FileSnapshot,
}

/// A regular file found at a checked path.
struct Existing {
    content: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// What is at a checked path, without following a final symlink.
fn lstat(checked: &CheckedPath) -> Result<Option<fs::Metadata>, Failure> {
    match fs::symlink_metadata(&checked.resolved) {
        Ok(meta) if meta.file_type().is_symlink() => Err(Failure::new(format!(
            "path {} is a symbolic link",
            checked.requested
        ))),
        Ok(meta) => Ok(Some(meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::new(format!(
            "cannot inspect path {}: {e}",
            checked.requested
        ))),
    }
}

/// Reads the regular file at a checked path, if any, for a snapshot.
fn read_existing(checked: &CheckedPath) -> Result<Option<Existing>, Failure> {
    let Some(meta) = lstat(checked)? else {
        return Ok(None);
    };
    let req = &checked.requested;
    if !meta.is_file() {
        return Err(Failure::new(format!("path {req} is not a regular file")));
    }
    let too_large = || {
        Failure::new(format!(
            "path {req} is larger than {MAX_SNAPSHOT_BYTES} bytes, too large to snapshot"
        ))
    };
    if meta.len() > MAX_SNAPSHOT_BYTES {
        return Err(too_large());
    }
    let read_err = |e: io::Error| Failure::new(format!("cannot read path {req}: {e}"));
    let file = File::open(&checked.resolved).map_err(read_err)?;
    let opened = file.metadata().map_err(read_err)?;
    if opened.dev() != meta.dev() || opened.ino() != meta.ino() {
        return Err(Failure::new(format!(
            "path {req} changed while it was being read"
        )));
    }
    let mut content = Vec::new();
    file.take(MAX_SNAPSHOT_BYTES + 1)
        .read_to_end(&mut content)
        .map_err(read_err)?;
    if content.len() as u64 > MAX_SNAPSHOT_BYTES {
        return Err(too_large());
    }
    Ok(Some(Existing {
        content,
        mode: opened.mode() & 0o7777,
        uid: opened.uid(),
        gid: opened.gid(),
    }))
}

/// The file or directory at a checked path, which must exist.
fn existing_entry(checked: &CheckedPath) -> Result<fs::Metadata, Failure> {
    let req = &checked.requested;
    let meta = lstat(checked)?.ok_or_else(|| Failure::new(format!("path {req} does not exist")))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(Failure::new(format!(
            "path {req} is neither a regular file nor a directory"
        )));
    }
    Ok(meta)
}

/// Writes `content` with `mode` atomically at the checked path, keeping `owner` (the replaced
/// file's) when the agent may.
fn replace_file(
    checked: &CheckedPath,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let temp = TempFile::beside(&checked.resolved)?;
    if let Some((uid, gid)) = owner {
        if let Err(e) = temp.chown(uid, gid) {
            tracing::warn!(
                path = %checked.requested, uid, gid, error = %e,
                "cannot keep the owner of the replaced file"
            );
        }
    }
    temp.commit(content, mode)
}

fn write_file(params: &Value, allowed: &[PathBuf]) -> Result<Done, Failure> {
    let p: WriteFileParams = parse_params(WRITE_FILE, params)?;
    let mode = p.mode.as_deref().map(parse_settable_mode).transpose()?;
    let checked = check_path(&p.path, allowed)?;
    let existing = read_existing(&checked)?;
    let snapshot = match &existing {
        Some(old) => FileSnapshot {
            existed: true,
            content_base64: Some(BASE64.encode(&old.content)),
            mode: Some(format_mode(old.mode)),
        },
        None => FileSnapshot {
            existed: false,
            content_base64: None,
            mode: None,
        },
    };
    let snapshot = serde_json::to_value(&snapshot)
        .map_err(|e| Failure::new(format!("cannot encode the snapshot: {e}")))?;
    let final_mode = mode
        .or(existing.as_ref().map(|old| old.mode))
        .unwrap_or(DEFAULT_NEW_FILE_MODE);
    let owner = existing.as_ref().map(|old| (old.uid, old.gid));
    replace_file(&checked, p.content.as_bytes(), final_mode, owner).map_err(|e| Failure {
        error: format!("cannot write path {}: {e}", p.path),
        snapshot: Some(snapshot.clone()),
    })?;
    Ok(Done {
        output: json!({
            "path": p.path,
            "bytes": p.content.len(),
            "mode": format_mode(final_mode),
        }),
        snapshot: Some(snapshot),
    })
}

fn set_file_mode(params: &Value, allowed: &[PathBuf]) -> Result<Done, Failure> {
    let p: ModeParams = parse_params(SET_FILE_MODE, params)?;
    let mode = parse_settable_mode(&p.mode)?;
    let checked = check_path(&p.path, allowed)?;
    let meta = existing_entry(&checked)?;
    let snapshot = json!({ "existed": true, "mode": format_mode(meta.mode()) });
    fs::set_permissions(&checked.resolved, Permissions::from_mode(mode)).map_err(|e| Failure {
        error: format!("cannot change the mode of path {}: {e}", p.path),
        snapshot: Some(snapshot.clone()),
    })?;
    Ok(Done {
        output: json!({ "path": p.path, "mode": format_mode(mode) }),
        snapshot: Some(snapshot),
    })
}

fn restore_file(params: &Value, allowed: &[PathBuf]) -> Result<Done, Failure> {
    let p: RestoreFileParams = parse_params(RESTORE_FILE, params)?;
    // Decode the whole snapshot before touching anything.
    let wanted = if p.snapshot.existed {
        let content = p
            .snapshot
            .content_base64
            .as_deref()
            .ok_or("the snapshot of an existing file has no content_base64")?;
        let content = BASE64
            .decode(content)
            .map_err(|e| format!("snapshot content_base64 is not base64: {e}"))?;
        let mode = p
            .snapshot
            .mode
            .as_deref()
            .ok_or("the snapshot of an existing file has no mode")?;
        Some((content, parse_mode(mode)?))
    } else {
        None
    };
    let checked = check_path(&p.path, allowed)?;
    let current = lstat(&checked)?;
    if let Some(meta) = &current {
        if !meta.is_file() {
            return Err(Failure::new(format!(
                "path {} is not a regular file",
                p.path
            )));
        }
    }
    match wanted {
        None => {
            if current.is_none() {
                return Ok(Done {
                    output: json!({ "path": p.path, "restored": "absent" }),
                    snapshot: None,
                });
            }
            fs::remove_file(&checked.resolved)
                .map_err(|e| format!("cannot remove path {}: {e}", p.path))?;
            if let Some(dir) = checked.resolved.parent() {
                if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                    tracing::warn!(path = %p.path, error = %e, "cannot sync directory after removal");
                }
            }
            Ok(Done {
                output: json!({ "path": p.path, "restored": "removed" }),
                snapshot: None,
            })
        }
        Some((content, mode)) => {
            let owner = current.as_ref().map(|m| (m.uid(), m.gid()));
            replace_file(&checked, &content, mode, owner)
                .map_err(|e| format!("cannot write path {}: {e}", p.path))?;
            Ok(Done {
                output: json!({
                    "path": p.path,
                    "restored": "written",
                    "bytes": content.len(),
                    "mode": format_mode(mode),
                }),
                snapshot: None,
            })
        }
    }
}

fn restore_file_mode(params: &Value, allowed: &[PathBuf]) -> Result<Done, Failure> {
    let p: ModeParams = parse_params(RESTORE_FILE_MODE, params)?;
    let mode = parse_mode(&p.mode)?;
    let checked = check_path(&p.path, allowed)?;
    existing_entry(&checked)?;
    fs::set_permissions(&checked.resolved, Permissions::from_mode(mode))
        .map_err(|e| format!("cannot change the mode of path {}: {e}", p.path))?;
    Ok(Done {
        output: json!({ "path": p.path, "mode": format_mode(mode) }),
        snapshot: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    struct Fixture {
        _root: tempfile::TempDir,
        allowed: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let outside = root.path().join("outside");
        fs::create_dir_all(&allowed).unwrap();
        fs::create_dir_all(&outside).unwrap();
        Fixture {
            allowed,
            outside,
            _root: root,
        }
    }

    impl Fixture {
        fn dirs(&self) -> Vec<PathBuf> {
            vec![self.allowed.clone()]
        }
        fn run(&self, kind: &str, params: Value) -> Outcome {
            execute(kind, &params, &self.dirs())
        }
    }

    fn p(path: &Path) -> String {
        path.to_str().unwrap().to_string()
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn assert_failed(outcome: &Outcome, needle: &str) {
        assert_eq!(outcome.status, Status::Failed, "{outcome:?}");
        let error = outcome.error().unwrap();
        assert!(error.contains(needle), "{error:?} lacks {needle:?}");
    }

    #[test]
    fn write_file_new_then_restore_removes_it() {
        let f = fixture();
        let target = f.allowed.join("new.conf");
        let out = f.run(
            WRITE_FILE,
            json!({"path": p(&target), "content": "hello\n", "mode": "0640"}),
        );
        assert_eq!(out.status, Status::Succeeded, "{out:?}");
        assert_eq!(
            out.output,
            json!({"path": p(&target), "bytes": 6, "mode": "0640"})
        );
        assert_eq!(out.snapshot, Some(json!({"existed": false})));
        assert_eq!(fs::read_to_string(&target).unwrap(), "hello\n");
        assert_eq!(mode_of(&target), 0o640);
        // Only the file: no temporary file left behind.
        assert_eq!(fs::read_dir(&f.allowed).unwrap().count(), 1);

        let body = serde_json::to_value(&out).unwrap();
        assert_eq!(body["status"], "succeeded");

        let restored = f.run(
            RESTORE_FILE,
            json!({"path": p(&target), "snapshot": out.snapshot.clone().unwrap()}),
        );
        assert_eq!(restored.status, Status::Succeeded, "{restored:?}");
        assert_eq!(
            restored.output,
            json!({"path": p(&target), "restored": "removed"})
        );
        assert!(restored.snapshot.is_none());
        assert!(!target.exists());
        // Restoring again is harmless.
        let again = f.run(
            RESTORE_FILE,
            json!({"path": p(&target), "snapshot": {"existed": false}}),
        );
        assert_eq!(again.output["restored"], "absent");
    }

    #[test]
    fn write_file_existing_then_restore_puts_content_and_mode_back() {
        let f = fixture();
        let target = f.allowed.join("app.conf");
        let old: &[u8] = b"old\x00binary\xff content";
        fs::write(&target, old).unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o600)).unwrap();

        // No mode given: the existing mode is kept.
        let out = f.run(WRITE_FILE, json!({"path": p(&target), "content": "new"}));
        assert_eq!(out.status, Status::Succeeded, "{out:?}");
        assert_eq!(out.output["mode"], "0600");
        assert_eq!(
            out.snapshot,
            Some(json!({"existed": true, "content_base64": BASE64.encode(old), "mode": "0600"}))
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");

        // A second write with a mode changes it.
        let out2 = f.run(
            WRITE_FILE,
            json!({"path": p(&target), "content": "newer", "mode": "644"}),
        );
        assert_eq!(out2.output["mode"], "0644");
        assert_eq!(mode_of(&target), 0o644);

        let restored = f.run(
            RESTORE_FILE,
            json!({"path": p(&target), "snapshot": out.snapshot.unwrap()}),
        );
        assert_eq!(restored.status, Status::Succeeded, "{restored:?}");
        assert_eq!(restored.output["restored"], "written");
        assert_eq!(fs::read(&target).unwrap(), old);
        assert_eq!(mode_of(&target), 0o600);
        assert_eq!(fs::read_dir(&f.allowed).unwrap().count(), 1);
    }

    #[test]
    fn new_files_default_to_0644() {
        let f = fixture();
        let target = f.allowed.join("d.conf");
        let out = f.run(WRITE_FILE, json!({"path": p(&target), "content": ""}));
        assert_eq!(out.output["mode"], "0644");
        assert_eq!(mode_of(&target), 0o644);
    }

    #[test]
    fn set_file_mode_then_restore() {
        let f = fixture();
        let target = f.allowed.join("key.pem");
        fs::write(&target, "k").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        let out = f.run(SET_FILE_MODE, json!({"path": p(&target), "mode": "0600"}));
        assert_eq!(out.status, Status::Succeeded, "{out:?}");
        assert_eq!(out.output, json!({"path": p(&target), "mode": "0600"}));
        assert_eq!(out.snapshot, Some(json!({"existed": true, "mode": "0644"})));
        assert_eq!(mode_of(&target), 0o600);

        let back = f.run(
            RESTORE_FILE_MODE,
            json!({"path": p(&target), "mode": out.snapshot.unwrap()["mode"]}),
        );
        assert_eq!(back.status, Status::Succeeded, "{back:?}");
        assert_eq!(back.output, json!({"path": p(&target), "mode": "0644"}));
        assert_eq!(mode_of(&target), 0o644);
        assert_eq!(fs::read_to_string(&target).unwrap(), "k");
    }

    #[test]
    fn set_file_mode_on_a_missing_file_fails() {
        let f = fixture();
        let target = f.allowed.join("missing");
        let out = f.run(SET_FILE_MODE, json!({"path": p(&target), "mode": "0600"}));
        assert_failed(&out, "does not exist");
        assert!(out.snapshot.is_none());
        let out = f.run(
            RESTORE_FILE_MODE,
            json!({"path": p(&target), "mode": "0600"}),
        );
        assert_failed(&out, "does not exist");
        assert!(!target.exists());
    }

    #[test]
    fn refused_paths_change_nothing() {
        let f = fixture();
        let victim = f.outside.join("victim");
        fs::write(&victim, "untouched").unwrap();
        fs::set_permissions(&victim, Permissions::from_mode(0o644)).unwrap();
        symlink(&f.outside, f.allowed.join("escape")).unwrap();
        symlink(&victim, f.allowed.join("victim-link")).unwrap();

        let outside = p(&victim);
        let via_dir_link = p(&f.allowed.join("escape/victim"));
        let via_file_link = p(&f.allowed.join("victim-link"));
        let dotdot = format!("{}/../outside/victim", p(&f.allowed));
        let cases = [
            (
                outside.clone(),
                format!("path {outside} is outside allowed_paths"),
            ),
            (
                via_dir_link.clone(),
                format!("path {via_dir_link} is outside allowed_paths"),
            ),
            (via_file_link.clone(), "is a symbolic link".to_string()),
            (dotdot, "is not normalized".to_string()),
            ("relative/victim".to_string(), "is not absolute".to_string()),
        ];
        for (path, needle) in &cases {
            for (kind, params) in [
                (
                    WRITE_FILE,
                    json!({"path": path, "content": "pwned", "mode": "0777"}),
                ),
                (SET_FILE_MODE, json!({"path": path, "mode": "0777"})),
                (
                    RESTORE_FILE,
                    json!({"path": path, "snapshot": {"existed": false}}),
                ),
                (RESTORE_FILE_MODE, json!({"path": path, "mode": "0777"})),
            ] {
                let out = f.run(kind, params);
                assert_failed(&out, needle);
                assert!(
                    out.snapshot.is_none(),
                    "{kind} {path}: a refusal has no snapshot"
                );
            }
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(mode_of(&victim), 0o644);
        assert_eq!(fs::read_dir(&f.outside).unwrap().count(), 1);
        // Nothing was written inside either (only the two symlinks are there).
        assert_eq!(fs::read_dir(&f.allowed).unwrap().count(), 2);
    }

    #[test]
    fn empty_allowed_paths_allow_nothing() {
        let f = fixture();
        let target = p(&f.allowed.join("x"));
        let out = execute(WRITE_FILE, &json!({"path": target, "content": "x"}), &[]);
        assert_failed(&out, "outside allowed_paths");
        assert!(!f.allowed.join("x").exists());
    }

    #[test]
    fn unknown_command_type_fails() {
        let f = fixture();
        let out = f.run("reboot", json!({}));
        assert_eq!(out.status, Status::Failed);
        assert_eq!(out.output, json!({"error": "unknown command type reboot"}));
        assert!(out.snapshot.is_none());
        let body = serde_json::to_value(&out).unwrap();
        assert_eq!(
            body,
            json!({"status": "failed", "output": {"error": "unknown command type reboot"}})
        );
    }

    #[test]
    fn bad_params_and_modes_fail_before_anything_happens() {
        let f = fixture();
        let target = f.allowed.join("m");
        assert_failed(
            &f.run(WRITE_FILE, json!({"path": p(&target)})),
            "invalid params for write_file",
        );
        assert_failed(
            &f.run(WRITE_FILE, Value::Null),
            "invalid params for write_file",
        );
        for mode in ["644x", "0o644", "88", "12345", ""] {
            let out = f.run(
                WRITE_FILE,
                json!({"path": p(&target), "content": "x", "mode": mode}),
            );
            assert_failed(&out, "not an octal mode");
        }
        let out = f.run(
            WRITE_FILE,
            json!({"path": p(&target), "content": "x", "mode": "4755"}),
        );
        assert_failed(&out, "setuid or setgid");
        assert!(!target.exists());
        // Unknown params are ignored (the server may pass its whole target).
        let out = f.run(
            WRITE_FILE,
            json!({"path": p(&target), "content": "x", "agent_id": "agt_1"}),
        );
        assert_eq!(out.status, Status::Succeeded, "{out:?}");
    }

    #[test]
    fn directories_and_bad_snapshots_are_refused() {
        let f = fixture();
        let dir = f.allowed.join("d");
        fs::create_dir(&dir).unwrap();
        assert_failed(
            &f.run(WRITE_FILE, json!({"path": p(&dir), "content": "x"})),
            "not a regular file",
        );
        let target = f.allowed.join("t");
        assert_failed(
            &f.run(
                RESTORE_FILE,
                json!({"path": p(&target), "snapshot": {"existed": true, "mode": "0644"}}),
            ),
            "no content_base64",
        );
        assert_failed(
            &f.run(
                RESTORE_FILE,
                json!({"path": p(&target), "snapshot": {"existed": true, "content_base64": "!!", "mode": "0644"}}),
            ),
            "not base64",
        );
        assert!(!target.exists());
    }

    #[test]
    fn too_large_files_are_not_replaced() {
        let f = fixture();
        let target = f.allowed.join("big");
        let big = vec![b'a'; (MAX_SNAPSHOT_BYTES + 1) as usize];
        fs::write(&target, &big).unwrap();
        let out = f.run(WRITE_FILE, json!({"path": p(&target), "content": "small"}));
        assert_failed(&out, "too large to snapshot");
        assert_eq!(fs::read(&target).unwrap().len(), big.len());
    }

    #[test]
    fn commands_parse_from_json() {
        let c = Command::from_json(&json!({"id": "cmd_1", "type": "write_file", "params": {"path": "/x", "content": "SECRET"}})).unwrap();
        assert_eq!(c.kind, "write_file");
        assert_eq!(c.path(), Some("/x"));
        assert!(!format!("{c:?}").contains("SECRET"));
        let c = Command::from_json(&json!({"id": "cmd_2"})).unwrap();
        assert_eq!(c.kind, "");
        assert!(Command::from_json(&json!({"type": "x"})).is_err());
        assert!(Command::from_json(&json!({"id": "../x"})).is_err());
    }
}
