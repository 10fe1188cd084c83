//! The content store (DESIGN.md section 5): an OCI image layout that skopeo and umoci read
//! as it is, shared by every ferry process of the user.
//!
//! ```text
//! oci-layout, index.json   the layout; index.json is also the table of local names (refs)
//! blobs/sha256/<hex>       every blob: written to tmp/, fsynced, verified, renamed
//! tmp/session-…/           one per process: whatever it stages (see `tmp.rs`)
//! locks/                   named lock files (`Store::lock`)
//! cache/, snapshots/ …     other modules' state, under `Store::state_dir`
//! ```
//!
//! Why `index.json` is the ref table (and there is no separate `refs/` directory): one file
//! replaced atomically cannot disagree with itself after a crash, and skopeo and umoci see
//! every local name without a second step. See `refs.rs` for the naming scheme.
//!
//! Concurrency: blobs are immutable and appear by rename, so readers need no lock. Changes
//! to `index.json` take the `index` lock. Operations that write blobs before naming them
//! (pull, load, build) hold `gc_guard()` (shared) so that a concurrent prune, which takes it
//! exclusively, never deletes a blob between its write and its ref.
//!
//! Crashes: every file a reader trusts (a blob, `index.json`, a cache entry) appears by an
//! atomic rename of a complete, fsynced temp file, and temp files live in the writer's
//! session directory, which the next `Store::open` removes once the writer is gone.

mod archive;
mod blob;
mod gc;
mod image;
mod lock;
mod refs;
mod tmp;
mod verify;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::digest::Digest;
use crate::oci::{self, Descriptor};

pub use archive::{ArchiveFormat, ArchiveImage, LoadedImage};
pub use blob::BlobWriter;
pub use gc::{PruneMode, PruneReport, RemoveReport};
pub use image::{choose_platform, display_name, Image, ImageSummary, Resolved};
pub use lock::LockGuard;
pub use tmp::remove_tree;
pub use verify::{CorruptBlob, MissingBlob, VerifyReport};

/// Everything that can go wrong in the store, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {digest} is not in the store")]
    BlobNotFound { digest: Digest },
    #[error("content does not match its digest: expected {expected}, got {actual} ({size} bytes); it was not stored")]
    DigestMismatch { expected: Digest, actual: Digest, size: u64 },
    #[error("{what} is not valid: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{} is not an OCI image layout ferry can use: {reason}", root.display())]
    NotALayout { root: PathBuf, reason: String },
    #[error("invalid image name {name:?}: {reason}")]
    InvalidRefName { name: String, reason: String },
    #[error("no image {name:?} in the store (`ferry images` lists them; `ferry pull {name}` fetches one)")]
    ImageNotFound { name: String },
    #[error("{prefix:?} matches several images ({}); give more of the digest", matches.join(", "))]
    Ambiguous { prefix: String, matches: Vec<String> },
    #[error("image {id} is named {} ; untag them one by one, or use --force to remove them all", names.join(", "))]
    ManyNames { id: String, names: Vec<String> },
    #[error("cannot delete image {name} ({id}): {} built on it; remove {} first, or use --force", dependents.join(", "), if dependents.len() == 1 { "it" } else { "them" })]
    HasDependents { name: String, id: String, dependents: Vec<String> },
    #[error("{kind} {digest} has media type {media_type:?}, which ferry does not read")]
    UnsupportedMediaType { kind: &'static str, digest: Digest, media_type: String },
    #[error("no image for platform {wanted} in index {digest} (it has {})", available.join(", "))]
    NoMatchingPlatform { digest: Digest, wanted: String, available: Vec<String> },
    #[error("archive {}: {reason}", path.display())]
    Archive { path: PathBuf, reason: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { action, path, source }
}

/// A handle on a store directory. Cheap to clone; every method is safe to call from
/// several threads and processes at once.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// This handle's temporary directory (shared by its clones); None when the store is
    /// read-only to us, which is fine for commands that only read.
    session: Option<Arc<tmp::Session>>,
}

const OCI_LAYOUT_FILE: &str = "oci-layout";
const INDEX_FILE: &str = "index.json";

