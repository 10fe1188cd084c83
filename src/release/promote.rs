//! Promotion: copy images already published in one environment into another by digest,
//! never rebuilding (DESIGN.md section 11).
//!
//! Two phases. [`plan`] only reads: it resolves each image's digest in the source
//! environment, fetches the manifests (an index with its children), and asks the
//! destination which manifests, blobs, referrers and tags it already has. Then
//! [`PromotionPlan::execute`] copies what is missing — manifest bytes verbatim so the digest
//! is the same, blobs mounted inside one registry or streamed between two, referrers with
//! them — and only when every image's content is in the destination does it move tags
//! (inside one registry, an image without referrers goes in with its tags: see
//! `CopyWork::top_goes_with_tags`). A plan with a problem (an image missing in the
//! source, an immutable tag held by another digest) executes nothing at all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use serde::Serialize;

use crate::digest::Digest;
use crate::manifest::{Environment, Image, Manifest};
use crate::oci::{self, Descriptor, ImageIndex, ParsedManifest};
use crate::permits::Permits;
use crate::plan::{render_tags, PlanError, SourceInfo};
use crate::reference::{Reference, Repository};
use crate::registry::{FetchedManifest, Registry, RegistryError, MAX_REQUESTS_IN_FLIGHT};

/// Tag suffixes of the cosign tag scheme (`sha256-<hex>.sig` …) copied with an image.
const DIGEST_TAG_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

/// Indexes nest rarely and shallowly; deeper nesting is a malformed or hostile index.
const MAX_INDEX_DEPTH: usize = 4;

/// How many threads a promotion asks the registry from at once: as many as the client
/// sends requests at once. Its requests are small (reads, mounts, manifest and tag PUTs)
/// and their cost is latency: a registry on a filesystem syncs each write, and concurrent
/// writes share one journal commit, so dozens at once finish in little more time than one.
/// Independent of `--jobs`, which bounds streams.
const REQUESTS_IN_FLIGHT: usize = MAX_REQUESTS_IN_FLIGHT;
/// How many of the destination's tags one request lists (the registry may send fewer):
/// enough for all of a repository's tags in most.
const DESTINATION_TAG_PAGE: usize = 1000;

/// What to promote.
#[derive(Debug, Clone)]
pub struct PromoteRequest {
    pub from: String,
    pub to: String,
    /// Images by images.toml key; empty: every image of the manifest.
    pub images: Vec<String>,
    /// Source digests that replace the tag lookup (`--digest IMAGE=sha256:…`).
    pub digests: BTreeMap<String, Digest>,
    /// Copy referrers (signatures, SBOMs, attestations) with each image.
    pub referrers: bool,
    /// How many images are resolved and copied at once.
    pub jobs: usize,
}

/// Why a promotion cannot even be planned: invalid input or an unusable registry.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("unknown environment `{env}`{}", did_you_mean(suggestion))]
    UnknownEnvironment { env: String, suggestion: Option<String> },
    #[error("cannot promote environment `{env}` into itself")]
    SameEnvironment { env: String },
    #[error("environment `{to}` accepts promotions only from `{allowed}` (promote_from in images.toml), not from `{from}`; run `ferry promote --from {allowed} --to {to}`")]
    SourceNotAllowed { from: String, to: String, allowed: String },
    #[error("unknown image `{image}`{}", did_you_mean(suggestion))]
    UnknownImage { image: String, suggestion: Option<String> },
    #[error("--digest names image `{image}`, which is not selected for promotion")]
    DigestNotSelected { image: String },
    #[error(
        "image `{image}`: {}; pass --digest {image}=sha256:… to name the image to promote",
        no_source_tag(env, version)
    )]
    NoSourceTag { image: String, env: String, version: Option<String> },
    #[error("image `{image}`: invalid repository `{repository}`: {reason}")]
    BadRepository { image: String, repository: String, reason: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("image `{image}`: {source}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
}

fn no_source_tag(env: &str, version: &Option<String>) -> String {
    match version {
        Some(v) => format!("no tag of environment `{env}` contains its version {v}"),
        None => format!("it has no version, so its tag in environment `{env}` is unknown"),
    }
}

fn did_you_mean(s: &Option<String>) -> String {
    s.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
}

/// What promotion does with one image's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    /// Its manifest is not in the destination yet: copy it.
    Copy,
    /// The destination has the manifest (its tags may still move).
    AlreadyThere,
    /// The source environment does not have it: the promotion fails.
    MissingInSource,
}

