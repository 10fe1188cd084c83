//! Promotion: copy images already published in one environment into another by digest,
//! never rebuilding (DESIGN.md section 11).
//!
//! Two phases. [`plan`] only reads: it resolves each image's digest in the source
//! environment, fetches the manifests (an index with its children), and asks the
//! destination which manifests, blobs, referrers and tags it already has. Then
//! [`PromotionPlan::execute`] copies what is missing — manifest bytes verbatim so the digest
//! is the same, blobs mounted inside one registry or streamed between two, referrers with
//! them — and only when every image's content is in the destination does it move tags.
//! A plan with a problem (an image missing in the source, an immutable tag held by another
//! digest) executes nothing at all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::digest::Digest;
use crate::manifest::{Environment, Image, Manifest};
use crate::oci::{self, Descriptor, ImageIndex, ParsedManifest};
use crate::plan::{render_tags, PlanError, SourceInfo};
use crate::reference::{Reference, Repository};
use crate::registry::{FetchedManifest, Registry, RegistryError};

/// Tag suffixes of the cosign tag scheme (`sha256-<hex>.sig` …) copied with an image.
const DIGEST_TAG_SUFFIXES: [&str; 3] = [".sig", ".att", ".sbom"];

/// Indexes nest rarely and shallowly; deeper nesting is a malformed or hostile index.
const MAX_INDEX_DEPTH: usize = 4;

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
    /// Blobs the destination lacks, and their bytes.
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
    /// Manifests to put by digest, children before parents, referrers last.
    manifests: Vec<FetchedManifest>,
    /// Blobs the destination lacks.
    blobs: Vec<Descriptor>,
    /// Every referrer of the source manifest, as the source lists them.
    referrers: Vec<Descriptor>,
    /// The source's referrers fallback index (tag `sha256-<hex>`), if it has one.
    referrers_index: Option<FetchedManifest>,
    /// Cosign-scheme tags and their manifests.
    digest_tags: Vec<(String, FetchedManifest)>,
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
        let stats = Stats::default();
        let failures = Mutex::new(Vec::new());
        // Every missing blob of every image at once (a big image's layers in parallel too),
        // then each image's manifests, children before the index that names them.
        let blobs: Vec<(&ImagePlan, &CopyWork, &Descriptor)> = self
            .images
            .iter()
            .filter_map(|img| img.work.as_ref().map(|w| (img, w)))
            .flat_map(|(img, w)| w.blobs.iter().map(move |b| (img, w, b)))
            .collect();
        run_parallel(jobs, &blobs, |(img, work, blob)| {
            if let Err(e) = copy_blob(registry, &work.src, &work.dst, blob, &stats) {
                lock(&failures).push(format!("image `{}`: {e}", img.image));
            }
        });
        if lock(&failures).is_empty() {
            run_parallel(jobs, &self.images, |img| {
                if let Some(work) = &img.work {
                    if let Err(e) = copy_manifests(registry, work, &stats) {
                        lock(&failures).push(format!("image `{}`: {e}", img.image));
                    }
                }
            });
        }
        report.stats = stats.snapshot();
        let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
        if !failures.is_empty() {
            report.outcome = Outcome::Failed;
            report.failures = failures;
            report.failures.push("no tag was moved".to_string());
            return report;
        }
        // Every manifest is in the destination. Check immutable tags again right before
        // moving any: another promotion may have run since the plan was made.
        if self.immutable {
            let conflicts = recheck_conflicts(registry, &self.images);
            match conflicts {
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
        // Tags of every image at once: registries take tens of milliseconds per manifest
        // PUT, and the all-or-nothing decision has been made above.
        let moves: Vec<(&ImagePlan, &CopyWork, &TagPlan)> = self
            .images
            .iter()
            .filter_map(|img| img.work.as_ref().map(|w| (img, w)))
            .flat_map(|(img, w)| img.tags.iter().map(move |t| (img, w, t)))
            .filter(|(_, _, t)| matches!(t.action, TagAction::Create | TagAction::Move { .. }))
            .collect();
        let moved: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
        let failures = Mutex::new(Vec::new());
        run_parallel(jobs, &moves, |(img, work, t)| {
            let m = match work.digest_tags.iter().find(|(tag, _)| *tag == t.tag) {
                Some((_, m)) => m,
                None => &work.top,
            };
            match registry.put_manifest(&work.dst, &t.tag, &m.media_type, &m.bytes) {
                Ok(_) => {
                    lock(&moved).insert((img.image.clone(), t.tag.clone()));
                }
                Err(e) => lock(&failures).push(format!("image `{}`: {e}", img.image)),
            }
        });
        run_parallel(jobs, &self.images, |img| {
            let Some(work) = &img.work else { return };
            if work.referrers.is_empty() {
                return;
            }
            if let Err(e) = update_referrers_index(registry, work) {
                lock(&failures).push(format!("image `{}`: {e}", img.image));
            }
        });
        let moved = moved.into_inner().unwrap_or_else(|p| p.into_inner());
        report.stats.tags_moved = moved.len() as u64;
        for img in &self.images {
            for t in &img.tags {
                let now_there = t.action == TagAction::Unchanged
                    || moved.contains(&(img.image.clone(), t.tag.clone()));
                if now_there {
                    report.tagged.push(format!("{}:{}", img.destination, t.tag));
                }
            }
        }
        let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
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
    let results: Mutex<BTreeMap<String, Result<ImagePlan, PromoteError>>> =
        Mutex::new(BTreeMap::new());
    run_parallel(request.jobs, &targets, |t| {
        let r = plan_image(registry, t, request.referrers);
        lock(&results).insert(t.image.clone(), r);
    });
    let mut images = Vec::new();
    for (_, r) in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        images.push(r?);
    }
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
        mount: t.src.registry == t.dst.registry,
        referrers: Vec::new(),
        tags: Vec::new(),
        error: None,
        work: None,
    };
    // The source: the manifest and everything it reaches.
    let top = match registry.get_manifest(&t.src, &t.src_reference) {
        Ok(m) => m,
        Err(RegistryError::NotFound { .. }) => {
            plan.error = Some(format!("{} does not exist in the source environment", plan.source));
            return Ok(plan);
        }
        Err(e) => return Err(reg_err(e)),
    };
    let mut content = Content::default();
    match collect(registry, &t.src, &top, &mut content, 0) {
        Ok(()) => {}
        Err(RegistryError::NotFound { what, .. }) => {
            plan.error = Some(format!(
                "{} is incomplete in the source environment: {what} is missing",
                plan.source
            ));
            return Ok(plan);
        }
        Err(e) => return Err(reg_err(e)),
    }
    plan.digest = Some(top.digest.clone());
    plan.media_type = Some(top.media_type.clone());

    // The destination: what it lacks.
    let mut work = CopyWork {
        src: t.src.clone(),
        dst: t.dst.clone(),
        top: top.clone(),
        manifests: Vec::new(),
        blobs: Vec::new(),
        referrers: Vec::new(),
        referrers_index: None,
        digest_tags: Vec::new(),
    };
    let top_present = registry.head_manifest(&t.dst, &top.digest.to_string()).map_err(reg_err)?;
    plan.status = if top_present.is_some() { ImageStatus::AlreadyThere } else { ImageStatus::Copy };
    if top_present.is_none() {
        missing_content(registry, &t.dst, content, &mut work).map_err(reg_err)?;
    }

    if with_referrers {
        let listed = registry.referrers(&t.src, &top.digest, None).map_err(reg_err)?;
        for r in &listed.manifests {
            let present =
                registry.head_manifest(&t.dst, &r.digest.to_string()).map_err(reg_err)?.is_some();
            plan.referrers.push(ReferrerPlan {
                digest: r.digest.clone(),
                artifact_type: r.artifact_type.clone(),
                present,
            });
            if !present {
                let m = registry.get_manifest(&t.src, &r.digest.to_string()).map_err(reg_err)?;
                let mut c = Content::default();
                collect(registry, &t.src, &m, &mut c, 0).map_err(reg_err)?;
                missing_content(registry, &t.dst, c, &mut work).map_err(reg_err)?;
            }
        }
        work.referrers = listed.manifests;
        let fallback = fallback_tag(&top.digest);
        let src_tags = registry.list_tags(&t.src).map_err(reg_err)?;
        if src_tags.contains(&fallback) {
            work.referrers_index = Some(registry.get_manifest(&t.src, &fallback).map_err(reg_err)?);
        }
        for suffix in DIGEST_TAG_SUFFIXES {
            let tag = format!("{fallback}{suffix}");
            if !src_tags.contains(&tag) {
                continue;
            }
            let m = registry.get_manifest(&t.src, &tag).map_err(reg_err)?;
            let action = match registry.head_manifest(&t.dst, &tag).map_err(reg_err)? {
                None => TagAction::Create,
                Some(d) if d.digest == m.digest => TagAction::Unchanged,
                Some(d) => TagAction::Keep { existing: d.digest },
            };
            if action == TagAction::Create {
                let present = registry
                    .head_manifest(&t.dst, &m.digest.to_string())
                    .map_err(reg_err)?
                    .is_some();
                if !present {
                    let mut c = Content::default();
                    collect(registry, &t.src, &m, &mut c, 0).map_err(reg_err)?;
                    missing_content(registry, &t.dst, c, &mut work).map_err(reg_err)?;
                }
            }
            plan.tags.push(TagPlan { tag: tag.clone(), action });
            work.digest_tags.push((tag, m));
        }
    }

    // Image tags go first in the list: they are what people look for.
    let mut tags = Vec::new();
    for tag in &t.dst_tags {
        let action = match registry.head_manifest(&t.dst, tag).map_err(reg_err)? {
            None => TagAction::Create,
            Some(d) if d.digest == top.digest => TagAction::Unchanged,
            Some(d) if t.immutable => TagAction::Conflict { existing: d.digest },
            Some(d) => TagAction::Move { from: d.digest },
        };
        tags.push(TagPlan { tag: tag.clone(), action });
    }
    tags.append(&mut plan.tags);
    plan.tags = tags;
    plan.manifests_to_copy = work.manifests.len();
    plan.blobs_to_copy = work.blobs.len();
    plan.bytes_to_copy = work.blobs.iter().map(|b| b.size).sum();
    plan.work = Some(work);
    Ok(plan)
}

