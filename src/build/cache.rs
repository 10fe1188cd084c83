//! The cache index: cache key → the layer a step produced. A plain, serialisable mapping
//! kept as one small JSON file per key under the store's `cache/` directory, so that
//! exporting it to a registry (DESIGN.md section 14) is another backend, not a rewrite.
//!
//! When an entry was last used is its file's modification time: writing the entry sets it,
//! and a hit moves it forward, at most once per [`TOUCH_INTERVAL`] (as ccache keeps its LRU
//! order). That costs a hit one `fstat` and, at most hourly, one metadata update without a
//! data write or an fsync, so a no-op build of a big fleet stays read-only; a lost update
//! (a crash before writeback) only makes an entry look older. Stores from before this
//! record need nothing: an entry's mtime is then the time it was written.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::key::CacheKey;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::store::Store;

/// A layer as the cache remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedLayer {
    /// The uncompressed digest: the layer's identity.
    pub diff_id: Digest,
    /// The stored blob (compressed as the store's default).
    pub blob: Descriptor,
    /// The history line of the step that made it.
    pub created_by: String,
    /// Set in an alias entry (a `COPY --from` keyed by its source's identity rather than
    /// by the content it copies): the content key the same layer is recorded under, which
    /// the steps after it build on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolves_to: Option<Digest>,
}

/// How long a hit leaves an entry's last-use time alone: LRU order needs no finer grain,
/// and a no-op build repeated within the hour writes nothing at all.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(3600);

/// The environment variable that fixes "now" (seconds since the epoch) for last-use records
/// and `cache prune --older-than`. For tests only, which cannot wait days: with it a test
/// builds "yesterday" and prunes "next week".
pub const TEST_NOW_ENV: &str = "FERRY_TEST_NOW";