/// What happens to one destination tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum TagAction {
    /// The tag does not exist yet.
    Create,
    /// The tag already names the promoted digest.
    Unchanged,
    /// The tag names another digest and will be moved.
    Move { from: Digest },
    /// The environment is immutable and the tag names another digest: nothing moves.
    Conflict { existing: Digest },
    /// A referrer tag (`sha256-<hex>.sig` …) that the destination holds with other content;
    /// it is left as it is (overwriting would drop the destination's own signatures).
    Keep { existing: Digest },
}

#[derive(Debug, Clone, Serialize)]
pub struct TagPlan {
    pub tag: String,
    #[serde(flatten)]
    pub action: TagAction,
}

/// A referrer of the promoted manifest (a signature, an SBOM …).
#[derive(Debug, Clone, Serialize)]
pub struct ReferrerPlan {
    pub digest: Digest,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Already in the destination.
    pub present: bool,
}

/// The plan for one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImagePlan {
    pub image: String,
    /// Where the image is read: `repository:tag` or `repository@digest`.
    pub source: String,
    /// The destination repository.
    pub destination: String,
    pub status: ImageStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Manifests to put (children of an index, the image, referrers).
    pub manifests_to_copy: usize,
    /// Blobs to copy and their bytes: the ones the destination lacks when they are
    /// streamed; every blob of the missing manifests when they are mounted (the mount
    /// itself tells whether the destination had it; nothing is sent either way).
    pub blobs_to_copy: usize,
    pub bytes_to_copy: u64,
    /// Source and destination are one registry: blobs are mounted, no bytes are sent.
    pub mount: bool,
    pub referrers: Vec<ReferrerPlan>,
    /// Destination tags, then referrer tags of the cosign scheme.
    pub tags: Vec<TagPlan>,
    /// Why the image cannot be promoted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    work: Option<CopyWork>,
}

/// What executing an image's plan needs; never shown.
#[derive(Debug, Clone)]
struct CopyWork {
    src: Repository,
    dst: Repository,
    top: FetchedManifest,
    /// The image's manifests to put by digest, children before parents.
    manifests: Vec<ContentManifest>,
    /// Referrers' and cosign-scheme manifests to put after the image's.
    referrer_manifests: Vec<ContentManifest>,
    /// Blobs to copy: all of the missing manifests' blobs when they are mounted, the
    /// ones the destination lacks when they are streamed.
    blobs: Vec<Descriptor>,
    /// Every referrer of the source manifest, as the source lists them.
    referrers: Vec<Descriptor>,
    /// The source's referrers fallback index (tag `sha256-<hex>`), if it has one.
    referrers_index: Option<FetchedManifest>,
    /// Cosign-scheme tags and their manifests.
    digest_tags: Vec<(String, FetchedManifest)>,
    /// The top manifest is missing and goes in with its tags alone, not by digest first
    /// (see [`CopyWork::top_goes_with_tags`]).
    top_with_tags: bool,
}

/// An immutable tag held by another digest.
#[derive(Debug, Clone, Serialize)]
pub struct TagConflict {
    pub image: String,
    pub reference: String,
    pub existing: Digest,
    pub promoted: Digest,
}

impl std::fmt::Display for TagConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image `{}`: tag {} is immutable and names {}, not the promoted {}",
            self.image, self.reference, self.existing, self.promoted
        )
    }
}

/// The whole promotion, before anything is written.
#[derive(Debug, Clone, Serialize)]
pub struct PromotionPlan {
    pub from: String,
    pub to: String,
    pub immutable: bool,
    pub images: Vec<ImagePlan>,
}

