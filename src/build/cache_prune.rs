//! `ferry cache stats` and `ferry cache prune`: what the build cache keeps on disk, and
//! removing its entries (least recently used first, unused for a while, or all) with the
//! layer blobs and snapshots nothing else needs, as `docker buildx du` and
//! `docker builder prune` do for BuildKit.
//!
//! What a cache entry costs is what would be freed without it: a layer an image in the store
//! (or a compression variant) also reaches is kept anyway and is "shared"; the rest is
//! "reclaimable". `--keep-bytes` budgets the reclaimable layer blobs and the
//! `RUN --mount=type=cache` directories together, least recently used first: shared layers
//! cost the cache nothing, so their entries are never dropped to meet it.
//!
//! Safety, as for `ferry prune`: a real prune holds the store's `gc` lock exclusively, which
//! every build holds shared from before it pins its bases until its images are named, so no
//! build runs in between: a layer a build resolved from the cache is named by its image
//! (or still by its entry) before a prune can look. Order on disk: a journal of what may be
//! deleted, then the entries (deletions synced), then blobs, then snapshots, then the
//! journal. Killed anywhere, no entry names a missing blob (and a missing blob would only be
//! a cache miss), and the next prune finishes the deletions the journal lists.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::cache::{CacheError, CacheIndex, Clock, IndexEntry};
use crate::digest::Digest;
use crate::layer::snapshot_id;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CachePruneError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: io::Error },
}

type Result<T, E = CachePruneError> = std::result::Result<T, E>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CachePruneError {
    let path = path.to_path_buf();
    move |source| CachePruneError::Io { action, path, source }
}

/// `ferry cache stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Entries that give a layer (content keys and `COPY --from` aliases).
    pub entries: usize,
    /// Entries whose blob is gone: builds miss them; any prune removes them.
    pub dangling_entries: usize,
    /// Entries that cannot be read: builds miss them; any prune removes them.
    pub unreadable_entries: usize,
    /// Distinct layer blobs the entries keep, and their stored (compressed) bytes.
    pub layers: usize,
    pub layer_bytes: u64,
    /// Of those, the layers an image in the store (or a compression variant) reaches: they
    /// stay whatever the cache does.
    pub shared_layers: usize,
    pub shared_bytes: u64,
    /// The layers only the cache keeps: what `cache prune --all` frees.
    pub reclaimable_layers: usize,
    pub reclaimable_bytes: u64,
    /// Extracted layer snapshots of those layers, and their disk usage.
    pub snapshots: usize,
    pub snapshot_bytes: u64,
    /// The part of `snapshot_bytes` whose layer no image in the store has.
    pub reclaimable_snapshot_bytes: u64,
    /// The least and the most recent use of an entry (RFC 3339), if there is one.
    pub oldest_last_used: Option<String>,
    pub newest_last_used: Option<String>,
    /// `RUN --mount=type=cache` directories and their disk usage (`cache prune --all`
    /// removes them, `--older-than` those unused for that long).
    pub run_caches: usize,
    pub run_cache_bytes: u64,
}

/// Which entries `cache prune` removes. Entries that give no layer (unreadable, or their blob
/// gone) are removed by every prune.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunePolicy {
    /// Every entry.
    pub all: bool,
    /// Only entries unused for at least this long (all entries when None).
    pub older_than: Option<Duration>,
    /// Of those, only as many as needed, least recently used first, for the reclaimable
    /// layer bytes and the RUN caches' bytes to be at most this many.
    pub keep_bytes: Option<u64>,
}

/// What a prune removed (or, dry, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CachePruneReport {
    pub dry_run: bool,
    pub entries_removed: usize,
    pub entries_kept: usize,
    /// Layer blobs deleted: no image, variant or remaining entry reaches them.
    pub removed_blobs: Vec<Digest>,
    pub blob_bytes: u64,
    /// Snapshot ids deleted, and their disk usage.
    pub removed_snapshots: Vec<String>,
    pub snapshot_bytes: u64,
    /// `RUN --mount=type=cache` directories deleted (by `--all`, `--keep-bytes` or
    /// `--older-than`; one in use is kept).
    pub removed_run_caches: Vec<String>,
    pub run_cache_bytes: u64,
    /// RUN caches that could not be removed, and why.
    pub failed_run_caches: Vec<String>,
    pub reclaimed_bytes: u64,
}

