//! The stage executor: runs one image's Dockerfile stages instruction by instruction over
//! the store, reusing cached layers by key (DESIGN.md sections 6–8).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::cache::{CacheIndex, CachedLayer};
use super::config::{self, StageFlags};
use super::key::CacheKey;
use super::rootfs;
use super::BuildOptions;
use crate::context::{map_to_destination, CopyItem, CopyKind, SourceTree, StatCache};
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
    pub steps: Vec<StepReport>,
}

/// A `RUN --mount`, resolved, with what the cache key records of it.
struct PreparedMount {
    mount: RunMount,
    key: String,
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
    /// The image the stage chain starts from, for the base.* annotations.
    base: Option<BaseImage>,
}

/// Shared by every image of one build.
pub struct Executor<'a> {
    pub store: &'a Store,
    pub cache: &'a CacheIndex,
    pub sandbox: &'a dyn Sandbox,
    pub stat_cache: &'a StatCache,
    pub options: &'a BuildOptions,
    /// Flattened root filesystems for `COPY --from` and bind mounts, by filesystem key.
    pub flattened: Mutex<BTreeMap<CacheKey, Arc<tempfile::TempDir>>>,
    /// Called with each line of RUN output and each step as it starts.
    pub progress: &'a (dyn Fn(&str, ProgressEvent<'_>) + Sync),
}

