//! The reads of a promotion plan: what one image is in the source, and what of it (content,
//! referrers, tags) the destination already has.

use std::collections::BTreeSet;

use super::{
    both, join, par_map, ImagePlan, ImageStatus, PromoteError, ReferrerPlan, TagAction, TagPlan,
    Target, DESTINATION_TAG_PAGE, DIGEST_TAG_SUFFIXES, MAX_INDEX_DEPTH,
};
use crate::digest::Digest;
use crate::oci::{self, Descriptor, ImageIndex, ParsedManifest};
use crate::reference::Repository;
use crate::registry::{FetchedManifest, Registry, RegistryError};

/// What executing an image's plan needs; never shown.
#[derive(Debug, Clone)]
pub(super) struct CopyWork {
    pub(super) src: Repository,
    pub(super) dst: Repository,
    pub(super) top: FetchedManifest,
    /// The image's manifests to put by digest, children before parents.
    pub(super) manifests: Vec<ContentManifest>,
    /// Referrers' and cosign-scheme manifests to put after the image's.
    pub(super) referrer_manifests: Vec<ContentManifest>,
    /// Blobs to copy: all of the missing manifests' blobs when they are mounted, the
    /// ones the destination lacks when they are streamed.
    pub(super) blobs: Vec<Descriptor>,
    /// Every referrer of the source manifest, as the source lists them.
    pub(super) referrers: Vec<Descriptor>,
    /// The source's referrers fallback index (tag `sha256-<hex>`), if it has one.
    pub(super) referrers_index: Option<FetchedManifest>,
    /// Cosign-scheme tags and their manifests.
    pub(super) digest_tags: Vec<(String, FetchedManifest)>,
    /// The top manifest is missing and goes in with its tags alone, not by digest first
    /// (see [`CopyWork::top_goes_with_tags`]).
    pub(super) top_with_tags: bool,
}

