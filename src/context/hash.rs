//! Content digests of selections, for COPY/ADD cache keys (DESIGN.md section 6).
//!
//! The digest is a Merkle hash of exactly the selected entries: per file its name, type, mode
//! (with setuid/setgid/sticky), owner, size and content sha256; per symlink its target; per
//! directory the hashes of its children sorted by name. Not mtimes, not anything outside the
//! selection. File contents are hashed in parallel, and a [`StatCache`] remembers
//! `(path, size, mtime, ctime, inode, device) -> content digest` across runs so that an
//! unchanged context costs a stat walk, not a read.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::tree::{Entry, EntryKind, FileStat, Selection};
use super::{ContextError, Result};
use crate::digest::{Digest, Hasher};

/// A file modified (or its inode changed) this close to the start of hashing is not cached: a
/// later write within the same timestamp tick (coarse kernel clocks; 1-2 s on some
/// filesystems) would leave size and times unchanged and the cache would serve stale content.
/// Git calls this "racily clean". ctime counts as well as mtime because tools such as `tar`
/// and `rsync -t` set mtimes back after writing.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

const CACHE_FORMAT_VERSION: u32 = 1;

/// What the cache remembers about one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct CachedFile {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
    digest: Digest,
}

impl CachedFile {
    fn matches(&self, size: u64, stat: &FileStat) -> bool {
        self.size == size
            && self.mtime_ns == stat.mtime_ns
            && self.ctime_ns == stat.ctime_ns
            && self.ino == stat.ino
            && self.dev == stat.dev
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    files: BTreeMap<String, CachedFile>,
}

/// How much work content hashing did: files read and hashed, files served from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CacheStats {
    pub files_hashed: u64,
    pub files_from_cache: u64,
    pub bytes_hashed: u64,
}

/// Content digests of files keyed by their stat identity, persisted between runs.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    /// Where the file being saved is staged (default: beside `path`).
    staging_dir: Option<PathBuf>,
    files: Mutex<HashMap<PathBuf, CachedFile>>,
    dirty: AtomicBool,
    files_hashed: AtomicU64,
    files_from_cache: AtomicU64,
    bytes_hashed: AtomicU64,
}

impl StatCache {
    /// An empty cache that lives only in memory.
    pub fn in_memory() -> StatCache {
        StatCache::default()
    }

    /// Load the cache saved at `path`. A missing file is an empty cache; an unreadable or
    /// corrupt one is logged and replaced (a cache must never fail a build).
    pub fn load(path: &Path) -> StatCache {
        let files = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<CacheFile>(&bytes) {
                Ok(file) if file.version == CACHE_FORMAT_VERSION => {
                    file.files.into_iter().map(|(p, f)| (PathBuf::from(p), f)).collect()
                }
                Ok(file) => {
                    tracing::debug!(path = %path.display(), version = file.version, "stat cache of another format version, starting afresh");
                    HashMap::new()
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "stat cache is corrupt, starting afresh");
                    HashMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the stat cache, starting afresh");
                HashMap::new()
            }
        };
        StatCache {
            path: Some(path.to_path_buf()),
            files: Mutex::new(files),
            ..StatCache::default()
        }
    }

    /// Write the cache back to the file it was loaded from (nothing for an in-memory cache or
    /// when nothing changed). Written to a temporary file and renamed, so a reader never sees
    /// half a cache.
    pub fn save(&self) -> Result<()> {
        match &self.path {
            Some(path) if self.dirty.load(Ordering::Relaxed) => self.save_to(path),
            _ => Ok(()),
        }
    }

    /// Stage saved files in `dir` (on the same filesystem as the cache file) rather than
    /// beside the cache file, e.g. a store's temporary directory, which a crash does not
    /// leave littered.
    pub fn staging_in(mut self, dir: PathBuf) -> StatCache {
        self.staging_dir = Some(dir);
        self
    }

    /// Write the cache to `path` (temporary file + rename).
    pub fn save_to(&self, path: &Path) -> Result<()> {
        let files: BTreeMap<String, CachedFile> = self
            .lock()
            .iter()
            .filter_map(|(p, f)| p.to_str().map(|p| (p.to_string(), f.clone())))
            .collect();
        let bytes = serde_json::to_vec(&CacheFile { version: CACHE_FORMAT_VERSION, files })
            .map_err(|e| ContextError::CacheWrite { path: path.to_path_buf(), source: e.into() })?;
        let write_err = |source| ContextError::CacheWrite { path: path.to_path_buf(), source };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(write_err)?;
        let staging = self.staging_dir.as_deref().unwrap_or(dir);
        let mut tmp = tempfile::NamedTempFile::new_in(staging).map_err(write_err)?;
        tmp.write_all(&bytes).map_err(write_err)?;
        match tmp.persist(path) {
            Ok(_) => {}
            // The staging directory is on another filesystem after all: stage beside it.
            Err(e) if e.error.raw_os_error() == Some(libc::EXDEV) => {
                let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
                tmp.write_all(&bytes).map_err(write_err)?;
                tmp.persist(path).map_err(|e| write_err(e.error))?;
            }
            Err(e) => return Err(write_err(e.error)),
        }
        self.dirty.store(false, Ordering::Relaxed);
        Ok(())
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            files_hashed: self.files_hashed.load(Ordering::Relaxed),
            files_from_cache: self.files_from_cache.load(Ordering::Relaxed),
            bytes_hashed: self.bytes_hashed.load(Ordering::Relaxed),
        }
    }

    /// Number of files the cache knows.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, CachedFile>> {
        // A panic elsewhere while holding the lock leaves a map that is still consistent.
        self.files.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The content digest and length of one regular file: from the cache if its stat identity
    /// is unchanged, else read and hashed (and remembered when that is safe).
    fn file_digest(&self, entry: &Entry, started_ns: i64) -> Result<(Digest, u64)> {
        if let Some(hit) = self.lock().get(&entry.path) {
            if hit.matches(entry.size, &entry.stat) {
                self.files_from_cache.fetch_add(1, Ordering::Relaxed);
                return Ok((hit.digest.clone(), hit.size));
            }
        }
        let io = |source| ContextError::Io { path: entry.path.clone(), source };
        let mut file = std::fs::File::open(&entry.path).map_err(io)?;
        let before = file.metadata().map_err(io)?;
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let after = file.metadata().map_err(io)?;
        let (digest, len) = hasher.finish();
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.bytes_hashed.fetch_add(len, Ordering::Relaxed);

        let stat = FileStat::of(&before);
        let unchanged_while_read =
            stat == FileStat::of(&after) && before.len() == after.len() && len == before.len();
        let settled = stat.mtime_ns.max(stat.ctime_ns) < started_ns.saturating_sub(RACY_WINDOW_NS);
        if unchanged_while_read && settled && entry.path.to_str().is_some() {
            let record = CachedFile {
                size: len,
                mtime_ns: stat.mtime_ns,
                ctime_ns: stat.ctime_ns,
                ino: stat.ino,
                dev: stat.dev,
                digest: digest.clone(),
            };
            self.lock().insert(entry.path.clone(), record);
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok((digest, len))
    }
}