/// What the executor tells the reporter.
pub enum ProgressEvent<'a> {
    Step { stage: usize, line: usize, text: &'a str },
    Output(&'a [u8]),
}

impl Executor<'_> {
    fn created(&self) -> String {
        chrono::DateTime::from_timestamp(self.options.source_date_epoch, 0)
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
        let mut stages: BTreeMap<usize, StageState> = BTreeMap::new();
        let mut steps = Vec::new();
        for &index in &node.stages {
            let base = node.stage_bases.get(&index).cloned().unwrap_or(BaseRef::Scratch);
            let mut state = match &base {
                BaseRef::Scratch => self.scratch(),
                BaseRef::Stage(s) => stages
                    .get(s)
                    .cloned()
                    .ok_or_else(|| self.image_error(image, format!("stage {s} was not built")))?,
                BaseRef::Image(name) => {
                    let built = parents.get(name).ok_or_else(|| {
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
            let stage_ctx = StageContext {
                image,
                df,
                index,
                global: &global,
                build_args: &build_args,
                parents,
                stages: &stages,
            };
            let mut flags = StageFlags::default();
            for trigger in onbuild {
                let ins = parse_trigger(&trigger, df).map_err(|message| BuildError::Step {
                    file: df.file.name.clone(),
                    line: df.stages[index].from.line,
                    message,
                })?;
                self.execute(&stage_ctx, &mut state, &mut flags, &ins, &mut steps)?;
            }
            for ins in &df.stages[index].instructions {
                self.execute(&stage_ctx, &mut state, &mut flags, ins, &mut steps)?;
            }
            stages.insert(index, state);
        }
        let target = stages
            .remove(&node.target_stage)
            .ok_or_else(|| self.image_error(image, "target stage was not built".into()))?;
        self.commit_image(image, target, steps)
    }

    fn image_error(&self, image: &Image, message: String) -> BuildError {
        BuildError::Image { image: image.name.clone(), message }
    }

    fn scratch(&self) -> StageState {
        StageState {
            config: ContainerConfig {
                env: vec![format!("PATH={}", DEFAULT_PATH)],
                ..Default::default()
            },
            author: None,
            layers: Vec::new(),
            diff_ids: Vec::new(),
            history: Vec::new(),
            key: CacheKey::scratch(&self.options.platform),
            args: Vars::new(),
            base: None,
        }
    }

    fn state_of_built(&self, built: &BuiltImage) -> StageState {
        StageState {
            config: built.config.config.clone().unwrap_or_default(),
            author: built.config.author.clone(),
            layers: built.layers.clone(),
            diff_ids: built.config.rootfs.diff_ids.clone(),
            history: built.config.history.clone(),
            key: CacheKey::image(&built.manifest.digest),
            args: Vars::new(),
            base: Some(BaseImage {
                name: match built.config.config.as_ref().and_then(|c| c.labels.get(labels::VERSION))
                {
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
        let resolved = self
            .store
            .resolve(reference)
            .map_err(|e| err(format!("base image `{reference}` is not in the store ({e}); pull it first with `ferry pull {reference}`")))?;
        let img = self
            .store
            .image_for_platform(&resolved.descriptor, &crate::oci::Platform::host())
            .map_err(|e| err(format!("base image `{reference}`: {e}")))?;
        Ok(StageState {
            config: img.config.config.clone().unwrap_or_default(),
            author: img.config.author.clone(),
            layers: img.manifest.layers.clone(),
            diff_ids: img.config.rootfs.diff_ids.clone(),
            history: img.config.history.clone(),
            key: CacheKey::image(img.digest()),
            args: Vars::new(),
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
        let step_err = |message: String| BuildError::Step {
            file: df.file.name.clone(),
            line: ins.line,
            message,
        };
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
                    self.copy(ctx, state, is_add, copy_flags, sources, dest, &vars, ins, &text)?;
                self.check_layer_count(ctx, state, ins)?;
                status
            }
            other => {
                let applied =
                    config::apply(other, lexer, &vars, &mut state.config, &mut state.author, flags)
                        .unwrap_or_else(|| Ok(config::Applied { created_by: text.clone() }))
                        .map_err(|e| step_err(e.to_string()))?;
                state.history.push(History {
                    created: Some(self.created()),
                    created_by: Some(applied.created_by),
                    empty_layer: true,
                    ..Default::default()
                });
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

    /// Record a layer step: reuse the cached layer for `key`, or make it with `make`.
    fn layer_step(
        &self,
        state: &mut StageState,
        key: CacheKey,
        created_by: String,
        make: impl FnOnce() -> Result<CachedLayer, BuildError>,
    ) -> Result<StepStatus, BuildError> {
        let cached = if self.options.no_cache { None } else { self.cache.get(self.store, &key) };
        let (layer, status) = match cached {
            Some(l) => (l, StepStatus::Cached),
            None => {
                let l = make()?;
                // A cache write failure costs only a future rebuild.
                if let Err(e) = self.cache.put(&key, &l) {
                    tracing::warn!("cannot record cache entry: {e}");
                }
                (l, StepStatus::Built)
            }
        };
        state.layers.push(layer.blob.clone());
        state.diff_ids.push(layer.diff_id.clone());
        state.history.push(History {
            created: Some(self.created()),
            created_by: Some(created_by),
            ..Default::default()
        });
        state.key = key;
        Ok(status)
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
        })
    }

    fn flattened(
        &self,
        key: &CacheKey,
        layers: &[Descriptor],
    ) -> Result<Arc<tempfile::TempDir>, String> {
        if let Some(dir) = self.flattened.lock().map_err(|e| e.to_string())?.get(key) {
            return Ok(dir.clone());
        }
        let tmp = self.store.tmp_dir();
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(&tmp)
            .map_err(|e| e.to_string())?;
        rootfs::flatten(self.store, layers, dir.path()).map_err(|e| e.to_string())?;
        let dir = Arc::new(dir);
        self.flattened.lock().map_err(|e| e.to_string())?.insert(key.clone(), dir.clone());
        Ok(dir)
    }

    /// The source of `--from=NAME`: a stage, a sibling image, or an external image.
    fn source_of(
        &self,
        ctx: &StageContext<'_>,
        word: &str,
    ) -> Result<(CacheKey, Vec<Descriptor>), String> {
        let lower = word.to_lowercase();
        let df = ctx.df;
        let stage = df.stages[..ctx.index]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
            .or_else(|| word.parse::<usize>().ok().filter(|i| *i < ctx.index));
        if let Some(i) = stage {
            let s = ctx.stages.get(&i).ok_or_else(|| format!("stage `{word}` was not built"))?;
            return Ok((s.key.clone(), s.layers.clone()));
        }
        let repo = crate::reference::strip_tag_and_digest(word);
        let sibling =
            ctx.parents.get(word).or_else(|| ctx.parents.values().find(|b| b.repository == repo));
        if let Some(built) = sibling {
            return Ok((CacheKey::image(&built.manifest.digest), built.layers.clone()));
        }
        let state = self.state_of_external(ctx.image, word).map_err(|e| e.to_string())?;
        Ok((state.key, state.layers))
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
        text: &str,
    ) -> Result<StepStatus, BuildError> {
        let df = ctx.df;
        let err = |message: String| BuildError::Step {
            file: df.file.name.clone(),
            line: ins.line,
            message,
        };
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
                    chmod = Some(u32::from_str_radix(&v, 8).map_err(|_| {
                        err(format!("{keyword} --chmod={v}: expected an octal mode like 755"))
                    })?)
                }
                ("link", v) => link = v.as_deref().is_none_or(|v| v != "false"),
                ("exclude", Some(v)) => excludes.push(v),
                ("checksum", Some(v)) if is_add => checksum = Some(v),
                ("parents", _) => {
                    return Err(err(format!("{keyword} --parents is not supported yet")))
                }
                (name, _) => return Err(err(format!("{keyword} does not take --{name}"))),
            }
        }
        let dest = lexer.expand_word(dest, vars).map_err(|e| err(e.to_string()))?;
        let workdir = state.config.working_dir.clone().unwrap_or_else(|| "/".into());

        // Where the sources come from, and the identity of that tree for the key.
        let (tree, source_key): (SourceTree, String) = match &from {
            Some(word) => {
                let (key, layers) = self.source_of(ctx, word).map_err(&err)?;
                let dir = self.flattened(&key, &layers).map_err(&err)?;
                let tree = SourceTree::rootfs(dir.path(), format!("--from={word}"))
                    .map_err(|e| err(e.to_string()))?;
                // The temp dir lives in `self.flattened` until the build ends.
                (tree, key.to_string())
            }
            None => {
                let tree =
                    SourceTree::build_context(&ctx.image.context, Some(&ctx.image.dockerfile))
                        .map_err(|e| err(e.to_string()))?;
                (tree, "context".to_string())
            }
        };
        let mut path_sources = Vec::new();
        let mut heredocs = Vec::new();
        let mut urls = Vec::new();
        for s in sources {
            match s {
                Source::Path(p) => {
                    let p = lexer.expand_word(p, vars).map_err(|e| err(e.to_string()))?;
                    if is_add && (p.starts_with("https://") || p.starts_with("http://")) {
                        urls.push(p);
                    } else if p.starts_with("https://") || p.starts_with("http://") {
                        return Err(err(format!("COPY cannot fetch URLs (`{p}`); use ADD")));
                    } else {
                        path_sources.push(p);
                    }
                }
                Source::HereDoc { name, doc } => {
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
        let owner = match &chown {
            None => None,
            Some(spec) => {
                let mut read = |p: &str| rootfs::read_file(self.store, &state.layers, p);
                Some(
                    rootfs::resolve_owner(spec, &mut read)
                        .map_err(|e| err(e.to_string()))?
                        .map_err(|m| err(format!("{keyword} --chown={spec}: {m}")))?,
                )
            }
        };

        let selection = if path_sources.is_empty() {
            None
        } else {
            Some(tree.select(&path_sources, &excludes).map_err(|e| err(e.to_string()))?)
        };
        let content = match &selection {
            Some(sel) => {
                sel.content_digest(self.stat_cache).map_err(|e| err(e.to_string()))?.to_string()
            }
            None => String::new(),
        };
        let parent_key =
            if link { CacheKey::scratch(&self.options.platform) } else { state.key.clone() };
        let key = parent_key
            .step(keyword)
            .field("source", &source_key)
            .field("content", &content)
            .list("sources", path_sources.iter().map(String::as_str))
            .list("heredocs", heredocs.iter().flat_map(|(n, b)| [n.as_str(), b.as_str()]))
            .list("urls", urls.iter().map(String::as_str))
            .field("checksum", checksum.as_deref().unwrap_or(""))
            .field("dest", &dest)
            .field("workdir", &workdir)
            .field("chown", &owner.map(|(u, g)| format!("{u}:{g}")).unwrap_or_default())
            .field("chmod", &chmod.map(|m| format!("{m:o}")).unwrap_or_default())
            .field("from_is_context", if from.is_none() { "1" } else { "0" })
            .finish();
        let created_by = format!("{text} # ferry");
        let keep_owner = from.is_some();
        self.layer_step(state, key, created_by.clone(), || {
            let mut entries = Vec::new();
            if let Some(sel) = &selection {
                let items =
                    map_to_destination(sel, &dest, &workdir).map_err(|e| err(e.to_string()))?;
                for item in items {
                    if is_add && item.kind == CopyKind::File {
                        if let Some(extracted) = self.add_archive(&item).map_err(&err)? {
                            entries.extend(extracted);
                            continue;
                        }
                    }
                    entries.push(copy_entry(&item, owner, chmod, keep_owner).map_err(&err)?);
                }
            }
            for (name, body) in &heredocs {
                let target =
                    resolve_dest(&dest, &workdir, name, heredocs.len() + path_sources.len() > 1);
                let (uid, gid) = owner.unwrap_or((0, 0));
                entries.extend(parent_dirs(&target, owner));
                entries.push(
                    LayerEntry::bytes(strip_root(&target), body.clone().into_bytes())
                        .with_mode(chmod.unwrap_or(0o644))
                        .with_owner(uid, gid),
                );
            }
            for url in &urls {
                let name = url
                    .rsplit('/')
                    .next()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("download")
                    .to_string();
                let target =
                    resolve_dest(&dest, &workdir, &name, urls.len() > 1 || dest.ends_with('/'));
                let bytes = download(url, checksum.as_deref()).map_err(&err)?;
                let (uid, gid) = owner.unwrap_or((0, 0));
                entries.extend(parent_dirs(&target, owner));
                entries.push(
                    LayerEntry::bytes(strip_root(&target), bytes)
                        .with_mode(chmod.unwrap_or(0o600))
                        .with_owner(uid, gid),
                );
            }
            dedup_entries(&mut entries);
            self.pack(entries, &created_by).map_err(err)
        })
    }

    /// ADD of a local tar archive (plain, gzip, bzip2, xz or zstd) extracts it at the
    /// destination directory instead of copying it. Returns None when the file is no archive.
    fn add_archive(&self, item: &CopyItem) -> Result<Option<Vec<LayerEntry>>, String> {
        let Some(source) = &item.source else { return Ok(None) };
        let file = std::fs::File::open(source).map_err(|e| format!("{}: {e}", source.display()))?;
        let (_, mut reader) =
            crate::layer::decompress(file).map_err(|e| format!("{}: {e}", source.display()))?;
        // A tar has "ustar" at offset 257 of its first header.
        let mut head = vec![0u8; 512];
        let mut n = 0;
        while n < head.len() {
            match std::io::Read::read(&mut reader, &mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(_) => return Ok(None),
            }
        }
        if n < 512 || &head[257..262] != b"ustar" {
            return Ok(None);
        }
        let file = std::fs::File::open(source).map_err(|e| e.to_string())?;
        let (_, reader) = crate::layer::decompress(file).map_err(|e| e.to_string())?;
        let tmp = self.store.tmp_dir();
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let staging =
            tempfile::Builder::new().prefix("add-").tempdir_in(&tmp).map_err(|e| e.to_string())?;
        crate::layer::extract_layer(reader, staging.path(), crate::layer::ExtractMode::Apply)
            .map_err(|e| format!("ADD {}: {e}", source.display()))?;
        // The archive lands in the directory the file would have been copied into.
        let dest_dir = Path::new(&item.target)
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_else(|| "/".into());
        let mut entries = crate::layer::directory_entries(staging.path(), &Default::default())
            .map_err(|e| e.to_string())?;
        for e in &mut entries {
            e.path = Path::new(&strip_root(&dest_dir)).join(&e.path);
        }
        // Keep the staging directory alive until packing: host files are read then.
        let keep = staging.keep();
        self.flattened_keepalive(keep);
        Ok(Some(entries))
    }

    fn flattened_keepalive(&self, dir: PathBuf) {
        // Removed with the store's tmp sweep; kept until the layer is packed.
        tracing::debug!(dir = %dir.display(), "ADD staging directory");
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
        let err = |message: String| BuildError::Step {
            file: df.file.name.clone(),
            line: ins.line,
            message,
        };
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
                // `RUN <<EOF` alone runs the here-document as the script; otherwise the shell
                // gets the whole text and handles the here-documents itself.
                let trimmed = s.trim();
                if heredocs.len() == 1 && trimmed.starts_with("<<") && !trimmed.contains(' ') {
                    argv.push(heredocs[0].body.clone());
                } else if heredocs.is_empty() {
                    argv.push(s.clone());
                } else {
                    let full = df.file.text[ins.span.clone()].to_string();
                    let body =
                        full.split_once(char::is_whitespace).map(|(_, b)| b).unwrap_or_default();
                    argv.push(strip_run_flags(body));
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
        let created_by =
            format!("RUN {} # ferry", serde_json::to_string(&argv).unwrap_or_default());
        let lower_layers = state.layers.clone();
        let lower_diff_ids = state.diff_ids.clone();
        let stage_name =
            df.stages[ctx.index].name.clone().unwrap_or_else(|| format!("#{}", ctx.index));
        let line = ins.line;
        self.layer_step(state, key, created_by.clone(), || {
            let io = |what: &str, e: &dyn std::fmt::Display| err(format!("{what}: {e}"));
            let snapshots = self.store.state_dir("snapshots").map_err(|e| io("snapshots", &e))?;
            let tmp = self.store.tmp_dir();
            std::fs::create_dir_all(&tmp).map_err(|e| io("store tmp", &e))?;
            let mut lower_dirs = Vec::new();
            for (desc, diff_id) in lower_layers.iter().zip(&lower_diff_ids).rev() {
                let id = crate::layer::snapshot_id(diff_id);
                let dir = crate::layer::ensure_snapshot(&snapshots, &tmp, &id, || {
                    self.store
                        .open_blob(&desc.digest)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
                .map_err(|e| io("extracting a base layer", &e))?;
                lower_dirs.push(dir);
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
                let mut read = |p: &str| rootfs::read_file(self.store, &lower_layers, p);
                rootfs::resolve_owner(&user, &mut read)
                    .map_err(|e| io("reading /etc/passwd", &e))?
                    .map_err(|m| err(format!("USER {user}: {m}")))?
            };
            let spec = RunSpec {
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
                mounts: mounts.iter().map(|m| m.mount.clone()).collect(),
                hostname: "ferry".to_string(),
            };
            let mut output =
                |bytes: &[u8]| (self.progress)(&ctx.image.name, ProgressEvent::Output(bytes));
            let outcome = self
                .sandbox
                .run(&spec, &mut output)
                .map_err(|e| err(format!("cannot run: {e}")))?;
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
                        .collect::<Vec<_>>()
                        .join("\n"),
                })));
            }
            let xattrs = match outcome.xattrs {
                crate::sandbox::OverlayXattrs::Trusted => crate::layer::OverlayXattrs::Trusted,
                crate::sandbox::OverlayXattrs::User => crate::layer::OverlayXattrs::User,
            };
            let opts =
                crate::layer::UpperDirOptions { overlay_xattrs: xattrs, ..Default::default() };
            let entries = crate::layer::directory_entries(&upper, &opts)
                .map_err(|e| io("reading the RUN result", &e))?;
            self.pack(entries, &created_by).map_err(err)
        })
    }

    /// Resolve `RUN --mount=...` values. Each mount's `key` is what the step's cache key
    /// includes: the content digest of a bind source, the target of a cache/tmpfs/secret mount
    /// (never a secret's value).
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
                    let (root, key) = match opts.get("from") {
                        Some(from) => {
                            let (key, layers) = self.source_of(ctx, from)?;
                            let dir = self.flattened(&key, &layers)?;
                            (dir.path().to_path_buf(), format!("bind:{key}:{source}:{target}"))
                        }
                        None => {
                            let tree = SourceTree::build_context(
                                &ctx.image.context,
                                Some(&ctx.image.dockerfile),
                            )
                            .map_err(|e| e.to_string())?;
                            let src =
                                if source.is_empty() { ".".to_string() } else { source.clone() };
                            let digest = tree
                                .select(&[src], &[])
                                .map_err(|e| e.to_string())?
                                .content_digest(self.stat_cache)
                                .map_err(|e| e.to_string())?;
                            (
                                ctx.image.context.clone(),
                                format!("bind:context:{digest}:{source}:{target}"),
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
                    });
                }
                "cache" => {
                    let target = target.ok_or("RUN --mount=type=cache needs target=")?;
                    let id = opts.get("id").cloned().unwrap_or_else(|| target.clone());
                    let dir = self
                        .store
                        .state_dir("mounts")
                        .map_err(|e| e.to_string())?
                        .join(Digest::of(id.as_bytes()).short());
                    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                    out.push(PreparedMount {
                        mount: RunMount::Cache { host_dir: dir, target: target.clone() },
                        key: format!("cache:{target}"),
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
            &labels::Provenance::discover(image),
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
            steps,
        })
    }
}

/// The values docker gives the automatic platform ARGs when a stage declares them.
fn builtin_arg(name: &str, platform: &str) -> Option<String> {
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

/// A RUN's text without its `--flag` words, for the shell to run with its here-documents.
fn strip_run_flags(body: &str) -> String {
    let mut rest = body.trim_start();
    while rest.starts_with("--") {
        rest = rest.split_once(char::is_whitespace).map_or("", |(_, r)| r).trim_start();
    }
    rest.to_string()
}

fn strip_root(path: &str) -> String {
    path.trim_start_matches('/').to_string()
}

/// Where a named source lands: into `dest` when it is a directory (ends in `/`, or several
/// sources), else at `dest` itself; relative to the working directory.
fn resolve_dest(dest: &str, workdir: &str, name: &str, into_dir: bool) -> String {
    let abs = if dest.starts_with('/') {
        dest.to_string()
    } else {
        format!("{}/{dest}", workdir.trim_end_matches('/'))
    };
    if into_dir || abs.ends_with('/') {
        config::clean_path(&format!("{}/{name}", abs.trim_end_matches('/')))
    } else {
        config::clean_path(&abs)
    }
}

/// Parent directories of `target` as layer entries (0755, owned by the copier).
fn parent_dirs(target: &str, owner: Option<(u32, u32)>) -> Vec<LayerEntry> {
    let (uid, gid) = owner.unwrap_or((0, 0));
    let mut out = Vec::new();
    let mut cur = Path::new(target).parent();
    while let Some(p) = cur {
        let s = strip_root(&p.to_string_lossy());
        if s.is_empty() {
            break;
        }
        out.push(LayerEntry::dir(s).with_mode(0o755).with_owner(uid, gid));
        cur = p.parent();
    }
    out
}

/// One COPY item as a layer entry. From the build context, owners become 0:0 unless
/// `--chown`; from another stage or image they are kept (as docker does).
fn copy_entry(
    item: &CopyItem,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    keep_owner: bool,
) -> Result<LayerEntry, String> {
    let path = strip_root(&item.target);
    let (uid, gid) = owner.unwrap_or(if keep_owner { (item.uid, item.gid) } else { (0, 0) });
    let entry = match (&item.kind, &item.source) {
        (CopyKind::ParentDir, _) => {
            return Ok(LayerEntry::dir(path).with_mode(0o755).with_owner(uid, gid))
        }
        (CopyKind::Symlink, _) => {
            LayerEntry::symlink(path, item.link_target.clone().unwrap_or_default())
        }
        (CopyKind::Dir, _) => LayerEntry::dir(path),
        (CopyKind::File, Some(src)) => LayerEntry::host_file(path, src.clone()),
        (CopyKind::File, None) => return Err(format!("{}: no source file", item.target)),
    };
    let mode = match (&item.kind, chmod) {
        (CopyKind::Symlink, _) => 0o777,
        (_, Some(m)) => m,
        _ => item.mode,
    };
    Ok(entry.with_mode(mode).with_owner(uid, gid))
}

/// Keep the last entry for each path (a later source overwrites an earlier one), in order.
fn dedup_entries(entries: &mut Vec<LayerEntry>) {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<LayerEntry> = Vec::with_capacity(entries.len());
    for e in entries.drain(..).rev() {
        if seen.insert(e.path.clone()) {
            out.push(e);
        }
    }
    out.reverse();
    *entries = out;
}

/// Fetch an ADD URL (https, or http), checking `--checksum=sha256:…` when given.
fn download(url: &str, checksum: Option<&str>) -> Result<Vec<u8>, String> {
    let response = reqwest::blocking::get(url).map_err(|e| format!("ADD {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("ADD {url}: the server answered {}", response.status()));
    }
    let bytes = response.bytes().map_err(|e| format!("ADD {url}: {e}"))?.to_vec();
    if let Some(expected) = checksum {
        let expected: Digest = expected.parse().map_err(|e| format!("ADD --checksum: {e}"))?;
        let actual = Digest::of(&bytes);
        if actual != expected {
            return Err(format!("ADD {url}: checksum mismatch: expected {expected}, got {actual}"));
        }
    }
    Ok(bytes)
}