/// The tag of the OCI referrers fallback scheme (and the stem of cosign's tags).
fn fallback_tag(digest: &Digest) -> String {
    format!("sha256-{}", digest.hex())
}

/// Manifests (children first) and blobs that a manifest reaches.
#[derive(Default)]
struct Content {
    manifests: Vec<FetchedManifest>,
    blobs: Vec<Descriptor>,
}

fn collect(
    registry: &dyn Registry,
    repo: &Repository,
    m: &FetchedManifest,
    out: &mut Content,
    depth: usize,
) -> Result<(), RegistryError> {
    let invalid = |reason: String| RegistryError::Invalid {
        registry: repo.registry.clone(),
        what: format!("manifest {}@{}", repo.path, m.digest),
        reason,
    };
    let (_, parsed) = oci::parse_manifest(&m.bytes, Some(&m.media_type)).map_err(invalid)?;
    match parsed {
        ParsedManifest::Image(im) => {
            out.blobs.push(im.config);
            // Foreign layers (with URLs) live outside the registry; they are not copied.
            out.blobs.extend(im.layers.into_iter().filter(|l| l.urls.is_empty()));
        }
        ParsedManifest::Index(ix) => {
            if depth >= MAX_INDEX_DEPTH {
                return Err(invalid(format!("indexes nest deeper than {MAX_INDEX_DEPTH} levels")));
            }
            for child in &ix.manifests {
                if out.manifests.iter().any(|c| c.digest == child.digest) {
                    continue;
                }
                let c = registry.get_manifest(repo, &child.digest.to_string())?;
                collect(registry, repo, &c, out, depth + 1)?;
            }
        }
    }
    out.manifests.push(m.clone());
    Ok(())
}

