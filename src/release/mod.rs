//! Releases: environments, tag templates, the semver policy, push and promotion plans.

pub mod labels;
pub mod policy;
pub mod promote;
pub mod push;
pub mod template;
pub mod variants;

use crate::manifest::Compression;

/// The layer compression images.toml names.
pub fn layer_compression(c: Compression) -> crate::layer::LayerCompression {
    match c {
        Compression::Zstd => crate::layer::LayerCompression::Zstd,
        Compression::Gzip => crate::layer::LayerCompression::Gzip,
    }
}
