//! The cache index shared through a registry (DESIGN.md section 14): `--cache-to REF`
//! exports the entries a build used or made, and `--cache-from REF` lets a build in another
//! store (a fresh CI machine) reuse them, fetching a layer only when one of its steps hits.
//!
//! What REF holds is an OCI image manifest whose config (media type [`INDEX_MEDIA_TYPE`])
//! is the index, a JSON map from cache key to layer, and whose layers are the layer blobs
//! the index names, so the registry keeps them and a push can mount them. One tag serves a
//! whole fleet: an export merges into what REF holds, replacing the entries of the images
//! it built and keeping those of the others, so that a `--since` build of two images does
//! not drop the rest of the fleet's cache.
//!
//! The cache is an optimisation: an index that cannot be read, a blob that cannot be
//! fetched or that is not what its entry says is a warning and a step built locally, never
//! a failed build.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::cache::CachedLayer;
use super::key::CacheKey;
use crate::digest::{Digest, Hasher};
use crate::oci::{self, Descriptor, ImageManifest};
use crate::reference::{Reference, Repository};
use crate::registry::pull::{fetch_blob, Stats};
use crate::registry::{Registry, RegistryError};
use crate::store::Store;

/// The media type of the index blob: the manifest's config.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.ferry.cache.index.v1+json";

/// An index larger than this is not a ferry cache (a fleet's is a few hundred KiB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Uploads at once during an export.
const UPLOADS_IN_FLIGHT: usize = 4;

#[derive(Debug, Default, Serialize, Deserialize)]
struct SharedIndex {
    version: u32,
    entries: BTreeMap<CacheKey, SharedEntry>,
}

const INDEX_VERSION: u32 = 1;

/// One entry of the shared index: the layer, and the images whose build used it (an
/// export replaces the entries of the images it built).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SharedEntry {
    #[serde(flatten)]
    layer: CachedLayer,
    images: BTreeSet<String>,
}

/// What the imported indexes gave this build.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// `--cache-from` references read, with the entries each holds.
    pub sources: Vec<(String, usize)>,
    /// Steps served from a shared index (the local cache missed them).
    pub hits: usize,
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
}

/// What an export did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub reference: String,
    /// The manifest now at the reference.
    pub digest: Digest,
    /// Entries in the exported index: this build's and those of the images it did not build.
    pub entries: usize,
    pub blobs_uploaded: usize,
    pub bytes_uploaded: u64,
}

/// An index read from a `--cache-from` reference.
struct Source {
    /// The reference as the user gave it, for messages.
    name: String,
    reference: Reference,
    entries: BTreeMap<CacheKey, SharedEntry>,
}

/// The shared cache of one build: the indexes read from `--cache-from`, and the entries
/// the build used or made, for `--cache-to`.
pub struct SharedCache<'r> {
    registry: &'r dyn Registry,
    /// First match wins, in the order given.
    sources: Vec<Source>,
    /// Sources that failed (after retries) during this build, by position in `sources`.
    given_up: Mutex<BTreeSet<usize>>,
    used: Mutex<BTreeMap<CacheKey, SharedEntry>>,
    report: Mutex<ImportReport>,
}

