//! The cache index: cache key → the layer a step produced. A plain, serialisable mapping
//! kept as one small JSON file per key under the store's `cache/` directory, so that
//! exporting it to a registry (DESIGN.md section 14) is another backend, not a rewrite.

use std::path::PathBuf;

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

pub struct CacheIndex {
    dir: PathBuf,
    /// Entries are written through the store, so a crash leaves no partial file here.
    store: Store,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache index {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl CacheIndex {
    pub fn open(store: &Store) -> Result<CacheIndex, CacheError> {
        Ok(CacheIndex { dir: store.state_dir("cache")?, store: store.clone() })
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        let hex = key.0.hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.json"))
    }

    /// The layer for `key`, if recorded and its blob is still in the store. An unreadable
    /// entry is a miss (it will be rewritten), never an error: the cache is an optimisation.
    pub fn get(&self, store: &Store, key: &CacheKey) -> Option<CachedLayer> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let entry: CachedLayer = serde_json::from_slice(&bytes).ok()?;
        store.has_blob(&entry.blob.digest).then_some(entry)
    }

    pub fn put(&self, key: &CacheKey, entry: &CachedLayer) -> Result<(), CacheError> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| CacheError::Io { path: parent.to_path_buf(), source })?;
        }
        let bytes = serde_json::to_vec(entry).unwrap_or_default();
        self.store.atomic_write(&path, &bytes)?;
        Ok(())
    }

    /// The layer an alias key stands for, with the content key the stage continues from.
    pub fn get_alias(&self, store: &Store, alias: &CacheKey) -> Option<(CachedLayer, CacheKey)> {
        let entry = self.get(store, alias)?;
        let key = CacheKey(entry.resolves_to.clone()?);
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
        self.entries().into_iter().map(|e| e.blob.digest).collect()
    }

    /// Every recorded layer's diffID, so that prune keeps their snapshots.
    pub fn diff_ids(&self) -> Vec<Digest> {
        self.entries().into_iter().map(|e| e.diff_id).collect()
    }

    fn entries(&self) -> Vec<CachedLayer> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                if let Ok(bytes) = std::fs::read(file.path()) {
                    if let Ok(entry) = serde_json::from_slice::<CachedLayer>(&bytes) {
                        out.push(entry);
                    }
                }
            }
        }
        out
    }
}
