//! The stage executor: runs one image's Dockerfile stages instruction by instruction over
//! the store, reusing cached layers by key (DESIGN.md sections 6–8).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::accounts;
use super::cache::{CacheIndex, CachedLayer};
use super::cache_mount::{self, CacheMount};
use super::config::{self, StageFlags};
use super::download::download;
use super::history;
use super::key::CacheKey;
use super::merged::{MergedView, PathKind};
use super::scheduler::{self, Job, Outcome};
use super::scratch::{self, BindFrom, FromSource};
use super::shared_cache::SharedCache;
use super::BuildOptions;
use crate::context::{map_to_destination_with, CopyItem, CopyKind, SourceTree, StatCache};
use crate::digest::Digest;
use crate::dockerfile::expand::{Lexer, Vars};
use crate::dockerfile::{Command, Dockerfile, Flag, Instruction, Kind, Source};
use crate::graph::{BaseRef, ImageNode};
use crate::layer::{pack_entries, LayerEntry, LayerOptions};
use crate::manifest::Image;
use crate::oci::{
    media_type, ContainerConfig, Descriptor, History, ImageConfig, ImageManifest, RootFs,
};
use crate::release::labels::{self, BaseImage};
use crate::sandbox::{Network, RunMount, RunSpec, Sandbox, SecretBytes};
use crate::store::Store;

/// Docker's limit on layers in one image (overlayfs lower dirs).
pub const MAX_LAYERS: usize = 127;

/// An image this build produced (or found entirely in the cache).
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub name: String,
    pub manifest: Descriptor,
    pub config: ImageConfig,
    pub layers: Vec<Descriptor>,
    pub repository: String,
    /// The images.toml version: a child's `base.name` annotation is `<repository>:<version>`.
    pub version: Option<String>,
    pub steps: Vec<StepReport>,
}

/// A `RUN --mount`, resolved, with what the cache key records of it.
struct PreparedMount {
    mount: RunMount,
    key: String,
    /// What a bind mount reads when it is not the context read-only: prepared only when the
    /// step runs (a cached step never touches it), as a scratch tree.
    from: Option<BindFrom>,
    /// A cache mount's directory is chosen and locked only when the step runs, too.
    cache: Option<CacheMount>,
}

/// What the instructions of one stage can see.
struct StageContext<'a> {
    image: &'a Image,
    df: &'a Dockerfile,
    index: usize,
    global: &'a Vars,
    build_args: &'a BTreeMap<String, String>,
    parents: &'a BTreeMap<String, Arc<BuiltImage>>,
    stages: &'a BTreeMap<usize, StageState>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What one instruction did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub stage: usize,
    pub line: usize,
    pub instruction: String,
    /// `built`, `cached`, or `config` (changed only the image config).
    pub status: StepStatus,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Built,
    Cached,
    Config,
}

/// A failed build of one image, with where it failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{file}:{line}: {message}")]
    Step { file: String, line: usize, message: String },
    #[error("{}:{}: RUN failed with {} (image `{}`, stage {})\n{}", .0.file, .0.line, .0.status, .0.image, .0.stage, .0.tail)]
    RunFailed(Box<RunFailure>),
    #[error("image `{image}`: {message}")]
    Image { image: String, message: String },
}

/// Where and how a RUN step failed, with the last lines of its output.
#[derive(Debug)]
pub struct RunFailure {
    pub image: String,
    pub stage: String,
    pub file: String,
    pub line: usize,
    pub status: String,
    pub tail: String,
}

/// The state of a stage between instructions.
#[derive(Debug, Clone)]
struct StageState {
    config: ContainerConfig,
    author: Option<String>,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
    history: Vec<History>,
    /// The key of the filesystem so far: changes with every layer-producing step only, so
    /// a LABEL does not invalidate the RUN after it (as in BuildKit).
    key: CacheKey,
    args: Vars,
    /// The ARG names the stage declared, in order (a RUN's history entry lists them).
    declared_args: Vec<String>,
    /// The image the stage chain starts from, for the base.* annotations.
    base: Option<BaseImage>,
}

/// Shared by every image of one build.
pub struct Executor<'a> {
    pub store: &'a Store,
    pub cache: &'a CacheIndex,
    /// The registry-shared index (`--cache-from`/`--cache-to`): asked when the local cache
    /// misses, and told every entry the build uses or makes.
    pub shared: Option<&'a SharedCache<'a>>,
    pub sandbox: &'a dyn Sandbox,
    pub stat_cache: &'a StatCache,
    pub options: &'a BuildOptions,
    /// The revision and source labels of each image, by name.
    pub provenance: &'a BTreeMap<String, labels::Provenance>,
    /// Called with each line of RUN output and each step as it starts.
    pub progress: &'a (dyn Fn(&str, ProgressEvent<'_>) + Sync),
}

