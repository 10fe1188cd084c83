//! Images as users see them: a named manifest with its config; name resolution
//! (exact name, docker reference, digest or image-id prefix) and listing.

use std::collections::BTreeMap;

use super::{Result, Store, StoreError};
use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageConfig, ImageManifest, ParsedManifest, Platform};
use crate::reference::Reference;

/// An image in the store: its manifest and config, parsed.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image manifest's descriptor (the platform's manifest when the name points at an
    /// index).
    pub descriptor: Descriptor,
    /// The index the name points at, when it points at one.
    pub index: Option<Descriptor>,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
}

impl Image {
    /// The image id as docker shows it: the config digest.
    pub fn id(&self) -> &Digest {
        &self.manifest.config.digest
    }

    /// The manifest digest (the digest a registry knows the image by).
    pub fn digest(&self) -> &Digest {
        &self.descriptor.digest
    }

    /// Stored size: manifest, config and layer blobs as stored (layers compressed).
    pub fn size(&self) -> u64 {
        self.descriptor.size
            + self.manifest.config.size
            + self.manifest.layers.iter().map(|l| l.size).sum::<u64>()
    }

    /// Every blob of the image: manifest, config, layers (and the index, if any).
    pub fn blobs(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = self.index.iter().map(|d| d.digest.clone()).collect();
        v.push(self.descriptor.digest.clone());
        v.push(self.manifest.config.digest.clone());
        v.extend(self.manifest.layers.iter().map(|l| l.digest.clone()));
        v
    }
}

/// What a user-given name resolved to.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The store name it matched, or None when it matched by digest or image id.
    pub name: Option<String>,
    pub descriptor: Descriptor,
}

/// A row of `ferry images`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSummary {
    /// The store name.
    pub name: String,
    /// Repository and tag as docker would show them (`alpine`, `3.19`).
    pub repository: String,
    pub tag: Option<String>,
    /// Manifest digest.
    pub digest: Digest,
    /// Image id (config digest).
    pub id: Digest,
    pub created: Option<String>,
    pub size: u64,
}

impl Store {
    /// Read the manifest (following an index to the host platform) and config of `desc`.
    pub fn image(&self, desc: &Descriptor) -> Result<Image> {
        self.image_for_platform(desc, &Platform::host())
    }

    pub fn image_for_platform(&self, desc: &Descriptor, platform: &Platform) -> Result<Image> {
        let bytes = self.read_blob(&desc.digest)?;
        let (_, parsed) =
            oci::parse_manifest(&bytes, Some(&desc.media_type)).map_err(|reason| {
                StoreError::Invalid { what: format!("manifest {}", desc.digest), reason }
            })?;
        match parsed {
            ParsedManifest::Image(manifest) => {
                let config = self.read_config(&manifest)?;
                Ok(Image { descriptor: desc.clone(), index: None, manifest, config })
            }
            ParsedManifest::Index(index) => {
                let chosen = choose_platform(&index, platform).ok_or_else(|| {
                    StoreError::NoMatchingPlatform {
                        digest: desc.digest.clone(),
                        wanted: platform.to_string(),
                        available: index
                            .manifests
                            .iter()
                            .filter_map(|m| m.platform.as_ref().map(|p| p.to_string()))
                            .collect(),
                    }
                })?;
                let mut img = self.image_for_platform(chosen, platform)?;
                if img.index.is_some() {
                    return Err(StoreError::Invalid {
                        what: format!("index {}", desc.digest),
                        reason: "it nests another index".to_string(),
                    });
                }
                img.index = Some(desc.clone());
                Ok(img)
            }
        }
    }

    /// The descriptor of the stored manifest or index `digest`, from its own bytes. Use it
    /// to hold on to what a build produced: a name can be moved meanwhile by another
    /// process (two projects sharing the store and an images.toml key), a digest cannot.
    pub fn manifest_descriptor(&self, digest: &Digest) -> Result<Descriptor> {
        let bytes = self.read_blob(digest)?;
        let (media_type, _) = oci::parse_manifest(&bytes, None)
            .map_err(|reason| StoreError::Invalid { what: format!("manifest {digest}"), reason })?;
        Ok(Descriptor::new(media_type, digest.clone(), bytes.len() as u64))
    }

