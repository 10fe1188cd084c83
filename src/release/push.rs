//! Push: the plan (what each image needs in the registry) and its execution.
//!
//! The order is what makes a push safe to interrupt (DESIGN.md section 11):
//! 1. plan: HEAD every blob in its repository, every manifest by digest and every tag, so
//!    the plan says exactly what will be uploaded, mounted or left alone, and so an
//!    immutable environment refuses a moving tag before anything is sent;
//! 2. blobs: each missing blob is uploaded once per registry, then mounted into the other
//!    repositories that need it (201 mounted; 202 means the registry chose to take an upload);
//! 3. manifests, by digest: nothing is tagged yet, so nobody pulling by tag sees them;
//! 4. tags, all images together, only if every image got this far (with `keep_going`: the
//!    images whose whole ancestry did).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::variants::PushableManifest;
use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::reference::Repository;
use crate::registry::{MountOutcome, Registry, RegistryError};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("image `{image}`: {reason}")]
    Image { image: String, reason: String },
}

/// An image to push, as the caller built it.
#[derive(Debug, Clone)]
pub struct PushImage {
    pub name: String,
    pub repository: Repository,
    pub tags: Vec<String>,
    /// Images of the manifest this one is built from (FROM, COPY --from): a published image
    /// never points at an ancestor that failed.
    pub parents: Vec<String>,
    pub source: ImageSource,
}

#[derive(Debug, Clone)]
pub enum ImageSource {
    Built(Box<PushableManifest>),
    /// The build failed or was skipped; why.
    NotBuilt(String),
}