/// Where the cache reads the time from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    fixed: Option<SystemTime>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { fixed: None }
    }

    /// A clock that always says `at`.
    pub fn fixed(at: SystemTime) -> Clock {
        Clock { fixed: Some(at) }
    }

    /// [`TEST_NOW_ENV`] if it is set, else the system clock.
    pub fn from_env() -> Clock {
        match std::env::var(TEST_NOW_ENV) {
            Ok(v) => match v.trim().parse::<u64>() {
                Ok(secs) => Clock::fixed(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
                Err(_) => {
                    tracing::warn!("{TEST_NOW_ENV}={v:?} is not a number of seconds; ignored");
                    Clock::system()
                }
            },
            Err(_) => Clock::system(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.fixed.unwrap_or_else(SystemTime::now)
    }
}

pub struct CacheIndex {
    dir: PathBuf,
    /// Entries are written through the store, so a crash leaves no partial file here.
    store: Store,
    clock: Clock,
}

/// One entry as listed by [`CacheIndex::list`].
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub key: CacheKey,
    /// None when the file cannot be read or parsed: a miss for builds, removed by any prune.
    pub layer: Option<CachedLayer>,
    /// The last hit, or when the entry was written.
    pub last_used: SystemTime,
    path: PathBuf,
}

#[cfg(test)]
impl IndexEntry {
    /// An entry that is not on disk, for tests of what is done with a listing.
    pub(crate) fn for_test(
        key: CacheKey,
        layer: Option<CachedLayer>,
        last_used: SystemTime,
    ) -> IndexEntry {
        IndexEntry { key, layer, last_used, path: PathBuf::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io { path: path.to_path_buf(), source }
}

impl CacheIndex {
    pub fn open(store: &Store) -> Result<CacheIndex, CacheError> {
        Self::open_with_clock(store, Clock::from_env())
    }

    pub fn open_with_clock(store: &Store, clock: Clock) -> Result<CacheIndex, CacheError> {
        Ok(CacheIndex { dir: store.state_dir("cache")?, store: store.clone(), clock })
    }

    /// The `cache/` directory (other files of the cache's own, such as a prune's journal,
    /// live beside the entries' fan-out directories).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        let hex = key.0.hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The layer for `key`, if recorded and its blob is still in the store; a hit counts as
    /// a use. An unreadable entry is a miss (it will be rewritten), never an error: the
    /// cache is an optimisation.
    pub fn get(&self, store: &Store, key: &CacheKey) -> Option<CachedLayer> {
        let mut file = File::open(self.path(key)).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let entry: CachedLayer = serde_json::from_slice(&bytes).ok()?;
        if !store.has_blob(&entry.blob.digest) {
            return None;
        }
        self.touch(&file);
        Some(entry)
    }

    /// Move an entry's last use to now, unless it was recorded less than
    /// [`TOUCH_INTERVAL`] ago (or in the future of this clock). Best effort: a store we may
    /// not write to keeps its order.
    fn touch(&self, file: &File) {
        let now = self.clock.now();
        let Ok(mtime) = file.metadata().and_then(|m| m.modified()) else { return };
        if now.duration_since(mtime).is_ok_and(|age| age >= TOUCH_INTERVAL) {
            if let Err(e) = file.set_modified(now) {
                tracing::debug!("cannot record a cache entry's use: {e}");
            }
        }
    }

    pub fn put(&self, key: &CacheKey, entry: &CachedLayer) -> Result<(), CacheError> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        let bytes = serde_json::to_vec(entry).unwrap_or_default();
        self.store.atomic_write(&path, &bytes)?;
        // The write itself dated the entry by the system clock; a fixed clock dates it too.
        if let Some(at) = self.clock.fixed {
            if let Ok(file) = File::open(&path) {
                let _ = file.set_modified(at);
            }
        }
        Ok(())
    }

    /// The layer an alias key stands for, with the content key the stage continues from.
    /// Both entries count as used: the content entry is skipped by the hit, not unneeded.
    pub fn get_alias(&self, store: &Store, alias: &CacheKey) -> Option<(CachedLayer, CacheKey)> {
        let entry = self.get(store, alias)?;
        let key = CacheKey(entry.resolves_to.clone()?);
        if let Ok(file) = File::open(self.path(&key)) {
            self.touch(&file);
        }
        Some((entry, key))
    }

    /// Record that `alias` gives `layer`, the layer of content key `key`.
    pub fn put_alias(
        &self,
        alias: &CacheKey,
        layer: &CachedLayer,
        key: &CacheKey,
    ) -> Result<(), CacheError> {
        let entry = CachedLayer { resolves_to: Some(key.0.clone()), ..layer.clone() };
        self.put(alias, &entry)
    }

    /// Every recorded blob, so that prune keeps what the cache still points at.
    pub fn blobs(&self) -> Vec<Digest> {
        self.layers().map(|l| l.blob.digest).collect()
    }

    /// Every recorded layer's diffID, so that prune keeps their snapshots.
    pub fn diff_ids(&self) -> Vec<Digest> {
        self.layers().map(|l| l.diff_id).collect()
    }

    fn layers(&self) -> impl Iterator<Item = CachedLayer> {
        self.list().unwrap_or_default().into_iter().filter_map(|e| e.layer)
    }

    /// Every entry: `cache/<2 hex>/<64 hex>.json`. Anything else under `cache/` is not an
    /// entry and is left alone.
    pub fn list(&self) -> Result<Vec<IndexEntry>, CacheError> {
        let mut out = Vec::new();
        let fanout = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_error(&self.dir)(e)),
        };
        for dir in fanout {
            let dir = dir.map_err(io_error(&self.dir))?;
            let prefix = dir.file_name().to_string_lossy().to_string();
            if prefix.len() != 2 || !dir.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let files = fs::read_dir(dir.path()).map_err(io_error(&dir.path()))?;
            for file in files {
                let file = file.map_err(io_error(&dir.path()))?;
                let name = file.file_name().to_string_lossy().to_string();
                let Some(hex) = name.strip_suffix(".json").filter(|h| h.starts_with(&prefix))
                else {
                    continue;
                };
                let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() else { continue };
                let path = file.path();
                // Gone since the listing (a concurrent prune): not an entry any more.
                let Ok(meta) = file.metadata() else { continue };
                let layer = match fs::read(&path) {
                    Ok(bytes) => serde_json::from_slice::<CachedLayer>(&bytes).ok(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(_) => None,
                };
                out.push(IndexEntry {
                    key: CacheKey(digest),
                    layer,
                    last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    path,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Delete `entries` and make the deletions durable before returning, so that they
    /// reach the disk before the blobs those entries name are deleted: even a power cut
    /// leaves no entry whose blob is gone. An entry already gone is fine.
    pub fn remove<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a IndexEntry>,
    ) -> Result<(), CacheError> {
        let mut dirs = std::collections::BTreeSet::new();
        for entry in entries {
            match fs::remove_file(&entry.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&entry.path)(e)),
            }
            if let Some(dir) = entry.path.parent() {
                dirs.insert(dir.to_path_buf());
            }
        }
        for dir in dirs {
            // Some filesystems refuse to sync a directory; the unlink happened regardless.
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(store: &Store, content: &[u8]) -> CachedLayer {
        let digest = store.put_blob_bytes(content, None).unwrap();
        CachedLayer {
            diff_id: Digest::of(content),
            blob: Descriptor::new(
                "application/vnd.oci.image.layer.v1.tar",
                digest,
                content.len() as u64,
            ),
            created_by: "COPY".into(),
            resolves_to: None,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn last_used(cache: &CacheIndex, key: &CacheKey) -> SystemTime {
        cache.list().unwrap().into_iter().find(|e| &e.key == key).unwrap().last_used
    }

    const T0: u64 = 1_800_000_000;

    #[test]
    fn a_hit_moves_the_last_use_at_most_once_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = CacheKey(Digest::of(b"k"));
        let l = layer(&store, b"layer");
        CacheIndex::open_with_clock(&store, Clock::fixed(at(T0))).unwrap().put(&key, &l).unwrap();
        let cache = |t| CacheIndex::open_with_clock(&store, Clock::fixed(at(t))).unwrap();
        assert_eq!(last_used(&cache(T0), &key), at(T0), "the write is the first use");

        assert_eq!(cache(T0 + 3599).get(&store, &key), Some(l.clone()));
        assert_eq!(last_used(&cache(T0), &key), at(T0), "a hit within the hour writes nothing");
        assert_eq!(cache(T0 + 3600).get(&store, &key), Some(l.clone()));
        assert_eq!(last_used(&cache(T0), &key), at(T0 + 3600));
        // A clock behind the record (another machine's, a test's) never moves it back.
        assert!(cache(T0).get(&store, &key).is_some());
        assert_eq!(last_used(&cache(T0), &key), at(T0 + 3600));
    }

    #[test]
    fn an_alias_hit_uses_the_content_entry_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (alias, key) = (CacheKey(Digest::of(b"alias")), CacheKey(Digest::of(b"content")));
        let l = layer(&store, b"layer");
        let old = CacheIndex::open_with_clock(&store, Clock::fixed(at(T0))).unwrap();
        old.put(&key, &l).unwrap();
        old.put_alias(&alias, &l, &key).unwrap();
        let later = CacheIndex::open_with_clock(&store, Clock::fixed(at(T0 + 7200))).unwrap();
        let (got, resolved) = later.get_alias(&store, &alias).unwrap();
        assert_eq!((got.blob, resolved.clone()), (l.blob, key.clone()));
        assert_eq!(last_used(&later, &alias), at(T0 + 7200));
        assert_eq!(last_used(&later, &key), at(T0 + 7200));
    }

    #[test]
    fn listing_and_removal_cover_broken_entries_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache = CacheIndex::open(&store).unwrap();
        let good = CacheKey(Digest::of(b"good"));
        cache.put(&good, &layer(&store, b"x")).unwrap();
        let broken = Digest::of(b"broken");
        let broken_path =
            cache.dir().join(&broken.hex()[..2]).join(format!("{}.json", broken.hex()));
        fs::create_dir_all(broken_path.parent().unwrap()).unwrap();
        fs::write(&broken_path, b"{not json").unwrap();
        // Not entries: a journal beside the fan-out, a stray file in it.
        fs::write(cache.dir().join("journal"), b"{}").unwrap();
        fs::write(broken_path.parent().unwrap().join("notes.txt"), b"").unwrap();

        let listed = cache.list().unwrap();
        assert_eq!(listed.len(), 2);
        let by_key = |k: &Digest| listed.iter().find(|e| &e.key.0 == k).unwrap();
        assert!(by_key(&good.0).layer.is_some());
        assert!(by_key(&broken).layer.is_none());
        assert_eq!(cache.blobs().len(), 1);

        cache.remove(listed.iter()).unwrap();
        assert!(cache.list().unwrap().is_empty());
        assert!(cache.get(&store, &good).is_none());
        cache.remove(listed.iter()).unwrap();
        assert!(cache.dir().join("journal").exists());
    }
}
