//! `--output`: the built images written out of the store, as an OCI image layout directory
//! or a docker-archive file.

use std::path::Path;

use crate::oci::{Descriptor, ImageIndex, ANNOTATION_REF_NAME};
use crate::store::{ArchiveFormat, ArchiveImage, Store};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("--output {}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("--output: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Write `images` (name, manifest descriptor) as an OCI layout under `dir`, each named by
/// the `org.opencontainers.image.ref.name` annotation. Existing blobs are kept.
pub fn write_oci_layout(
    store: &Store,
    images: &[(String, Descriptor)],
    dir: &Path,
) -> Result<(), OutputError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OutputError::Io { path, source }
    };
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let mut index = ImageIndex::new_oci();
    for (name, desc) in images {
        let image = store.image(desc)?;
        for digest in image.blobs() {
            let target = blobs.join(digest.hex());
            if !target.exists() {
                let tmp = blobs.join(format!(".{}.tmp", digest.hex()));
                std::fs::copy(store.blob_path(&digest), &tmp).map_err(io(&tmp))?;
                std::fs::rename(&tmp, &target).map_err(io(&target))?;
            }
        }
        let mut d = desc.clone();
        d.annotations.insert(ANNOTATION_REF_NAME.to_string(), name.clone());
        index.manifests.push(d);
    }
    let layout = dir.join("oci-layout");
    std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&layout))?;
    let index_path = dir.join("index.json");
    crate::store::atomic_write(
        &index_path,
        &serde_json::to_vec_pretty(&index).unwrap_or_default(),
    )?;
    Ok(())
}

/// Write `images` as a docker-archive (`docker load -i FILE`).
pub fn write_docker_archive(
    store: &Store,
    images: &[(String, Descriptor)],
    file: &Path,
) -> Result<(), OutputError> {
    let list: Vec<ArchiveImage> = images
        .iter()
        .map(|(n, d)| ArchiveImage { name: Some(n.clone()), descriptor: d.clone() })
        .collect();
    store.save_archive(&list, ArchiveFormat::Docker, file)?;
    Ok(())
}
