//! Writing a blob: into a locked temp file under `tmp/`, hashed on the way, then fsynced,
//! verified and renamed into `blobs/sha256/<hex>`. A reader never sees half a blob, and a
//! writer that dies leaves only a temp file that the next `Store::open` removes.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use tempfile::NamedTempFile;

use super::lock::LockGuard;
use super::{io_err, sync_dir, Result, Store, StoreError};
use crate::digest::{Digest, Hasher};

pub(super) const TMP_PREFIX: &str = "blob-";

/// A blob being written. `commit` makes it visible; dropping it (or `abort`) removes it.
pub struct BlobWriter {
    store: Store,
    out: BufWriter<NamedTempFile>,
    hasher: Hasher,
}

impl BlobWriter {
    pub(super) fn new(store: &Store) -> Result<BlobWriter> {
        let dir = store.tmp_dir();
        // The shared `tmp` lock closes the window between creating the file and locking it,
        // in which a cleaner could otherwise take the file for a dead writer's.
        let _creating = LockGuard::acquire(&store.lock_path("tmp"), false)?;
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&dir)
            .map_err(io_err("create a temp file in", &dir))?;
        tmp.as_file().lock().map_err(io_err("lock", tmp.path()))?;
        Ok(BlobWriter {
            store: store.clone(),
            out: BufWriter::with_capacity(256 * 1024, tmp),
            hasher: Hasher::new(),
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Digest of the bytes written so far, without finishing.
    pub fn digest_so_far(&self) -> Digest {
        self.hasher.clone().finish().0
    }

    /// Flush, fsync and verify (against `expected` if given), then rename into place.
    /// On a mismatch nothing is stored and the error names both digests.
    pub fn commit(self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let BlobWriter { store, out, hasher } = self;
        let (digest, size) = hasher.finish();
        let tmp = out.into_inner().map_err(|e| {
            let (source, w) = e.into_parts();
            StoreError::Io { action: "write", path: w.get_ref().path().to_path_buf(), source }
        })?;
        if let Some(exp) = expected {
            if *exp != digest {
                return Err(StoreError::DigestMismatch {
                    expected: exp.clone(),
                    actual: digest,
                    size,
                });
            }
        }
        let dest = store.blob_path(&digest);
        if dest.is_file() {
            // Same digest, same bytes: someone else stored it first.
            return Ok((digest, size));
        }
        tmp.as_file().sync_all().map_err(io_err("sync", tmp.path()))?;
        set_read_only(tmp.as_file());
        tmp.persist(&dest).map_err(|e| io_err("store blob", &dest)(e.error))?;
        if let Some(dir) = dest.parent() {
            sync_dir(dir);
        }
        tracing::debug!(%digest, size, "stored blob");
        Ok((digest, size))
    }

    /// Discard what was written.
    pub fn abort(self) {}
}

/// Blobs are immutable; make accidental writes by other tools fail loudly.
fn set_read_only(f: &File) {
    use std::os::unix::fs::PermissionsExt;
    let _ = f.set_permissions(std::fs::Permissions::from_mode(0o444));
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