impl PromotionPlan {
    /// Immutable tags that block the promotion.
    pub fn conflicts(&self) -> Vec<TagConflict> {
        let mut out = Vec::new();
        for img in &self.images {
            for t in &img.tags {
                if let (TagAction::Conflict { existing }, Some(d)) = (&t.action, &img.digest) {
                    out.push(TagConflict {
                        image: img.image.clone(),
                        reference: format!("{}:{}", img.destination, t.tag),
                        existing: existing.clone(),
                        promoted: d.clone(),
                    });
                }
            }
        }
        out
    }

    /// Problems that stop the promotion before anything is written.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .images
            .iter()
            .filter_map(|i| i.error.as_ref().map(|e| format!("image `{}`: {e}", i.image)))
            .collect();
        out.extend(self.conflicts().iter().map(ToString::to_string));
        out
    }

    /// Whether executing would change nothing in the destination.
    pub fn is_noop(&self) -> bool {
        self.problems().is_empty()
            && self.images.iter().all(|i| {
                i.status == ImageStatus::AlreadyThere
                    && i.manifests_to_copy == 0
                    && i.referrers.iter().all(|r| r.present)
                    && i.tags
                        .iter()
                        .all(|t| matches!(t.action, TagAction::Unchanged | TagAction::Keep { .. }))
            })
    }

    /// Copy content, then move tags. Returns what was done; a failure of any image leaves
    /// every tag where it was.
    ///
    /// `jobs` bounds the blob streams between two registries (they move bytes); the small
    /// requests (mounts, manifest and tag PUTs) go [`REQUESTS_IN_FLIGHT`] at a time.
    pub fn execute(self, registry: &dyn Registry, jobs: usize) -> PromotionReport {
        let mut report = PromotionReport::new(&self);
        let problems = self.problems();
        if !problems.is_empty() {
            report.outcome = Outcome::Failed;
            report.failures = problems;
            return report;
        }
        if self.is_noop() {
            report.outcome = Outcome::NothingToDo;
            return report;
        }
        let work: Vec<(&ImagePlan, &CopyWork)> =
            self.images.iter().filter_map(|img| img.work.as_ref().map(|w| (img, w))).collect();
        let copier = Copier {
            registry,
            streams: Permits::new(jobs),
            stats: Stats::default(),
            carriers: Carriers::new(&work),
        };
        // Every image at once, each as soon as its own blobs are in: blobs (a big image's
        // layers in parallel too), then its manifests, children before the index that
        // names them. Content without tags is harmless if another image then fails.
        let numbered: Vec<(usize, &CopyWork)> = work.iter().map(|(_, w)| *w).enumerate().collect();
        let failures: Vec<String> = par_map(&numbered, |&(i, w)| {
            copier.copy_content(i, w).err().map(|e| format!("image `{}`: {e}", work[i].0.image))
        })
        .into_iter()
        .flatten()
        .collect();
        report.stats = copier.stats.snapshot();
        if !failures.is_empty() {
            report.outcome = Outcome::Failed;
            report.failures = failures;
            report.failures.push("no tag was moved".to_string());
            return report;
        }
        // Every manifest is in the destination. Check immutable tags again right before
        // moving any: another promotion may have run since the plan was made.
        if self.immutable {
            match recheck_conflicts(registry, &work) {
                Ok(c) if c.is_empty() => {}
                Ok(c) => {
                    report.outcome = Outcome::Failed;
                    report.failures = c.iter().map(ToString::to_string).collect();
                    report.failures.push("no tag was moved".to_string());
                    return report;
                }
                Err(e) => {
                    report.outcome = Outcome::Failed;
                    report.failures = vec![e, "no tag was moved".to_string()];
                    return report;
                }
            }
        }
        // The all-or-nothing decision is made: every tag of every image at once, and the
        // referrers fallback indexes with them.
        let moves: Vec<(&ImagePlan, &CopyWork, &TagPlan)> = work
            .iter()
            .flat_map(|&(img, w)| img.tags.iter().map(move |t| (img, w, t)))
            .filter(|(_, _, t)| matches!(t.action, TagAction::Create | TagAction::Move { .. }))
            .collect();
        let with_referrers: Vec<&(&ImagePlan, &CopyWork)> =
            work.iter().filter(|(_, w)| !w.referrers.is_empty()).collect();
        let put_tags = || {
            par_map(&moves, |(img, w, t)| {
                let m = match w.digest_tags.iter().find(|(tag, _)| *tag == t.tag) {
                    Some((_, m)) => m,
                    None => &w.top,
                };
                registry
                    .put_manifest(&w.dst, &t.tag, &m.media_type, &m.bytes)
                    .map(|_| (img.image.clone(), t.tag.clone()))
                    .map_err(|e| format!("image `{}`: {e}", img.image))
            })
        };
        let update_indexes = || {
            par_map(&with_referrers, |(img, w)| {
                update_referrers_index(registry, w)
                    .map_err(|e| format!("image `{}`: {e}", img.image))
            })
        };
        let (tag_results, referrer_results) = if with_referrers.is_empty() {
            (put_tags(), Vec::new())
        } else {
            both(put_tags, update_indexes)
        };
        let mut moved: BTreeSet<(String, String)> = BTreeSet::new();
        let mut failures = Vec::new();
        for r in tag_results {
            match r {
                Ok(m) => {
                    moved.insert(m);
                }
                Err(e) => failures.push(e),
            }
        }
        failures.extend(referrer_results.into_iter().filter_map(Result::err));
        report.stats.tags_moved = moved.len() as u64;
        // A top manifest that went in with its tags was copied when one of them moved.
        report.stats.manifests_copied += work
            .iter()
            .filter(|(img, w)| {
                w.top_with_tags
                    && img.tags.iter().any(|t| moved.contains(&(img.image.clone(), t.tag.clone())))
            })
            .count() as u64;
        for img in &self.images {
            for t in &img.tags {
                let now_there = t.action == TagAction::Unchanged
                    || moved.contains(&(img.image.clone(), t.tag.clone()));
                if now_there {
                    report.tagged.push(format!("{}:{}", img.destination, t.tag));
                }
            }
        }
        if !failures.is_empty() {
            report.outcome = Outcome::Failed;
            report.failures = failures;
            return report;
        }
        report.outcome = Outcome::Promoted;
        report
    }
}

