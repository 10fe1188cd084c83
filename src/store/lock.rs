//! Named file locks (flock): released by the kernel when the holder exits, so a ferry
//! process killed while holding one never blocks the next.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::{io_err, Result, StoreError};

/// A held lock; dropping it releases the lock.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
    path: PathBuf,
}

impl LockGuard {
    pub(super) fn acquire(path: &Path, exclusive: bool) -> Result<LockGuard> {
        let file = open_lock_file(path)?;
        tracing::trace!(path = %path.display(), exclusive, "waiting for lock");
        let r = if exclusive { file.lock() } else { file.lock_shared() };
        r.map_err(io_err("lock", path))?;
        Ok(LockGuard { file, path: path.to_path_buf() })
    }

    /// The lock if it is free now; an error (without waiting) if someone holds it.
    pub(super) fn try_acquire(path: &Path, exclusive: bool) -> Result<LockGuard> {
        let file = open_lock_file(path)?;
        let r = if exclusive { file.try_lock() } else { file.try_lock_shared() };
        match r {
            Ok(()) => Ok(LockGuard { file, path: path.to_path_buf() }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Io {
                action: "lock",
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", path)(e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open lock file", path))
}