    fn read_config(&self, manifest: &ImageManifest) -> Result<ImageConfig> {
        let cd = &manifest.config;
        if !oci::is_image_config(&cd.media_type) {
            return Err(StoreError::UnsupportedMediaType {
                kind: "config",
                digest: cd.digest.clone(),
                media_type: cd.media_type.clone(),
            });
        }
        self.read_json(&cd.digest)
    }

    /// Resolve what a user typed: an exact store name, then a docker reference
    /// (`alpine` → `docker.io/library/alpine:latest`), then a manifest digest or image id
    /// (full, or a unique hex prefix of at least 4 digits, with or without `sha256:`).
    pub fn resolve(&self, input: &str) -> Result<Resolved> {
        let refs = self.list_refs()?;
        let by_name: BTreeMap<&str, &Descriptor> =
            refs.iter().map(|(n, d)| (n.as_str(), d)).collect();
        let mut candidates = vec![input.to_string()];
        if let Ok(r) = Reference::parse(input) {
            candidates.push(r.store_name());
            candidates.push(r.familiar());
        }
        for c in &candidates {
            if let Some(d) = by_name.get(c.as_str()) {
                return Ok(Resolved { name: Some(c.clone()), descriptor: (*d).clone() });
            }
        }
        let hex = input.strip_prefix("sha256:").unwrap_or(input);
        if hex.len() >= 4 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let mut found: BTreeMap<Digest, Descriptor> = BTreeMap::new();
            let entries = refs.iter().map(|(_, d)| d.clone()).chain(self.unnamed_entries()?);
            for d in entries {
                let matches_manifest = d.digest.hex().starts_with(&hex);
                let matches_id = !matches_manifest
                    && self.image(&d).map(|i| i.id().hex().starts_with(&hex)).unwrap_or(false);
                if matches_manifest || matches_id {
                    found.insert(d.digest.clone(), d);
                }
            }
            match found.len() {
                0 => {}
                1 => {
                    let descriptor = found
                        .into_values()
                        .next()
                        .ok_or_else(|| StoreError::ImageNotFound { name: input.to_string() })?;
                    return Ok(Resolved { name: None, descriptor });
                }
                _ => {
                    return Err(StoreError::Ambiguous {
                        prefix: input.to_string(),
                        matches: found.keys().map(|d| d.short().to_string()).collect(),
                    })
                }
            }
        }
        Err(StoreError::ImageNotFound { name: input.to_string() })
    }

    /// Every named image, sorted by name. A name whose content is missing or unreadable is
    /// skipped with a warning in the log (`cache verify` reports it).
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for (name, desc) in self.list_refs()? {
            let img = match self.image(&desc) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(name, error = %e, "skipping unreadable image");
                    continue;
                }
            };
            let (repository, tag) = display_name(&name);
            out.push(ImageSummary {
                name,
                repository,
                tag,
                digest: img.digest().clone(),
                id: img.id().clone(),
                created: img.config.created.clone(),
                size: img.size(),
            });
        }
        Ok(out)
    }
}

/// Pick the index entry for `platform`; never an attestation (`unknown/unknown`).
pub fn choose_platform<'a>(
    index: &'a oci::ImageIndex,
    platform: &Platform,
) -> Option<&'a Descriptor> {
    let entries = index.manifests.iter().filter(|m| oci::media_type::is_manifest(&m.media_type));
    let mut fallback = None;
    for m in entries {
        match &m.platform {
            Some(p) if platform.matches(p) => {
                // Prefer an exact variant match over a variant-less one.
                if p.variant == platform.variant {
                    return Some(m);
                }
                fallback.get_or_insert(m);
            }
            _ => {}
        }
    }
    fallback
}

/// Repository and tag of a store name, as `docker images` shows them.
pub fn display_name(name: &str) -> (String, Option<String>) {
    if let Ok(r) = Reference::parse(name) {
        if r.store_name() == name {
            return (r.repository.familiar(), r.tag.clone());
        }
    }
    let base = name.split('@').next().unwrap_or(name);
    let slash = base.rfind('/').map(|i| i + 1).unwrap_or(0);
    match base[slash..].rfind(':') {
        Some(i) => (base[..slash + i].to_string(), Some(base[slash + i + 1..].to_string())),
        None => (base.to_string(), None),
    }
}
