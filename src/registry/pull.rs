//! `pull`: fetch an image (resolving an index to one platform) into the store, verifying
//! every blob against its digest while it streams, and name it only once it is complete.

use std::io::{self, Read, Write};
use std::sync::Mutex;

use super::{Registry, RegistryError, Result};
use crate::digest::Digest;
use crate::oci::{
    self, Compression, Descriptor, ImageConfig, ImageManifest, ParsedManifest, Platform,
};
use crate::reference::Reference;
use crate::store::{Store, StoreError};

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to pick from an index.
    pub platform: Platform,
    /// Blobs downloaded at once.
    pub jobs: usize,
    /// Name the image in the store (`Reference::store_name`). Without it, the content is
    /// stored and the caller names it (the build engine pins bases by digest).
    pub set_ref: bool,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions { platform: Platform::host(), jobs: 4, set_ref: true }
    }
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    /// The store name it was recorded under (if `set_ref`).
    pub name: Option<String>,
    /// The image manifest stored (the platform's, when the reference named an index).
    pub descriptor: Descriptor,
    /// The index the reference named, if it named one.
    pub index_digest: Option<Digest>,
    /// Image id (config digest).
    pub id: Digest,
    pub blobs_fetched: usize,
    pub bytes_fetched: u64,
    pub blobs_present: usize,
}