/// Add to `work` the manifests and blobs of `content` the destination lacks.
fn missing_content(
    registry: &dyn Registry,
    dst: &Repository,
    content: Content,
    work: &mut CopyWork,
) -> Result<(), RegistryError> {
    for m in content.manifests {
        if work.manifests.iter().any(|w| w.digest == m.digest) {
            continue;
        }
        if registry.head_manifest(dst, &m.digest.to_string())?.is_none() {
            work.manifests.push(m);
        }
    }
    let mut seen: BTreeSet<Digest> = work.blobs.iter().map(|b| b.digest.clone()).collect();
    for b in content.blobs {
        if !seen.insert(b.digest.clone()) {
            continue;
        }
        if registry.blob_exists(dst, &b.digest)?.is_none() {
            work.blobs.push(b);
        }
    }
    Ok(())
}

/// Put an image's manifests by digest (its blobs are in the destination already).
fn copy_manifests(
    registry: &dyn Registry,
    work: &CopyWork,
    stats: &Stats,
) -> Result<(), RegistryError> {
    let referrers: BTreeSet<&Digest> = work.referrers.iter().map(|r| &r.digest).collect();
    for m in &work.manifests {
        registry.put_manifest(&work.dst, &m.digest.to_string(), &m.media_type, &m.bytes)?;
        stats.manifests_copied.fetch_add(1, Ordering::Relaxed);
        if referrers.contains(&m.digest) {
            stats.referrers_copied.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

fn copy_blob(
    registry: &dyn Registry,
    src: &Repository,
    dst: &Repository,
    blob: &Descriptor,
    stats: &Stats,
) -> Result<(), RegistryError> {
    if src.registry == dst.registry && registry.try_mount_blob(dst, src, &blob.digest)? {
        stats.blobs_mounted.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    // From one connection to the other; a cut stream starts over from a new GET.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let stream = registry.get_blob(src, &blob.digest)?;
        match registry.put_blob_stream(dst, &blob.digest, blob.size, stream.reader) {
            Ok(()) => {
                stats.blobs_streamed.fetch_add(1, Ordering::Relaxed);
                stats.bytes_streamed.fetch_add(blob.size, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => match registry.retry_delay(&e, attempt) {
                // The registry's retry policy: backoff, Retry-After.
                Some(delay) => {
                    tracing::info!(digest = %blob.digest, error = %e, "blob copy failed; starting over");
                    std::thread::sleep(delay);
                }
                None => return Err(e),
            },
        }
    }
}

fn recheck_conflicts(
    registry: &dyn Registry,
    images: &[ImagePlan],
) -> Result<Vec<TagConflict>, String> {
    let mut out = Vec::new();
    for img in images {
        let (Some(work), Some(digest)) = (&img.work, &img.digest) else { continue };
        for t in &img.tags {
            if !matches!(t.action, TagAction::Create | TagAction::Unchanged) {
                continue;
            }
            if t.tag.starts_with("sha256-")
                && DIGEST_TAG_SUFFIXES.iter().any(|s| t.tag.ends_with(s))
            {
                continue;
            }
            let now = registry
                .head_manifest(&work.dst, &t.tag)
                .map_err(|e| format!("image `{}`: {e}", img.image))?;
            if let Some(d) = now {
                if d.digest != *digest {
                    out.push(TagConflict {
                        image: img.image.clone(),
                        reference: format!("{}:{}", img.destination, t.tag),
                        existing: d.digest,
                        promoted: digest.clone(),
                    });
                }
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

/// Run `f` on every item with at most `jobs` at once.
fn run_parallel<T: Sync>(jobs: usize, items: &[T], f: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                f(item);
            });
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain collections; a panic elsewhere leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