/// Everything that decides what a cache entry costs, read once.
struct Survey {
    entries: Vec<IndexEntry>,
    /// The size of every stored blob an entry names (absent: the blob is gone).
    blob_sizes: HashMap<Digest, u64>,
    /// Blobs that images and the caller's roots reach.
    kept_by_images: HashSet<Digest>,
    /// Snapshot ids of the layers of the images in the store.
    image_snapshots: HashSet<String>,
    /// The RUN caches with their last use and size, when a budget needs them.
    run_caches: Vec<RunCacheUse>,
}

/// A `RUN --mount=type=cache` directory as a budget sees it.
struct RunCacheUse {
    dir: PathBuf,
    last_used: SystemTime,
    bytes: u64,
}

impl Survey {
    fn take(store: &Store, cache: &CacheIndex, roots: &[Digest]) -> Result<Survey> {
        let entries = cache.list()?;
        let mut blob_sizes = HashMap::new();
        for layer in entries.iter().filter_map(|e| e.layer.as_ref()) {
            let d = &layer.blob.digest;
            if !blob_sizes.contains_key(d) {
                if let Some(size) = store.blob_size(d)? {
                    blob_sizes.insert(d.clone(), size);
                }
            }
        }
        let kept_by_images = store.reachable(roots)?;
        let mut image_snapshots = HashSet::new();
        for desc in store.read_index()?.manifests {
            // An unreadable image keeps no snapshot; `cache verify` is where it is reported.
            if let Ok(image) = store.image(&desc) {
                image_snapshots.extend(image.config.rootfs.diff_ids.iter().map(snapshot_id));
            }
        }
        Ok(Survey { entries, blob_sizes, kept_by_images, image_snapshots, run_caches: Vec::new() })
    }

    /// Add the RUN caches (their sizes are a walk of each: only a budget needs them).
    fn with_run_caches(mut self, store: &Store) -> Result<Survey> {
        for dir in run_caches(store)? {
            // One that cannot be read is left to `--all`, as `--older-than` leaves it; it
            // does not stop the prune of everything else.
            let (Ok(last_used), Ok(bytes)) = (run_cache_last_use(&dir), disk_usage(&dir)) else {
                tracing::warn!("cannot measure RUN cache {}; not counted", dir.display());
                continue;
            };
            self.run_caches.push(RunCacheUse { dir, last_used, bytes });
        }
        Ok(self)
    }

    /// The layer blob an entry gives, if it gives one (readable, blob present).
    fn blob_of<'a>(&self, entry: &'a IndexEntry) -> Option<&'a Digest> {
        let d = &entry.layer.as_ref()?.blob.digest;
        self.blob_sizes.contains_key(d).then_some(d)
    }

    /// What keeping a layer costs: its bytes, unless an image keeps it anyway.
    fn cost(&self, blob: &Digest) -> u64 {
        if self.kept_by_images.contains(blob) {
            0
        } else {
            self.blob_sizes.get(blob).copied().unwrap_or(0)
        }
    }
}

/// `ferry cache stats`. Reads only: takes no lock, so a running build does not hold it up.
pub fn stats(
    store: &Store,
    clock: Clock,
    kept_roots: impl FnOnce() -> Vec<Digest>,
) -> Result<CacheStats> {
    let cache = CacheIndex::open_with_clock(store, clock)?;
    let survey = Survey::take(store, &cache, &kept_roots())?;
    let snapshots_dir = store.root().join("snapshots");
    let mut s = CacheStats::default();
    let mut layers = BTreeSet::new();
    let mut snapshot_ids = BTreeSet::new();
    for entry in &survey.entries {
        let Some(layer) = &entry.layer else {
            s.unreadable_entries += 1;
            continue;
        };
        snapshot_ids.insert(snapshot_id(&layer.diff_id));
        match survey.blob_of(entry) {
            Some(blob) => {
                s.entries += 1;
                layers.insert(blob);
            }
            None => s.dangling_entries += 1,
        }
    }
    for blob in layers {
        let size = survey.blob_sizes.get(blob).copied().unwrap_or(0);
        s.layers += 1;
        s.layer_bytes += size;
        if survey.cost(blob) == 0 {
            s.shared_layers += 1;
            s.shared_bytes += size;
        } else {
            s.reclaimable_layers += 1;
            s.reclaimable_bytes += size;
        }
    }
    for id in snapshot_ids {
        let dir = snapshots_dir.join(&id);
        if !dir.is_dir() {
            continue;
        }
        let bytes = disk_usage(&dir)?;
        s.snapshots += 1;
        s.snapshot_bytes += bytes;
        if !survey.image_snapshots.contains(&id) {
            s.reclaimable_snapshot_bytes += bytes;
        }
    }
    let uses = survey.entries.iter().map(|e| e.last_used);
    s.oldest_last_used = uses.clone().min().map(rfc3339);
    s.newest_last_used = uses.max().map(rfc3339);
    for dir in run_caches(store)? {
        s.run_caches += 1;
        s.run_cache_bytes += disk_usage(&dir)?;
    }
    Ok(s)
}

