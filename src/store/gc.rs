//! Reachability, prune and image removal. A blob is live when a walk from `index.json`
//! (named and unnamed entries) or from a caller's extra roots (e.g. the build cache's
//! layers) reaches it through manifests and indexes.
//!
//! The extra roots are asked for only once the `gc` lock is held exclusively: a build that
//! was running when prune started records its cache entries before it lets go of its
//! (shared) hold, and roots listed before that would miss them.

use std::collections::{HashSet, VecDeque};
use std::fs;

use super::image::display_name;
use super::refs::ref_name;
use super::{io_err, Result, Store, StoreError};
use crate::digest::Digest;
use crate::oci::{self, ParsedManifest};

/// Manifests are small; anything larger is a layer and is not parsed during the walk.
const MANIFEST_MAX: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneMode {
    /// Remove unnamed entries and every blob nothing reaches.
    Dangling,
    /// Also remove images no tag names (pulled or loaded by digest only). An image with a
    /// tagged name keeps its other names too (a build's images.toml key, say).
    All,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PruneReport {
    pub removed_names: Vec<String>,
    pub removed_blobs: Vec<Digest>,
    pub freed_bytes: u64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    /// Blobs deleted because no other image or root reaches them.
    pub deleted: Vec<Digest>,
    pub freed_bytes: u64,
}

impl Store {
    /// Every blob reachable from `index.json` and from `extra_roots`.
    pub fn reachable(&self, extra_roots: &[Digest]) -> Result<HashSet<Digest>> {
        let index = self.read_index()?;
        let mut queue: VecDeque<Digest> =
            index.manifests.iter().map(|m| m.digest.clone()).collect();
        queue.extend(extra_roots.iter().cloned());
        let mut seen = HashSet::new();
        while let Some(d) = queue.pop_front() {
            if !seen.insert(d.clone()) {
                continue;
            }
            queue.extend(self.children(&d)?);
        }
        Ok(seen)
    }

    /// The blobs a manifest or index names; nothing for any other blob (or a missing one).
    pub(super) fn children(&self, d: &Digest) -> Result<Vec<Digest>> {
        match self.blob_size(d)? {
            Some(size) if size <= MANIFEST_MAX => {}
            _ => return Ok(Vec::new()),
        }
        let bytes = self.read_blob(d)?;
        if bytes.first() != Some(&b'{') {
            return Ok(Vec::new());
        }
        Ok(match oci::parse_manifest(&bytes, None) {
            Ok((_, ParsedManifest::Image(m))) => std::iter::once(m.config.digest)
                .chain(m.layers.into_iter().map(|l| l.digest))
                .chain(m.subject.map(|s| s.digest))
                .collect(),
            Ok((_, ParsedManifest::Index(i))) => i
                .manifests
                .into_iter()
                .map(|m| m.digest)
                .chain(i.subject.map(|s| s.digest))
                .collect(),
            Err(_) => Vec::new(),
        })
    }

    /// Remove dangling entries (and with `All`, untagged images) and every blob nothing
    /// reaches, then stale temp files. Waits for running pulls, loads and builds;
    /// `extra_roots` is called once they are done.
    pub fn prune(
        &self,
        mode: PruneMode,
        extra_roots: impl FnOnce() -> Vec<Digest>,
    ) -> Result<PruneReport> {
        let _gc = self.lock("gc")?;
        let extra_roots = extra_roots();
        let mut report = PruneReport::default();
        self.update_index(|index| {
            let tagged: HashSet<Digest> = index
                .manifests
                .iter()
                .filter(|m| ref_name(m).is_some_and(|n| display_name(n).1.is_some()))
                .map(|m| m.digest.clone())
                .collect();
            index.manifests.retain(|m| {
                let keep = match ref_name(m) {
                    None => false,
                    Some(_) => mode == PruneMode::Dangling || tagged.contains(&m.digest),
                };
                if !keep {
                    report.removed_names.push(
                        ref_name(m).map(str::to_string).unwrap_or_else(|| m.digest.to_string()),
                    );
                }
                keep
            });
            Ok(())
        })?;
        let live = self.reachable(&extra_roots)?;
        let dir = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let entry = entry.map_err(io_err("read", &dir))?;
            let Ok(digest) =
                format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>()
            else {
                continue;
            };
            if live.contains(&digest) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(entry.path()).map_err(io_err("remove", &entry.path()))?;
            report.freed_bytes += size;
            report.removed_blobs.push(digest);
        }
        self.clean_stale_tmp();
        Ok(report)
    }

    /// `rmi`: untag `input`; when its image loses its last name, delete the image's blobs
    /// that nothing else reaches. Refuses to delete an image another named image is built on
    /// (its layers are a prefix of the other's), and to untag an image id that has several
    /// names, unless `force`. `extra_roots` is called under the `gc` lock, as for `prune`.
    pub fn remove_image(
        &self,
        input: &str,
        force: bool,
        extra_roots: impl FnOnce() -> Vec<Digest>,
    ) -> Result<RemoveReport> {
        let _gc = self.lock("gc")?;
        let resolved = self.resolve(input)?;
        let digest = resolved.descriptor.digest.clone();
        let all_names = self.names_of(&digest)?;
        let names: Vec<String> = match &resolved.name {
            Some(n) => vec![n.clone()],
            None => {
                if all_names.len() > 1 && !force {
                    return Err(StoreError::ManyNames { id: input.to_string(), names: all_names });
                }
                all_names.clone()
            }
        };
        let last_name_goes = all_names.iter().all(|n| names.contains(n));
        let mut report = RemoveReport::default();
        if last_name_goes && !force {
            if let Ok(img) = self.image(&resolved.descriptor) {
                let base = &img.config.rootfs.diff_ids;
                let mut dependents = Vec::new();
                for (other, desc) in self.list_refs()? {
                    if desc.digest == digest || base.is_empty() {
                        continue;
                    }
                    if let Ok(o) = self.image(&desc) {
                        let ids = &o.config.rootfs.diff_ids;
                        if ids.len() > base.len() && ids.starts_with(base) {
                            dependents.push(other);
                        }
                    }
                }
                if !dependents.is_empty() {
                    return Err(StoreError::HasDependents {
                        name: names.first().cloned().unwrap_or_else(|| input.to_string()),
                        id: img.id().short().to_string(),
                        dependents,
                    });
                }
            }
        }
        let image = self.image(&resolved.descriptor).ok();
        self.update_index(|index| {
            index.manifests.retain(|m| match ref_name(m) {
                Some(n) => !names.iter().any(|x| x == n),
                None => !(last_name_goes && m.digest == digest),
            });
            Ok(())
        })?;
        report.untagged = names;
        if !last_name_goes {
            return Ok(report);
        }
        let live = self.reachable(&extra_roots())?;
        let mut candidates = vec![digest.clone()];
        if let Some(img) = &image {
            candidates.extend(img.blobs());
        }
        for d in candidates {
            if live.contains(&d) || report.deleted.contains(&d) {
                continue;
            }
            if let Some(size) = self.blob_size(&d)? {
                let path = self.blob_path(&d);
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                report.freed_bytes += size;
                report.deleted.push(d);
            }
        }
        Ok(report)
    }
}
