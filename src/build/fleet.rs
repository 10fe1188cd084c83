//! Building a fleet: the scheduler runs the stage executor per image in dependency order,
//! then each result is tagged in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::cache::{CacheError, CacheIndex};
use super::executor::{BuiltImage, Executor, ProgressEvent, StepReport, StepStatus};
use super::scheduler::{self, Job, Outcome};
use super::shared_cache::{ExportReport, ImportReport, SharedCache};
use super::BuildOptions;
use crate::context::StatCache;
use crate::graph::Graph;
use crate::manifest::Manifest;
use crate::sandbox::Sandbox;
use crate::store::Store;

/// The outcome of `ferry build`, per image in build order.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub images: Vec<ImageReport>,
    /// Steps run vs served from the cache, over the whole build.
    pub steps_built: usize,
    pub steps_cached: usize,
    pub seconds: f64,
    /// What `--cache-from` gave the build, when it was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_from: Option<ImportReport>,
    /// What `--cache-to` wrote, when it was asked and succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_to: Option<ExportReport>,
    /// Why `--cache-to` wrote nothing (a warning: the images are built).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_to_error: Option<String>,
    /// The costly work the build process did, from its start to the end of the build.
    pub work: crate::report::work::Work,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub name: String,
    pub status: ImageStatus,
    pub digest: Option<String>,
    /// Compressed size of config and layers.
    pub size: u64,
    /// Names it was recorded under in the store.
    pub tags: Vec<String>,
    pub steps: Vec<StepReport>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Built,
    Failed,
    Skipped,
}

impl BuildReport {
    pub fn failed(&self) -> usize {
        self.images.iter().filter(|i| i.status != ImageStatus::Built).count()
    }
}

/// What the reporter is told while a fleet builds.
pub enum FleetEvent<'a> {
    Started(&'a str),
    Step { image: &'a str, stage: usize, line: usize, text: &'a str },
    Output { image: &'a str, bytes: &'a [u8] },
    Finished { image: &'a str, report: &'a ImageReport },
}

/// Build the `selected` images of the fleet.
#[allow(clippy::too_many_arguments)]
pub fn build_fleet(
    manifest: &Manifest,
    graph: &Graph,
    selected: &BTreeSet<String>,
    store: &Store,
    sandbox: &dyn Sandbox,
    options: &BuildOptions,
    shared: Option<&SharedCache<'_>>,
    on_event: &(dyn Fn(FleetEvent<'_>) + Sync),
) -> Result<BuildReport, CacheError> {
    let started = Instant::now();
    // Blobs written by this build are named (cache entries, refs) only later: keep a
    // concurrent prune from collecting them in between.
    let _gc = store.gc_guard()?;
    let cache = CacheIndex::open(store)?;
    let stat_cache = StatCache::load(&store.state_dir("context")?.join("stat-cache.json"))
        .staging_in(store.tmp_dir());
    let progress = |image: &str, event: ProgressEvent<'_>| match event {
        ProgressEvent::Step { stage, line, text } => {
            on_event(FleetEvent::Step { image, stage, line, text })
        }
        ProgressEvent::Output(bytes) => on_event(FleetEvent::Output { image, bytes }),
    };
    // Asked once for the fleet (and remembered per commit), not once per image.
    let provenance = crate::release::labels::Provenance::for_images(
        &manifest.root,
        store,
        manifest.images.values().filter(|i| selected.contains(&i.name)),
    );
    let executor = Executor {
        store,
        provenance: &provenance,
        cache: &cache,
        shared,
        sandbox,
        stat_cache: &stat_cache,
        options,
        progress: &progress,
    };
    let jobs: Vec<Job> = graph
        .build_order()
        .into_iter()
        .filter(|n| selected.contains(&n.name))
        .map(|n| Job {
            name: n.name.clone(),
            parents: n.parents.iter().filter(|p| selected.contains(*p)).cloned().collect(),
            priority: n.level,
        })
        .collect();
    let reports: Mutex<BTreeMap<String, ImageReport>> = Mutex::new(BTreeMap::new());
    let outcomes = scheduler::run(
        &jobs,
        options.jobs,
        options.keep_going,
        |name, parents: &BTreeMap<String, Arc<BuiltImage>>| {
            on_event(FleetEvent::Started(name));
            let (Some(node), Some(image)) = (graph.node(name), manifest.images.get(name)) else {
                return Err(format!("image `{name}` is not in the graph"));
            };
            let result = executor
                .build_image(image, node, parents)
                .map_err(|e| e.to_string())
                .and_then(|built| {
                    let tags = tag(store, image, &built)
                        .map_err(|e| format!("image `{name}`: recording tags: {e}"))?;
                    Ok((built, tags))
                });
            let report = match &result {
                Ok((built, tags)) => ImageReport {
                    name: name.to_string(),
                    status: ImageStatus::Built,
                    digest: Some(built.manifest.digest.to_string()),
                    size: built.manifest.size + built.layers.iter().map(|l| l.size).sum::<u64>(),
                    tags: tags.clone(),
                    steps: built.steps.clone(),
                    error: None,
                },
                Err(e) => ImageReport {
                    name: name.to_string(),
                    status: ImageStatus::Failed,
                    digest: None,
                    size: 0,
                    tags: Vec::new(),
                    steps: Vec::new(),
                    error: Some(e.clone()),
                },
            };
            on_event(FleetEvent::Finished { image: name, report: &report });
            if let Ok(mut r) = reports.lock() {
                r.insert(name.to_string(), report);
            }
            result.map(|(built, _)| Arc::new(built))
        },
    );
    if let Err(e) = stat_cache.save() {
        tracing::warn!("cannot save the context stat cache: {e}");
    }
    let mut reports = reports.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut images = Vec::new();
    for job in &jobs {
        let report = match outcomes.get(&job.name) {
            Some(Outcome::Skipped(why)) => ImageReport {
                name: job.name.clone(),
                status: ImageStatus::Skipped,
                digest: None,
                size: 0,
                tags: Vec::new(),
                steps: Vec::new(),
                error: Some(format!("not built: {why}")),
            },
            _ => match reports.remove(&job.name) {
                Some(r) => r,
                None => continue,
            },
        };
        images.push(report);
    }
    let count =
        |s: StepStatus| images.iter().flat_map(|i| &i.steps).filter(|st| st.status == s).count();
    Ok(BuildReport {
        steps_built: count(StepStatus::Built),
        steps_cached: count(StepStatus::Cached),
        seconds: started.elapsed().as_secs_f64(),
        images,
        cache_from: shared.map(SharedCache::import_report),
        cache_to: None,
        cache_to_error: None,
        work: crate::report::work::so_far(),
    })
}

/// Record a built image under its images.toml key, `<repository>:<version>` and
/// `<repository>:latest`.
fn tag(
    store: &Store,
    image: &crate::manifest::Image,
    built: &BuiltImage,
) -> Result<Vec<String>, crate::store::StoreError> {
    let mut names = vec![image.name.clone()];
    if let Some(v) = &image.version {
        names.push(format!("{}:{}", image.repository, v.to_string().replace('+', "_")));
    }
    names.push(format!("{}:latest", image.repository));
    let refs: Vec<(String, crate::oci::Descriptor)> =
        names.iter().map(|n| (n.clone(), built.manifest.clone())).collect();
    store.set_refs(&refs)?;
    Ok(names)
}