/// How a promotion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Not executed (`--dry-run`).
    Planned,
    Promoted,
    /// Everything was already in the destination with its tags.
    NothingToDo,
    Failed,
}

/// What moved over the wire.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CopyStats {
    pub manifests_copied: u64,
    pub blobs_mounted: u64,
    pub blobs_streamed: u64,
    pub bytes_streamed: u64,
    pub tags_moved: u64,
    pub referrers_copied: u64,
}

#[derive(Default)]
struct Stats {
    manifests_copied: AtomicU64,
    blobs_mounted: AtomicU64,
    blobs_streamed: AtomicU64,
    bytes_streamed: AtomicU64,
    referrers_copied: AtomicU64,
}

impl Stats {
    fn snapshot(&self) -> CopyStats {
        CopyStats {
            manifests_copied: self.manifests_copied.load(Ordering::Relaxed),
            blobs_mounted: self.blobs_mounted.load(Ordering::Relaxed),
            blobs_streamed: self.blobs_streamed.load(Ordering::Relaxed),
            bytes_streamed: self.bytes_streamed.load(Ordering::Relaxed),
            tags_moved: 0,
            referrers_copied: self.referrers_copied.load(Ordering::Relaxed),
        }
    }
}

/// The result of a promotion (or of a dry run: the plan, outcome `planned`).
#[derive(Debug, Clone, Serialize)]
pub struct PromotionReport {
    pub from: String,
    pub to: String,
    pub outcome: Outcome,
    pub images: Vec<ImagePlan>,
    pub stats: CopyStats,
    /// Full references that now name the promoted digests.
    pub tagged: Vec<String>,
    pub failures: Vec<String>,
    pub warnings: Vec<String>,
}