impl Selection {
    /// The Merkle content digest of exactly the selected entries (see the module docs).
    /// Reading a file can fail (removed meanwhile, no permission): that is an error naming it.
    pub fn content_digest(&self, cache: &StatCache) -> Result<Digest> {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.content_digest_at(cache, now_ns)
    }

    /// [`Selection::content_digest`] as if hashing started at `started_ns` (nanoseconds since
    /// the epoch): the moment files must have settled before to be cached. Tests use it to
    /// stand for "later" instead of sleeping.
    pub(crate) fn content_digest_at(&self, cache: &StatCache, started_ns: i64) -> Result<Digest> {
        let files: Vec<&Entry> = self.entries().filter(|e| e.kind == EntryKind::File).collect();
        let contents: HashMap<&Path, (Digest, u64)> = files
            .par_iter()
            .map(|entry| cache.file_digest(entry, started_ns).map(|d| (entry.path.as_path(), d)))
            .collect::<Result<_>>()?;

        let mut hasher = Hasher::new();
        put_bytes(&mut hasher, b"ferry selection v1");
        put_u64(&mut hasher, self.items.len() as u64);
        for item in &self.items {
            put_bytes(&mut hasher, item.rel.as_bytes());
            let node = self.node_digest(&item.entry, &contents, cache, started_ns)?;
            put_bytes(&mut hasher, node.hex().as_bytes());
        }
        Ok(hasher.finish().0)
    }

    fn node_digest(
        &self,
        entry: &Entry,
        contents: &HashMap<&Path, (Digest, u64)>,
        cache: &StatCache,
        started_ns: i64,
    ) -> Result<Digest> {
        let mut h = Hasher::new();
        let tag: &[u8] = match entry.kind {
            EntryKind::File => b"file",
            EntryKind::Dir => b"dir",
            EntryKind::Symlink => b"symlink",
        };
        put_bytes(&mut h, tag);
        put_u64(&mut h, u64::from(entry.mode));
        if self.digest_ownership {
            put_u64(&mut h, u64::from(entry.uid));
            put_u64(&mut h, u64::from(entry.gid));
        }
        match entry.kind {
            EntryKind::File => {
                let (digest, len) = match contents.get(entry.path.as_path()) {
                    Some(known) => known.clone(),
                    None => cache.file_digest(entry, started_ns)?,
                };
                put_u64(&mut h, len);
                put_bytes(&mut h, digest.hex().as_bytes());
            }
            EntryKind::Symlink => {
                let target = entry.link_target.as_deref().map(|t| t.as_os_str().as_bytes());
                put_bytes(&mut h, target.unwrap_or_default());
            }
            EntryKind::Dir => {
                put_u64(&mut h, entry.children.len() as u64);
                for child in &entry.children {
                    put_bytes(&mut h, child.name.as_bytes());
                    let node = self.node_digest(child, contents, cache, started_ns)?;
                    put_bytes(&mut h, node.hex().as_bytes());
                }
            }
        }
        Ok(h.finish().0)
    }
}

/// Length-prefixed, so that no two different field sequences hash the same bytes.
fn put_bytes(h: &mut Hasher, bytes: &[u8]) {
    put_u64(h, bytes.len() as u64);
    h.update(bytes);
}

fn put_u64(h: &mut Hasher, n: u64) {
    h.update(&n.to_le_bytes());
}

#[cfg(test)]
mod tests;