/// What the executor tells the reporter.
pub enum ProgressEvent<'a> {
    Step { stage: usize, line: usize, text: &'a str },
    Output(&'a [u8]),
}

impl Executor<'_> {
    /// The epoch every stage's cache key starts from (see [`CacheKey::scratch`]).
    fn key_epoch(&self) -> Option<i64> {
        self.options.source_date_epoch.clamp()
    }

    fn created(&self) -> String {
        chrono::DateTime::from_timestamp(self.options.source_date_epoch.created(), 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    /// Build one image. `parents` are the already built images of the manifest this one
    /// starts from or copies from.
    pub fn build_image(
        &self,
        image: &Image,
        node: &ImageNode,
        parents: &BTreeMap<String, Arc<BuiltImage>>,
    ) -> Result<BuiltImage, BuildError> {
        let df = &node.dockerfile;
        let mut build_args = image.args.clone();
        build_args.extend(self.options.build_args.clone());
        let global = crate::graph::global_arg_values(df, &build_args).map_err(|e| {
            BuildError::Step { file: df.file.name.clone(), line: 1, message: e.to_string() }
        })?;
        if let Some(syntax) = &df.syntax {
            tracing::info!(
                "{}: `# syntax={syntax}` is ignored: ferry reads Dockerfiles itself",
                df.file.name
            );
        }
        // Stages run as a small DAG of their own: independent stages concurrently.
        let jobs: Vec<Job> = node
            .stages
            .iter()
            .map(|&i| Job {
                name: i.to_string(),
                parents: node
                    .stage_deps
                    .get(&i)
                    .into_iter()
                    .flatten()
                    .map(|d| d.to_string())
                    .collect(),
                priority: i,
            })
            .collect();
        let outcomes = scheduler::run(
            &jobs,
            self.options.jobs,
            false,
            |name, inputs: &BTreeMap<String, Arc<(StageState, Vec<StepReport>)>>| {
                let index: usize = name.parse().unwrap_or_default();
                let stages: BTreeMap<usize, StageState> = inputs
                    .iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.0.clone())))
                    .collect();
                let ctx = StageContext {
                    image,
                    df,
                    index,
                    global: &global,
                    build_args: &build_args,
                    parents,
                    stages: &stages,
                };
                self.build_stage(&ctx, node).map(Arc::new)
            },
        );
        let mut steps = Vec::new();
        let mut target = None;
        for (name, outcome) in outcomes {
            match outcome {
                Outcome::Done(done) => {
                    steps.extend(done.1.iter().cloned());
                    if name == node.target_stage.to_string() {
                        target = Some(done.0.clone());
                    }
                }
                Outcome::Failed(e) => return Err(e),
                Outcome::Skipped(_) => {}
            }
        }
        steps.sort_by_key(|s| (s.stage, s.line));
        let target =
            target.ok_or_else(|| self.image_error(image, "target stage was not built".into()))?;
        self.commit_image(image, target, steps)
    }

    /// `FROM --platform=P`: ferry builds for the platform it runs on (RUN executes natively,
    /// without emulation), so P must name that platform, as `$BUILDPLATFORM` and
    /// `$TARGETPLATFORM` do.
    fn check_platform(&self, ctx: &StageContext<'_>) -> Result<(), BuildError> {
        let from = &ctx.df.stages[ctx.index].from;
        let Some(word) = &from.platform else { return Ok(()) };
        let err = |message: String| BuildError::Step {
            file: ctx.df.file.name.clone(),
            line: from.line,
            message,
        };
        let mut vars = ctx.global.clone();
        for name in
            ["BUILDPLATFORM", "TARGETPLATFORM", "BUILDOS", "TARGETOS", "BUILDARCH", "TARGETARCH"]
        {
            if let Some(v) = builtin_arg(name, &self.options.platform) {
                vars.entry(name.to_string()).or_insert(v);
            }
        }
        let lexer = Lexer { escape: ctx.df.escape };
        let value = lexer.expand_word(word, &vars).map_err(|e| err(e.to_string()))?;
        let wanted = value.to_lowercase();
        let host = &self.options.platform;
        // `linux/amd64/v1` and friends: a variant of the host's architecture is the host.
        let same = wanted == *host
            || wanted.strip_prefix(host.as_str()).is_some_and(|rest| rest.starts_with('/'));
        if !same {
            return Err(err(format!(
                "FROM --platform={value}: ferry builds for the platform it runs on ({host}) and cannot build {value} images"
            )));
        }
        Ok(())
    }

    /// Run one stage: its base, the base's ONBUILD triggers, then its instructions.
    fn build_stage(
        &self,
        ctx: &StageContext<'_>,
        node: &ImageNode,
    ) -> Result<(StageState, Vec<StepReport>), BuildError> {
        let (image, df, index) = (ctx.image, ctx.df, ctx.index);
        self.check_platform(ctx)?;
        let base = node.stage_bases.get(&index).cloned().unwrap_or(BaseRef::Scratch);
        let mut state = match &base {
            BaseRef::Scratch => self.scratch(),
            BaseRef::Stage(s) => ctx
                .stages
                .get(s)
                .cloned()
                .ok_or_else(|| self.image_error(image, format!("stage {s} was not built")))?,
            BaseRef::Image(name) => {
                let built = ctx.parents.get(name).ok_or_else(|| {
                    self.image_error(image, format!("parent image `{name}` was not built"))
                })?;
                self.state_of_built(built)
            }
            BaseRef::External(reference) => self.state_of_external(image, reference)?,
        };
        // A stage sees only the ARGs it declares; the values come from build args, then
        // the global scope, then the declaration's default.
        state.args = Vars::new();
        let onbuild = std::mem::take(&mut state.config.on_build);
        let mut flags = StageFlags::default();
        let mut steps = Vec::new();
        for trigger in onbuild {
            let ins = parse_trigger(&trigger, df).map_err(|message| BuildError::Step {
                file: df.file.name.clone(),
                line: df.stages[index].from.line,
                message,
            })?;
            self.execute(ctx, &mut state, &mut flags, &ins, &mut steps)?;
        }
        for ins in &df.stages[index].instructions {
            self.execute(ctx, &mut state, &mut flags, ins, &mut steps)?;
        }
        Ok((state, steps))
    }

    fn image_error(&self, image: &Image, message: String) -> BuildError {
        BuildError::Image { image: image.name.clone(), message }
    }

    fn scratch(&self) -> StageState {
        StageState {
            config: ContainerConfig {
                env: vec![format!("PATH={}", DEFAULT_PATH)],
                working_dir: Some("/".into()),
                ..Default::default()
            },
            author: None,
            layers: Vec::new(),
            diff_ids: Vec::new(),
            history: Vec::new(),
            key: CacheKey::scratch(&self.options.platform, self.key_epoch()),
            args: Vars::new(),
            declared_args: Vec::new(),
            base: None,
        }
    }

    fn state_of_built(&self, built: &BuiltImage) -> StageState {
        StageState {
            config: stage_start_config(built.config.config.clone().unwrap_or_default()),
            author: built.config.author.clone(),
            layers: built.layers.clone(),
            diff_ids: built.config.rootfs.diff_ids.clone(),
            history: built.config.history.clone(),
            key: CacheKey::image(&built.manifest.digest, self.key_epoch()),
            args: Vars::new(),
            declared_args: Vec::new(),
            base: Some(BaseImage {
                name: match &built.version {
                    Some(v) => format!("{}:{v}", built.repository),
                    None => built.repository.clone(),
                },
                digest: built.manifest.digest.clone(),
                labels: built.config.config.as_ref().map(|c| c.labels.clone()).unwrap_or_default(),
            }),
        }
    }

    fn state_of_external(&self, image: &Image, reference: &str) -> Result<StageState, BuildError> {
        let err = |message: String| BuildError::Image { image: image.name.clone(), message };
        let descriptor = match self.options.bases.get(reference) {
            Some(d) => d.clone(),
            None => {
                self.store
                    .resolve(reference)
                    .map_err(|e| {
                        err(format!(
                            "base image `{reference}` is not in the store ({e}); pull it first with `ferry pull {reference}`"
                        ))
                    })?
                    .descriptor
            }
        };
        let img = self
            .store
            .image_for_platform(&descriptor, &crate::oci::Platform::host())
            .map_err(|e| err(format!("base image `{reference}`: {e}")))?;
        Ok(StageState {
            config: stage_start_config(img.config.config.clone().unwrap_or_default()),
            author: img.config.author.clone(),
            layers: img.manifest.layers.clone(),
            diff_ids: img.config.rootfs.diff_ids.clone(),
            history: img.config.history.clone(),
            key: CacheKey::image(img.digest(), self.key_epoch()),
            args: Vars::new(),
            declared_args: Vec::new(),
            base: Some(BaseImage {
                name: reference.to_string(),
                digest: img.digest().clone(),
                labels: img.config.config.as_ref().map(|c| c.labels.clone()).unwrap_or_default(),
            }),
        })
    }

    fn execute(
        &self,
        ctx: &StageContext<'_>,
        state: &mut StageState,
        flags: &mut StageFlags,
        ins: &Instruction,
        steps: &mut Vec<StepReport>,
    ) -> Result<(), BuildError> {
        let df = ctx.df;
        let text = df.file.text[ins.span.clone()].lines().next().unwrap_or_default().to_string();
        (self.progress)(
            &ctx.image.name,
            ProgressEvent::Step { stage: ctx.index, line: ins.line, text: &text },
        );
        let started = Instant::now();
        let step_err = step_error(df, ins);
        let lexer = Lexer { escape: df.escape };
        let vars = config::expansion_vars(&state.args, &state.config);
        let status = match &ins.kind {
            Kind::Arg(words) => {
                for w in words {
                    let (name, default) = match w.split_once('=') {
                        Some((n, d)) => (n.to_string(), Some(d)),
                        None => (w.clone(), None),
                    };
                    let value = match (ctx.build_args.get(&name), default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => {
                            Some(lexer.expand_word(d, &vars).map_err(|e| step_err(e.to_string()))?)
                        }
                        (None, None) => ctx
                            .global
                            .get(&name)
                            .cloned()
                            .or_else(|| builtin_arg(&name, &self.options.platform)),
                    };
                    // BuildKit's entry shows the default as written (expanded).
                    let shown = match default {
                        Some(d) => format!(
                            "ARG {name}={}",
                            lexer.expand_word(d, &vars).map_err(|e| step_err(e.to_string()))?
                        ),
                        None => format!("ARG {name}"),
                    };
                    state.history.push(History {
                        created: Some(self.created()),
                        created_by: Some(shown),
                        empty_layer: true,
                        ..Default::default()
                    });
                    state.declared_args.push(name.clone());
                    if let Some(v) = value {
                        state.args.insert(name, v);
                    }
                }
                StepStatus::Config
            }
            Kind::Run { flags: run_flags, command, heredocs } => {
                let status = self.run(ctx, state, run_flags, command, heredocs, &vars, ins)?;
                self.check_layer_count(ctx, state, ins)?;
                status
            }
            Kind::Copy { flags: copy_flags, sources, dest }
            | Kind::Add { flags: copy_flags, sources, dest } => {
                let is_add = matches!(ins.kind, Kind::Add { .. });
                let status =
                    self.copy(ctx, state, is_add, copy_flags, sources, dest, &vars, ins)?;
                self.check_layer_count(ctx, state, ins)?;
                status
            }
            Kind::Workdir(_) => {
                let applied = config::apply(
                    &ins.kind,
                    lexer,
                    &vars,
                    &mut state.config,
                    &mut state.author,
                    flags,
                )
                .unwrap_or_else(|| Ok(config::Applied { created_by: Some(text.clone()) }))
                .map_err(|e| step_err(e.to_string()))?;
                let created_by = applied.created_by.unwrap_or_else(|| text.clone());
                self.workdir(ctx, state, created_by).map_err(step_err)?
            }
            other => {
                let applied =
                    config::apply(other, lexer, &vars, &mut state.config, &mut state.author, flags)
                        .unwrap_or_else(|| Ok(config::Applied { created_by: Some(text.clone()) }))
                        .map_err(|e| step_err(e.to_string()))?;
                if let Some(created_by) = applied.created_by {
                    state.history.push(History {
                        created: Some(self.created()),
                        created_by: Some(created_by),
                        empty_layer: true,
                        ..Default::default()
                    });
                }
                StepStatus::Config
            }
        };
        steps.push(StepReport {
            stage: ctx.index,
            line: ins.line,
            instruction: text,
            status,
            seconds: started.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    fn check_layer_count(
        &self,
        ctx: &StageContext<'_>,
        state: &StageState,
        ins: &Instruction,
    ) -> Result<(), BuildError> {
        if state.layers.len() > MAX_LAYERS {
            return Err(BuildError::Step {
                file: ctx.df.file.name.clone(),
                line: ins.line,
                message: format!(
                    "image `{}` would have {} layers; the limit is {MAX_LAYERS} (overlayfs cannot stack more): merge RUN steps or use a multi-stage build",
                    ctx.image.name,
                    state.layers.len()
                ),
            });
        }
        Ok(())
    }

    /// Record a layer step of `image`: reuse the cached layer for `key`, or make it with
    /// `make`.
    fn layer_step(
        &self,
        image: &str,
        state: &mut StageState,
        key: CacheKey,
        created_by: String,
        make: impl FnOnce() -> Result<CachedLayer, BuildError>,
    ) -> Result<(StepStatus, CachedLayer), BuildError> {
        let (layer, status) = match self.cached(&key, &created_by) {
            Some(l) => (l, StepStatus::Cached),
            None => {
                let l = make()?;
                self.remember(&key, &l);
                (l, StepStatus::Built)
            }
        };
        if let Some(shared) = self.shared {
            shared.record(&key, &layer, image);
        }
        push_layer(state, &layer, key, created_by, self.created());
        Ok((status, layer))
    }

    /// The layer the local cache, else a shared index, has for `key`, the step `step` (a
    /// shared hit is recorded locally, so the next build finds it in the store).
    fn cached(&self, key: &CacheKey, step: &str) -> Option<CachedLayer> {
        if self.options.no_cache {
            return None;
        }
        if let Some(l) = self.cache.get(self.store, key) {
            return Some(l);
        }
        let l = self.shared?.lookup(self.store, key, false, step)?;
        self.remember(key, &l);
        Some(l)
    }

    /// The layer an alias key stands for, with the content key the stage continues from:
    /// from the local cache, else a shared index.
    fn cached_alias(&self, alias: &CacheKey, step: &str) -> Option<(CachedLayer, CacheKey)> {
        if self.options.no_cache {
            return None;
        }
        if let Some(hit) = self.cache.get_alias(self.store, alias) {
            return Some(hit);
        }
        let l = self.shared?.lookup(self.store, alias, true, step)?;
        let key = CacheKey(l.resolves_to.clone()?);
        self.remember(alias, &l);
        Some((l, key))
    }

    fn remember(&self, key: &CacheKey, layer: &CachedLayer) {
        // A cache write failure costs only a future rebuild.
        if let Err(e) = self.cache.put(key, layer) {
            tracing::warn!("cannot record cache entry: {e}");
        }
    }

    /// Pack entries into a stored layer blob.
    fn pack(&self, entries: Vec<LayerEntry>, created_by: &str) -> Result<CachedLayer, String> {
        let writer = self.store.blob_writer().map_err(|e| e.to_string())?;
        let opts = LayerOptions {
            source_date_epoch: self.options.source_date_epoch,
            compression: self.options.compression,
        };
        let (packed, writer) = pack_entries(entries, &opts, writer).map_err(|e| e.to_string())?;
        let (digest, size) = writer.commit(Some(&packed.blob_digest)).map_err(|e| e.to_string())?;
        Ok(CachedLayer {
            diff_id: packed.diff_id,
            blob: Descriptor::new(packed.media_type, digest, size),
            created_by: created_by.to_string(),
            resolves_to: None,
        })
    }

    /// The source of `--from=NAME`: a stage, a sibling image, or an external image.
    fn source_of(&self, ctx: &StageContext<'_>, word: &str) -> Result<FromSource, String> {
        let lower = word.to_lowercase();
        let df = ctx.df;
        let stage = df.stages[..ctx.index]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
            .or_else(|| word.parse::<usize>().ok().filter(|i| *i < ctx.index));
        if let Some(i) = stage {
            let s = ctx.stages.get(&i).ok_or_else(|| format!("stage `{word}` was not built"))?;
            return Ok(FromSource {
                key: s.key.clone(),
                layers: s.layers.clone(),
                diff_ids: s.diff_ids.clone(),
            });
        }
        let repo = crate::reference::strip_tag_and_digest(word);
        let sibling =
            ctx.parents.get(word).or_else(|| ctx.parents.values().find(|b| b.repository == repo));
        if let Some(built) = sibling {
            return Ok(FromSource {
                key: CacheKey::image(&built.manifest.digest, self.key_epoch()),
                layers: built.layers.clone(),
                diff_ids: built.config.rootfs.diff_ids.clone(),
            });
        }
        let state = self.state_of_external(ctx.image, word).map_err(|e| e.to_string())?;
        Ok(FromSource { key: state.key, layers: state.layers, diff_ids: state.diff_ids })
    }

    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        ctx: &StageContext<'_>,
        state: &mut StageState,
        is_add: bool,
        flags: &[Flag],
        sources: &[Source],
        dest: &str,
        vars: &Vars,
        ins: &Instruction,
    ) -> Result<StepStatus, BuildError> {
        let df = ctx.df;
        let err = step_error(df, ins);
        let lexer = Lexer { escape: df.escape };
        let keyword = if is_add { "ADD" } else { "COPY" };
        let mut from = None;
        let mut chown = None;
        let mut chmod = None;
        let mut link = false;
        let mut excludes = Vec::new();
        let mut checksum = None;
        for f in flags {
            let value = f
                .value
                .as_deref()
                .map(|v| lexer.expand_word(v, vars))
                .transpose()
                .map_err(|e| err(e.to_string()))?;
            match (f.name.as_str(), value) {
                ("from", Some(v)) => from = Some(v),
                ("chown", Some(v)) => chown = Some(v),
                ("chmod", Some(v)) => {
                    chmod = Some(
                        u32::from_str_radix(&v, 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| {
                                err(format!(
                                    "{keyword} --chmod={v}: expected an octal mode from 0 to 7777, like 755"
                                ))
                            })?
                            // docker's frontend hands the mode on as a Go FileMode, in which
                            // 0o7000 are no setuid/setgid/sticky bits: 4755 gives 0755.
                            & 0o777,
                    )
                }
                ("link", v) => link = v.as_deref().is_none_or(|v| v != "false"),
                ("exclude", Some(v)) => excludes.push(v),
                ("checksum", Some(v)) if is_add => {
                    v.parse::<Digest>().map_err(|e| err(format!("ADD --checksum={v}: {e}")))?;
                    checksum = Some(v)
                }
                ("parents", _) => {
                    return Err(err(format!("{keyword} --parents is not supported yet")))
                }
                (name, _) => return Err(err(format!("{keyword} does not take --{name}"))),
            }
        }
        let dest = lexer.expand_word(dest, vars).map_err(|e| err(e.to_string()))?;
        let workdir = state.config.working_dir.clone().unwrap_or_else(|| "/".into());

        let mut path_sources = Vec::new();
        let mut heredocs = Vec::new();
        let mut urls = Vec::new();
        // As the history entry shows them (BuildKit: expanded, no flags).
        let mut shown_sources = Vec::new();
        for s in sources {
            match s {
                Source::Path(p) => {
                    let p = lexer.expand_word(p, vars).map_err(|e| err(e.to_string()))?;
                    shown_sources.push(p.clone());
                    if is_add && (p.starts_with("https://") || p.starts_with("http://")) {
                        urls.push(p);
                    } else if p.starts_with("https://") || p.starts_with("http://") {
                        return Err(err(format!("COPY cannot fetch URLs (`{p}`); use ADD")));
                    } else {
                        path_sources.push(p);
                    }
                }
                Source::HereDoc { name, doc } => {
                    shown_sources.push(name.clone());
                    let body = if doc.expand {
                        lexer
                            .expand_word(&doc.body.replace('"', "\\\""), vars)
                            .unwrap_or_else(|_| doc.body.clone())
                    } else {
                        doc.body.clone()
                    };
                    heredocs.push((name.clone(), body));
                }
            }
        }
        // BuildKit makes `--link` a separate layer merged onto the stage only without
        // `--chmod`; with it, the copy is an ordinary one onto the stage.
        let link = link && chmod.is_none();
        if checksum.is_some()
            && (urls.len() != 1 || !path_sources.is_empty() || !heredocs.is_empty())
        {
            return Err(err(
                "ADD --checksum needs exactly one http:// or https:// source (it checks a download)"
                    .into(),
            ));
        }

        let parent_key = if link {
            CacheKey::scratch(&self.options.platform, self.key_epoch())
        } else {
            state.key.clone()
        };
        let created_by =
            format!("{keyword} {} {dest}{}", shown_sources.join(" "), history::LAYER_SUFFIX);
        // The spec as written: the parent key stands for the /etc/passwd it resolves
        // through, so a hit needs no name looked up (and no file of the stage read).
        let chown_key = chown.clone().unwrap_or_default();
        let chmod_key = chmod.map(|m| format!("{m:o}")).unwrap_or_default();

        // `--from`: the source's key stands for its whole content, so an alias key made of
        // it and the step finds a cached result without reading the source at all. On a
        // miss, only the paths the step copies are brought out of the source's snapshots
        // and the step is keyed by their content, as a context copy is (a rebuilt source
        // whose copied files did not change still hits).
        let from_source = match &from {
            Some(word) => Some(self.source_of(ctx, word).map_err(&err)?),
            None => None,
        };
        let alias = from_source.as_ref().map(|src| {
            parent_key
                .step(keyword)
                .field("from", &src.key.to_string())
                .list("sources", path_sources.iter().map(String::as_str))
                .list("excludes", excludes.iter().map(String::as_str))
                .list("heredocs", heredocs.iter().flat_map(|(n, b)| [n.as_str(), b.as_str()]))
                .list("urls", urls.iter().map(String::as_str))
                .field("checksum", checksum.as_deref().unwrap_or(""))
                .field("dest", &dest)
                .field("workdir", &workdir)
                .field("chown", &chown_key)
                .field("chmod", &chmod_key)
                .finish()
        });
        if let Some(alias) = &alias {
            if let Some((layer, key)) = self.cached_alias(alias, &created_by) {
                if let Some(shared) = self.shared {
                    // The content key too: a build whose source changed but whose copied
                    // files did not misses the alias and hits it.
                    shared.record(alias, &layer, &ctx.image.name);
                    let content = CachedLayer { resolves_to: None, ..layer.clone() };
                    shared.record(&key, &content, &ctx.image.name);
                }
                push_layer(state, &layer, key, created_by, self.created());
                return Ok(StepStatus::Cached);
            }
        }
        let from_stat_cache = StatCache::in_memory();
        let (tree, source_key, stat_cache, _scratch) = match (&from, &from_source) {
            (Some(word), Some(src)) => {
                let scratch =
                    scratch::copy_sources(self.store, src, &path_sources).map_err(&err)?;
                let tree = SourceTree::rootfs(scratch.path(), format!("--from={word}"))
                    .map_err(|e| err(e.to_string()))?;
                (tree, src.key.to_string(), &from_stat_cache, Some(scratch))
            }
            _ => {
                // The Dockerfile as the context sees it (a relative path is read from the
                // context), for its `<Dockerfile>.dockerignore`. Context files are written
                // 0:0 (or `--chown`): their owners on this machine must not change the key.
                let dockerfile = Path::new(&ctx.image.dockerfile_rel);
                let tree = SourceTree::build_context(&ctx.image.context, Some(dockerfile))
                    .map_err(|e| err(e.to_string()))?
                    .without_ownership_in_digest();
                (tree, "context".to_string(), self.stat_cache, None)
            }
        };
        let selection = if path_sources.is_empty() {
            None
        } else {
            Some(tree.select(&path_sources, &excludes).map_err(|e| err(e.to_string()))?)
        };
        let content = match &selection {
            Some(sel) => {
                sel.content_digest(stat_cache).map_err(|e| err(e.to_string()))?.to_string()
            }
            None => String::new(),
        };
        // A URL's content is part of the key: without --checksum it is fetched now (as
        // BuildKit does on every build), with one the checksum stands for it.
        let mut downloads = Vec::new();
        let mut url_keys = Vec::new();
        for url in &urls {
            match &checksum {
                Some(sum) => {
                    downloads.push(None);
                    url_keys.push(format!("{url} {sum}"));
                }
                None => {
                    let bytes = download(url, None).map_err(&err)?;
                    url_keys.push(format!("{url} {}", Digest::of(&bytes)));
                    downloads.push(Some(bytes));
                }
            }
        }
        let key = parent_key
            .step(keyword)
            .field("source", &source_key)
            .field("content", &content)
            .list("sources", path_sources.iter().map(String::as_str))
            .list("heredocs", heredocs.iter().flat_map(|(n, b)| [n.as_str(), b.as_str()]))
            .list("urls", url_keys.iter().map(String::as_str))
            .field("checksum", checksum.as_deref().unwrap_or(""))
            .field("dest", &dest)
            .field("workdir", &workdir)
            .field("chown", &chown_key)
            .field("chmod", &chmod_key)
            .field("from_is_context", if from.is_none() { "1" } else { "0" })
            .finish();
        let keep_owner = from.is_some();
        let lower_layers = state.layers.clone();
        let lower_diff_ids = state.diff_ids.clone();
        let image_name = &ctx.image.name;
        let (status, layer) =
            self.layer_step(image_name, state, key.clone(), created_by.clone(), || {
                // What the stage already has where this copy writes (its directories are kept,
                // its symlinks followed). `--link` must not depend on it, by definition.
                let stage = || {
                    MergedView::open(self.store, &lower_layers, &lower_diff_ids)
                        .map_err(|e| err(format!("reading the stage's filesystem: {e}")))
                };
                let image = if link { MergedView::default() } else { stage()? };
                // Names resolve through the stage's accounts, `--link` or not (BuildKit).
                let owner = match &chown {
                    None => None,
                    Some(spec) => {
                        let accounts = if link { stage()? } else { image.clone() };
                        Some(
                            accounts::resolve_owner_in(spec, &accounts)
                                .map_err(|e| err(format!("reading /etc/passwd: {e}")))?
                                .map_err(|m| err(format!("{keyword} --chown={spec}: {m}")))?,
                        )
                    }
                };
                let abs = config::clean_path(&if dest.starts_with('/') {
                    dest.clone()
                } else {
                    format!("{}/{dest}", workdir.trim_end_matches('/'))
                });
                let resolved = image.resolve(&abs).map_err(&err)?;
                let into_dir = dir_syntax(&dest) || image.is_dir(&resolved);
                let mut layer = CopyLayer {
                    image: &image,
                    owner,
                    chmod,
                    entries: BTreeMap::new(),
                    inodes: HashMap::new(),
                    source_root: None,
                };
                // ADD staging directories: their files are read when the layer is packed.
                let mut staging = Vec::new();
                if let Some(sel) = &selection {
                    let mapped = if dir_syntax(&dest) && resolved != "/" {
                        format!("{resolved}/")
                    } else {
                        resolved.clone()
                    };
                    let items = map_to_destination_with(sel, &mapped, "/", &|p| image.is_dir(p))
                        .map_err(|e| err(e.to_string()))?;
                    for item in items {
                        if let (true, CopyKind::File, Some(source)) =
                            (is_add, item.kind, item.source.as_deref())
                        {
                            if let Some(archive) =
                                self.add_archive(source, &resolved).map_err(&err)?
                            {
                                layer.created_dir(&resolved).map_err(&err)?;
                                for e in archive.entries {
                                    // A directory the archive only implies is created like a
                                    // parent: an existing one is left alone, as by docker's
                                    // untar; one the archive lists takes its metadata.
                                    let path = e.path.to_string_lossy().to_string();
                                    if archive.implied_dirs.contains(&path) {
                                        layer.created_dir(&path).map_err(&err)?;
                                    } else {
                                        layer.put_extracted(e).map_err(&err)?;
                                    }
                                }
                                staging.push(archive.staging);
                                continue;
                            }
                        }
                        layer.item(&item, keep_owner).map_err(&err)?;
                    }
                }
                let target_of = |name: &str| {
                    if into_dir {
                        join_abs(&resolved, name)
                    } else {
                        resolved.clone()
                    }
                };
                for (name, body) in &heredocs {
                    let entry = LayerEntry::bytes(strip_root(&target_of(name)), body.clone())
                        .with_mode(chmod.unwrap_or(0o644));
                    layer.file(entry).map_err(&err)?;
                }
                for (url, fetched) in urls.iter().zip(downloads.iter()) {
                    let bytes = match fetched {
                        Some(b) => b.clone(),
                        None => download(url, checksum.as_deref()).map_err(&err)?,
                    };
                    // Docker gives downloads mode 0600.
                    let entry =
                        LayerEntry::bytes(strip_root(&target_of(&url_file_name(url))), bytes)
                            .with_mode(chmod.unwrap_or(0o600));
                    layer.file(entry).map_err(&err)?;
                }
                let packed = self.pack(layer.into_entries(), &created_by).map_err(err);
                drop(staging);
                packed
            })?;
        if let Some(alias) = alias {
            // A cache write failure costs only a future source read.
            if let Err(e) = self.cache.put_alias(&alias, &layer, &key) {
                tracing::warn!("cannot record cache entry: {e}");
            }
            if let Some(shared) = self.shared {
                let entry = CachedLayer { resolves_to: Some(key.0.clone()), ..layer.clone() };
                shared.record(&alias, &entry, &ctx.image.name);
            }
        }
        Ok(status)
    }

    /// ADD of a local tar archive (plain, gzip, bzip2, xz or zstd) extracts it into the
    /// destination directory `dest_dir` instead of copying it, keeping the archive's owners
    /// even with `--chown`, as docker's untar does (its --chown applies to what ADD copies,
    /// and to the directories it creates on the way). Returns None when the file is no
    /// archive (a compressed non-tar file is copied as it is); otherwise the entries and the
    /// staging directory holding their content, to be kept until the layer is packed.
    fn add_archive(
        &self,
        source: &Path,
        dest_dir: &str,
    ) -> Result<Option<ExtractedArchive>, String> {
        let open = || {
            let file =
                std::fs::File::open(source).map_err(|e| format!("{}: {e}", source.display()))?;
            crate::layer::decompress(file).map_err(|e| format!("{}: {e}", source.display()))
        };
        let (_, mut reader) = open()?;
        let mut head = [0u8; 512];
        let mut n = 0;
        while n < head.len() {
            match std::io::Read::read(&mut reader, &mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                // Not a readable stream in its apparent compression: no archive, copied.
                Err(_) => return Ok(None),
            }
        }
        if n < head.len() || !crate::layer::looks_like_tar(&head) {
            return Ok(None);
        }
        // The directories the archive lists, to tell them from those it only implies.
        let mut listed = std::collections::HashSet::new();
        let (_, reader) = open()?;
        let mut archive = tar::Archive::new(reader);
        let bad = |e: std::io::Error| format!("ADD {}: {e}", source.display());
        for entry in archive.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            if entry.header().entry_type() == tar::EntryType::Directory {
                let name = entry.path().map_err(bad)?.to_string_lossy().to_string();
                listed.insert(config::clean_path(&format!("/{name}")));
            }
        }
        let (_, reader) = open()?;
        let tmp = self.store.tmp_dir();
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let staging =
            tempfile::Builder::new().prefix("add-").tempdir_in(&tmp).map_err(|e| e.to_string())?;
        crate::layer::extract_layer(reader, staging.path(), crate::layer::ExtractMode::Apply)
            .map_err(|e| format!("ADD {}: {e}", source.display()))?;
        let mut entries = crate::layer::directory_entries(staging.path(), &Default::default())
            .map_err(|e| e.to_string())?;
        // Entries come as absolute paths of the staging tree; move them under `dest_dir`.
        let rebase = |p: &Path| {
            PathBuf::from(strip_root(&join_abs(dest_dir, &strip_root(&p.to_string_lossy()))))
        };
        let mut implied_dirs = std::collections::HashSet::new();
        for e in &mut entries {
            if e.kind == crate::layer::EntryKind::Dir
                && !listed.contains(&config::clean_path(&e.path.to_string_lossy()))
            {
                implied_dirs.insert(rebase(&e.path).to_string_lossy().to_string());
            }
            e.path = rebase(&e.path);
            if let crate::layer::EntryKind::Hardlink { target } = &mut e.kind {
                *target = rebase(target);
            }
        }
        Ok(Some(ExtractedArchive { entries, implied_dirs, staging }))
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ctx: &StageContext<'_>,
        state: &mut StageState,
        flags: &[Flag],
        command: &Command,
        heredocs: &[crate::dockerfile::HereDoc],
        vars: &Vars,
        ins: &Instruction,
    ) -> Result<StepStatus, BuildError> {
        let df = ctx.df;
        let err = step_error(df, ins);
        let lexer = Lexer { escape: df.escape };
        let shell = if state.config.shell.is_empty() {
            config::default_shell()
        } else {
            state.config.shell.clone()
        };
        let argv = match command {
            Command::Exec(v) => v.clone(),
            Command::Shell(s) => {
                let mut argv = shell.clone();
                // `RUN <<EOF` alone runs the here-document as the script; `RUN <<EOF cmd`
                // feeds it to `cmd` on stdin, through the shell's own here-document.
                match heredocs {
                    [] => argv.push(s.clone()),
                    [doc] if s.trim().is_empty() => argv.push(doc.body.clone()),
                    [doc] => {
                        let delim = "FERRY_HEREDOC_EOF";
                        let quoted =
                            if doc.expand { delim.to_string() } else { format!("'{delim}'") };
                        argv.push(format!("{} <<{quoted}\n{}{delim}\n", s.trim(), doc.body));
                    }
                    _ => {
                        return Err(err(
                            "RUN with several here-documents is not supported yet".into()
                        ))
                    }
                }
                argv
            }
        };
        let mut network = Network::Default;
        let mut mount_specs = Vec::new();
        for f in flags {
            let value = f
                .value
                .as_deref()
                .map(|v| lexer.expand_word(v, vars))
                .transpose()
                .map_err(|e| err(e.to_string()))?
                .unwrap_or_default();
            match f.name.as_str() {
                "network" => {
                    network = match value.as_str() {
                        "default" => Network::Default,
                        "none" => Network::None,
                        "host" => Network::Host,
                        other => {
                            return Err(err(format!(
                                "RUN --network={other}: use default, none or host"
                            )))
                        }
                    }
                }
                "mount" => mount_specs.push(value),
                "security" if value == "sandbox" => {}
                other => {
                    return Err(err(format!(
                        "RUN does not take --{other}{}",
                        if value.is_empty() { String::new() } else { format!("={value}") }
                    )))
                }
            }
        }
        // The environment: ENV, then ARGs not overridden by ENV (they are visible to RUN but
        // not kept in the image).
        let mut env = config::env_map(&state.config.env);
        for (k, v) in &state.args {
            env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let user = state.config.user.clone().unwrap_or_default();
        let workdir = state.config.working_dir.clone().unwrap_or_else(|| "/".into());
        let mounts = self.run_mounts(ctx, &mount_specs).map_err(&err)?;
        let key = state
            .key
            .step("RUN")
            .list("argv", argv.iter().map(String::as_str))
            .list("env", env.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]))
            .field("user", &user)
            .field("workdir", &workdir)
            .field("network", &format!("{network:?}"))
            .list("mounts", mounts.iter().map(|m| m.key.as_str()))
            .finish();
        let build_args: Vec<(String, String)> = state
            .declared_args
            .iter()
            .map(|name| {
                let value = config::env_map(&state.config.env)
                    .get(name)
                    .or_else(|| state.args.get(name))
                    .cloned()
                    .unwrap_or_default();
                (name.clone(), value)
            })
            .collect();
        let created_by = history::run(&argv, &build_args);
        let lower_layers = state.layers.clone();
        let lower_diff_ids = state.diff_ids.clone();
        let stage_name =
            df.stages[ctx.index].name.clone().unwrap_or_else(|| format!("#{}", ctx.index));
        let line = ins.line;
        self.layer_step(&ctx.image.name, state, key, created_by.clone(), || {
            let io = |what: &str, e: &dyn std::fmt::Display| err(format!("{what}: {e}"));
            let lower_view = MergedView::open(self.store, &lower_layers, &lower_diff_ids)
                .map_err(|e| io("the layers RUN starts from", &e))?;
            let tmp = self.store.tmp_dir();
            std::fs::create_dir_all(&tmp).map_err(|e| io("store tmp", &e))?;
            // Bind mounts from a stage or image: their scratch trees live until the step ran.
            let mut bind_scratches = Vec::new();
            let mut run_mounts = Vec::new();
            for m in &mounts {
                let mut mount = m.mount.clone();
                if let (Some(from), RunMount::Bind { source, readonly, .. }) = (&m.from, &mut mount)
                {
                    let (scratch, path) = scratch::bind_source(self.store, from, source, *readonly)
                        .map_err(|e| io("preparing a bind mount", &e))?;
                    *source = path;
                    bind_scratches.push(scratch);
                }
                run_mounts.push(mount);
            }
            let scratch = tempfile::Builder::new()
                .prefix("run-")
                .tempdir_in(&tmp)
                .map_err(|e| io("store tmp", &e))?;
            let upper = scratch.path().join("upper");
            let work = scratch.path().join("work");
            for d in [&upper, &work] {
                std::fs::create_dir(d).map_err(|e| io("store tmp", &e))?;
            }
            let (uid, gid) = if user.is_empty() {
                (0, 0)
            } else {
                accounts::resolve_owner_in(&user, &lower_view)
                    .map_err(|e| io("reading /etc/passwd", &e))?
                    .map_err(|m| err(format!("USER {user}: {m}")))?
            };
            // As docker's runtime: HOME, unless set, is the user's home in /etc/passwd, else
            // `/`. It is not in the key: the user and the filesystem it comes from are.
            let mut env = env.clone();
            if !env.contains_key("HOME") {
                let home = accounts::home_in(&lower_view, uid)
                    .map_err(|e| io("reading /etc/passwd", &e))?;
                env.insert("HOME".into(), home);
            }
            let lower_dirs = lower_view.into_layer_dirs();
            let mut spec = RunSpec {
                lower_dirs,
                upper_dir: upper.clone(),
                work_dir: work,
                argv: argv.clone(),
                env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                uid,
                gid,
                additional_gids: Vec::new(),
                cwd: workdir.clone(),
                network,
                mounts: run_mounts,
                hostname: "ferry".to_string(),
            };
            // Cache mounts are locked for the command only, not while layers are packed.
            let held_caches = cache_mount::acquire_all(
                self.store,
                mounts.iter().filter_map(|m| m.cache.as_ref()),
            )
            .map_err(&err)?;
            for (m, mount) in mounts.iter().zip(spec.mounts.iter_mut()) {
                if let (Some(cache), RunMount::Cache { host_dir, .. }) = (&m.cache, mount) {
                    if let Some(held) = held_caches.get(&cache.name()) {
                        host_dir.clone_from(&held.dir);
                    }
                }
            }
            let mut output =
                |bytes: &[u8]| (self.progress)(&ctx.image.name, ProgressEvent::Output(bytes));
            let outcome = self
                .sandbox
                .run(&spec, &mut output)
                .map_err(|e| err(format!("cannot run: {e}")))?;
            drop(held_caches);
            if !outcome.status.success() {
                let status = match outcome.status {
                    crate::sandbox::ExitStatus::Code(c) => format!("exit code {c}"),
                    crate::sandbox::ExitStatus::Signal(s) => format!("signal {s}"),
                };
                return Err(BuildError::RunFailed(Box::new(RunFailure {
                    image: ctx.image.name.clone(),
                    stage: stage_name.clone(),
                    file: df.file.name.clone(),
                    line,
                    status,
                    tail: outcome
                        .output_tail
                        .iter()
                        .map(|l| format!("  | {l}"))
                        .chain(outcome.note.iter().map(|note| format!("note: {note}")))
                        .collect::<Vec<_>>()
                        .join("\n"),
                })));
            }
            // Owners as the step gave them: a sandbox with a user namespace of its own says
            // how its host ids read (else they are the image's already).
            let opts = crate::layer::UpperDirOptions {
                overlay_xattrs: outcome.xattrs,
                uid_map: outcome.uid_map.clone(),
                gid_map: outcome.gid_map.clone(),
            };
            let entries = crate::layer::directory_entries(&upper, &opts)
                .map_err(|e| io("reading the RUN result", &e))?;
            self.pack(entries, &created_by).map_err(err)
        })
        .map(|(status, _)| status)
    }

    /// Resolve `RUN --mount=...` values. Each mount's `key` is what the step's cache key
    /// includes: the content digest of a bind source, the target of a cache/tmpfs/secret mount
    /// (never a secret's value).
    /// WORKDIR as BuildKit runs it: `mkdir -p` of the directory, the components it creates
    /// owned by the stage's USER (an unknown name: root), as a layer of its own, empty when
    /// the directory exists. `WORKDIR /` makes no layer. The key needs no file of the stage:
    /// its parent key stands for the filesystem, /etc/passwd included.
    fn workdir(
        &self,
        ctx: &StageContext<'_>,
        state: &mut StageState,
        created_by: String,
    ) -> Result<StepStatus, String> {
        let dir = state.config.working_dir.clone().unwrap_or_else(|| "/".into());
        let path = config::clean_path(&dir);
        if path == "/" {
            state.history.push(History {
                created: Some(self.created()),
                created_by: Some(created_by),
                empty_layer: true,
                ..Default::default()
            });
            return Ok(StepStatus::Config);
        }
        let user = state.config.user.clone().unwrap_or_default();
        let key = state.key.step("WORKDIR").field("path", &path).field("user", &user).finish();
        let lower_layers = state.layers.clone();
        let lower_diff_ids = state.diff_ids.clone();
        let (status, _) = self
            .layer_step(&ctx.image.name, state, key, created_by.clone(), || {
                let err =
                    |m: String| BuildError::Image { image: ctx.image.name.clone(), message: m };
                let image = MergedView::open(self.store, &lower_layers, &lower_diff_ids)
                    .map_err(|e| err(format!("reading the stage's filesystem: {e}")))?;
                let owner = if user.is_empty() {
                    (0, 0)
                } else {
                    accounts::resolve_owner_in(&user, &image)
                        .map_err(|e| err(format!("reading /etc/passwd: {e}")))?
                        .unwrap_or((0, 0))
                };
                let resolved = image.resolve(&path).map_err(err)?;
                let mut layer = CopyLayer {
                    image: &image,
                    owner: Some(owner),
                    chmod: None,
                    entries: BTreeMap::new(),
                    inodes: HashMap::new(),
                    source_root: None,
                };
                layer.created_dir(&resolved).map_err(err)?;
                self.pack(layer.into_entries(), &created_by).map_err(err)
            })
            .map_err(|e| e.to_string())?;
        Ok(status)
    }

    fn run_mounts(
        &self,
        ctx: &StageContext<'_>,
        specs: &[String],
    ) -> Result<Vec<PreparedMount>, String> {
        let mut out = Vec::new();
        for spec in specs {
            let mut opts: BTreeMap<String, String> = BTreeMap::new();
            for part in spec.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = part.split_once('=').unwrap_or((part, "true"));
                opts.insert(k.to_string(), v.to_string());
            }
            let kind = opts.get("type").cloned().unwrap_or_else(|| "bind".into());
            let target =
                opts.get("target").or(opts.get("dst")).or(opts.get("destination")).cloned();
            // `rw`, `readonly` and friends are flags: present means true unless `=false`.
            let flag = |names: [&str; 2]| {
                names.iter().find_map(|n| opts.get(*n)).is_some_and(|v| v != "false")
            };
            // A bind mount is read-only unless it says rw, as in BuildKit.
            let readonly =
                flag(["readonly", "ro"]) || (kind == "bind" && !flag(["rw", "readwrite"]));
            match kind.as_str() {
                "bind" => {
                    let target = target.ok_or("RUN --mount=type=bind needs target=")?;
                    let source =
                        opts.get("source").or(opts.get("src")).cloned().unwrap_or_default();
                    if source.split('/').any(|c| c == "..") {
                        return Err(format!("RUN --mount source `{source}` leaves its root"));
                    }
                    let (root, key, from) = match opts.get("from") {
                        Some(from) => {
                            let src = self.source_of(ctx, from)?;
                            let key = format!("bind:{}:{source}:{target}", src.key);
                            (PathBuf::new(), key, Some(BindFrom::Image(src)))
                        }
                        None => {
                            let tree = SourceTree::build_context(
                                &ctx.image.context,
                                Some(Path::new(&ctx.image.dockerfile_rel)),
                            )
                            .map_err(|e| e.to_string())?;
                            let src =
                                if source.is_empty() { ".".to_string() } else { source.clone() };
                            let digest = tree
                                .select(&[src], &[])
                                .map_err(|e| e.to_string())?
                                .content_digest(self.stat_cache)
                                .map_err(|e| e.to_string())?;
                            // Writes to a writable mount are thrown away, as in BuildKit: never
                            // into the user's context.
                            let from = (!readonly).then_some(BindFrom::WritableContext);
                            (
                                ctx.image.context.clone(),
                                format!("bind:context:{digest}:{source}:{target}"),
                                from,
                            )
                        }
                    };
                    out.push(PreparedMount {
                        mount: RunMount::Bind {
                            source: root.join(source.trim_start_matches('/')),
                            target,
                            readonly,
                        },
                        key,
                        from,
                        cache: None,
                    });
                }
                "cache" => {
                    let target = target.ok_or("RUN --mount=type=cache needs target=")?;
                    let cache = CacheMount::parse(&opts, &target)?;
                    out.push(PreparedMount {
                        mount: RunMount::Cache { host_dir: PathBuf::new(), target: target.clone() },
                        key: format!("cache:{target}"),
                        from: None,
                        cache: Some(cache),
                    });
                }
                "tmpfs" => {
                    let target = target.ok_or("RUN --mount=type=tmpfs needs target=")?;
                    let size = opts
                        .get("size")
                        .map(|s| {
                            s.parse::<u64>().map_err(|_| {
                                format!(
                                    "RUN --mount=type=tmpfs size `{s}` is not a number of bytes"
                                )
                            })
                        })
                        .transpose()?;
                    out.push(PreparedMount {
                        mount: RunMount::Tmpfs { target: target.clone(), size },
                        key: format!("tmpfs:{target}"),
                        from: None,
                        cache: None,
                    });
                }
                "secret" => {
                    let id = opts
                        .get("id")
                        .cloned()
                        .or_else(|| {
                            target.as_ref().and_then(|t| t.rsplit('/').next().map(str::to_string))
                        })
                        .ok_or("RUN --mount=type=secret needs id= or target=")?;
                    let target = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
                    let required = opts.get("required").is_some_and(|v| v != "false");
                    let Some(bytes) = self.options.secrets.get(&id) else {
                        if required {
                            return Err(format!("secret `{id}` is required: pass it with --secret id={id},src=FILE or --secret id={id},env=VAR"));
                        }
                        continue;
                    };
                    let num = |k: &str, default: u32, radix: u32| {
                        opts.get(k).map_or(Ok(default), |v| {
                            u32::from_str_radix(v, radix).map_err(|_| {
                                format!("RUN --mount=type=secret {k}=`{v}` is not a number")
                            })
                        })
                    };
                    out.push(PreparedMount {
                        mount: RunMount::Secret {
                            target: target.clone(),
                            bytes: SecretBytes(bytes.clone()),
                            mode: num("mode", 0o400, 8)?,
                            uid: num("uid", 0, 10)?,
                            gid: num("gid", 0, 10)?,
                        },
                        key: format!("secret:{id}:{target}"),
                        from: None,
                        cache: None,
                    });
                }
                other => {
                    return Err(format!(
                        "RUN --mount=type={other} is not supported (bind, cache, tmpfs, secret)"
                    ))
                }
            }
        }
        Ok(out)
    }

    fn commit_image(
        &self,
        image: &Image,
        state: StageState,
        steps: Vec<StepReport>,
    ) -> Result<BuiltImage, BuildError> {
        let err = |message: String| BuildError::Image { image: image.name.clone(), message };
        let mut container = state.config;
        let annotations = labels::apply(
            &mut container.labels,
            image,
            &self.created(),
            state.base.as_ref(),
            &self.provenance.get(&image.name).cloned().unwrap_or_default(),
        );
        let (os, arch) = self.options.platform.split_once('/').unwrap_or(("linux", "amd64"));
        let config = ImageConfig {
            created: Some(self.created()),
            author: state.author,
            architecture: arch.to_string(),
            os: os.to_string(),
            config: Some(container),
            rootfs: RootFs { kind: "layers".into(), diff_ids: state.diff_ids },
            history: state.history,
            ..Default::default()
        };
        let config_desc =
            self.store.put_json(media_type::OCI_CONFIG, &config).map_err(|e| err(e.to_string()))?;
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: config_desc,
            layers: state.layers.clone(),
            subject: None,
            annotations,
        };
        let manifest_desc = self
            .store
            .put_json(media_type::OCI_MANIFEST, &manifest)
            .map_err(|e| err(e.to_string()))?;
        Ok(BuiltImage {
            name: image.name.clone(),
            manifest: manifest_desc,
            config,
            layers: state.layers,
            repository: image.repository.clone(),
            version: image.version.as_ref().map(ToString::to_string),
            steps,
        })
    }
}