impl PromotionReport {
    fn new(plan: &PromotionPlan) -> PromotionReport {
        let mut warnings = Vec::new();
        for img in &plan.images {
            for t in &img.tags {
                if let TagAction::Keep { existing } = &t.action {
                    warnings.push(format!(
                        "image `{}`: {}:{} already names {existing} in `{}`; left unchanged",
                        img.image, img.destination, t.tag, plan.to
                    ));
                }
            }
        }
        PromotionReport {
            from: plan.from.clone(),
            to: plan.to.clone(),
            outcome: Outcome::Planned,
            images: plan.images.clone(),
            stats: CopyStats::default(),
            tagged: Vec::new(),
            failures: Vec::new(),
            warnings,
        }
    }

    /// The plan as a report, without executing it.
    pub fn dry_run(plan: &PromotionPlan) -> PromotionReport {
        let mut r = PromotionReport::new(plan);
        r.failures = plan.problems();
        if plan.is_noop() {
            r.outcome = Outcome::NothingToDo;
        }
        r
    }
}

/// Resolve, fetch and compare: everything [`PromotionPlan::execute`] needs, read-only.
pub fn plan(
    manifest: &Manifest,
    registry: &dyn Registry,
    request: &PromoteRequest,
    info: &SourceInfo,
) -> Result<PromotionPlan, PromoteError> {
    let from = environment(manifest, &request.from)?;
    let to = environment(manifest, &request.to)?;
    if from.name == to.name {
        return Err(PromoteError::SameEnvironment { env: from.name.clone() });
    }
    if let Some(allowed) = &to.promote_from {
        if *allowed != from.name {
            return Err(PromoteError::SourceNotAllowed {
                from: from.name.clone(),
                to: to.name.clone(),
                allowed: allowed.clone(),
            });
        }
    }
    let selected = select(manifest, &request.images)?;
    for image in request.digests.keys() {
        if !manifest.images.contains_key(image) {
            return Err(PromoteError::UnknownImage {
                image: image.clone(),
                suggestion: crate::diagnostic::did_you_mean(
                    image,
                    manifest.images.keys().map(String::as_str),
                )
                .map(str::to_string),
            });
        }
        if !selected.iter().any(|i| i.name == *image) {
            return Err(PromoteError::DigestNotSelected { image: image.clone() });
        }
    }
    // Everything that needs no registry first, so bad input fails before any request.
    let mut targets = Vec::new();
    for image in selected {
        targets.push(Target::new(image, from, to, request, info)?);
    }
    // Every image at once: the plan is a few rounds of small reads per image, and a
    // registry answers dozens of them in parallel.
    let mut results =
        par_map(&targets, |t| (t.image.clone(), plan_image(registry, t, request.referrers)));
    // In name order, as the report lists them (and the first error by name is the one told).
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let images = results.into_iter().map(|(_, r)| r).collect::<Result<Vec<_>, _>>()?;
    Ok(PromotionPlan {
        from: from.name.clone(),
        to: to.name.clone(),
        immutable: to.immutable,
        images,
    })
}

fn environment<'a>(manifest: &'a Manifest, name: &str) -> Result<&'a Environment, PromoteError> {
    manifest.environments.get(name).ok_or_else(|| PromoteError::UnknownEnvironment {
        env: name.to_string(),
        suggestion: crate::diagnostic::did_you_mean(
            name,
            manifest.environments.keys().map(String::as_str),
        )
        .map(str::to_string),
    })
}

/// The named images (no ancestors: promotion copies finished images), or all of them.
fn select<'a>(manifest: &'a Manifest, names: &[String]) -> Result<Vec<&'a Image>, PromoteError> {
    if names.is_empty() {
        return Ok(manifest.images.values().collect());
    }
    let mut out: Vec<&Image> = Vec::new();
    for name in names {
        let image = manifest.images.get(name).ok_or_else(|| PromoteError::UnknownImage {
            image: name.clone(),
            suggestion: crate::diagnostic::did_you_mean(
                name,
                manifest.images.keys().map(String::as_str),
            )
            .map(str::to_string),
        })?;
        if !out.iter().any(|i| i.name == image.name) {
            out.push(image);
        }
    }
    Ok(out)
}

