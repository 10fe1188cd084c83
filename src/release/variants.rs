//! Compression variants: the image as an environment receives it.
//!
//! The store keeps each layer in the project's compression. An environment may ask for
//! another one (`compression = "gzip"` for old clients); the layers are then re-encoded
//! (`layer::recompress`, which checks the diffID) and the manifest is re-written with the
//! new layer digests and media types. The config is unchanged (diffIDs do not depend on
//! compression), but the manifest digest does change: that re-written manifest is what is
//! pushed and what the tags point to.
//!
//! Each variant is computed once: `compressed/` under the store maps
//! `diffID + compression → blob` and `manifest digest + compression → re-written manifest`.
//! An entry whose blob is gone (pruned) is recomputed, never trusted.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::layer::{recompress, LayerCompression, LayerError};
use crate::oci::{Descriptor, ImageManifest};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum VariantError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {diff_id} (blob {blob}) cannot be re-compressed to {to}: {source}")]
    Layer { diff_id: Digest, blob: Digest, to: LayerCompression, source: LayerError },
    #[error("image {manifest}: {reason}")]
    Invalid { manifest: Digest, reason: String },
}

/// An image manifest ready to push: exact bytes and their descriptor.
#[derive(Debug, Clone)]
pub struct PushableManifest {
    pub descriptor: Descriptor,
    pub bytes: Vec<u8>,
    pub manifest: ImageManifest,
    /// The manifest digest in the store (what `ferry build` reported).
    pub source_digest: Digest,
    /// Whether the layers were re-compressed, so the digest differs from the store's.
    pub rewritten: bool,
    /// Layer variants computed by this call (0 when all came from the index).
    pub computed: usize,
}

/// Which compression a layer needs for an environment, if it must change.
///
/// A gzip environment exists for clients that cannot read zstd: every layer becomes gzip.
/// In a zstd environment gzip layers are kept as they are (as BuildKit does without
/// `force-compression`): they come from pulled base images, every client reads gzip, and
/// re-encoding them would only lose their identity with the upstream blobs. Uncompressed
/// layers are compressed in both.
pub fn target_compression(
    layer_media_type: &str,
    env: LayerCompression,
) -> Option<LayerCompression> {
    let current = LayerCompression::from_media_type(layer_media_type)?;
    let change = match env {
        LayerCompression::Gzip => current != LayerCompression::Gzip,
        LayerCompression::Zstd => current == LayerCompression::None,
        LayerCompression::None => false,
    };
    change.then_some(env)
}

/// The variant index under the store.
pub struct Variants {
    store: Store,
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    descriptor: Descriptor,
}

impl Variants {
    pub fn open(store: &Store) -> Result<Variants, VariantError> {
        let dir = store.state_dir("compressed")?;
        for sub in ["layers", "manifests"] {
            store.state_dir(&format!("compressed/{sub}"))?;
        }
        Ok(Variants { store: store.clone(), dir })
    }

    fn entry_path(&self, kind: &str, digest: &Digest, to: LayerCompression) -> PathBuf {
        self.dir.join(kind).join(format!("{}.{to}.json", digest.hex()))
    }

    fn lookup(&self, kind: &str, digest: &Digest, to: LayerCompression) -> Option<Descriptor> {
        let bytes = std::fs::read(self.entry_path(kind, digest, to)).ok()?;
        let entry: Entry = serde_json::from_slice(&bytes).ok()?;
        self.store.has_blob(&entry.descriptor.digest).then_some(entry.descriptor)
    }

    fn record(
        &self,
        kind: &str,
        digest: &Digest,
        to: LayerCompression,
        descriptor: &Descriptor,
    ) -> Result<(), VariantError> {
        let bytes = serde_json::to_vec(&Entry { descriptor: descriptor.clone() }).map_err(|e| {
            StoreError::Invalid { what: "a variant entry".into(), reason: e.to_string() }
        })?;
        self.store.atomic_write(&self.entry_path(kind, digest, to), &bytes)?;
        Ok(())
    }

