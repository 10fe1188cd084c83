//! An image's layer stack flattened into a directory, for writable bind mounts from a
//! stage or image. (Single files are read from the snapshots: see `MergedView::read_file`.)

use std::path::Path;

use crate::layer::{decompress, extract_layer, ExtractMode};
use crate::oci::Descriptor;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("reading layer {digest}: {source}")]
    Read { digest: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("extracting layer {digest}: {source}")]
    Layer { digest: String, source: crate::layer::LayerError },
}

/// Extract `layers` (bottom first) on top of each other into the empty directory `dest`.
pub fn flatten(store: &Store, layers: &[Descriptor], dest: &Path) -> Result<(), RootfsError> {
    for desc in layers {
        let blob = store.open_blob(&desc.digest)?;
        let (_, tar) = decompress(blob)
            .map_err(|source| RootfsError::Read { digest: desc.digest.to_string(), source })?;
        extract_layer(tar, dest, ExtractMode::Apply)
            .map_err(|source| RootfsError::Layer { digest: desc.digest.to_string(), source })?;
    }
    Ok(())
}