/// The `RUN --mount=type=cache` directories of the store (with the private pools' extra
/// directories; without the lock files and the half-made `.new-*` ones a killed build may
/// leave).
fn run_caches(store: &Store) -> Result<Vec<PathBuf>> {
    let mounts = store.root().join("mounts");
    let listing = match fs::read_dir(&mounts) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", &mounts)(e)),
    };
    let mut out = Vec::new();
    for entry in listing {
        let entry = entry.map_err(io_err("read", &mounts))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().map_err(io_err("read", &entry.path()))?.is_dir() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// What `prune --all` did to the RUN caches.
struct RunCachesPruned {
    removed: Vec<String>,
    bytes: u64,
    /// Caches that could not be removed, and why (a prune does not stop for one).
    failed: Vec<String>,
}

/// Which RUN caches a prune takes, by directory and last use.
type RunCacheFilter<'a> = dyn Fn(&Path, io::Result<SystemTime>) -> bool + 'a;

/// When a RUN cache was last used: a step's lock sets its lock file's mtime.
fn run_cache_last_use(dir: &Path) -> io::Result<SystemTime> {
    let lock_path = super::cache_mount::lock_path(dir);
    fs::metadata(&lock_path).or_else(|_| fs::metadata(dir)).and_then(|m| m.modified())
}

/// Remove every RUN cache directory `chosen` picks (by its path and last use) that no step
/// is using, and the half-made ones.
fn prune_run_caches(
    store: &Store,
    dry_run: bool,
    chosen: &RunCacheFilter<'_>,
) -> Result<RunCachesPruned> {
    let mut done = RunCachesPruned { removed: Vec::new(), bytes: 0, failed: Vec::new() };
    for dir in run_caches(store)? {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let lock_path = super::cache_mount::lock_path(&dir);
        if !chosen(&dir, run_cache_last_use(&dir)) {
            continue;
        }
        // A step holds `<dir>.lock` (shared or exclusive) while it uses the directory.
        let lock = match super::cache_mount::lock_file(&dir) {
            Ok(lock) => lock,
            Err(e) => {
                done.failed.push(format!("{name}: {e}"));
                continue;
            }
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => continue,
            Err(fs::TryLockError::Error(e)) => {
                done.failed.push(format!("{name}: cannot lock it: {e}"));
                continue;
            }
        }
        let bytes = match disk_usage(&dir) {
            Ok(bytes) => bytes,
            Err(e) => {
                done.failed.push(format!("{name}: {e}"));
                continue;
            }
        };
        if !dry_run {
            // Out of sight first, under a name the sweep below (and the next prune's) takes:
            // a prune killed half-way must not leave half a cache for the next step to mount.
            let doomed = dir.with_file_name(format!(".new-doomed-{name}"));
            if let Err(e) = fs::rename(&dir, &doomed) {
                done.failed.push(format!("{name}: cannot move it aside: {e}"));
                continue;
            }
            // Through directories their owner made read-only, too (Go's module cache).
            if let Err(e) = crate::store::remove_tree(&doomed) {
                done.failed.push(format!("{name}: {e}"));
                continue;
            }
            // Its lock goes too: no step can be waiting for it under the gc lock.
            let _ = fs::remove_file(lock_path);
        }
        done.bytes += bytes;
        done.removed.push(name);
    }
    if !dry_run {
        // Half-made directories of a killed build (no build runs under the gc lock).
        let mounts = store.root().join("mounts");
        for entry in fs::read_dir(&mounts).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".new-") {
                let _ = crate::store::remove_tree(&entry.path());
            }
        }
    }
    Ok(done)
}