    /// The blob of layer `diff_id` in compression `to`, made from `source` (a stored blob of
    /// the same layer) if it was never made before. The bool says whether it was made now.
    pub fn layer(
        &self,
        source: &Descriptor,
        diff_id: &Digest,
        to: LayerCompression,
    ) -> Result<(Descriptor, bool), VariantError> {
        if let Some(d) = self.lookup("layers", diff_id, to) {
            return Ok((d, false));
        }
        let layer_err = |source_err: LayerError| VariantError::Layer {
            diff_id: diff_id.clone(),
            blob: source.digest.clone(),
            to,
            source: source_err,
        };
        let from = LayerCompression::from_media_type(&source.media_type).ok_or_else(|| {
            VariantError::Invalid {
                manifest: source.digest.clone(),
                reason: format!(
                    "layer media type {:?} is not one ferry can re-compress",
                    source.media_type
                ),
            }
        })?;
        let blob = self.store.open_blob(&source.digest)?;
        let writer = self.store.blob_writer()?;
        let (packed, writer) =
            recompress(std::io::BufReader::new(blob), from.into(), to, diff_id, writer)
                .map_err(layer_err)?;
        let (digest, size) = writer.commit(Some(&packed.blob_digest))?;
        let mut descriptor = Descriptor::new(to.media_type(), digest, size);
        descriptor.annotations = source.annotations.clone();
        self.record("layers", diff_id, to, &descriptor)?;
        tracing::debug!(%diff_id, %to, blob = %descriptor.digest, "computed a layer variant");
        Ok((descriptor, true))
    }

