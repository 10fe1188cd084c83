//! The writes of a promotion: blobs mounted or streamed, manifests put by digest, the
//! referrers fallback index; and the last look at immutable tags before any tag moves.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};

use super::read::{fallback_tag, ContentManifest, CopyWork};
use super::{
    lock, par_map, ImagePlan, Stats, TagAction, TagConflict, TagPlan, DIGEST_TAG_SUFFIXES,
};
use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageIndex};
use crate::permits::Permits;
use crate::reference::Repository;
use crate::registry::{FetchedManifest, Registry, RegistryError};

/// What copying content needs, shared by every image's thread.
pub(super) struct Copier<'a> {
    registry: &'a dyn Registry,
    /// Bounds the blob streams between two registries (`--jobs`).
    streams: Permits,
    pub(super) stats: Stats,
    carriers: Carriers<'a>,
}

impl<'a> Copier<'a> {
    /// `work`: every image's, in the order their positions (`me`) refer to.
    pub(super) fn new(
        registry: &'a dyn Registry,
        jobs: usize,
        work: &[(&'a ImagePlan, &'a CopyWork)],
    ) -> Copier<'a> {
        Copier {
            registry,
            streams: Permits::new(jobs),
            stats: Stats::default(),
            carriers: Carriers::new(work),
        }
    }

    /// Copy the missing blobs of image `me` (its position in the work list), then put
    /// its manifests.
    pub(super) fn copy_content(&self, me: usize, work: &'a CopyWork) -> Result<(), RegistryError> {
        let blobs: Vec<&'a Descriptor> = work.blobs.iter().collect();
        for r in par_map(&blobs, |b| self.copy_blob(me, work, b)) {
            r?;
        }
        let referrers: BTreeSet<&Digest> = work.referrers.iter().map(|r| &r.digest).collect();
        let image: Vec<ContentManifest> = work
            .manifests
            .iter()
            .filter(|m| !(work.top_with_tags && m.manifest.digest == work.top.digest))
            .cloned()
            .collect();
        // The image before its referrers: a registry may index a referrer by its subject.
        for group in [&image, &work.referrer_manifests] {
            put_manifests(self.registry, &work.dst, group, &referrers, &self.stats)?;
        }
        Ok(())
    }

    /// Mount a blob inside one registry; between two, stream it once per destination
    /// registry and mount it from there into the other repositories that need it.
    fn copy_blob(
        &self,
        me: usize,
        work: &'a CopyWork,
        blob: &'a Descriptor,
    ) -> Result<(), RegistryError> {
        let (src, dst) = (&work.src, &work.dst);
        if src.registry == dst.registry {
            if self.registry.try_mount_blob(dst, src, &blob.digest)? {
                self.stats.blobs_mounted.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            return self.stream(work, blob);
        }
        let key = (dst.registry.as_str(), &blob.digest);
        match self.carriers.first.get(&key) {
            Some(&(carrier, from)) if carrier != me => {
                if self.carriers.wait(key)
                    && self.registry.try_mount_blob(dst, from, &blob.digest)?
                {
                    self.stats.blobs_mounted.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // The carrier failed, or the registry does not mount: send the bytes.
                self.stream(work, blob)
            }
            Some(_) => {
                let mut landing = Landing { carriers: &self.carriers, key, ok: false };
                self.stream(work, blob)?;
                landing.ok = true;
                Ok(())
            }
            None => self.stream(work, blob),
        }
    }

    /// From one connection to the other; a cut stream starts over from a new GET.
    fn stream(&self, work: &CopyWork, blob: &Descriptor) -> Result<(), RegistryError> {
        self.streams.with(|| {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let stream = self.registry.get_blob(&work.src, &blob.digest)?;
                match self.registry.put_blob_stream(
                    &work.dst,
                    &blob.digest,
                    blob.size,
                    stream.reader,
                ) {
                    Ok(()) => {
                        self.stats.blobs_streamed.fetch_add(1, Ordering::Relaxed);
                        self.stats.bytes_streamed.fetch_add(blob.size, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(e) => match self.registry.retry_delay(&e, attempt) {
                        // The registry's retry policy: backoff, Retry-After.
                        Some(delay) => {
                            tracing::info!(digest = %blob.digest, error = %e, "blob copy failed; starting over");
                            std::thread::sleep(delay);
                        }
                        None => return Err(e),
                    },
                }
            }
        })
    }
}

/// A fleet shares base layers. Between two registries, the first image (in work order)
/// that needs a blob in a destination registry carries it there; the other images wait
/// for it and mount it, so its bytes cross once. Images only ever wait for an earlier
/// one, which was started first, so the waits cannot form a cycle.
struct Carriers<'a> {
    /// (destination registry, digest) → the carrying image and its repository.
    first: BTreeMap<(&'a str, &'a Digest), (usize, &'a Repository)>,
    /// Whether each carried blob arrived, once that is known.
    landed: Mutex<BTreeMap<(&'a str, &'a Digest), bool>>,
    changed: Condvar,
}

impl<'a> Carriers<'a> {
    fn new(work: &[(&'a ImagePlan, &'a CopyWork)]) -> Carriers<'a> {
        let mut first = BTreeMap::new();
        for (i, (_, w)) in work.iter().enumerate() {
            if w.src.registry == w.dst.registry {
                continue;
            }
            for b in &w.blobs {
                first.entry((w.dst.registry.as_str(), &b.digest)).or_insert((i, &w.dst));
            }
        }
        Carriers { first, landed: Mutex::new(BTreeMap::new()), changed: Condvar::new() }
    }

    /// Wait until the blob's carrier is done; whether the blob arrived.
    fn wait(&self, key: (&'a str, &'a Digest)) -> bool {
        let mut landed = lock(&self.landed);
        loop {
            if let Some(ok) = landed.get(&key) {
                return *ok;
            }
            landed = self.changed.wait(landed).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Tells the waiting images how a carried blob's copy ended, however it ends.
struct Landing<'c, 'a> {
    carriers: &'c Carriers<'a>,
    key: (&'a str, &'a Digest),
    ok: bool,
}

impl Drop for Landing<'_, '_> {
    fn drop(&mut self) {
        lock(&self.carriers.landed).insert(self.key, self.ok);
        self.carriers.changed.notify_all();
    }
}

/// Put manifests by digest: those that name no manifest at once, then the indexes in
/// order (each after the children listed before it).
fn put_manifests(
    registry: &dyn Registry,
    dst: &Repository,
    manifests: &[ContentManifest],
    referrers: &BTreeSet<&Digest>,
    stats: &Stats,
) -> Result<(), RegistryError> {
    let put = |m: &FetchedManifest| -> Result<(), RegistryError> {
        registry.put_manifest(dst, &m.digest.to_string(), &m.media_type, &m.bytes)?;
        stats.manifests_copied.fetch_add(1, Ordering::Relaxed);
        if referrers.contains(&m.digest) {
            stats.referrers_copied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    let plain: Vec<&FetchedManifest> =
        manifests.iter().filter(|m| !m.index).map(|m| &m.manifest).collect();
    for r in par_map(&plain, |m| put(m)) {
        r?;
    }
    for m in manifests.iter().filter(|m| m.index) {
        put(&m.manifest)?;
    }
    Ok(())
}

/// Immutable tags that another digest took since the plan was made (all asked at once).
pub(super) fn recheck_conflicts(
    registry: &dyn Registry,
    work: &[(&ImagePlan, &CopyWork)],
) -> Result<Vec<TagConflict>, String> {
    let checks: Vec<(&ImagePlan, &CopyWork, &Digest, &TagPlan)> = work
        .iter()
        .filter_map(|&(img, w)| img.digest.as_ref().map(|d| (img, w, d)))
        .flat_map(|(img, w, d)| img.tags.iter().map(move |t| (img, w, d, t)))
        .filter(|(_, _, _, t)| matches!(t.action, TagAction::Create | TagAction::Unchanged))
        .filter(|(_, _, _, t)| {
            !(t.tag.starts_with("sha256-")
                && DIGEST_TAG_SUFFIXES.iter().any(|s| t.tag.ends_with(s)))
        })
        .collect();
    let now = par_map(&checks, |(img, w, _, t)| {
        registry.head_manifest(&w.dst, &t.tag).map_err(|e| format!("image `{}`: {e}", img.image))
    });
    let mut out = Vec::new();
    for ((img, _, digest, t), now) in checks.iter().zip(now) {
        if let Some(d) = now? {
            if d.digest != **digest {
                out.push(TagConflict {
                    image: img.image.clone(),
                    reference: format!("{}:{}", img.destination, t.tag),
                    existing: d.digest,
                    promoted: (*digest).clone(),
                });
            }
        }
    }
    Ok(out)
}

/// Make the destination list the promoted referrers. A registry with the referrers API
/// lists them as soon as they are pushed; one without it reads the fallback index at tag
/// `sha256-<hex>`, which is then written: the source's own bytes when the destination has
/// none, else the destination's index with the missing descriptors added.
pub(super) fn update_referrers_index(
    registry: &dyn Registry,
    work: &CopyWork,
) -> Result<(), RegistryError> {
    let listed = registry.referrers(&work.dst, &work.top.digest, None)?;
    let have: BTreeSet<&Digest> = listed.manifests.iter().map(|d| &d.digest).collect();
    let missing: Vec<&Descriptor> =
        work.referrers.iter().filter(|r| !have.contains(&r.digest)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let tag = fallback_tag(&work.top.digest);
    let existing = match registry.get_manifest(&work.dst, &tag) {
        Ok(m) => Some(m),
        Err(RegistryError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    match (existing, &work.referrers_index) {
        (None, Some(src)) => {
            registry.put_manifest(&work.dst, &tag, &src.media_type, &src.bytes)?;
        }
        (existing, _) => {
            let mut index = existing
                .and_then(|m| serde_json::from_slice::<ImageIndex>(&m.bytes).ok())
                .unwrap_or_else(ImageIndex::new_oci);
            index.manifests.extend(missing.into_iter().cloned());
            let bytes = serde_json::to_vec(&index).map_err(|e| RegistryError::Invalid {
                registry: work.dst.registry.clone(),
                what: format!("the referrers index {tag}"),
                reason: e.to_string(),
            })?;
            registry.put_manifest(&work.dst, &tag, oci::media_type::OCI_INDEX, &bytes)?;
        }
    }
    Ok(())
}
