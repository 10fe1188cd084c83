//! Writing a blob: into a temp file in the process's session under `tmp/`, hashed on the
//! way, then fsynced, verified and renamed into `blobs/sha256/<hex>`. A reader never sees
//! half a blob, and a writer that dies leaves only a temp file that the next `Store::open`
//! removes.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use tempfile::NamedTempFile;

use super::{io_err, sync_dir, Result, Store, StoreError};
use crate::digest::{Digest, Hasher};

/// Also the prefix of the temp files earlier versions wrote directly under `tmp/` (each
/// flock-ed by its writer), which `Store::open` still cleans.
pub(super) const TMP_PREFIX: &str = "blob-";

/// A blob being written. `commit` makes it visible; dropping it (or `abort`) removes it.
pub struct BlobWriter {
    store: Store,
    out: BufWriter<NamedTempFile>,
    hasher: Hasher,
}

impl BlobWriter {
    pub(super) fn new(store: &Store) -> Result<BlobWriter> {
        // In this process's session directory: if the process dies, the next open removes
        // the whole session, this file with it.
        let dir = store.tmp_dir();
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(&dir)
            .map_err(io_err("create a temp file in", &dir))?;
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