/// Pull `reference` into `store` through `registry`.
pub fn pull(
    store: &Store,
    registry: &dyn Registry,
    reference: &Reference,
    opts: &PullOptions,
) -> Result<PullReport> {
    let repo = &reference.repository;
    let reg = repo.registry.clone();
    let _gc = store.gc_guard()?;
    let first = registry.get_manifest(repo, &reference.manifest_reference())?;
    if let Some(d) = &reference.digest {
        if first.digest != *d {
            return Err(RegistryError::DigestMismatch {
                registry: reg,
                what: format!("manifest {}", reference.familiar()),
                expected: d.clone(),
                actual: first.digest,
            });
        }
    }
    let invalid = |what: String, reason: String| RegistryError::Invalid {
        registry: reg.clone(),
        what,
        reason,
    };
    let (_, parsed) = oci::parse_manifest(&first.bytes, Some(&first.media_type))
        .map_err(|r| invalid(format!("manifest {}", reference.familiar()), r))?;
    let (fetched, manifest, index_digest, platform) = match parsed {
        ParsedManifest::Image(m) => (first, m, None, None),
        ParsedManifest::Index(index) => {
            let chosen =
                crate::store::choose_platform(&index, &opts.platform).ok_or_else(|| {
                    RegistryError::Store(StoreError::NoMatchingPlatform {
                        digest: first.digest.clone(),
                        wanted: opts.platform.to_string(),
                        available: index
                            .manifests
                            .iter()
                            .filter_map(|m| m.platform.as_ref().map(|p| p.to_string()))
                            .collect(),
                    })
                })?;
            let m = registry.get_manifest(repo, &chosen.digest.to_string())?;
            if m.digest != chosen.digest {
                return Err(RegistryError::DigestMismatch {
                    registry: reg,
                    what: format!("manifest for {} of {}", opts.platform, reference.familiar()),
                    expected: chosen.digest.clone(),
                    actual: m.digest,
                });
            }
            let image = match oci::parse_manifest(&m.bytes, Some(&m.media_type)) {
                Ok((_, ParsedManifest::Image(i))) => i,
                Ok((_, ParsedManifest::Index(_))) => {
                    return Err(invalid(
                        format!("index {}", first.digest),
                        "it nests another index".to_string(),
                    ))
                }
                Err(r) => return Err(invalid(format!("manifest {}", m.digest), r)),
            };
            (m, image, Some(first.digest.clone()), chosen.platform.clone())
        }
    };
    check_image_manifest(&manifest, &fetched.digest)
        .map_err(|r| invalid(format!("manifest {}", fetched.digest), r))?;

    // Config first (small, and it says how many layers to expect), then the layers.
    let mut stats = Stats::default();
    fetch_blob(store, registry, reference, &manifest.config, &mut stats)?;
    let config: ImageConfig = store.read_json(&manifest.config.digest)?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(invalid(
            format!("image {}", reference.familiar()),
            format!(
                "its config lists {} layers but its manifest {}",
                config.rootfs.diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    fetch_layers(store, registry, reference, &manifest.layers, opts.jobs.max(1), &mut stats)?;
    store.put_blob_bytes(&fetched.bytes, Some(&fetched.digest))?;
    let mut desc = fetched.descriptor();
    desc.platform = platform;
    let name = if opts.set_ref {
        let n = reference.store_name();
        store.set_ref(&n, &desc)?;
        Some(n)
    } else {
        None
    };
    tracing::info!(reference = %reference, digest = %desc.digest, "pulled");
    Ok(PullReport {
        name,
        descriptor: desc,
        index_digest,
        id: manifest.config.digest.clone(),
        blobs_fetched: stats.fetched,
        bytes_fetched: stats.bytes,
        blobs_present: stats.present,
    })
}

fn check_image_manifest(m: &ImageManifest, digest: &Digest) -> std::result::Result<(), String> {
    if !oci::is_image_config(&m.config.media_type) {
        return Err(format!(
            "{digest} is not a container image (config media type {:?}); ferry pulls images only",
            m.config.media_type
        ));
    }
    for l in &m.layers {
        if Compression::of_layer_media_type(&l.media_type).is_none() {
            return Err(format!(
                "layer {} has media type {:?}, which ferry does not read",
                l.digest, l.media_type
            ));
        }
    }
    Ok(())
}

/// Blobs a download fetched, its bytes, and blobs the store already had.
#[derive(Default)]
pub(crate) struct Stats {
    pub fetched: usize,
    pub bytes: u64,
    pub present: usize,
}

fn fetch_layers(
    store: &Store,
    registry: &dyn Registry,
    reference: &Reference,
    layers: &[Descriptor],
    jobs: usize,
    stats: &mut Stats,
) -> Result<()> {
    let queue = Mutex::new(layers.iter());
    let total = Mutex::new(Stats::default());
    let first_error: Mutex<Option<RegistryError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(layers.len()) {
            s.spawn(|| loop {
                if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(layer) = next else { return };
                let mut local = Stats::default();
                match fetch_blob(store, registry, reference, layer, &mut local) {
                    Ok(()) => {
                        if let Ok(mut t) = total.lock() {
                            t.fetched += local.fetched;
                            t.bytes += local.bytes;
                            t.present += local.present;
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = first_error.lock() {
                            f.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let t = total.into_inner().unwrap_or_else(|p| p.into_inner());
    stats.fetched += t.fetched;
    stats.bytes += t.bytes;
    stats.present += t.present;
    Ok(())
}

/// Download the blob `desc` of `reference`'s repository into `store` unless the store has
/// it, verifying its size and digest as it streams; a download that breaks off starts over
/// as the registry's retry policy allows.
pub(crate) fn fetch_blob(
    store: &Store,
    registry: &dyn Registry,
    reference: &Reference,
    desc: &Descriptor,
    stats: &mut Stats,
) -> Result<()> {
    if store.has_blob(&desc.digest) {
        stats.present += 1;
        return Ok(());
    }
    let repo = &reference.repository;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let stream = registry.get_blob(repo, &desc.digest)?;
        let mut writer = store.blob_writer()?;
        // Read at most one byte more than announced: enough to tell a blob is too long.
        let mut limited = stream.reader.take(desc.size.saturating_add(1));
        match copy(&mut limited, &mut writer) {
            Ok(n) if n != desc.size => {
                return Err(RegistryError::Invalid {
                    registry: repo.registry.clone(),
                    what: format!("blob {} of {}", desc.digest, reference.familiar()),
                    reason: format!(
                        "it has {}{} bytes, the manifest says {}",
                        if n > desc.size { "more than " } else { "" },
                        n.min(desc.size),
                        desc.size
                    ),
                })
            }
            Ok(n) => {
                return match writer.commit(Some(&desc.digest)) {
                    Ok(_) => {
                        stats.fetched += 1;
                        stats.bytes += n;
                        Ok(())
                    }
                    Err(StoreError::DigestMismatch { expected, actual, .. }) => {
                        Err(RegistryError::DigestMismatch {
                            registry: repo.registry.clone(),
                            what: format!("blob of {}", reference.familiar()),
                            expected,
                            actual,
                        })
                    }
                    Err(e) => Err(e.into()),
                };
            }
            Err(CopyError::Read(e)) => {
                writer.abort();
                let broke = RegistryError::Interrupted {
                    registry: repo.registry.clone(),
                    what: format!("the download of blob {} of {}", desc.digest, repo.path),
                    reason: e.to_string(),
                };
                match registry.retry_delay(&broke, attempt) {
                    Some(delay) => {
                        tracing::info!(digest = %desc.digest, error = %broke, ?delay, "download broke off; starting over");
                        std::thread::sleep(delay);
                    }
                    None => return Err(broke),
                }
            }
            Err(CopyError::Write(e)) => {
                return Err(RegistryError::Io { path: store.tmp_dir(), source: e });
            }
        }
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// `io::copy`, telling a network failure from a disk failure.
fn copy(r: &mut impl Read, w: &mut impl Write) -> std::result::Result<u64, CopyError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        w.write_all(&buf[..k]).map_err(CopyError::Write)?;
        n += k as u64;
    }
}