/// `ferry cache prune`: remove the entries `policy` selects, then the layer blobs and
/// snapshots that no image, no compression variant (`kept_roots`, asked under the lock) and
/// no remaining entry needs. A dry run changes nothing and takes no lock.
pub fn prune(
    store: &Store,
    policy: &PrunePolicy,
    dry_run: bool,
    clock: Clock,
    kept_roots: impl FnOnce() -> Vec<Digest>,
) -> Result<CachePruneReport> {
    // Waits for running builds, pulls and pushes; none starts until the prune is done.
    let gc = if dry_run { None } else { Some(store.lock("gc")?) };
    prune_holding(store, policy, dry_run, clock, kept_roots, gc)
}

/// The environment variable that sets what the automatic prune after a build keeps: a size
/// as `--keep-bytes` takes it, or `off`.
pub const AUTO_KEEP_BYTES_ENV: &str = "FERRY_CACHE_KEEP_BYTES";

/// How often at most the automatic prune runs on one store: its survey reads every cache
/// entry, which a no-op build should not pay each time.
pub const AUTO_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The automatic prune's budget: [`AUTO_KEEP_BYTES_ENV`] when set (None for `off`), else a
/// tenth of the size of the filesystem the store is on, as BuildKit's default GC keeps.
pub fn auto_keep_bytes(
    store: &Store,
    setting: Option<&str>,
) -> std::result::Result<Option<u64>, String> {
    match setting.map(str::trim).filter(|s| !s.is_empty()) {
        Some(off) if off.eq_ignore_ascii_case("off") => Ok(None),
        Some(size) => {
            parse_size(size).map(Some).map_err(|e| format!("{AUTO_KEEP_BYTES_ENV}: {e}, or `off`"))
        }
        None => {
            let fs = nix::sys::statvfs::statvfs(store.root()).map_err(|e| {
                format!("cannot size the filesystem of {}: {e}", store.root().display())
            })?;
            Ok(Some(fs.blocks() as u64 * fs.fragment_size() as u64 / 10))
        }
    }
}

/// After a build: `cache prune --keep-bytes keep`, unless a prune ran within
/// [`AUTO_PRUNE_INTERVAL`] or another process holds the store (a build, a pull, a prune):
/// it never waits, since the build it follows is done. None when it did not run.
pub fn auto_prune(
    store: &Store,
    keep: u64,
    clock: Clock,
    kept_roots: impl FnOnce() -> Vec<Digest>,
) -> Result<Option<CachePruneReport>> {
    let stamp = store.state_dir("cache")?.join("auto-prune.stamp");
    let now = clock.now();
    let recent = || {
        let last = fs::metadata(&stamp).and_then(|m| m.modified()).ok();
        // Within the interval either way: a clock set back far enough does not stop pruning.
        let apart = |t: SystemTime| now.duration_since(t).unwrap_or_else(|e| e.duration());
        last.is_some_and(|t| apart(t) < AUTO_PRUNE_INTERVAL)
    };
    if recent() {
        return Ok(None);
    }
    let Some(gc) = store.try_lock("gc")? else {
        tracing::debug!("automatic prune skipped: another ferry process is using the store");
        return Ok(None);
    };
    // Another process may have pruned between the look and the lock.
    if recent() {
        return Ok(None);
    }
    // Stamped first: a prune that fails is not tried again after every build.
    fs::write(&stamp, b"").map_err(io_err("write", &stamp))?;
    let _ = fs::File::options().write(true).open(&stamp).and_then(|f| f.set_modified(now));
    let policy = PrunePolicy { keep_bytes: Some(keep), ..PrunePolicy::default() };
    prune_holding(store, &policy, false, clock, kept_roots, Some(gc)).map(Some)
}