pub(super) fn plan_image(
    registry: &dyn Registry,
    t: &Target,
    with_referrers: bool,
) -> Result<ImagePlan, PromoteError> {
    let reg_err = |source: RegistryError| PromoteError::Registry { image: t.image.clone(), source };
    let mount = t.src.registry == t.dst.registry;
    let mut plan = ImagePlan {
        image: t.image.clone(),
        source: t.source_name(),
        destination: t.dst.to_string(),
        status: ImageStatus::MissingInSource,
        digest: None,
        media_type: None,
        manifests_to_copy: 0,
        blobs_to_copy: 0,
        bytes_to_copy: 0,
        mount,
        referrers: Vec::new(),
        tags: Vec::new(),
        error: None,
        work: None,
    };
    // Three rounds of reads, each round's requests at once: what a request costs is
    // mostly the registry's own work per request, and then how many round trips follow
    // one another.
    //
    // Round 1: the source manifest, the source's tags (where the cosign-scheme referrer
    // tags are found) and the destination's (which of its tags exist).
    let (top, dst_listing, src_tags) = std::thread::scope(|s| {
        let dst_listing = s.spawn(|| registry.tags_page(&t.dst, DESTINATION_TAG_PAGE));
        let src_tags = with_referrers.then(|| s.spawn(|| registry.list_tags(&t.src)));
        let top = registry.get_manifest(&t.src, &t.src_reference);
        (top, join(dst_listing), src_tags.map(join))
    });
    let top = match top {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => {
            plan.error = Some(format!("{} does not exist in the source environment", plan.source));
            return Ok(plan);
        }
        Err(e) => return Err(reg_err(e)),
    };
    let src_tags = src_tags.transpose().map_err(reg_err)?.unwrap_or_default();
    let dst_known = DestinationTags::from_listing(dst_listing, &t.dst_tags);

    // Round 2: what the manifest reaches, what the destination's tags name and whether it
    // has the manifest, the referrers.
    let fallback = fallback_tag(&top.digest);
    let digest_tag_names: Vec<String> = DIGEST_TAG_SUFFIXES
        .iter()
        .map(|suffix| format!("{fallback}{suffix}"))
        .filter(|tag| src_tags.contains(tag))
        .collect();
    let (content, dst_now, listed, referrers_index, digest_tags) = std::thread::scope(|s| {
        let dst_now = s.spawn(|| dst_known.read(registry, &t.dst, &t.dst_tags, &top.digest));
        // The API alone: without it the source's tag list says whether the fallback index
        // exists, and it is read here anyway.
        let listed =
            with_referrers.then(|| s.spawn(|| registry.referrers_api(&t.src, &top.digest)));
        let index = src_tags
            .contains(&fallback)
            .then(|| s.spawn(|| registry.get_manifest(&t.src, &fallback)));
        let digest_tags = (!digest_tag_names.is_empty()).then(|| {
            s.spawn(|| {
                par_map(&digest_tag_names, |tag| {
                    both(
                        || registry.get_manifest(&t.src, tag),
                        || registry.head_manifest(&t.dst, tag),
                    )
                })
            })
        });
        let content = collect(registry, &t.src, &top, 0);
        let digest_tags = digest_tags.map(join).unwrap_or_default();
        (content, join(dst_now), listed.map(join), index.map(join), digest_tags)
    });
    let content = match content {
        Ok(c) => c,
        Err(RegistryError::NotFound { what, .. }) => {
            plan.error = Some(format!(
                "{} is incomplete in the source environment: {what} is missing",
                plan.source
            ));
            return Ok(plan);
        }
        Err(e) => return Err(reg_err(e)),
    };
    plan.digest = Some(top.digest.clone());
    plan.media_type = Some(top.media_type.clone());
    let (dst_tags, top_present) = dst_now.map_err(reg_err)?;
    plan.status = if top_present { ImageStatus::AlreadyThere } else { ImageStatus::Copy };
    let referrers_index = referrers_index.transpose().map_err(reg_err)?;
    let listed = match listed.transpose().map_err(reg_err)? {
        Some(Some(api)) => api.manifests,
        // No referrers API: the fallback index lists them (as the registry client reads it).
        Some(None) => referrers_index
            .as_ref()
            .and_then(|m| serde_json::from_slice::<ImageIndex>(&m.bytes).ok())
            .map(|index| index.manifests)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut digest_tags_now = Vec::new();
    for (tag, (m, now)) in digest_tag_names.into_iter().zip(digest_tags) {
        let m = m.map_err(reg_err)?;
        let action = match now.map_err(reg_err)? {
            None => TagAction::Create,
            Some(d) if d.digest == m.digest => TagAction::Unchanged,
            Some(d) => TagAction::Keep { existing: d.digest },
        };
        digest_tags_now.push((tag, m, action));
    }

    // Round 3: what of it the destination lacks (for a referrer, its manifest is fetched
    // while the destination is asked whether it has it).
    let created: Vec<&FetchedManifest> = digest_tags_now
        .iter()
        .filter(|(_, _, action)| *action == TagAction::Create)
        .map(|(_, m, _)| m)
        .collect();
    let image = || (!top_present).then(|| missing(registry, &t.dst, content, &top.digest, mount));
    let others = || {
        let referrers = par_map(&listed, |r| {
            let reference = r.digest.to_string();
            let (m, present) = both(
                || registry.get_manifest(&t.src, &reference),
                || registry.head_manifest(&t.dst, &reference),
            );
            if present?.is_some() {
                return Ok(None);
            }
            missing_of(registry, t, &m?, mount).map(Some)
        });
        let digest_tags = par_map(&created, |m| {
            if registry.head_manifest(&t.dst, &m.digest.to_string())?.is_some() {
                return Ok(None);
            }
            missing_of(registry, t, m, mount).map(Some)
        });
        (referrers, digest_tags)
    };
    let (image_missing, (referrers_missing, digest_tags_missing)) =
        if listed.is_empty() && created.is_empty() {
            (image(), (Vec::new(), Vec::new()))
        } else {
            both(image, others)
        };
    let mut work = CopyWork {
        src: t.src.clone(),
        dst: t.dst.clone(),
        top: top.clone(),
        manifests: Vec::new(),
        referrer_manifests: Vec::new(),
        blobs: Vec::new(),
        referrers: Vec::new(),
        referrers_index,
        digest_tags: Vec::new(),
        top_with_tags: false,
    };
    if let Some(m) = image_missing {
        work.add(m.map_err(reg_err)?, false);
    }
    for (r, m) in listed.iter().zip(referrers_missing) {
        let m = m.map_err(reg_err)?;
        plan.referrers.push(ReferrerPlan {
            digest: r.digest.clone(),
            artifact_type: r.artifact_type.clone(),
            present: m.is_none(),
        });
        if let Some(m) = m {
            work.add(m, true);
        }
    }
    for m in digest_tags_missing {
        if let Some(m) = m.map_err(reg_err)? {
            work.add(m, true);
        }
    }
    work.referrers = listed;

    // Image tags go first in the list: they are what people look for.
    for (tag, now) in t.dst_tags.iter().zip(dst_tags) {
        let action = match now {
            None => TagAction::Create,
            Some(d) if d.digest == top.digest => TagAction::Unchanged,
            Some(d) if t.immutable => TagAction::Conflict { existing: d.digest },
            Some(d) => TagAction::Move { from: d.digest },
        };
        plan.tags.push(TagPlan { tag: tag.clone(), action });
    }
    for (tag, m, action) in digest_tags_now {
        plan.tags.push(TagPlan { tag: tag.clone(), action });
        work.digest_tags.push((tag, m));
    }
    work.top_with_tags = work.top_goes_with_tags(&plan.tags);
    plan.manifests_to_copy = work.manifests.len() + work.referrer_manifests.len();
    plan.blobs_to_copy = work.blobs.len();
    plan.bytes_to_copy = work.blobs.iter().map(|b| b.size).sum();
    plan.work = Some(work);
    Ok(plan)
}

/// What one request for the destination's tags told about the tags an image gets there.
enum DestinationTags {
    /// The repository has no tags: a fresh destination, nothing to ask about.
    None,
    /// These of the image's tags (in order) exist and are asked where they point.
    Some(Vec<bool>),
}

impl DestinationTags {
    /// From the first page of the destination's tags. When the page is not the whole list,
    /// or the registry would not list tags, every tag is asked about.
    fn from_listing(
        listing: Result<(Vec<String>, bool), RegistryError>,
        tags: &[String],
    ) -> DestinationTags {
        match listing {
            Ok((page, false)) if page.is_empty() => DestinationTags::None,
            Ok((page, false)) => {
                DestinationTags::Some(tags.iter().map(|t| page.contains(t)).collect())
            }
            Ok((_, true)) => DestinationTags::Some(vec![true; tags.len()]),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the destination's tags; asking for each");
                DestinationTags::Some(vec![true; tags.len()])
            }
        }
    }

    /// What each tag names now, and whether the destination has the manifest `digest`:
    /// known when a tag names it, else asked. A repository without tags is taken not to
    /// have it (it may hold it untagged, after an interrupted promotion; then the copy
    /// mounts and puts again what is there, which changes nothing).
    fn read(
        &self,
        registry: &dyn Registry,
        dst: &Repository,
        tags: &[String],
        digest: &Digest,
    ) -> Result<(Vec<Option<Descriptor>>, bool), RegistryError> {
        let exists = match self {
            DestinationTags::None => return Ok((vec![None; tags.len()], false)),
            DestinationTags::Some(exists) => exists,
        };
        let asked: Vec<&String> =
            tags.iter().zip(exists).filter(|(_, e)| **e).map(|(t, _)| t).collect();
        let mut answers = par_map(&asked, |tag| registry.head_manifest(dst, tag)).into_iter();
        let mut now = Vec::with_capacity(tags.len());
        for e in exists {
            now.push(if *e { answers.next().transpose()?.flatten() } else { None });
        }
        let present = now.iter().flatten().any(|d| d.digest == *digest)
            || registry.head_manifest(dst, &digest.to_string())?.is_some();
        Ok((now, present))
    }
}