/// One image's source reference and destination repository and tags.
struct Target {
    image: String,
    src: Repository,
    /// A tag or a digest.
    src_reference: String,
    dst: Repository,
    dst_tags: Vec<String>,
    immutable: bool,
}

impl Target {
    fn new(
        image: &Image,
        from: &Environment,
        to: &Environment,
        request: &PromoteRequest,
        info: &SourceInfo,
    ) -> Result<Target, PromoteError> {
        let src_tags = render_tags(image, from, info)?;
        let dst_tags = render_tags(image, to, info)?;
        let src_reference = match request.digests.get(&image.name) {
            Some(d) => d.to_string(),
            None => {
                let version = image.version.as_ref().map(|v| v.to_string().replace('+', "_"));
                version
                    .as_ref()
                    .and_then(|v| src_tags.tags.iter().find(|t| t.contains(v.as_str())))
                    .cloned()
                    .ok_or_else(|| PromoteError::NoSourceTag {
                        image: image.name.clone(),
                        env: from.name.clone(),
                        version: version.clone(),
                    })?
            }
        };
        Ok(Target {
            image: image.name.clone(),
            src: repository(&image.name, &src_tags.repository)?,
            src_reference,
            dst: repository(&image.name, &dst_tags.repository)?,
            dst_tags: dst_tags.tags,
            immutable: to.immutable,
        })
    }

    fn source_name(&self) -> String {
        if self.src_reference.starts_with("sha256:") {
            format!("{}@{}", self.src, self.src_reference)
        } else {
            format!("{}:{}", self.src, self.src_reference)
        }
    }
}

fn repository(image: &str, name: &str) -> Result<Repository, PromoteError> {
    Reference::parse(name).map(|r| r.repository).map_err(|e| PromoteError::BadRepository {
        image: image.to_string(),
        repository: name.to_string(),
        reason: e.to_string(),
    })
}

fn plan_image(
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
fn fallback_tag(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

/// A manifest to put by digest.
#[derive(Debug, Clone)]
struct ContentManifest {
    manifest: FetchedManifest,
    /// It names other manifests, which must be in the destination first.
    index: bool,
}

/// Manifests (children before the indexes that name them) and blobs.
#[derive(Debug, Default)]
struct Content {
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

/// What copying content needs, shared by every image's thread.
struct Copier<'a> {
    registry: &'a dyn Registry,
    /// Bounds the blob streams between two registries (`--jobs`).
    streams: Permits,
    stats: Stats,
    carriers: Carriers<'a>,
}

impl<'a> Copier<'a> {
    /// Copy the missing blobs of image `me` (its position in the work list), then put
    /// its manifests.
    fn copy_content(&self, me: usize, work: &'a CopyWork) -> Result<(), RegistryError> {
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
fn recheck_conflicts(
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
fn update_referrers_index(registry: &dyn Registry, work: &CopyWork) -> Result<(), RegistryError> {
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

/// Run `f` on every item, up to [`REQUESTS_IN_FLIGHT`] at once (the caller's thread
/// among them), and return the results in item order. What reaches the registry is
/// bounded by the client ([`MAX_REQUESTS_IN_FLIGHT`]); this bounds the threads.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = items.len().min(REQUESTS_IN_FLIGHT);
    if workers <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            done.push((i, f(item)));
        }
        done
    };
    let mut results = std::thread::scope(|s| {
        let helpers: Vec<_> = (1..workers).map(|_| s.spawn(work)).collect();
        let mut all = work();
        for h in helpers {
            all.extend(join(h));
        }
        all
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Run `a` and `b` at once.
fn both<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    std::thread::scope(|s| {
        let b = s.spawn(b);
        let a = a();
        (a, join(b))
    })
}

/// A scoped thread's result; its panic goes on in the caller.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A counting semaphore.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain counters; a panic elsewhere leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