/// What will happen to one blob of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum BlobAction {
    /// The repository already has it.
    Present,
    /// Sent by this image's repository.
    Upload,
    /// Linked from another repository of the same registry (which has it, or gets it
    /// earlier in this push).
    Mount { from: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct BlobPlan {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    #[serde(flatten)]
    pub action: BlobAction,
    #[serde(skip)]
    mount_from: Option<Repository>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TagAction {
    /// The tag does not exist yet.
    Create,
    /// The tag points at another digest and will be moved.
    Move,
    /// The tag already points at this digest.
    Unchanged,
}

#[derive(Debug, Clone, Serialize)]
pub struct TagPlan {
    pub tag: String,
    pub action: TagAction,
    /// Where the tag points now, if it exists.
    pub current: Option<Digest>,
}

/// A tag of an immutable environment that exists with another digest.
#[derive(Debug, Clone, Serialize)]
pub struct TagConflict {
    pub image: String,
    pub reference: String,
    pub existing: Digest,
    pub pushed: Digest,
}

impl std::fmt::Display for TagConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "image `{}`: tag {} already points at {}; this push would move it to {}",
            self.image, self.reference, self.existing, self.pushed
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ImagePlan {
    pub name: String,
    pub repository: String,
    #[serde(skip)]
    repo: Repository,
    /// The digest pushed and tagged; None when the image was not built.
    pub digest: Option<Digest>,
    /// The digest in the store, when the push re-writes the manifest (another compression).
    pub store_digest: Option<Digest>,
    pub rewritten: bool,
    /// Layer variants this run had to compute (0 when all came from the store's index).
    pub variants_computed: usize,
    pub manifest_present: bool,
    pub tags: Vec<TagPlan>,
    pub blobs: Vec<BlobPlan>,
    pub upload_bytes: u64,
    pub present_bytes: u64,
    pub parents: Vec<String>,
    pub not_built: Option<String>,
    #[serde(skip)]
    manifest: Option<PushableManifest>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushPlan {
    pub environment: String,
    pub immutable: bool,
    pub images: Vec<ImagePlan>,
    /// Non-empty only in an immutable environment: the push must not start.
    pub conflicts: Vec<TagConflict>,
    pub blobs_to_upload: usize,
    pub blobs_to_mount: usize,
    pub blobs_present: usize,
    pub upload_bytes: u64,
    pub present_bytes: u64,
}

/// How a push runs.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Registry requests at once.
    pub jobs: usize,
    /// Publish the images whose whole ancestry succeeded, even when others failed.
    pub keep_going: bool,
}

/// What the reporter is told while a push runs.
#[derive(Debug, Clone)]
pub enum PushEvent<'a> {
    Blob { image: &'a str, digest: &'a Digest, action: &'a str, bytes: u64 },
    Manifest { image: &'a str, digest: &'a Digest },
    Tag { image: &'a str, reference: &'a str },
    Failed { image: &'a str, error: &'a str },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushStatus {
    /// Uploaded and tagged.
    Published,
    /// Blobs and manifest are in the registry, but no tag was moved (another image failed).
    UploadedUntagged,
    /// Its upload failed.
    Failed,
    /// Not uploaded: its build failed, or an ancestor's did.
    NotBuilt,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageOutcome {
    pub name: String,
    pub repository: String,
    pub status: PushStatus,
    pub digest: Option<Digest>,
    pub store_digest: Option<Digest>,
    pub rewritten: bool,
    /// Tags that point at `digest` after the push (moved now or already there).
    pub tags: Vec<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub environment: String,
    pub images: Vec<ImageOutcome>,
    pub blobs_uploaded: usize,
    pub bytes_uploaded: u64,
    pub blobs_mounted: usize,
    pub blobs_present: usize,
    pub manifests_pushed: usize,
    pub tags_moved: usize,
    pub tags_unchanged: usize,
}

impl PushReport {
    pub fn all_published(&self) -> bool {
        self.images.iter().all(|i| i.status == PushStatus::Published)
    }
}

/// Ask the registry what each image needs. Nothing is written.
pub fn plan(
    registry: &dyn Registry,
    environment: &str,
    immutable: bool,
    images: Vec<PushImage>,
    jobs: usize,
) -> Result<PushPlan, PushError> {
    // Every (repository, blob) and (repository, tag) pair, asked once and in parallel.
    let mut blob_queries: BTreeSet<(Repository, Digest)> = BTreeSet::new();
    let mut tag_queries: BTreeSet<(Repository, String)> = BTreeSet::new();
    let mut manifest_queries: BTreeSet<(Repository, String)> = BTreeSet::new();
    for img in &images {
        if let ImageSource::Built(m) = &img.source {
            for d in blobs_of(m) {
                blob_queries.insert((img.repository.clone(), d.digest.clone()));
            }
            manifest_queries.insert((img.repository.clone(), m.descriptor.digest.to_string()));
            for t in &img.tags {
                tag_queries.insert((img.repository.clone(), t.clone()));
            }
        }
    }
    let blob_queries: Vec<_> = blob_queries.into_iter().collect();
    let present: BTreeMap<(Repository, Digest), bool> = parallel(&blob_queries, jobs, |(r, d)| {
        registry.blob_exists(r, d).map(|s| ((r.clone(), d.clone()), s.is_some()))
    })
    .into_iter()
    .collect::<Result<_, _>>()?;
    let refs: Vec<_> = tag_queries.into_iter().chain(manifest_queries).collect();
    let heads: BTreeMap<(Repository, String), Option<Digest>> = parallel(&refs, jobs, |(r, t)| {
        registry.head_manifest(r, t).map(|d| ((r.clone(), t.clone()), d.map(|d| d.digest)))
    })
    .into_iter()
    .collect::<Result<_, _>>()?;

    // Per registry and blob: the repositories of this push that already have it, and the
    // first image (in build order) that has to send it.
    let mut holders: BTreeMap<(String, Digest), Repository> = BTreeMap::new();
    for ((repo, digest), there) in &present {
        if *there {
            holders.entry((repo.registry.clone(), digest.clone())).or_insert_with(|| repo.clone());
        }
    }

    let mut plans = Vec::new();
    let mut conflicts = Vec::new();
    for img in images {
        let repository = img.repository.to_string();
        let manifest = match img.source {
            ImageSource::Built(m) => *m,
            ImageSource::NotBuilt(why) => {
                plans.push(ImagePlan {
                    name: img.name,
                    repository,
                    repo: img.repository,
                    digest: None,
                    store_digest: None,
                    rewritten: false,
                    variants_computed: 0,
                    manifest_present: false,
                    tags: img
                        .tags
                        .into_iter()
                        .map(|tag| TagPlan { tag, action: TagAction::Create, current: None })
                        .collect(),
                    blobs: Vec::new(),
                    upload_bytes: 0,
                    present_bytes: 0,
                    parents: img.parents,
                    not_built: Some(why),
                    manifest: None,
                });
                continue;
            }
        };
        let digest = manifest.descriptor.digest.clone();
        let mut blobs = Vec::new();
        let (mut upload_bytes, mut present_bytes) = (0, 0);
        let mut seen = BTreeSet::new();
        for d in blobs_of(&manifest) {
            if !seen.insert(d.digest.clone()) {
                continue;
            }
            let key = (img.repository.clone(), d.digest.clone());
            let holder_key = (img.repository.registry.clone(), d.digest.clone());
            let (action, mount_from) = if present.get(&key).copied().unwrap_or(false) {
                present_bytes += d.size;
                (BlobAction::Present, None)
            } else if let Some(from) = holders.get(&holder_key) {
                (BlobAction::Mount { from: from.path.clone() }, Some(from.clone()))
            } else {
                upload_bytes += d.size;
                holders.insert(holder_key, img.repository.clone());
                (BlobAction::Upload, None)
            };
            blobs.push(BlobPlan {
                digest: d.digest.clone(),
                size: d.size,
                media_type: d.media_type.clone(),
                action,
                mount_from,
            });
        }
        let mut tags = Vec::new();
        for tag in img.tags {
            let current = heads.get(&(img.repository.clone(), tag.clone())).cloned().flatten();
            let action = match &current {
                None => TagAction::Create,
                Some(c) if *c == digest => TagAction::Unchanged,
                Some(c) => {
                    if immutable {
                        conflicts.push(TagConflict {
                            image: img.name.clone(),
                            reference: format!("{repository}:{tag}"),
                            existing: c.clone(),
                            pushed: digest.clone(),
                        });
                    }
                    TagAction::Move
                }
            };
            tags.push(TagPlan { tag, action, current });
        }
        let manifest_present =
            heads.get(&(img.repository.clone(), digest.to_string())).cloned().flatten().is_some();
        plans.push(ImagePlan {
            name: img.name,
            repository,
            repo: img.repository,
            digest: Some(digest),
            store_digest: manifest.rewritten.then(|| manifest.source_digest.clone()),
            rewritten: manifest.rewritten,
            variants_computed: manifest.computed,
            manifest_present,
            tags,
            blobs,
            upload_bytes,
            present_bytes,
            parents: img.parents,
            not_built: None,
            manifest: Some(manifest),
        });
    }
    let count = |f: &dyn Fn(&BlobAction) -> bool| {
        plans.iter().flat_map(|p| &p.blobs).filter(|b| f(&b.action)).count()
    };
    Ok(PushPlan {
        environment: environment.to_string(),
        immutable,
        blobs_to_upload: count(&|a| *a == BlobAction::Upload),
        blobs_to_mount: count(&|a| matches!(a, BlobAction::Mount { .. })),
        blobs_present: count(&|a| *a == BlobAction::Present),
        upload_bytes: plans.iter().map(|p| p.upload_bytes).sum(),
        present_bytes: plans.iter().map(|p| p.present_bytes).sum(),
        images: plans,
        conflicts,
    })
}

/// The config and layers of an image, in manifest order.
fn blobs_of(m: &PushableManifest) -> impl Iterator<Item = &Descriptor> {
    std::iter::once(&m.manifest.config).chain(&m.manifest.layers)
}

/// Carry out a plan. Refuses a plan with immutable-tag conflicts (the caller should have
/// stopped; this keeps the rule in one place).
pub fn execute(
    plan: &PushPlan,
    store: &Store,
    registry: &dyn Registry,
    options: &PushOptions,
    on_event: &(dyn Fn(PushEvent<'_>) + Sync),
) -> Result<PushReport, PushError> {
    if let Some(c) = plan.conflicts.first() {
        return Err(PushError::Image { image: c.image.clone(), reason: c.to_string() });
    }
    let jobs = options.jobs.max(1);
    let errors: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
    let fail = |image: &str, error: String| {
        on_event(PushEvent::Failed { image, error: &error });
        lock(&errors).entry(image.to_string()).or_insert(error);
    };
    let uploaded_bytes = AtomicU64::new(0);
    let uploaded = AtomicUsize::new(0);
    let mounted = AtomicUsize::new(0);

    // Blobs: uploads first (each once per registry), then the mounts that need them.
    let tasks: Vec<(&ImagePlan, &BlobPlan)> = plan
        .images
        .iter()
        .flat_map(|img| img.blobs.iter().map(move |b| (img, b)))
        .filter(|(_, b)| b.action != BlobAction::Present)
        .collect();
    let (uploads, mounts): (Vec<_>, Vec<_>) =
        tasks.into_iter().partition(|(_, b)| b.action == BlobAction::Upload);
    let send = |(img, blob): &(&ImagePlan, &BlobPlan)| {
        let path = store.blob_path(&blob.digest);
        let result = match &blob.mount_from {
            Some(from) => registry
                .mount_blob(&img.repo, from, &blob.digest, blob.size, &path)
                .map(|o| o == MountOutcome::Uploaded),
            None => registry.put_blob(&img.repo, &blob.digest, blob.size, &path).map(|()| true),
        };
        match result {
            Ok(sent) => {
                if sent {
                    uploaded.fetch_add(1, Ordering::Relaxed);
                    uploaded_bytes.fetch_add(blob.size, Ordering::Relaxed);
                } else {
                    mounted.fetch_add(1, Ordering::Relaxed);
                }
                on_event(PushEvent::Blob {
                    image: &img.name,
                    digest: &blob.digest,
                    action: if sent { "uploaded" } else { "mounted" },
                    bytes: if sent { blob.size } else { 0 },
                });
            }
            Err(e) => fail(&img.name, format!("blob {}: {e}", blob.digest)),
        }
    };
    parallel(&uploads, jobs, send);
    parallel(&mounts, jobs, send);

    // Manifests by digest, for images whose every blob is there.
    let ready: Vec<&ImagePlan> = plan
        .images
        .iter()
        .filter(|i| i.manifest.is_some() && !lock(&errors).contains_key(&i.name))
        .collect();
    let manifests_pushed = AtomicUsize::new(0);
    parallel(&ready, jobs, |img| {
        let Some(m) = &img.manifest else { return };
        if img.manifest_present {
            return;
        }
        let digest = &m.descriptor.digest;
        match registry.put_manifest(
            &img.repo,
            &digest.to_string(),
            &m.descriptor.media_type,
            &m.bytes,
        ) {
            Ok(stored) if stored == *digest => {
                manifests_pushed.fetch_add(1, Ordering::Relaxed);
                on_event(PushEvent::Manifest { image: &img.name, digest });
            }
            Ok(stored) => fail(
                &img.name,
                format!("the registry stored the manifest as {stored}, expected {digest}"),
            ),
            Err(e) => fail(&img.name, format!("manifest {digest}: {e}")),
        }
    });

    // Who may be tagged: every image succeeded, or (keep_going) its whole ancestry did.
    let errors_now = lock(&errors).clone();
    let ok = |i: &ImagePlan| i.not_built.is_none() && !errors_now.contains_key(&i.name);
    let by_name: BTreeMap<&str, &ImagePlan> =
        plan.images.iter().map(|i| (i.name.as_str(), i)).collect();
    let everything_ok = plan.images.iter().all(ok);
    let publishable = |img: &ImagePlan| -> bool {
        if everything_ok {
            return true;
        }
        if !options.keep_going {
            return false;
        }
        let mut stack = vec![img];
        let mut seen = BTreeSet::new();
        while let Some(i) = stack.pop() {
            if !seen.insert(i.name.as_str()) {
                continue;
            }
            if !ok(i) {
                return false;
            }
            stack.extend(i.parents.iter().filter_map(|p| by_name.get(p.as_str()).copied()));
        }
        true
    };
    let to_tag: Vec<(&ImagePlan, &TagPlan)> = plan
        .images
        .iter()
        .filter(|i| publishable(i))
        .flat_map(|i| i.tags.iter().map(move |t| (i, t)))
        .filter(|(_, t)| t.action != TagAction::Unchanged)
        .collect();
    let tagged: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    parallel(&to_tag, jobs, |(img, tag)| {
        let Some(m) = &img.manifest else { return };
        let reference = format!("{}:{}", img.repository, tag.tag);
        match registry.put_manifest(&img.repo, &tag.tag, &m.descriptor.media_type, &m.bytes) {
            Ok(_) => {
                lock(&tagged).insert((img.name.clone(), tag.tag.clone()));
                on_event(PushEvent::Tag { image: &img.name, reference: &reference });
            }
            Err(e) => fail(&img.name, format!("tag {reference}: {e}")),
        }
    });

    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    let tagged = tagged.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut images = Vec::new();
    let mut tags_unchanged = 0;
    for img in &plan.images {
        let may_tag = publishable(img);
        let tags: Vec<String> = img
            .tags
            .iter()
            .filter(|t| {
                (may_tag && t.action == TagAction::Unchanged)
                    || tagged.contains(&(img.name.clone(), t.tag.clone()))
            })
            .map(|t| t.tag.clone())
            .collect();
        if may_tag {
            tags_unchanged += img.tags.iter().filter(|t| t.action == TagAction::Unchanged).count();
        }
        let error = img.not_built.clone().or_else(|| errors.get(&img.name).cloned());
        let status = if img.not_built.is_some() {
            PushStatus::NotBuilt
        } else if errors.contains_key(&img.name) {
            PushStatus::Failed
        } else if may_tag {
            PushStatus::Published
        } else {
            PushStatus::UploadedUntagged
        };
        images.push(ImageOutcome {
            name: img.name.clone(),
            repository: img.repository.clone(),
            status,
            digest: img.digest.clone(),
            store_digest: img.store_digest.clone(),
            rewritten: img.rewritten,
            tags,
            error,
        });
    }
    Ok(PushReport {
        environment: plan.environment.clone(),
        images,
        blobs_uploaded: uploaded.into_inner(),
        bytes_uploaded: uploaded_bytes.into_inner(),
        blobs_mounted: mounted.into_inner(),
        blobs_present: plan.blobs_present,
        manifests_pushed: manifests_pushed.into_inner(),
        tags_moved: tagged.len(),
        tags_unchanged,
    })
}

/// Run `f` over `items` on at most `jobs` threads; results in item order.
fn parallel<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                lock(&results)[i] = Some(r);
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only plain inserts happen under these locks; a panic leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