/// A stage's config as BuildKit starts it from its base's: a base without PATH (a
/// `docker import`ed tree, a hand-made config) gets the default PATH, in the build and in
/// the image; an empty WorkingDir means `/` and an empty User root, so they count as unset.
fn stage_start_config(mut config: ContainerConfig) -> ContainerConfig {
    if !config.env.iter().any(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == "PATH") {
        config.env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if config.working_dir.as_deref() == Some("") {
        config.working_dir = None;
    }
    if config.user.as_deref() == Some("") {
        config.user = None;
    }
    config
}

/// The error of one instruction: `file:line: message`.
fn step_error<'a>(df: &'a Dockerfile, ins: &'a Instruction) -> impl Fn(String) -> BuildError + 'a {
    move |message| BuildError::Step { file: df.file.name.clone(), line: ins.line, message }
}

/// Add a layer to the stage: the filesystem is now `key`.
fn push_layer(
    state: &mut StageState,
    layer: &CachedLayer,
    key: CacheKey,
    created_by: String,
    created: String,
) {
    state.layers.push(layer.blob.clone());
    state.diff_ids.push(layer.diff_id.clone());
    state.history.push(History {
        created: Some(created),
        created_by: Some(created_by),
        ..Default::default()
    });
    state.key = key;
}

/// The values docker gives the automatic platform ARGs when a stage declares them.
pub fn builtin_arg(name: &str, platform: &str) -> Option<String> {
    let (os, arch) = platform.split_once('/').unwrap_or(("linux", "amd64"));
    match name {
        "TARGETPLATFORM" | "BUILDPLATFORM" => Some(platform.to_string()),
        "TARGETOS" | "BUILDOS" => Some(os.to_string()),
        "TARGETARCH" | "BUILDARCH" => Some(arch.to_string()),
        "TARGETVARIANT" | "BUILDVARIANT" => Some(String::new()),
        _ => None,
    }
}

/// An ONBUILD trigger's text as an instruction, with the child Dockerfile's escape.
fn parse_trigger(text: &str, df: &Dockerfile) -> Result<Instruction, String> {
    let source = format!("# escape={}\nFROM scratch\n{text}\n", df.escape);
    let parsed = Dockerfile::parse(crate::diagnostic::SourceFile::new("ONBUILD", source))
        .map_err(|e| format!("ONBUILD trigger `{text}`: {e}"))?;
    let mut ins = parsed
        .stages
        .into_iter()
        .next()
        .and_then(|s| s.instructions.into_iter().next())
        .ok_or_else(|| format!("ONBUILD trigger `{text}` is empty"))?;
    ins.line = df.stages.first().map_or(1, |s| s.from.line);
    ins.span = 0..0;
    Ok(ins)
}

fn strip_root(path: &str) -> String {
    path.trim_start_matches('/').to_string()
}

/// A local archive ADD extracted, ready to become layer entries.
struct ExtractedArchive {
    /// Paths relative to the image root, under the destination.
    entries: Vec<LayerEntry>,
    /// Entry paths of directories the archive does not list but its files need.
    implied_dirs: std::collections::HashSet<String>,
    /// Holds the extracted files until the layer is packed.
    staging: tempfile::TempDir,
}

/// Whether a COPY destination is spelled as a directory (`dir/`, `.`, `dir/.`).
fn dir_syntax(dest: &str) -> bool {
    dest.is_empty() || dest == "." || dest.ends_with('/') || dest.ends_with("/.")
}

fn join_abs(dir: &str, name: &str) -> String {
    config::clean_path(&format!("{}/{name}", dir.trim_end_matches('/')))
}

/// The file name an ADD download gets: the last segment of the URL's path, or BuildKit's
/// `__unnamed__` when there is none.
fn url_file_name(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.path_segments().and_then(|mut s| s.next_back().map(str::to_string)))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "__unnamed__".to_string())
}