/// The tag of the OCI referrers fallback scheme (and the stem of cosign's tags).
pub(super) fn fallback_tag(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

/// A manifest to put by digest.
#[derive(Debug, Clone)]
pub(super) struct ContentManifest {
    pub(super) manifest: FetchedManifest,
    /// It names other manifests, which must be in the destination first.
    pub(super) index: bool,
}

/// Manifests (children before the indexes that name them) and blobs.
#[derive(Debug, Default)]
pub(super) struct Content {
    manifests: Vec<ContentManifest>,
    blobs: Vec<Descriptor>,
}

impl Content {
    /// Add what `other` has that `self` lacks, keeping children first.
    fn merge(&mut self, other: Content) {
        for m in other.manifests {
            if !self.manifests.iter().any(|c| c.manifest.digest == m.manifest.digest) {
                self.manifests.push(m);
            }
        }
        let mut seen: BTreeSet<Digest> = self.blobs.iter().map(|b| b.digest.clone()).collect();
        for b in other.blobs {
            if seen.insert(b.digest.clone()) {
                self.blobs.push(b);
            }
        }
    }
}

impl CopyWork {
    /// Whether the missing top manifest can skip its PUT by digest and go in with its
    /// first tag PUT. The PUT by digest puts content in before any tag moves, so that a
    /// registry refusing a manifest (a media type it does not take) fails the promotion
    /// before anything is tagged. Within one registry that cannot happen: it holds these
    /// very bytes in the source repository, so a third of the manifest writes would buy
    /// nothing. Not when referrers are copied (they go in after their subject), nor when
    /// no image tag is created or moved (nothing else would put it in).
    fn top_goes_with_tags(&self, tags: &[TagPlan]) -> bool {
        self.src.registry == self.dst.registry
            && self.referrer_manifests.is_empty()
            && self.manifests.iter().any(|m| m.manifest.digest == self.top.digest)
            && tags.iter().any(|t| {
                matches!(t.action, TagAction::Create | TagAction::Move { .. })
                    && !self.digest_tags.iter().any(|(tag, _)| *tag == t.tag)
            })
    }

    /// Add content the destination lacks; a referrer's manifests go after the image's.
    fn add(&mut self, content: Content, referrer: bool) {
        let known = |d: &Digest, w: &CopyWork| {
            w.manifests.iter().chain(&w.referrer_manifests).any(|c| c.manifest.digest == *d)
        };
        for m in content.manifests {
            if known(&m.manifest.digest, self) {
                continue;
            }
            if referrer {
                self.referrer_manifests.push(m);
            } else {
                self.manifests.push(m);
            }
        }
        let mut seen: BTreeSet<Digest> = self.blobs.iter().map(|b| b.digest.clone()).collect();
        for b in content.blobs {
            if seen.insert(b.digest.clone()) {
                self.blobs.push(b);
            }
        }
    }
}

/// The manifests and blobs `m` reaches; an index's children are fetched at once.
fn collect(
    registry: &dyn Registry,
    repo: &Repository,
    m: &FetchedManifest,
    depth: usize,
) -> Result<Content, RegistryError> {
    let invalid = |reason: String| RegistryError::Invalid {
        registry: repo.registry.clone(),
        what: format!("manifest {}@{}", repo.path, m.digest),
        reason,
    };
    let (_, parsed) = oci::parse_manifest(&m.bytes, Some(&m.media_type)).map_err(invalid)?;
    let mut out = Content::default();
    let index = match parsed {
        ParsedManifest::Image(im) => {
            out.blobs.push(im.config);
            // Foreign layers (with URLs) live outside the registry; they are not copied.
            out.blobs.extend(im.layers.into_iter().filter(|l| l.urls.is_empty()));
            false
        }
        ParsedManifest::Index(ix) => {
            if depth >= MAX_INDEX_DEPTH {
                return Err(invalid(format!("indexes nest deeper than {MAX_INDEX_DEPTH} levels")));
            }
            let mut children: Vec<&Descriptor> = Vec::new();
            for child in &ix.manifests {
                if !children.iter().any(|c| c.digest == child.digest) {
                    children.push(child);
                }
            }
            let parts = par_map(&children, |child| {
                let c = registry.get_manifest(repo, &child.digest.to_string())?;
                collect(registry, repo, &c, depth + 1)
            });
            for part in parts {
                out.merge(part?);
            }
            true
        }
    };
    out.manifests.push(ContentManifest { manifest: m.clone(), index });
    Ok(out)
}

/// What of `content` the destination lacks; `absent` is its top manifest, already known
/// to be missing. Blobs that will be mounted are not asked about: the mount answers the
/// same question (201 whether the blob was linked or already there), so a HEAD first
/// would only add a round trip. Blobs to stream are, since sending one costs its bytes.
fn missing(
    registry: &dyn Registry,
    dst: &Repository,
    content: Content,
    absent: &Digest,
    mount: bool,
) -> Result<Content, RegistryError> {
    let manifests_absent = || {
        par_map(&content.manifests, |m| {
            if m.manifest.digest == *absent {
                return Ok(true);
            }
            registry.head_manifest(dst, &m.manifest.digest.to_string()).map(|d| d.is_none())
        })
    };
    let blobs_absent =
        || par_map(&content.blobs, |b| registry.blob_exists(dst, &b.digest).map(|s| s.is_none()));
    let (manifests_absent, blobs_absent) =
        if mount { (manifests_absent(), Vec::new()) } else { both(manifests_absent, blobs_absent) };
    let mut out = Content::default();
    for (m, a) in content.manifests.into_iter().zip(manifests_absent) {
        if a? {
            out.manifests.push(m);
        }
    }
    if mount {
        out.blobs = content.blobs;
    } else {
        for (b, a) in content.blobs.into_iter().zip(blobs_absent) {
            if a? {
                out.blobs.push(b);
            }
        }
    }
    Ok(out)
}

/// What the destination lacks of a manifest it does not have.
fn missing_of(
    registry: &dyn Registry,
    t: &Target,
    m: &FetchedManifest,
    mount: bool,
) -> Result<Content, RegistryError> {
    let content = collect(registry, &t.src, m, 0)?;
    missing(registry, &t.dst, content, &m.digest, mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    fn asked(known: &DestinationTags) -> Option<Vec<bool>> {
        match known {
            DestinationTags::None => None,
            DestinationTags::Some(v) => Some(v.clone()),
        }
    }

    #[test]
    fn a_whole_listing_says_which_tags_to_ask_about() {
        let ours = tags(&["1.2.0", "1.2", "latest"]);
        let empty = DestinationTags::from_listing(Ok((Vec::new(), false)), &ours);
        assert_eq!(asked(&empty), None, "a repository without tags needs no question");
        let some =
            DestinationTags::from_listing(Ok((tags(&["1.1.0", "1.1", "latest"]), false)), &ours);
        assert_eq!(asked(&some), Some(vec![false, false, true]));
    }

    #[test]
    fn a_partial_or_failed_listing_asks_about_every_tag() {
        let ours = tags(&["1.2.0", "latest"]);
        // More pages follow: a tag missing from the first may be on a later one.
        let partial = DestinationTags::from_listing(Ok((tags(&["0.1"]), true)), &ours);
        assert_eq!(asked(&partial), Some(vec![true, true]));
        let empty_first_page = DestinationTags::from_listing(Ok((Vec::new(), true)), &ours);
        assert_eq!(asked(&empty_first_page), Some(vec![true, true]));
        let denied = RegistryError::Status {
            registry: "r".into(),
            what: "tags of acme/api".into(),
            status: 403,
            detail: String::new(),
            retry_after: None,
        };
        let failed = DestinationTags::from_listing(Err(denied), &ours);
        assert_eq!(asked(&failed), Some(vec![true, true]));
    }
}
