//! Temporary space. Each open `Store` handle (one per ferry process, normally) gets its own
//! directory `tmp/session-…/`, flock-ed for as long as the handle lives. Everything the
//! process stages there (blobs being written, files about to replace `index.json` or a
//! cache entry, extracted root filesystems, RUN upper dirs, snapshots being extracted) dies
//! with it: the kernel drops the lock when the process ends, however it ends, and the next
//! `Store::open` removes every session directory whose lock it can take. A session whose
//! owner still runs stays locked and is never touched.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::lock::LockGuard;
use super::{io_err, Result};

pub(super) const SESSION_PREFIX: &str = "session-";

/// One process's temporary directory, removed when the last handle on it drops.
#[derive(Debug)]
pub(super) struct Session {
    dir: PathBuf,
    /// Holds the flock that tells cleaners this session is alive.
    _lock: File,
}

impl Session {
    /// Create a session directory under `tmp_root`. `creating_lock` (the store's `tmp` lock)
    /// is held shared while the directory exists unlocked, so a cleaner (which holds it
    /// exclusively) never takes a directory that is being born for a dead one's.
    pub(super) fn create(tmp_root: &Path, creating_lock: &Path) -> Result<Session> {
        let _creating = LockGuard::acquire(creating_lock, false)?;
        let dir = tempfile::Builder::new()
            .prefix(SESSION_PREFIX)
            .tempdir_in(tmp_root)
            .map_err(io_err("create a temporary directory in", tmp_root))?
            .keep();
        let lock = File::open(&dir).map_err(io_err("open", &dir))?;
        lock.lock().map_err(io_err("lock", &dir))?;
        Ok(Session { dir, _lock: lock })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.dir) {
            // The next open removes it once this process is gone.
            tracing::debug!(dir = %self.dir.display(), error = %e, "cannot remove the temporary directory");
        }
    }
}

/// Remove the session directories of processes that are gone, and temp files that writers
/// of earlier ferry versions left directly under `tmp_root` (each one locked while live).
/// Call with the store's `tmp` lock held exclusively.
pub(super) fn sweep(tmp_root: &Path, legacy_file_prefix: &str) {
    let Ok(entries) = fs::read_dir(tmp_root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let owned = (is_dir && name.starts_with(SESSION_PREFIX))
            || (!is_dir && name.starts_with(legacy_file_prefix));
        if !owned {
            continue;
        }
        let Ok(f) = File::open(&path) else { continue };
        // A live owner holds the lock (our own session included: flock conflicts between
        // two opens of one directory even in one process).
        if f.try_lock().is_err() {
            continue;
        }
        tracing::debug!(path = %path.display(), "removing what a dead ferry process left");
        let removed = if is_dir { remove_tree(&path) } else { fs::remove_file(&path) };
        if let Err(e) = removed {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale temporary file");
        }
    }
}

/// `remove_dir_all` that also gets through directories without write or search permission
/// (an overlay work dir is left mode 000; a RUN step may `chmod 555` what it made).
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open_up(dir);
            fs::remove_dir_all(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Give the owner full access to every directory under `dir` (not following symlinks).
fn open_up(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            open_up(&entry.path());
        }
    }
}