impl<'r> SharedCache<'r> {
    pub fn new(registry: &'r dyn Registry) -> SharedCache<'r> {
        SharedCache {
            registry,
            sources: Vec::new(),
            given_up: Mutex::new(BTreeSet::new()),
            used: Mutex::new(BTreeMap::new()),
            report: Mutex::new(ImportReport::default()),
        }
    }

    /// Read the index at each of `from`. One that does not exist yet or cannot be read is
    /// skipped; the returned warnings say which and why.
    pub fn import(&mut self, from: &[Reference]) -> Vec<String> {
        let mut warnings = Vec::new();
        for reference in from {
            match read_index(self.registry, reference) {
                Ok(Some(index)) => {
                    lock(&self.report).sources.push((reference.familiar(), index.entries.len()));
                    self.sources.push(Source {
                        name: reference.familiar(),
                        reference: reference.clone(),
                        entries: index.entries,
                    });
                }
                Ok(None) => warnings.push(format!(
                    "--cache-from {}: no cache there yet; building without it",
                    reference.familiar()
                )),
                Err(e) => warnings.push(format!(
                    "--cache-from {}: {e}; building without it",
                    reference.familiar()
                )),
            }
        }
        warnings
    }

    /// The layer a shared index gives `key` (an alias key of a `COPY --from` when `alias`,
    /// whose entry then names the content key it stands for), its blob fetched into `store`
    /// and checked against the entry. None when no index has it or it cannot be used
    /// (logged with `step`). A registry that fails after its retries, or refuses access, is
    /// not asked again during this build: every later step would fail the same way.
    pub fn lookup(
        &self,
        store: &Store,
        key: &CacheKey,
        alias: bool,
        step: &str,
    ) -> Option<CachedLayer> {
        for (i, source) in self.sources.iter().enumerate() {
            let Some(entry) = source.entries.get(key) else { continue };
            if lock(&self.given_up).contains(&i) {
                continue;
            }
            let unusable = |why: &dyn std::fmt::Display| {
                tracing::warn!(
                    "--cache-from {}: the entry for `{step}` cannot be used: {why}; building the step",
                    source.name
                )
            };
            let layer = match checked_layer(&entry.layer, alias) {
                Ok(layer) => layer,
                Err(why) => {
                    unusable(&why);
                    continue;
                }
            };
            let mut stats = Stats::default();
            if let Err(e) =
                fetch_blob(store, self.registry, &source.reference, &layer.blob, &mut stats)
            {
                if gives_up_on_the_registry(&e) {
                    if lock(&self.given_up).insert(i) {
                        tracing::warn!(
                            "--cache-from {}: {e}; not using it for the rest of this build",
                            source.name
                        );
                    }
                } else {
                    unusable(&e);
                }
                continue;
            }
            if let Err(why) = check_diff_id(store, &layer) {
                unusable(&why);
                continue;
            }
            let mut report = lock(&self.report);
            report.hits += 1;
            report.blobs_fetched += stats.fetched;
            report.bytes_fetched += stats.bytes;
            return Some(layer);
        }
        None
    }

    /// Note that `image`'s build used or made `layer` for `key`: it goes into the export.
    pub fn record(&self, key: &CacheKey, layer: &CachedLayer, image: &str) {
        let mut used = lock(&self.used);
        let entry = used
            .entry(key.clone())
            .or_insert_with(|| SharedEntry { layer: layer.clone(), images: BTreeSet::new() });
        entry.images.insert(image.to_string());
    }

    pub fn import_report(&self) -> ImportReport {
        lock(&self.report).clone()
    }

    /// Write the index of what this build used or made to `to`, merged with the entries
    /// `to` holds for images this build did not make (`built` are the images it made):
    /// missing blobs first, then the index, then the manifest, so the tag never names
    /// content the registry lacks.
    pub fn export(
        &self,
        store: &Store,
        to: &Reference,
        built: &BTreeSet<String>,
    ) -> Result<ExportReport, RegistryError> {
        let repo = &to.repository;
        let (existing, there) = match read_cache(self.registry, to)? {
            Some((index, manifest)) => {
                (index, manifest.layers.into_iter().map(|l| l.digest).collect())
            }
            None => (SharedIndex::default(), BTreeSet::new()),
        };
        let ours = lock(&self.used).clone();
        let mut entries = merge(existing.entries, ours, built);
        // A kept entry whose blob the old manifest did not hold (a hand-edited index) and
        // that this store cannot upload would make the registry refuse the manifest.
        entries.retain(|_, e| {
            there.contains(&e.layer.blob.digest) || store.has_blob(&e.layer.blob.digest)
        });

        let mut blobs: BTreeMap<Digest, Descriptor> = BTreeMap::new();
        for e in entries.values() {
            blobs.entry(e.layer.blob.digest.clone()).or_insert_with(|| e.layer.blob.clone());
        }
        let missing: Vec<&Descriptor> =
            blobs.values().filter(|d| !there.contains(&d.digest)).collect();
        let (blobs_uploaded, bytes_uploaded) = self.upload_missing(store, repo, &missing)?;

        let index = SharedIndex { version: INDEX_VERSION, entries };
        let bytes = serde_json::to_vec(&index).map_err(|e| RegistryError::Invalid {
            registry: repo.registry.clone(),
            what: "the cache index".into(),
            reason: e.to_string(),
        })?;
        let digest = store.put_blob_bytes(&bytes, None)?;
        let size = bytes.len() as u64;
        if self.registry.blob_exists(repo, &digest)?.is_none() {
            self.registry.put_blob(repo, &digest, size, &store.blob_path(&digest))?;
        }
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(oci::media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: Descriptor::new(INDEX_MEDIA_TYPE, digest, size),
            layers: blobs.into_values().collect(),
            subject: None,
            annotations: BTreeMap::new(),
        };
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        let tag = to.manifest_reference();
        let digest = self.registry.put_manifest(
            repo,
            &tag,
            oci::media_type::OCI_MANIFEST,
            &manifest_bytes,
        )?;
        Ok(ExportReport {
            reference: to.familiar(),
            digest,
            entries: index.entries.len(),
            blobs_uploaded,
            bytes_uploaded,
        })
    }

    /// Upload the blobs the registry lacks, a few at a time: (count, bytes).
    fn upload_missing(
        &self,
        store: &Store,
        repo: &Repository,
        blobs: &[&Descriptor],
    ) -> Result<(usize, u64), RegistryError> {
        let queue = Mutex::new(blobs.iter());
        let done = Mutex::new((0usize, 0u64));
        let failed: Mutex<Option<RegistryError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..UPLOADS_IN_FLIGHT.min(blobs.len()) {
                s.spawn(|| loop {
                    if lock(&failed).is_some() {
                        return;
                    }
                    let Some(blob) = lock(&queue).next() else { return };
                    let uploaded = self.registry.blob_exists(repo, &blob.digest).and_then(|has| {
                        if has.is_some() {
                            return Ok(false);
                        }
                        let path = store.blob_path(&blob.digest);
                        self.registry.put_blob(repo, &blob.digest, blob.size, &path).map(|()| true)
                    });
                    match uploaded {
                        Ok(true) => {
                            let mut d = lock(&done);
                            d.0 += 1;
                            d.1 += blob.size;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            lock(&failed).get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(e) => Err(e),
            None => Ok(done.into_inner().unwrap_or_else(|e| e.into_inner())),
        }
    }
}

/// The entries an export writes: what `ours` used or made, and from `theirs` (what the
/// reference held) the entries of images this build did not make (a failed or skipped
/// image is not made: its entries stay). An entry of a built
/// image that this build no longer reaches is dropped, so the index follows the fleet
/// instead of growing with every change.
fn merge(
    theirs: BTreeMap<CacheKey, SharedEntry>,
    ours: BTreeMap<CacheKey, SharedEntry>,
    built: &BTreeSet<String>,
) -> BTreeMap<CacheKey, SharedEntry> {
    let mut out: BTreeMap<CacheKey, SharedEntry> = theirs
        .into_iter()
        .filter_map(|(key, mut entry)| {
            entry.images.retain(|i| !built.contains(i));
            (!entry.images.is_empty()).then_some((key, entry))
        })
        .collect();
    // This build's layer wins a key both hold: it is the one the build used, its blob is in
    // this store, and a `--no-cache` build can so replace a bad entry.
    for (key, mut entry) in ours {
        if let Some(kept) = out.remove(&key) {
            entry.images.extend(kept.images);
        }
        out.insert(key, entry);
    }
    out
}

/// The index at `reference`; None when the reference does not exist.
fn read_index(
    registry: &dyn Registry,
    reference: &Reference,
) -> Result<Option<SharedIndex>, RegistryError> {
    Ok(read_cache(registry, reference)?.map(|(index, _)| index))
}

/// The index at `reference` with the manifest that holds it; None when the reference does
/// not exist.
fn read_cache(
    registry: &dyn Registry,
    reference: &Reference,
) -> Result<Option<(SharedIndex, ImageManifest)>, RegistryError> {
    let repo = &reference.repository;
    let invalid = |reason: String| RegistryError::Invalid {
        registry: repo.registry.clone(),
        what: format!("the cache at {}", reference.familiar()),
        reason,
    };
    let fetched = match registry.get_manifest(repo, &reference.manifest_reference()) {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let manifest: ImageManifest = serde_json::from_slice(&fetched.bytes)
        .map_err(|e| invalid(format!("its manifest is not an image manifest: {e}")))?;
    if manifest.config.media_type != INDEX_MEDIA_TYPE {
        return Err(invalid(format!(
            "it is not a ferry cache (config media type {:?}); refusing to use or overwrite it",
            manifest.config.media_type
        )));
    }
    if manifest.config.size > MAX_INDEX_BYTES {
        return Err(invalid(format!(
            "its index has {} bytes, more than the {MAX_INDEX_BYTES} ferry reads",
            manifest.config.size
        )));
    }
    let stream = registry.get_blob(repo, &manifest.config.digest)?;
    let mut bytes = Vec::new();
    stream.reader.take(MAX_INDEX_BYTES + 1).read_to_end(&mut bytes).map_err(|e| {
        RegistryError::Interrupted {
            registry: repo.registry.clone(),
            what: format!("the cache index of {}", reference.familiar()),
            reason: e.to_string(),
        }
    })?;
    let actual = Digest::of(&bytes);
    if actual != manifest.config.digest {
        return Err(RegistryError::DigestMismatch {
            registry: repo.registry.clone(),
            what: format!("the cache index of {}", reference.familiar()),
            expected: manifest.config.digest.clone(),
            actual,
        });
    }
    let index: SharedIndex =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("its index: {e}")))?;
    if index.version != INDEX_VERSION {
        return Err(invalid(format!(
            "index version {} (ferry reads {INDEX_VERSION})",
            index.version
        )));
    }
    Ok(Some((index, manifest)))
}

/// Whether a failed download says the registry will fail every other one too: it is down,
/// failing after retries, or refusing this user.
fn gives_up_on_the_registry(e: &RegistryError) -> bool {
    e.is_transient()
        || matches!(
            e,
            RegistryError::AuthRequired { .. }
                | RegistryError::Unauthorized { .. }
                | RegistryError::Denied { .. }
                | RegistryError::Tls { .. }
        )
}

/// The layer an entry gives, as ferry will put it in an image: an entry of the wrong kind
/// (an alias without the key it stands for, or a content entry with one) is refused, and
/// the blob's descriptor is rebuilt from its media type, digest and size alone, so nothing
/// else an index says (URLs, annotations) reaches a manifest. Only the layer types every
/// runtime unpacks are taken.
fn checked_layer(layer: &CachedLayer, alias: bool) -> Result<CachedLayer, String> {
    match (alias, &layer.resolves_to) {
        (true, None) => return Err("it is an alias entry without the key it stands for".into()),
        (false, Some(_)) => return Err("it is an alias entry under a content key".into()),
        _ => {}
    }
    let media_type = layer.blob.media_type.as_str();
    if layer_compression(media_type).is_none() {
        return Err(format!("its layer has media type {media_type:?}"));
    }
    Ok(CachedLayer {
        blob: Descriptor::new(media_type, layer.blob.digest.clone(), layer.blob.size),
        ..layer.clone()
    })
}

/// How a layer of `media_type` is compressed, for the layer types a shared cache may hold.
fn layer_compression(media_type: &str) -> Option<crate::layer::Compression> {
    use crate::layer::Compression;
    use oci::media_type::*;
    match media_type {
        OCI_LAYER => Some(Compression::None),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(Compression::Gzip),
        OCI_LAYER_ZSTD => Some(Compression::Zstd),
        _ => None,
    }
}

/// The layer blob must decompress to the entry's diff_id: the image config will list it,
/// and a wrong one makes an image no runtime can unpack.
fn check_diff_id(store: &Store, layer: &CachedLayer) -> Result<(), String> {
    let compression = layer_compression(&layer.blob.media_type)
        .ok_or_else(|| format!("its layer has media type {:?}", layer.blob.media_type))?;
    let file = store.open_blob(&layer.blob.digest).map_err(|e| e.to_string())?;
    // As the media type says, not as the bytes look: a runtime trusts the media type.
    let mut reader = crate::layer::decompressing_reader(std::io::BufReader::new(file), compression)
        .map_err(|e| format!("blob {}: {e}", layer.blob.digest))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = reader.read(&mut buf).map_err(|e| format!("blob {}: {e}", layer.blob.digest))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let (actual, _) = hasher.finish();
    if actual != layer.diff_id {
        return Err(format!(
            "blob {} unpacks to {actual}, not the entry's diff_id {}",
            layer.blob.digest, layer.diff_id
        ));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, images: &[&str]) -> (CacheKey, SharedEntry) {
        let d = Digest::of(&[n]);
        let layer = CachedLayer {
            diff_id: d.clone(),
            blob: Descriptor::new(oci::media_type::OCI_LAYER_ZSTD, d.clone(), 1),
            created_by: format!("RUN {n}"),
            resolves_to: None,
        };
        (CacheKey(d), SharedEntry { layer, images: images.iter().map(|s| s.to_string()).collect() })
    }

    #[test]
    fn an_export_replaces_the_entries_of_the_images_it_built_and_keeps_the_others() {
        let theirs: BTreeMap<_, _> = [
            entry(1, &["base", "api"]), // shared with an image not built now: kept
            entry(2, &["api"]),         // only the rebuilt image's: dropped
            entry(3, &["web"]),         // not built now: kept
        ]
        .into();
        // This build made key 1's layer anew (say with --no-cache): its layer wins.
        let (key1, mut rebuilt) = entry(1, &["api"]);
        rebuilt.layer.created_by = "RUN 1, rebuilt".into();
        let ours: BTreeMap<_, _> = [(key1.clone(), rebuilt), entry(4, &["api"])].into();
        let built: BTreeSet<String> = ["api".to_string()].into();
        let merged = merge(theirs, ours, &built);
        let keys: BTreeSet<_> = merged.keys().cloned().collect();
        assert_eq!(keys, [1, 3, 4].map(|n| entry(n, &[]).0).into());
        let images = |n: u8| merged[&entry(n, &[]).0].images.iter().cloned().collect::<Vec<_>>();
        assert_eq!(images(1), ["api", "base"]);
        assert_eq!(merged[&key1].layer.created_by, "RUN 1, rebuilt");
        assert_eq!(images(3), ["web"]);
        assert_eq!(images(4), ["api"]);
    }

    #[test]
    fn an_entry_gives_only_a_plain_layer_of_its_own_kind() {
        let (_, e) = entry(1, &["api"]);
        let mut dressed = e.layer.clone();
        dressed.blob.urls = vec!["https://elsewhere.example/blob".into()];
        dressed.blob.annotations.insert("k".into(), "v".into());
        let layer = checked_layer(&dressed, false).unwrap();
        assert_eq!(
            layer.blob,
            Descriptor::new(&e.layer.blob.media_type, e.layer.blob.digest.clone(), 1)
        );

        let alias = CachedLayer { resolves_to: Some(Digest::of(b"k")), ..e.layer.clone() };
        assert!(checked_layer(&alias, true).is_ok());
        assert!(checked_layer(&alias, false)
            .unwrap_err()
            .contains("alias entry under a content key"));
        assert!(checked_layer(&e.layer, true).unwrap_err().contains("without the key"));

        for media_type in [
            "application/vnd.oci.image.layer.v1.tar+xz",
            oci::media_type::OCI_LAYER_NONDIST_GZIP,
            oci::media_type::OCI_CONFIG,
        ] {
            let mut odd = e.layer.clone();
            odd.blob.media_type = media_type.into();
            assert!(checked_layer(&odd, false).unwrap_err().contains("media type"), "{media_type}");
        }
    }

    #[test]
    fn the_index_round_trips_with_alias_entries() {
        let (key, mut e) = entry(1, &["api"]);
        e.layer.resolves_to = Some(Digest::of(b"content"));
        let index =
            SharedIndex { version: INDEX_VERSION, entries: [(key.clone(), e.clone())].into() };
        let bytes = serde_json::to_vec(&index).unwrap();
        let back: SharedIndex = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.entries[&key], e);
    }
}