impl Store {
    /// Open the store at `root`, creating the layout if it is not there yet.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root: PathBuf = root.into();
        let tmp_root = root.join("tmp");
        for dir in [root.join("blobs/sha256"), tmp_root.clone(), root.join("locks")] {
            fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        }
        let session = match tmp::Session::create(&tmp_root, &lock_path_in(&root, "tmp")) {
            Ok(s) => Some(Arc::new(s)),
            Err(StoreError::Io { source, path, .. }) if is_read_only(&source) => {
                tracing::debug!(path = %path.display(), "store is read-only: {source}");
                None
            }
            Err(e) => return Err(e),
        };
        let store = Store { root, session };
        store.ensure_layout()?;
        store.clean_stale_tmp();
        Ok(store)
    }

    /// `$FERRY_STORE`, else `$XDG_DATA_HOME/ferry`, else `~/.local/share/ferry`.
    pub fn default_root() -> Result<PathBuf> {
        root_from_env(|k| std::env::var_os(k))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A directory for another module's state (`cache`, `snapshots`, …), created on demand.
    pub fn state_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(dir)
    }

    /// Where this process stages temporary files and directories: inside the store (same
    /// filesystem as the blobs, so a rename into place is atomic), removed when the process
    /// is gone, however it ended.
    pub fn tmp_dir(&self) -> PathBuf {
        match &self.session {
            Some(s) => s.dir().to_path_buf(),
            None => self.root.join("tmp"),
        }
    }

    fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    fn ensure_layout(&self) -> Result<()> {
        let layout = self.root.join(OCI_LAYOUT_FILE);
        match fs::read(&layout) {
            Ok(bytes) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::NotALayout {
                        root: self.root.clone(),
                        reason: format!("oci-layout is not JSON: {e}"),
                    })?;
                if v.get("imageLayoutVersion").and_then(|v| v.as_str())
                    != Some(oci::media_type::OCI_LAYOUT_VERSION)
                {
                    return Err(StoreError::NotALayout {
                        root: self.root.clone(),
                        reason: format!("unsupported oci-layout {v}"),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let body = serde_json::json!({
                    "imageLayoutVersion": oci::media_type::OCI_LAYOUT_VERSION
                });
                self.atomic_write(&layout, body.to_string().as_bytes())?;
            }
            Err(e) => return Err(io_err("read", &layout)(e)),
        }
        if !self.index_path().exists() {
            let _g = self.lock("index")?;
            if !self.index_path().exists() {
                self.write_index(&oci::ImageIndex::new_oci())?;
            }
        }
        Ok(())
    }

    // ---- blobs ----

    /// Where blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The size of a stored blob, or None if it is not stored.
    pub fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::BlobNotFound { digest: digest.clone() }
            } else {
                io_err("open", &path)(e)
            }
        })
    }

    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut f = self.open_blob(digest)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io_err("read", &self.blob_path(digest)))?;
        Ok(buf)
    }

    /// A writer for a new blob; `commit` makes it visible, dropping it discards it.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        BlobWriter::new(self)
    }

    /// Store `bytes` as a blob (verified against `expected` if given); its digest.
    pub fn put_blob_bytes(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if let Some(exp) = expected {
            if *exp != digest {
                return Err(StoreError::DigestMismatch {
                    expected: exp.clone(),
                    actual: digest,
                    size: bytes.len() as u64,
                });
            }
        }
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut w = self.blob_writer()?;
        w.write_all(bytes).map_err(io_err("write", &self.tmp_dir()))?;
        let (d, _) = w.commit(Some(&digest))?;
        Ok(d)
    }

    /// Copy a stream into the store; digest and size of what was stored.
    pub fn put_blob_reader(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64)> {
        if let Some(d) = expected {
            if self.has_blob(d) {
                // Drain nothing: the caller chose to hand us the stream, but the content is
                // already stored and immutable.
                if let Some(size) = self.blob_size(d)? {
                    return Ok((d.clone(), size));
                }
            }
        }
        let mut w = self.blob_writer()?;
        io::copy(&mut reader, &mut w).map_err(io_err("write blob from", &self.tmp_dir()))?;
        w.commit(expected)
    }

    /// Serialise `value` as compact JSON and store it; a descriptor of the stored bytes.
    pub fn put_json<T: Serialize>(&self, media_type: &str, value: &T) -> Result<Descriptor> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Invalid {
            what: format!("a {media_type} document"),
            reason: e.to_string(),
        })?;
        self.put_blob_bytes(&bytes, None)?;
        Ok(Descriptor::of_bytes(media_type, &bytes))
    }

    /// Read and parse a JSON blob.
    pub fn read_json<T: DeserializeOwned>(&self, digest: &Digest) -> Result<T> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
            what: format!("blob {digest}"),
            reason: e.to_string(),
        })
    }

    // ---- locks ----

    /// An exclusive named lock (`locks/<name>.lock`), held until the guard drops.
    pub fn lock(&self, name: &str) -> Result<LockGuard> {
        LockGuard::acquire(&self.lock_path(name), true)
    }

    /// An exclusive named lock if nobody holds it now; None (without waiting) otherwise.
    pub fn try_lock(&self, name: &str) -> Result<Option<LockGuard>> {
        match LockGuard::try_acquire(&self.lock_path(name), true) {
            Ok(guard) => Ok(Some(guard)),
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::WouldBlock =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A shared named lock: many holders at once, none while someone holds it exclusively.
    pub fn lock_shared(&self, name: &str) -> Result<LockGuard> {
        LockGuard::acquire(&self.lock_path(name), false)
    }

    /// Held (shared) by any operation that writes blobs before it names them, so that prune
    /// (which takes it exclusively) cannot remove them in between. Do not nest with prune.
    pub fn gc_guard(&self) -> Result<LockGuard> {
        self.lock_shared("gc")
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        lock_path_in(&self.root, name)
    }

    /// Remove what processes that died left in `tmp/` (a live one holds a lock on its
    /// session). Skipped while another process cleans, or creates a session.
    fn clean_stale_tmp(&self) {
        let Ok(_guard) = LockGuard::try_acquire(&self.lock_path("tmp"), true) else {
            return;
        };
        tmp::sweep(&self.root.join("tmp"), blob::TMP_PREFIX);
    }

    /// Replace the file at `path` (inside the store) so that readers see the old or the new
    /// content, never a mix, and a crash leaves no partial file anywhere but in this
    /// process's session: the temp file is written there, fsynced, renamed over `path`, and
    /// the directory fsynced.
    pub fn atomic_write(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("file-")
            .tempfile_in(&tmp_dir)
            .map_err(io_err("create a temp file in", &tmp_dir))?;
        tmp.write_all(bytes).map_err(io_err("write", tmp.path()))?;
        tmp.as_file().sync_all().map_err(io_err("sync", tmp.path()))?;
        match tmp.persist(path) {
            Ok(_) => {}
            // `path` is on another filesystem (a state directory symlinked elsewhere).
            Err(e) if e.error.raw_os_error() == Some(libc::EXDEV) => {
                return atomic_write(path, bytes);
            }
            Err(e) => return Err(io_err("replace", path)(e.error)),
        }
        sync_dir(dir);
        Ok(())
    }
}

fn is_read_only(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS)
}