/// A prune with the `gc` lock already taken (None for a dry run, which takes none).
fn prune_holding(
    store: &Store,
    policy: &PrunePolicy,
    dry_run: bool,
    clock: Clock,
    kept_roots: impl FnOnce() -> Vec<Digest>,
    _gc: Option<crate::store::LockGuard>,
) -> Result<CachePruneReport> {
    let cache = CacheIndex::open_with_clock(store, clock)?;
    let journal = Journal::path(&cache);
    let unfinished = Journal::read(&journal);
    let mut survey = Survey::take(store, &cache, &kept_roots())?;
    if policy.keep_bytes.is_some() && !policy.all {
        survey = survey.with_run_caches(store)?;
    }
    let (doomed, doomed_run_caches) = select(&survey, policy, clock.now());

    let mut needed_blobs: HashSet<&Digest> = HashSet::new();
    let mut needed_snapshots: HashSet<String> = survey.image_snapshots.clone();
    let mut maybe_blobs: BTreeSet<Digest> = unfinished.blobs.into_iter().collect();
    let mut maybe_snapshots: BTreeSet<String> = unfinished.snapshots.into_iter().collect();
    for (entry, &doom) in survey.entries.iter().zip(&doomed) {
        let Some(layer) = &entry.layer else { continue };
        if doom {
            maybe_blobs.insert(layer.blob.digest.clone());
            maybe_snapshots.insert(snapshot_id(&layer.diff_id));
        } else if let Some(blob) = survey.blob_of(entry) {
            needed_blobs.insert(blob);
            needed_snapshots.insert(snapshot_id(&layer.diff_id));
        }
    }
    let mut report = CachePruneReport {
        dry_run,
        entries_removed: doomed.iter().filter(|d| **d).count(),
        entries_kept: doomed.iter().filter(|d| !**d).count(),
        ..CachePruneReport::default()
    };
    let mut blobs = Vec::new();
    for d in maybe_blobs {
        if needed_blobs.contains(&d) || survey.kept_by_images.contains(&d) {
            continue;
        }
        // A journal's blob is not in the survey's sizes: ask the store.
        let size = match survey.blob_sizes.get(&d) {
            Some(s) => Some(*s),
            None => store.blob_size(&d)?,
        };
        if let Some(size) = size {
            report.blob_bytes += size;
            blobs.push(d);
        }
    }
    let snapshots_dir = store.root().join("snapshots");
    let mut snapshots = Vec::new();
    for id in maybe_snapshots.into_iter().filter(|id| !needed_snapshots.contains(id)) {
        let dir = snapshots_dir.join(&id);
        if dir.is_dir() {
            report.snapshot_bytes += disk_usage(&dir)?;
            snapshots.push(id);
        }
    }
    report.reclaimed_bytes = report.blob_bytes + report.snapshot_bytes;
    report.removed_blobs = blobs.clone();
    report.removed_snapshots = snapshots.clone();
    // Last, after the layers: a cache that will not go keeps nothing else from going.
    let run_caches = |report: &mut CachePruneReport| -> Result<()> {
        // --all; those the budget picked; or those unused for --older-than.
        let now = clock.now();
        let everything = |_: &Path, _: io::Result<SystemTime>| true;
        let in_budget = |dir: &Path, _: io::Result<SystemTime>| doomed_run_caches.contains(dir);
        // A last use in this clock's future is a use now.
        let unused = |_: &Path, used: io::Result<SystemTime>| {
            policy.older_than.is_some_and(|age| {
                used.is_ok_and(|t| now.duration_since(t).is_ok_and(|a| a >= age))
            })
        };
        let chosen: Option<&RunCacheFilter<'_>> =
            match (policy.all, policy.older_than, policy.keep_bytes) {
                (true, _, _) => Some(&everything),
                (false, _, Some(_)) => Some(&in_budget),
                (false, Some(_), None) => Some(&unused),
                (false, None, None) => None,
            };
        if let Some(chosen) = chosen {
            let done = prune_run_caches(store, dry_run, chosen)?;
            report.removed_run_caches = done.removed;
            report.run_cache_bytes = done.bytes;
            report.failed_run_caches = done.failed;
            report.reclaimed_bytes += done.bytes;
        }
        Ok(())
    };
    if dry_run {
        run_caches(&mut report)?;
        return Ok(report);
    }
    if report.entries_removed == 0 && blobs.is_empty() && snapshots.is_empty() {
        Journal::remove(&journal)?;
        run_caches(&mut report)?;
        return Ok(report);
    }

    Journal { blobs: blobs.clone(), snapshots: snapshots.clone() }.write(store, &journal)?;
    cache.remove(survey.entries.iter().zip(&doomed).filter(|(_, d)| **d).map(|(e, _)| e))?;
    for d in &blobs {
        let path = store.blob_path(d);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
    }
    let doomed_snapshots: HashSet<&str> = snapshots.iter().map(String::as_str).collect();
    crate::layer::prune_snapshots(&snapshots_dir, &|id| !doomed_snapshots.contains(id))
        .map_err(io_err("remove snapshots in", &snapshots_dir))?;
    Journal::remove(&journal)?;
    run_caches(&mut report)?;
    Ok(report)
}