/// The entries of one COPY/ADD layer, checked against what the stage already has, as
/// BuildKit's copier writes into the stage's filesystem:
/// - a directory the copy has to create (a parent of a target, a destination ending in
///   `/`, the directory a directory source's contents go into) is created 0755 (or the
///   `--chmod` mode) owned by the `--chown` owner or root, and only if the stage does not
///   have it: an existing directory keeps its mode and owner (a 0700 /root, an app-owned
///   /home/app);
/// - a directory *inside* a copied directory overwrites an existing one's metadata, and
///   cannot replace a file or symlink of the stage ("cannot copy to non-directory");
/// - a file cannot replace a directory of the stage.
struct CopyLayer<'a> {
    image: &'a MergedView,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    /// By path without the leading `/`; later writes win.
    entries: BTreeMap<String, LayerEntry>,
    /// Source files with several names, by (device, inode): the path the first one was
    /// written to. The others become hard links to it, as BuildKit keeps a source's links.
    inodes: HashMap<(u64, u64), String>,
    /// The target of the directory source being copied (with a trailing `/`).
    source_root: Option<String>,
}

impl CopyLayer<'_> {
    /// The layer's entries, with every directory of the image above them as the image has
    /// it (mode, owner, mtime), as docker's layers list the parents of what changed. Without
    /// them the layer's snapshot would have those directories as 0755 root, and overlayfs,
    /// which takes a merged directory's metadata from its top-most layer, would show that to
    /// the next RUN: a `useradd -m` home lost its owner under a later `WORKDIR` in it.
    fn into_entries(mut self) -> Vec<LayerEntry> {
        let mut parents = Vec::new();
        // Each directory is looked up once: a copy of many files shares its parents.
        let mut seen = std::collections::HashSet::new();
        for path in self.entries.keys() {
            let mut prefix = path.as_str();
            while let Some((parent, _)) = prefix.rsplit_once('/') {
                prefix = parent;
                if !seen.insert(parent) {
                    break;
                }
                if self.entries.contains_key(parent) {
                    continue;
                }
                if let Some(info) = self.image.get(parent).filter(|i| i.kind == PathKind::Dir) {
                    parents.push(
                        LayerEntry::dir(parent.to_string())
                            .with_mode(info.mode)
                            .with_owner(info.uid, info.gid)
                            .with_mtime(info.mtime),
                    );
                }
            }
        }
        for entry in parents {
            let path = strip_root(&entry.path.to_string_lossy());
            self.entries.entry(path).or_insert(entry);
        }
        self.entries.into_values().collect()
    }

    /// Create directory `path` (absolute) and its missing parents, keeping what exists.
    fn created_dir(&mut self, path: &str) -> Result<(), String> {
        // Through the image's symlinks, as mkdir -p goes (debian's /var/run → /run).
        let path = &self.image.resolve(path)?;
        let mut prefix = String::new();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            if let Some(planned) = self.entries.get(&prefix) {
                if planned.kind == crate::layer::EntryKind::Dir {
                    continue;
                }
                return Err(format!(
                    "cannot create directory /{prefix}: this copy writes a file there"
                ));
            }
            match self.image.get(&prefix).map(|i| i.kind) {
                Some(PathKind::Dir) => continue,
                Some(_) => {
                    return Err(format!(
                        "cannot create directory /{prefix}: the image has a file or symlink there"
                    ))
                }
                None => {}
            }
            // 0755 even with --chmod: docker's copier creates the directories on the way (and
            // the one a directory source's contents go into) before it applies the mode.
            let (uid, gid) = self.owner.unwrap_or((0, 0));
            let entry = LayerEntry::dir(prefix.clone()).with_mode(0o755).with_owner(uid, gid);
            self.entries.insert(prefix.clone(), entry);
        }
        Ok(())
    }

    /// Write one entry whose parents exist (or are planned); returns the path it took.
    fn put(&mut self, entry: LayerEntry) -> Result<String, String> {
        self.put_through(entry, false)
    }

    /// `put` for an entry of an ADDed archive: a directory of the archive where the image
    /// has a symlink to a directory goes into the link's target (a tar holding `var/run/`
    /// on a base where /var/run → /run), as docker's untar does today
    /// (testDockerfileAddArchiveThroughAbsoluteSymlink). COPY still refuses that case
    /// ("cannot copy to non-directory"), as BuildKit's copier does.
    fn put_extracted(&mut self, entry: LayerEntry) -> Result<String, String> {
        self.put_through(entry, true)
    }

    fn put_through(&mut self, mut entry: LayerEntry, dir_links: bool) -> Result<String, String> {
        // The entry lands where its parent resolves to in the image: a copy through a
        // symlinked directory writes into the link's target, as BuildKit's copier does.
        let raw = strip_root(&entry.path.to_string_lossy());
        if let Some((parent, name)) = raw.rsplit_once('/') {
            let resolved = self.image.resolve(&format!("/{parent}"))?;
            let joined = strip_root(&join_abs(&resolved, name));
            if joined != raw {
                entry.path = joined.into();
            }
        }
        let path = strip_root(&entry.path.to_string_lossy());
        let is_dir = entry.kind == crate::layer::EntryKind::Dir;
        match self.image.get(&path).map(|i| i.kind) {
            Some(PathKind::Dir) if !is_dir => {
                return Err(format!("cannot replace directory /{path} of the image with a file"))
            }
            Some(PathKind::Symlink(_))
                if dir_links
                    && is_dir
                    && self.image.is_dir(&self.image.resolve(&format!("/{path}"))?) =>
            {
                return Ok(path)
            }
            Some(k) if is_dir && k != PathKind::Dir => {
                return Err(format!("cannot copy to non-directory: /{path}"))
            }
            _ => {}
        }
        if !is_dir {
            let below = format!("{path}/");
            let hidden: Vec<String> = self
                .entries
                .range(below.clone()..)
                .take_while(|(p, _)| p.starts_with(&below))
                .map(|(p, _)| p.clone())
                .collect();
            for p in hidden {
                self.entries.remove(&p);
            }
        }
        self.entries.insert(path.clone(), entry);
        Ok(path)
    }

    /// A generated file (here-document, download) with its owner and parents.
    fn file(&mut self, entry: LayerEntry) -> Result<(), String> {
        if let Some(parent) = entry.path.parent() {
            self.created_dir(&parent.to_string_lossy())?;
        }
        let (uid, gid) = self.owner.unwrap_or((0, 0));
        self.put(entry.with_owner(uid, gid)).map(|_| ())
    }

    /// One item of a mapped selection.
    fn item(&mut self, item: &CopyItem, keep_owner: bool) -> Result<(), String> {
        match item.kind {
            CopyKind::ParentDir => self.created_dir(&item.target),
            CopyKind::Dir if item.keep_existing => {
                // A directory source starts: links are kept within one source only.
                self.inodes.clear();
                self.source_root = Some(format!("{}/", item.target.trim_end_matches('/')));
                self.created_dir(&item.target)
            }
            _ => {
                let entry = copy_entry(item, self.owner, self.chmod, keep_owner)?;
                let in_dir_source =
                    self.source_root.as_ref().is_some_and(|r| item.target.starts_with(r.as_str()));
                if !in_dir_source {
                    self.source_root = None;
                    self.inodes.clear();
                }
                let linked = match (&item.kind, &item.source) {
                    (CopyKind::File, Some(src)) if in_dir_source => std::fs::symlink_metadata(src)
                        .ok()
                        .filter(|m| m.nlink() > 1)
                        .map(|m| (m.dev(), m.ino())),
                    _ => None,
                };
                let Some(inode) = linked else { return self.put(entry).map(|_| ()) };
                match self.inodes.get(&inode) {
                    Some(first) if self.entries.contains_key(first) => {
                        let link = LayerEntry::hardlink(entry.path.clone(), first.clone())
                            .with_mode(entry.mode)
                            .with_owner(entry.uid, entry.gid);
                        self.put(link).map(|_| ())
                    }
                    _ => {
                        let path = self.put(entry)?;
                        self.inodes.insert(inode, path);
                        Ok(())
                    }
                }
            }
        }
    }
}

