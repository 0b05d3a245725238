//! Atomic file replacement: a temporary file in the target's directory, written, synced,
//! chmod-ed, then renamed over the target, and the directory synced.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file next to `target`, created with mode 0600 (so nothing can read the content
/// before its final mode is set). Dropped without [`TempFile::commit`], it is removed.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl TempFile {
    /// Creates the temporary file in `target`'s directory.
    pub(crate) fn beside(target: &Path) -> io::Result<Self> {
        let dir = parent_dir(target)?;
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path names no file"))?
            .to_string_lossy()
            .into_owned();
        let mut last_err = None;
        for _ in 0..16 {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(
                ".{name}.nexplane-{}-{n}-{nanos:x}.tmp",
                std::process::id()
            ));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        target: target.to_path_buf(),
                        file: Some(file),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("cannot create a temporary file")))
    }

    /// Gives the file the owner `uid:gid` (used to keep the owner of a replaced file).
    pub(crate) fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        match &self.file {
            Some(file) => std::os::unix::fs::fchown(file, Some(uid), Some(gid)),
            None => Err(io::Error::other("temporary file already closed")),
        }
    }

    /// Writes `contents`, sets `mode`, syncs, renames over the target and syncs the directory
    /// (the last sync is best effort: the rename has happened by then).
    pub(crate) fn commit(mut self, contents: &[u8], mode: u32) -> io::Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("temporary file already closed"))?;
        file.write_all(contents)?;
        file.set_permissions(Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.path, &self.target)?;
        // Renamed: nothing left to clean up.
        self.path = PathBuf::new();
        if let Ok(dir) = parent_dir(&self.target) {
            if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot sync directory after rename");
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn parent_dir(target: &Path) -> io::Result<PathBuf> {
    match target.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(PathBuf::from(".")),
        Some(p) => Ok(p.to_path_buf()),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no parent directory",
        )),
    }
}

/// The permission bits of a mode as the API writes them: four octal digits, e.g. `0644`.
pub(crate) fn format_mode(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn commit_replaces_atomically_and_sets_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.conf");
        std::fs::write(&target, "old").unwrap();
        let tmp = TempFile::beside(&target).unwrap();
        tmp.commit(b"new", 0o640).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn dropped_temp_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.conf");
        let tmp = TempFile::beside(&target).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(tmp);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(!target.exists());
    }

    #[test]
    fn modes_are_four_octal_digits() {
        assert_eq!(format_mode(0o100644), "0644");
        assert_eq!(format_mode(0o4755), "4755");
        assert_eq!(format_mode(0o7), "0007");
    }
}
