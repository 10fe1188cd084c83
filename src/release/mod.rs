//! Releases: environments, tag templates, the semver policy, push and promotion plans.

pub mod labels;
pub mod policy;
pub mod push;
pub mod template;
pub mod variants;

use crate::manifest::{Compression, Manifest};
use crate::registry::RegistryConfig;

/// Registry settings for a project: the environment's (certs directories) and, over them,
/// images.toml's `[registries."host"]`.
pub fn registry_config(manifest: &Manifest) -> RegistryConfig {
    let mut config = RegistryConfig::from_environment();
    for (host, settings) in &manifest.registries {
        let h = config.host_mut(host);
        h.insecure |= settings.insecure;
        for m in &settings.mirrors {
            if !h.mirrors.contains(m) {
                h.mirrors.push(m.clone());
            }
        }
        if let Some(ca) = &settings.ca_file {
            if !h.ca_files.contains(ca) {
                h.ca_files.push(ca.clone());
            }
        }
    }
    config
}

/// The layer compression images.toml names.
pub fn layer_compression(c: Compression) -> crate::layer::LayerCompression {
    match c {
        Compression::Zstd => crate::layer::LayerCompression::Zstd,
        Compression::Gzip => crate::layer::LayerCompression::Gzip,
    }
}
