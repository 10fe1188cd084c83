//! Registry settings from images.toml `[registries."host"]`, over those of the environment
//! (certs.d directories, docker's config.json).

use super::config::RegistryConfig;
use crate::manifest::Manifest;

impl RegistryConfig {
    /// The environment's settings with images.toml's `insecure`, `mirrors` and `ca_file`
    /// added per host.
    pub fn for_manifest(manifest: &Manifest) -> RegistryConfig {
        let mut config = RegistryConfig::from_environment();
        for (host, settings) in &manifest.registries {
            let h = config.host_mut(host);
            h.insecure |= settings.insecure;
            // The project's mirrors are tried before any the machine knows.
            let mut mirrors = settings.mirrors.clone();
            mirrors.extend(h.mirrors.drain(..).filter(|m| !settings.mirrors.contains(m)));
            h.mirrors = mirrors;
            if let Some(ca) = &settings.ca_file {
                if !h.ca_files.contains(ca) {
                    h.ca_files.push(ca.clone());
                }
            }
        }
        config
    }
}
