//! Promotion: copy images already published in one environment into another by digest,
//! never rebuilding (DESIGN.md section 11).
//!
//! Two phases. [`plan`] only reads (module `read`): it resolves each image's digest in the
//! source environment, fetches the manifests (an index with its children), and asks the
//! destination which manifests, blobs, referrers and tags it already has. Then
//! [`PromotionPlan::execute`] copies what is missing (module `copy`): manifest bytes
//! verbatim so the digest is the same, blobs mounted inside one registry or streamed
//! between two, referrers with them. Only when every image's content is in the
//! destination does it move tags (inside one registry, an image without referrers goes in
//! with its tags: see `CopyWork::top_goes_with_tags`). A plan with a problem (an image
//! missing in the source, an immutable tag held by another digest) executes nothing at
//! all.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::digest::Digest;
use crate::manifest::{Environment, Image, Manifest};
use crate::plan::{render_tags, PlanError, SourceInfo};
use crate::reference::{Reference, Repository};
use crate::registry::{Registry, RegistryError, MAX_REQUESTS_IN_FLIGHT};

mod copy;
mod read;

use copy::{recheck_conflicts, update_referrers_index, Copier};
use read::{plan_image, CopyWork};

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
        let copier = Copier::new(registry, jobs, &work);
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