/// The file of the named lock `name` in the store at `root`.
fn lock_path_in(root: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    root.join("locks").join(format!("{safe}.lock"))
}

/// The default-root rule over any environment (so it can be tested without touching the
/// process environment).
fn root_from_env(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let non_empty = |k: &str| var(k).filter(|v| !v.is_empty());
    if let Some(p) = non_empty("FERRY_STORE") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = non_empty("XDG_DATA_HOME") {
        return Ok(PathBuf::from(p).join("ferry"));
    }
    match non_empty("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/ferry")),
        None => Err(StoreError::Invalid {
            what: "the environment".to_string(),
            reason: "none of FERRY_STORE, XDG_DATA_HOME or HOME is set; pass --store DIR"
                .to_string(),
        }),
    }
}

/// Write a small file so that readers see the old or the new content, never a mix:
/// temp file in the same directory, fsync, rename, fsync the directory. (Inside a store,
/// `Store::atomic_write` also keeps a crash from leaving the temp file behind.)
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_err("create a temp file in", dir))?;
    tmp.write_all(bytes).map_err(io_err("write", tmp.path()))?;
    tmp.as_file().sync_all().map_err(io_err("sync", tmp.path()))?;
    tmp.persist(path).map_err(|e| io_err("replace", path)(e.error))?;
    sync_dir(dir);
    Ok(())
}

/// Make a rename durable. Failure is not fatal (some filesystems refuse to sync a
/// directory); the rename itself already happened atomically.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests;