/// One copied file, directory or symlink as a layer entry. From the build context, owners
/// become 0:0 unless `--chown`; from another stage or image they are kept (as docker does).
/// `--chmod` applies to files and directories, never to symlinks.
fn copy_entry(
    item: &CopyItem,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    keep_owner: bool,
) -> Result<LayerEntry, String> {
    let path = strip_root(&item.target);
    // Kept owners are read from snapshots: a rootless ferry without its user namespace
    // extracted them as itself, which is root in the image.
    let (uid, gid) = owner.unwrap_or(if keep_owner {
        crate::userns::image_owner(item.uid, item.gid)
    } else {
        (0, 0)
    });
    let entry = match (&item.kind, &item.source) {
        (CopyKind::Symlink, _) => {
            LayerEntry::symlink(path, item.link_target.clone().unwrap_or_default())
        }
        (CopyKind::Dir | CopyKind::ParentDir, _) => LayerEntry::dir(path),
        (CopyKind::File, Some(src)) => LayerEntry::host_file(path, src.clone()),
        (CopyKind::File, None) => return Err(format!("{}: no source file", item.target)),
    };
    let mode = match (&item.kind, chmod) {
        (CopyKind::Symlink, _) => 0o777,
        (_, Some(m)) => m,
        _ => item.mode,
    };
    let entry = entry.with_mode(mode).with_owner(uid, gid);
    // The source's mtime, as docker keeps it; the layer clamps it to the epoch, if any.
    Ok(match item.mtime {
        Some(mtime) => entry.with_mtime(mtime),
        None => entry,
    })
}