/// Which entries go (`true` at the index of each doomed entry of `survey.entries`), and
/// which RUN caches a budget removes.
fn select(
    survey: &Survey,
    policy: &PrunePolicy,
    now: SystemTime,
) -> (Vec<bool>, BTreeSet<PathBuf>) {
    let entries = &survey.entries;
    let broken = |e: &IndexEntry| survey.blob_of(e).is_none();
    if policy.all {
        return (vec![true; entries.len()], BTreeSet::new());
    }
    // A last use in this clock's future is a use now.
    let candidate = |last_used: SystemTime| match policy.older_than {
        Some(age) => now.duration_since(last_used).is_ok_and(|a| a >= age),
        None => policy.keep_bytes.is_some(),
    };
    let mut doomed: Vec<bool> =
        entries.iter().map(|e| broken(e) || candidate(e.last_used)).collect();
    let Some(keep) = policy.keep_bytes else { return (doomed, BTreeSet::new()) };

    // A budget: whole layers and RUN caches go, least recently used first, until the rest
    // fits.
    struct LayerUse {
        last_used: SystemTime,
        entries: Vec<usize>,
        removable: bool,
    }
    let mut layers: BTreeMap<&Digest, LayerUse> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(blob) = survey.blob_of(e) else { continue };
        let l = layers.entry(blob).or_insert(LayerUse {
            last_used: e.last_used,
            entries: Vec::new(),
            removable: true,
        });
        l.last_used = l.last_used.max(e.last_used);
        l.entries.push(i);
        l.removable &= doomed[i];
        doomed[i] = false;
    }
    enum Item<'a> {
        Layer(&'a Digest, &'a LayerUse),
        RunCache(&'a RunCacheUse),
    }
    let mut total: u64 = layers.keys().map(|b| survey.cost(b)).sum::<u64>()
        + survey.run_caches.iter().map(|c| c.bytes).sum::<u64>();
    let mut order: Vec<(SystemTime, Item<'_>)> = layers
        .iter()
        .map(|(blob, l)| (l.last_used, Item::Layer(blob, l)))
        .chain(survey.run_caches.iter().map(|c| (c.last_used, Item::RunCache(c))))
        .collect();
    // Oldest first; at one time, layers (by digest) before caches (by path).
    order.sort_by(|(ta, a), (tb, b)| {
        let rank = |i: &Item<'_>| match i {
            Item::Layer(d, _) => (0, d.to_string()),
            Item::RunCache(c) => (1, c.dir.to_string_lossy().into_owned()),
        };
        (ta, rank(a)).cmp(&(tb, rank(b)))
    });
    let mut run_caches = BTreeSet::new();
    for (_, item) in order {
        if total <= keep {
            break;
        }
        match item {
            Item::Layer(blob, l) => {
                let cost = survey.cost(blob);
                if cost == 0 || !l.removable {
                    continue;
                }
                total -= cost;
                for &i in &l.entries {
                    doomed[i] = true;
                }
            }
            Item::RunCache(c) => {
                if !candidate(c.last_used) {
                    continue;
                }
                total -= c.bytes;
                run_caches.insert(c.dir.clone());
            }
        }
    }
    (doomed, run_caches)
}

/// What an unfinished prune had decided to delete, kept until it is done so that a prune
/// killed after removing entries does not leave their blobs to `ferry prune` alone. Always
/// re-checked against the store before anything in it is deleted.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Journal {
    blobs: Vec<Digest>,
    snapshots: Vec<String>,
}

impl Journal {
    /// Beside the entries' fan-out directories, under a name that is no entry.
    fn path(cache: &CacheIndex) -> PathBuf {
        cache.dir().join("prune-journal")
    }

    /// The journal of a killed prune; none (or an unreadable one) is an empty journal.
    fn read(path: &Path) -> Journal {
        fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn write(&self, store: &Store, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        store.atomic_write(path, &bytes)?;
        Ok(())
    }

    fn remove(path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", path)(e)),
        }
    }
}