    /// The image `manifest` (stored under `descriptor`) as an environment with compression
    /// `to` receives it. `diff_ids` are the config's, one per layer.
    pub fn manifest(
        &self,
        descriptor: &Descriptor,
        manifest: &ImageManifest,
        diff_ids: &[Digest],
        to: LayerCompression,
    ) -> Result<PushableManifest, VariantError> {
        let unchanged = || -> Result<PushableManifest, VariantError> {
            Ok(PushableManifest {
                descriptor: descriptor.clone(),
                bytes: self.store.read_blob(&descriptor.digest)?,
                manifest: manifest.clone(),
                source_digest: descriptor.digest.clone(),
                rewritten: false,
                computed: 0,
            })
        };
        let changes: Vec<Option<LayerCompression>> =
            manifest.layers.iter().map(|l| target_compression(&l.media_type, to)).collect();
        if changes.iter().all(Option::is_none) {
            return unchanged();
        }
        if diff_ids.len() != manifest.layers.len() {
            return Err(VariantError::Invalid {
                manifest: descriptor.digest.clone(),
                reason: format!(
                    "the manifest has {} layers but the config {} diffIDs",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        let mut rewritten = manifest.clone();
        let mut computed = 0;
        for ((layer, diff_id), change) in rewritten.layers.iter_mut().zip(diff_ids).zip(&changes) {
            if let Some(to) = change {
                let (variant, made) = self.layer(layer, diff_id, *to)?;
                computed += usize::from(made);
                *layer = variant;
            }
        }
        let media = manifest.media_type.clone().unwrap_or_else(|| descriptor.media_type.clone());
        if let Some(known) = self.lookup("manifests", &descriptor.digest, to) {
            let bytes = self.store.read_blob(&known.digest)?;
            if let Ok(m) = serde_json::from_slice::<ImageManifest>(&bytes) {
                if m == rewritten {
                    return Ok(PushableManifest {
                        descriptor: known,
                        bytes,
                        manifest: m,
                        source_digest: descriptor.digest.clone(),
                        rewritten: true,
                        computed,
                    });
                }
            }
        }
        let stored = self.store.put_json(&media, &rewritten)?;
        self.record("manifests", &descriptor.digest, to, &stored)?;
        Ok(PushableManifest {
            bytes: self.store.read_blob(&stored.digest)?,
            descriptor: stored,
            manifest: rewritten,
            source_digest: descriptor.digest.clone(),
            rewritten: true,
            computed,
        })
    }

    /// Every blob the index points at, so that a prune can keep them (as it keeps the
    /// cache index's).
    pub fn blobs(&self) -> Vec<Digest> {
        let mut out = Vec::new();
        for kind in ["layers", "manifests"] {
            for file in std::fs::read_dir(self.dir.join(kind)).into_iter().flatten().flatten() {
                if let Ok(bytes) = std::fs::read(file.path()) {
                    if let Ok(e) = serde_json::from_slice::<Entry>(&bytes) {
                        out.push(e.descriptor.digest);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{pack_entries, Epoch, LayerEntry, LayerOptions};
    use crate::oci::{media_type, ImageConfig};

    fn image(
        store: &Store,
        compression: LayerCompression,
    ) -> (Descriptor, ImageManifest, Vec<Digest>) {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for i in 0..2 {
            let entries =
                vec![LayerEntry::bytes(format!("f{i}"), format!("content {i}").repeat(100))];
            let (packed, blob) = pack_entries(
                entries,
                &LayerOptions { source_date_epoch: Epoch::Clamp(0), compression },
                Vec::new(),
            )
            .unwrap();
            store.put_blob_bytes(&blob, Some(&packed.blob_digest)).unwrap();
            layers.push(Descriptor::new(packed.media_type, packed.blob_digest, packed.blob_size));
            diff_ids.push(packed.diff_id);
        }
        let mut config = ImageConfig::default();
        config.rootfs.diff_ids = diff_ids.clone();
        let config = store.put_json(media_type::OCI_CONFIG, &config).unwrap();
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: [("org.opencontainers.image.version".to_string(), "1.0.0".to_string())]
                .into(),
        };
        let desc = store.put_json(media_type::OCI_MANIFEST, &manifest).unwrap();
        (desc, manifest, diff_ids)
    }

    #[test]
    fn gzip_variant_is_computed_once_and_keeps_the_diff_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (desc, manifest, diff_ids) = image(&store, LayerCompression::Zstd);
        let variants = Variants::open(&store).unwrap();

        let same = variants.manifest(&desc, &manifest, &diff_ids, LayerCompression::Zstd).unwrap();
        assert!(!same.rewritten);
        assert_eq!(same.descriptor.digest, desc.digest);

        let gz = variants.manifest(&desc, &manifest, &diff_ids, LayerCompression::Gzip).unwrap();
        assert!(gz.rewritten);
        assert_eq!(gz.computed, 2);
        assert_ne!(gz.descriptor.digest, desc.digest);
        assert_eq!(Digest::of(&gz.bytes), gz.descriptor.digest);
        assert_eq!(gz.manifest.config, manifest.config, "the config does not change");
        assert_eq!(gz.manifest.annotations, manifest.annotations);
        for (layer, diff_id) in gz.manifest.layers.iter().zip(&diff_ids) {
            assert_eq!(layer.media_type, crate::layer::MEDIA_TYPE_TAR_GZIP);
            let blob = store.read_blob(&layer.digest).unwrap();
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar)
                .unwrap();
            assert_eq!(&Digest::of(&tar), diff_id);
        }

        let again = variants.manifest(&desc, &manifest, &diff_ids, LayerCompression::Gzip).unwrap();
        assert_eq!(again.computed, 0, "every variant comes from the index");
        assert_eq!(again.descriptor, gz.descriptor);
        assert!(variants.blobs().contains(&gz.descriptor.digest));
    }

    #[test]
    fn a_pruned_variant_is_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (desc, manifest, diff_ids) = image(&store, LayerCompression::Zstd);
        let variants = Variants::open(&store).unwrap();
        let gz = variants.manifest(&desc, &manifest, &diff_ids, LayerCompression::Gzip).unwrap();
        let path = store.blob_path(&gz.manifest.layers[0].digest);
        std::fs::remove_file(path).unwrap();
        let again = variants.manifest(&desc, &manifest, &diff_ids, LayerCompression::Gzip).unwrap();
        assert_eq!(again.computed, 1);
        assert_eq!(again.descriptor.digest, gz.descriptor.digest, "gzip output is deterministic");
    }

    #[test]
    fn zstd_environments_keep_gzip_layers() {
        use crate::layer::{MEDIA_TYPE_TAR, MEDIA_TYPE_TAR_GZIP, MEDIA_TYPE_TAR_ZSTD};
        assert_eq!(target_compression(MEDIA_TYPE_TAR_GZIP, LayerCompression::Zstd), None);
        assert_eq!(
            target_compression(MEDIA_TYPE_TAR, LayerCompression::Zstd),
            Some(LayerCompression::Zstd)
        );
        assert_eq!(
            target_compression(MEDIA_TYPE_TAR_ZSTD, LayerCompression::Gzip),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(target_compression(MEDIA_TYPE_TAR_ZSTD, LayerCompression::Zstd), None);
    }
}
