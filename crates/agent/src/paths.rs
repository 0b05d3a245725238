//! The `allowed_paths` check (api.md §7.3): a command may touch a path only when it is
//! absolute, normalized, and strictly below one of the configured directories — both as
//! written and after resolving every symlink in its parent directory, so a symlink inside an
//! allowed directory cannot lead outside it. The last component itself is never followed:
//! commands refuse a path that is a symlink.

use std::path::{Path, PathBuf};

/// Why a path was refused. The `Display` text is what the failed result's `error` carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("path {0} is not absolute")]
    NotAbsolute(String),
    /// Has `.`, `..`, `//`, a trailing `/` or a NUL byte.
    #[error("path {0} is not normalized (no `.` or `..` components, `//` or trailing `/`)")]
    NotNormalized(String),
    /// The root directory itself.
    #[error("path {0} names no file")]
    NoFileName(String),
    /// Not below any allowed directory (as written or once symlinks are resolved).
    #[error("path {0} is outside allowed_paths")]
    OutsideAllowed(String),
    /// The parent directory does not exist or cannot be resolved.
    #[error("path {path}: cannot resolve its parent directory: {reason}")]
    Parent {
        /// The requested path.
        path: String,
        /// The IO error.
        reason: String,
    },
}

/// A path that passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPath {
    /// The path as the command gave it.
    pub requested: String,
    /// The parent directory with symlinks resolved, joined with the file name: what the
    /// command operates on.
    pub resolved: PathBuf,
}

/// True for an absolute path in normal form: it starts with `/`, has no `.` or `..`
/// component, no empty component (`//`), no trailing `/` (except the root itself) and no NUL.
pub fn is_normalized_absolute(path: &str) -> bool {
    if !path.starts_with('/') || path.contains('\0') {
        return false;
    }
    if path == "/" {
        return true;
    }
    path[1..]
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Checks `requested` against `allowed` (directories, as in the configuration).
pub fn check_path(requested: &str, allowed: &[PathBuf]) -> Result<CheckedPath, PathError> {
    let owned = || requested.to_string();
    if !requested.starts_with('/') {
        return Err(PathError::NotAbsolute(owned()));
    }
    if !is_normalized_absolute(requested) {
        return Err(PathError::NotNormalized(owned()));
    }
    let path = Path::new(requested);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(PathError::NoFileName(owned()));
    };
    // Each allowed directory as written and, when it exists, resolved.
    let allowed_forms: Vec<(PathBuf, Option<PathBuf>)> = allowed
        .iter()
        .map(|dir| (dir.clone(), std::fs::canonicalize(dir).ok()))
        .collect();

    // As written: strictly below an allowed directory (component-wise comparison).
    let lexically_inside = allowed_forms.iter().any(|(dir, canonical)| {
        parent.starts_with(dir) || canonical.as_ref().is_some_and(|c| parent.starts_with(c))
    });
    if !lexically_inside {
        return Err(PathError::OutsideAllowed(owned()));
    }

    // Resolved: the parent's real location must still be below a resolved allowed directory.
    let real_parent = std::fs::canonicalize(parent).map_err(|e| PathError::Parent {
        path: owned(),
        reason: e.to_string(),
    })?;
    let really_inside = allowed_forms
        .iter()
        .filter_map(|(_, canonical)| canonical.as_ref())
        .any(|c| real_parent.starts_with(c));
    if !really_inside {
        return Err(PathError::OutsideAllowed(owned()));
    }
    Ok(CheckedPath {
        requested: owned(),
        resolved: real_parent.join(name),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn s(p: &Path) -> String {
        p.to_str().unwrap().to_string()
    }

    #[test]
    fn normal_form() {
        assert!(is_normalized_absolute("/etc/app/a.conf"));
        assert!(is_normalized_absolute("/"));
        for bad in [
            "etc/app",
            "",
            "./x",
            "/etc//app",
            "/etc/app/",
            "/etc/./app",
            "/etc/../root",
            "/..",
            "/etc/app/..",
            "/etc/a\0b",
        ] {
            assert!(!is_normalized_absolute(bad), "{bad:?}");
        }
    }

    #[test]
    fn inside_is_allowed_and_resolved() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        let dirs = vec![allowed.clone()];
        let target = allowed.join("sub/a.conf");
        let ok = check_path(&s(&target), &dirs).unwrap();
        assert_eq!(ok.requested, s(&target));
        assert_eq!(
            ok.resolved,
            std::fs::canonicalize(allowed.join("sub"))
                .unwrap()
                .join("a.conf")
        );
        check_path(&s(&allowed.join("b")), &dirs).unwrap();
    }

    #[test]
    fn outside_relative_and_dotdot_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let other = root.path().join("allowedness");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let dirs = vec![allowed.clone()];

        let outside = s(&other.join("x"));
        assert_eq!(
            check_path(&outside, &dirs).unwrap_err().to_string(),
            format!("path {outside} is outside allowed_paths")
        );
        // The allowed directory itself is not a file below it.
        assert!(matches!(
            check_path(&s(&allowed), &dirs),
            Err(PathError::OutsideAllowed(_))
        ));
        assert!(matches!(
            check_path("/etc/passwd", &dirs),
            Err(PathError::OutsideAllowed(_))
        ));
        assert!(matches!(
            check_path("/etc/passwd", &[]),
            Err(PathError::OutsideAllowed(_))
        ));
        assert!(matches!(
            check_path("relative/a.conf", &dirs),
            Err(PathError::NotAbsolute(_))
        ));
        let dotdot = format!("{}/../allowedness/x", s(&allowed));
        assert!(matches!(
            check_path(&dotdot, &dirs),
            Err(PathError::NotNormalized(_))
        ));
        assert!(matches!(
            check_path("/", &dirs),
            Err(PathError::NoFileName(_))
        ));
        let missing_parent = s(&allowed.join("nope/x"));
        assert!(matches!(
            check_path(&missing_parent, &dirs),
            Err(PathError::Parent { .. })
        ));
    }

    #[test]
    fn a_symlink_cannot_escape() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let secret = root.path().join("secret");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&secret).unwrap();
        symlink(&secret, allowed.join("link")).unwrap();
        let dirs = vec![allowed.clone()];
        let escaping = s(&allowed.join("link/x"));
        assert_eq!(
            check_path(&escaping, &dirs).unwrap_err(),
            PathError::OutsideAllowed(escaping.clone())
        );
    }

    #[test]
    fn a_symlinked_allowed_directory_works_both_ways() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        let alias = root.path().join("alias");
        symlink(&real, &alias).unwrap();
        let dirs = vec![alias.clone()];
        let via_alias = check_path(&s(&alias.join("a")), &dirs).unwrap();
        let via_real = check_path(&s(&real.join("a")), &dirs).unwrap();
        assert_eq!(via_alias.resolved, via_real.resolved);
    }
}