/// Disk usage of a directory tree, as `du` counts it (allocated blocks, hard links once).
/// What disappears meanwhile (`cache stats` beside a prune) counts as nothing.
fn disk_usage(dir: &Path) -> Result<u64> {
    let gone =
        |e: &walkdir::Error| e.io_error().is_some_and(|e| e.kind() == io::ErrorKind::NotFound);
    let mut seen = HashSet::new();
    let mut total = 0;
    for entry in walkdir::WalkDir::new(dir).follow_links(false) {
        let meta = match entry.and_then(|e| e.metadata()) {
            Ok(meta) => meta,
            Err(e) if gone(&e) => continue,
            Err(e) => {
                let path = e.path().unwrap_or(dir).to_path_buf();
                return Err(io_err("read", &path)(e.into()));
            }
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
    }
    Ok(total)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A byte count as `--keep-bytes` takes it: a number with an optional unit, SI as ferry
/// prints sizes (`kB`, `MB`, `GB`, `TB`: powers of 1000; `K`, `M`, `G`, `T` alike) or binary
/// (`KiB`, `MiB`, `GiB`, `TiB`), any case; `1.5GB` is fine.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = || {
        format!("`{text}` is not a size: write a number of bytes with an optional unit, like 500MB or 10GB")
    };
    let n: f64 = number.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (n * scale).round();
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// A duration as `--older-than` takes it: one or more numbers with a unit, `s`, `m`, `h`,
/// `d` (24 hours) or `w` (7 days): `72h`, `7d`, `1d12h`, `90m`.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("`{text}` is not a duration: write a number with a unit (s, m, h, d, w), like 72h or 7d")
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut secs: u64 = 0;
    while !rest.is_empty() {
        let end = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..end].parse().map_err(|_| bad())?;
        let unit = rest[end..].chars().next().ok_or_else(bad)?;
        let scale = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return Err(bad()),
        };
        secs = n.checked_mul(scale).and_then(|v| secs.checked_add(v)).ok_or_else(bad)?;
        rest = &rest[end + unit.len_utf8()..];
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::cache::CachedLayer;
    use crate::build::key::CacheKey;
    use crate::oci::Descriptor;

    #[test]
    fn the_automatic_budget_is_the_setting_or_a_tenth_of_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        assert_eq!(auto_keep_bytes(&store, Some("off")), Ok(None));
        assert_eq!(auto_keep_bytes(&store, Some("Off")), Ok(None));
        assert_eq!(auto_keep_bytes(&store, Some(" 20GB ")), Ok(Some(20_000_000_000)));
        let err = auto_keep_bytes(&store, Some("plenty")).unwrap_err();
        assert!(err.starts_with("FERRY_CACHE_KEEP_BYTES: `plenty` is not a size"), "{err}");
        let fs = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let disk = fs.blocks() as u64 * fs.fragment_size() as u64;
        assert_eq!(auto_keep_bytes(&store, None), Ok(Some(disk / 10)));
        // Set but empty is unset.
        assert_eq!(auto_keep_bytes(&store, Some(" ")), Ok(Some(disk / 10)));
        assert!(disk > 0);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("10gb"), Ok(10_000_000_000));
        assert_eq!(parse_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("7 kB"), Ok(7000));
        for bad in ["", "MB", "10XB", "-1GB", "1.2.3GB", "1e99TB"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("is not a size"), "{bad}: {e}");
        }
    }

    #[test]
    fn ages() {
        assert_eq!(parse_age("72h"), Ok(Duration::from_secs(72 * 3600)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("1d12h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_age("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_age("0s"), Ok(Duration::ZERO));
        for bad in ["", "7", "d", "7y", "1.5h", "-1h", "99999999999999999999w"] {
            assert!(parse_age(bad).unwrap_err().contains("is not a duration"), "{bad}");
        }
    }

    const T0: u64 = 1_800_000_000;
    const H: u64 = 3600;

    /// A survey of entries (blob name, hours after T0 last used); blob sizes by name;
    /// `shared` blobs are reached by an image.
    fn survey(entries: &[(&str, u64)], sizes: &[(&str, u64)], shared: &[&str]) -> Survey {
        let blob = |name: &str| Digest::of(name.as_bytes());
        let entries = entries
            .iter()
            .enumerate()
            .map(|(i, (name, hours))| {
                IndexEntry::for_test(
                    CacheKey(Digest::of(format!("key{i}").as_bytes())),
                    (!name.is_empty()).then(|| CachedLayer {
                        diff_id: Digest::of(format!("diff {name}").as_bytes()),
                        blob: Descriptor::new(
                            "application/vnd.oci.image.layer.v1.tar",
                            blob(name),
                            0,
                        ),
                        created_by: String::new(),
                        resolves_to: None,
                    }),
                    SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + hours * H),
                )
            })
            .collect();
        Survey {
            entries,
            blob_sizes: sizes.iter().map(|(n, s)| (blob(n), *s)).collect(),
            kept_by_images: shared.iter().map(|n| blob(n)).collect(),
            image_snapshots: HashSet::new(),
            run_caches: Vec::new(),
        }
    }

    /// The entries `select` dooms.
    fn doomed(s: &Survey, policy: &PrunePolicy, now: SystemTime) -> Vec<bool> {
        select(s, policy, now).0
    }

    fn now(hours: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + hours * H)
    }

    #[test]
    fn keep_bytes_drops_whole_layers_least_recently_used_first() {
        // Layer a: two entries (an alias), one used recently. Layer b: oldest. c: shared.
        let s = survey(
            &[("a", 0), ("a", 5), ("b", 1), ("c", 0), ("d", 3)],
            &[("a", 100), ("b", 10), ("c", 1000), ("d", 50)],
            &["c"],
        );
        let keep = |bytes| PrunePolicy { keep_bytes: Some(bytes), ..PrunePolicy::default() };
        // Reclaimable: a 100 + b 10 + d 50 = 160. Under budget: nothing goes.
        assert_eq!(doomed(&s, &keep(160), now(6)), [false; 5]);
        // b (last used at 1) goes first, even though it is the smallest.
        assert_eq!(doomed(&s, &keep(155), now(6)), [false, false, true, false, false]);
        // Then d (3), then a (5, through its newer entry: both of its entries go).
        assert_eq!(doomed(&s, &keep(100), now(6)), [false, false, true, false, true]);
        assert_eq!(doomed(&s, &keep(0), now(6)), [true, true, true, false, true]);
        // With --older-than, only layers all of whose entries are old enough can go.
        let both = PrunePolicy {
            keep_bytes: Some(0),
            older_than: Some(Duration::from_secs(2 * H)),
            all: false,
        };
        assert_eq!(doomed(&s, &both, now(6)), [false, false, true, false, true]);
    }

    #[test]
    fn a_budget_takes_run_caches_and_layers_in_one_least_recently_used_order() {
        let mut s = survey(&[("a", 2), ("b", 4)], &[("a", 100), ("b", 100)], &[]);
        let cache = |name: &str, hours: u64, bytes: u64| RunCacheUse {
            dir: PathBuf::from(name),
            last_used: now(hours),
            bytes,
        };
        // Total 100 + 100 + 300 + 50 = 550.
        s.run_caches = vec![cache("apt", 1, 300), cache("npm", 3, 50)];
        let keep = |bytes| PrunePolicy { keep_bytes: Some(bytes), ..PrunePolicy::default() };
        let caches = |set: BTreeSet<PathBuf>| -> Vec<String> {
            set.iter().map(|p| p.display().to_string()).collect()
        };
        assert_eq!(select(&s, &keep(550), now(5)), (vec![false, false], BTreeSet::new()));
        // apt (1) is the oldest, though the largest: it alone goes.
        let (entries, gone) = select(&s, &keep(250), now(5));
        assert_eq!((entries, caches(gone)), (vec![false, false], vec!["apt".to_string()]));
        // Then a (2), then npm (3), then b (4).
        let (entries, gone) = select(&s, &keep(100), now(5));
        assert_eq!(
            (entries, caches(gone)),
            (vec![true, false], vec!["apt".to_string(), "npm".to_string()])
        );
        // With --older-than 3h, npm (used 2 hours ago) and b stay, though over the budget.
        let both = PrunePolicy {
            keep_bytes: Some(100),
            older_than: Some(Duration::from_secs(3 * H)),
            all: false,
        };
        let (entries, gone) = select(&s, &both, now(5));
        assert_eq!((entries, caches(gone)), (vec![true, false], vec!["apt".to_string()]));
    }

    #[test]
    fn older_than_all_and_broken_entries() {
        // The third entry's blob is gone, the fourth is unreadable.
        let s = survey(&[("a", 0), ("b", 10), ("gone", 10), ("", 10)], &[("a", 1), ("b", 1)], &[]);
        let older = |h| PrunePolicy {
            older_than: Some(Duration::from_secs(h * H)),
            ..PrunePolicy::default()
        };
        assert_eq!(doomed(&s, &older(10), now(11)), [true, false, true, true]);
        assert_eq!(doomed(&s, &older(12), now(11)), [false, false, true, true]);
        assert_eq!(doomed(&s, &older(0), now(11)), [true; 4]);
        // A use in the clock's future is recent.
        assert_eq!(doomed(&s, &older(1), now(5)), [true, false, true, true]);
        assert_eq!(doomed(&s, &PrunePolicy::default(), now(11)), [false, false, true, true]);
        let all = PrunePolicy { all: true, ..PrunePolicy::default() };
        assert_eq!(doomed(&s, &all, now(0)), [true; 4]);
    }
}
