//! `ferry build`: build the selected images of the fleet over the shared store.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use ferry::build::bases::PinnedBase;
use ferry::build::shared_cache::SharedCache;
use ferry::build::{build_fleet, BuildOptions, BuildReport, FleetEvent, ImageStatus};
use ferry::layer::Epoch;
use ferry::manifest::{EpochSetting, Manifest};
use ferry::reference::Reference;
use ferry::registry::{RegistryClient, RegistryConfig};
use ferry::release::layer_compression;
use ferry::store::Store;

use super::fleet::{
    describe_changes, load_graph, load_manifest, open_store, parse_build_arg, select_images,
    Selection,
};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// Images to build (their ancestors come with them); default: all.
    pub images: Vec<String>,
    /// Also build the descendants of the named images.
    #[arg(long)]
    pub with_dependents: bool,
    /// Only the images whose inputs changed since this git ref (commit, branch, tag), and
    /// their dependents (with the ancestors they need, from the cache when unchanged).
    #[arg(long, value_name = "GIT_REF")]
    pub since: Option<String>,
    /// Ignore the layer cache (results still land in it).
    #[arg(long)]
    pub no_cache: bool,
    /// A failed image fails only its descendants; the others finish.
    #[arg(long)]
    pub keep_going: bool,
    #[command(flatten)]
    pub inputs: BuildInputs,
    /// Pull every external base again, even when the store has it.
    #[arg(long)]
    pub pull: bool,
    /// Also write the built images to `oci:DIR` (an OCI layout) or `docker:FILE` (a
    /// docker-archive for `docker load`).
    #[arg(long, value_name = "oci:DIR|docker:FILE")]
    pub output: Option<String>,
}

/// What every command that builds takes besides the images to build.
#[derive(Args, Debug, Default)]
pub struct BuildInputs {
    /// A build arg for every image, overriding images.toml (repeatable).
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_build_arg)]
    pub args: Vec<(String, String)>,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or `id=ID,env=VAR`.
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<String>,
    /// Reuse the layers of a cache a build elsewhere exported to this registry reference
    /// with `--cache-to` (repeatable; the first that has a step wins). A cache that is
    /// missing or unreadable is a warning.
    #[arg(long = "cache-from", value_name = "REF", value_parser = parse_cache_ref)]
    pub cache_from: Vec<Reference>,
    /// After the build, export the cache entries it used or made to this registry
    /// reference, merged with the entries there of images it did not build.
    #[arg(long = "cache-to", value_name = "REF", value_parser = parse_cache_ref)]
    pub cache_to: Option<Reference>,
}

/// A `--cache-from`/`--cache-to` reference: a repository and a tag, never a digest (a
/// cache is rewritten in place).
fn parse_cache_ref(s: &str) -> Result<Reference, String> {
    let r = Reference::parse(s).map_err(|e| e.to_string())?;
    if r.digest.is_some() {
        return Err(format!("`{s}` names a digest; a cache lives at a tag"));
    }
    Ok(r)
}

impl BuildInputs {
    pub fn build_args(&self) -> BTreeMap<String, String> {
        self.args.iter().cloned().collect()
    }
}

/// How a command builds, beyond its inputs.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BuildMode {
    pub no_cache: bool,
    pub keep_going: bool,
    /// Pull external bases again even when the store has them.
    pub pull: bool,
}

/// Build the selected images as every command does: bases pinned, options from images.toml
/// and the flags, progress on the printer. The caller holds the store's gc guard from
/// before this call until it is done with the images (they are read by digest after).
pub(super) fn build_selected(
    global: &GlobalArgs,
    printer: &Printer,
    fleet: &Selection<'_>,
    store: &Store,
    inputs: &BuildInputs,
    mode: BuildMode,
) -> Result<(BuildReport, BTreeMap<String, PinnedBase>), CliError> {
    let Selection { manifest, graph, selected } = *fleet;
    let invalid = |m: String| CliError::invalid(miette::miette!("{m}"));
    let secrets = inputs
        .secrets
        .iter()
        .map(|s| load_secret(s))
        .collect::<Result<BTreeMap<_, _>, _>>()
        .map_err(invalid)?;
    let bases = pin_bases(manifest, graph, selected, store, printer, mode.pull)?;
    let options = BuildOptions {
        jobs: global.jobs(),
        no_cache: mode.no_cache,
        keep_going: mode.keep_going,
        source_date_epoch: source_date_epoch(manifest, store).map_err(invalid)?,
        compression: layer_compression(manifest.project.compression),
        platform: ferry::oci::Platform::host().to_string(),
        build_args: inputs.build_args(),
        secrets,
        bases: bases.iter().map(|(r, b)| (r.clone(), b.descriptor.clone())).collect(),
    };
    let sandbox = ferry::sandbox::NamespaceSandbox::new(
        std::env::current_exe()
            .map_err(|e| invalid(format!("cannot find the ferry binary: {e}")))?,
    );
    if let Some(note) = sandbox.rootless_note() {
        printer.warn(&note);
    }
    let sharing = !inputs.cache_from.is_empty() || inputs.cache_to.is_some();
    let registry = RegistryClient::new(RegistryConfig::for_manifest(manifest));
    let mut shared = SharedCache::new(&registry);
    if mode.no_cache && !inputs.cache_from.is_empty() {
        printer.warn("--cache-from is not read with --no-cache");
    } else {
        for warning in shared.import(&inputs.cache_from) {
            printer.warn(&warning);
        }
    }
    let progress = Progress::new(printer, global);
    let mut report = build_fleet(
        manifest,
        graph,
        selected,
        store,
        &sandbox,
        &options,
        sharing.then_some(&shared),
        &|e| progress.event(e),
    )
    .map_err(|e| invalid(e.to_string()))?;
    progress.finish();
    if let Some(imported) = &report.cache_from {
        if !imported.sources.is_empty() {
            printer.status(&format!(
                "shared cache: {} step{} from {}, {} blob{} fetched ({})",
                imported.hits,
                if imported.hits == 1 { "" } else { "s" },
                inputs.cache_from.iter().map(|r| r.familiar()).collect::<Vec<_>>().join(", "),
                imported.blobs_fetched,
                if imported.blobs_fetched == 1 { "" } else { "s" },
                human_size(imported.bytes_fetched)
            ));
        }
    }
    if let Some(to) = &inputs.cache_to {
        let built: BTreeSet<String> = report
            .images
            .iter()
            .filter(|i| i.status == ImageStatus::Built)
            .map(|i| i.name.clone())
            .collect();
        match shared.export(store, to, &built) {
            Ok(exported) => {
                printer.status(&format!(
                    "exported the cache to {} ({} entries, {} blob{} uploaded, {})",
                    exported.reference,
                    exported.entries,
                    exported.blobs_uploaded,
                    if exported.blobs_uploaded == 1 { "" } else { "s" },
                    human_size(exported.bytes_uploaded)
                ));
                report.cache_to = Some(exported);
            }
            Err(e) => {
                let message =
                    format!("--cache-to {}: {e}; the cache was not exported", to.familiar());
                printer.warn(&message);
                report.cache_to_error = Some(message);
            }
        }
    }
    Ok((report, bases))
}

pub fn run(global: &GlobalArgs, args: BuildArgs, printer: &Printer) -> CliResult {
    let manifest = load_manifest(global)?;
    let graph = load_graph(&manifest, &args.inputs.build_args())?;
    let (selected, changed) = select_images(
        &manifest,
        &graph,
        &args.images,
        args.with_dependents,
        args.since.as_deref(),
    )?;
    if let Some((git_ref, changed)) = args.since.as_deref().zip(changed.as_ref()) {
        printer.status(&describe_changes(git_ref, changed));
        if selected.is_empty() {
            if printer.json {
                printer.json(&serde_json::json!({
                    "images": [],
                    "since": { "ref": git_ref, "changed": changed },
                }));
            }
            return Ok(ExitStatus::Success);
        }
    }
    let output = args
        .output
        .as_deref()
        .map(parse_output)
        .transpose()
        .map_err(|m| CliError::invalid(miette::miette!("{m}")))?;
    let store = open_store(global)?;
    // From before the bases are pinned until the images are exported: a concurrent prune
    // must not take a base pulled by digest only, or a built image whose name another
    // process moved meanwhile, in between.
    let gc = store.gc_guard().map_err(|e| CliError::invalid(miette::miette!("{e}")))?;
    let fleet = Selection { manifest: &manifest, graph: &graph, selected: &selected };
    let mode = BuildMode { no_cache: args.no_cache, keep_going: args.keep_going, pull: args.pull };
    let (report, bases) = build_selected(global, printer, &fleet, &store, &args.inputs, mode)?;

    if let Some((kind, path)) = &output {
        let built: Vec<(String, String)> = report
            .images
            .iter()
            .filter(|i| i.status == ImageStatus::Built)
            .filter_map(|i| i.digest.clone().map(|d| (i.name.clone(), d)))
            .collect();
        super::fleet::export(&store, &built, kind, path)
            .map_err(|m| CliError::invalid(miette::miette!("{m}")))?;
    }
    if printer.json {
        // The whole command's work: the export and the cache export count too.
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        value["work"] = serde_json::to_value(ferry::report::work::so_far()).unwrap_or_default();
        value["bases"] = serde_json::to_value(&bases).unwrap_or_default();
        printer.json(&value);
    } else {
        let mut text = String::new();
        for img in &report.images {
            match img.status {
                ImageStatus::Built => {
                    let cached = img
                        .steps
                        .iter()
                        .filter(|s| s.status == ferry::build::executor::StepStatus::Cached)
                        .count();
                    let built = img
                        .steps
                        .iter()
                        .filter(|s| s.status == ferry::build::executor::StepStatus::Built)
                        .count();
                    text.push_str(&format!(
                        "{:<16} {}  {}  ({built} built, {cached} cached)\n",
                        img.name,
                        img.digest.as_deref().unwrap_or_default(),
                        human_size(img.size)
                    ));
                }
                ImageStatus::Failed | ImageStatus::Skipped => {
                    text.push_str(&format!(
                        "{:<16} {}\n",
                        img.name,
                        img.error.as_deref().unwrap_or("failed")
                    ));
                }
            }
        }
        let failed = report.failed();
        text.push_str(&format!(
            "{} image{} built, {failed} failed, in {:.1}s ({} steps built, {} cached)\n",
            report.images.len() - failed,
            if report.images.len() - failed == 1 { "" } else { "s" },
            report.seconds,
            report.steps_built,
            report.steps_cached
        ));
        printer.text(&text);
    }
    drop(gc);
    super::cache::auto_prune(&store, printer);
    if report.failed() > 0 {
        for img in report.images.iter().filter(|i| i.status == ImageStatus::Failed) {
            eprintln!("error: image `{}`: {}", img.name, img.error.as_deref().unwrap_or_default());
        }
        return Ok(ExitStatus::Failure);
    }
    Ok(ExitStatus::Success)
}

/// External bases of the selected images, pulled (through mirrors) when the store lacks
/// them, and pinned by digest before anything runs.
pub(super) fn pin_bases(
    manifest: &Manifest,
    graph: &ferry::graph::Graph,
    selected: &std::collections::BTreeSet<String>,
    store: &ferry::store::Store,
    printer: &Printer,
    always_pull: bool,
) -> Result<BTreeMap<String, PinnedBase>, CliError> {
    let external: std::collections::BTreeSet<String> = graph
        .build_order()
        .into_iter()
        .filter(|n| selected.contains(&n.name))
        .flat_map(|n| n.external_bases.iter().cloned())
        .collect();
    let registry = ferry::registry::RegistryClient::new(
        ferry::registry::RegistryConfig::for_manifest(manifest),
    );
    let bases = ferry::build::bases::ensure_bases(store, Some(&registry), &external, always_pull)
        .map_err(|e| CliError::invalid(miette::miette!("{e}")))?;
    for b in bases.values().filter(|b| b.pulled) {
        printer.status(&format!("pulled {} ({})", b.reference, b.descriptor.digest));
    }
    Ok(bases)
}

fn parse_output(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once(':') {
        Some((kind @ ("oci" | "docker"), path)) if !path.is_empty() => {
            Ok((kind.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("--output `{s}`: expected oci:DIR or docker:FILE")),
    }
}

/// `id=ID,src=FILE` or `id=ID,env=VAR` (docker's --secret syntax).
fn load_secret(spec: &str) -> Result<(String, Vec<u8>), String> {
    let mut id = None;
    let mut src = None;
    let mut env = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(v.to_string()),
            Some(("env", v)) => env = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "--secret: cannot read `{part}`; expected id=ID,src=FILE or id=ID,env=VAR"
                ))
            }
        }
    }
    let id = id.ok_or("--secret needs id=")?;
    let value = match (src, env) {
        (Some(path), _) => std::fs::read(&path)
            .map_err(|e| format!("--secret id={id}: cannot read the secret file: {e}"))?,
        (None, Some(var)) => std::env::var(&var)
            .map_err(|_| format!("--secret id={id}: environment variable {var} is not set"))?
            .into_bytes(),
        (None, None) => std::env::var(&id)
            .map_err(|_| format!("--secret id={id}: give src=FILE or env=VAR"))?
            .into_bytes(),
    };
    Ok((id, value))
}

/// The build's epoch: SOURCE_DATE_EPOCH from the environment, else images.toml's
/// `source_date_epoch`, whose default is the HEAD commit's time in a git checkout and no
/// epoch (mtimes kept, as docker does) outside one. Without an epoch, what the build
/// creates gets the time it started.
pub(super) fn source_date_epoch(manifest: &Manifest, store: &Store) -> Result<Epoch, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .map(Epoch::Clamp)
            .map_err(|_| format!("SOURCE_DATE_EPOCH `{v}` is not a number of seconds"));
    }
    match manifest.project.source_date_epoch {
        EpochSetting::Seconds(s) => Ok(Epoch::Clamp(s)),
        EpochSetting::Unset => Ok(Epoch::Unset { now }),
        EpochSetting::Git => head_commit_time(&manifest.root, store)
            .map(Epoch::Clamp)
            .map_err(|e| format!("source_date_epoch = \"git\": {e}")),
        EpochSetting::Auto => match head_commit_time(&manifest.root, store) {
            Ok(t) => Ok(Epoch::Clamp(t)),
            Err(why) => {
                tracing::debug!("no SOURCE_DATE_EPOCH: {why}; mtimes are kept");
                Ok(Epoch::Unset { now })
            }
        },
    }
}

/// The committer time of HEAD of the git work tree `dir` is in (remembered per commit in
/// the store: a build of a commit seen before starts no git).
fn head_commit_time(dir: &std::path::Path, store: &Store) -> Result<i64, String> {
    ferry::git::HeadFacts::of(dir, Some(store))
        .ok_or_else(|| "the project has no commit to take the time from".to_string())?
        .time()
}

pub fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", units[i])
    }
}

/// Progress on stderr (`--progress`): a live line per image on a terminal, plain lines
/// otherwise, RUN output included.
pub(super) struct Progress {
    bars: Option<(indicatif::MultiProgress, Mutex<BTreeMap<String, indicatif::ProgressBar>>)>,
    quiet: bool,
    /// Per image: the Dockerfile line running, and the output's unfinished last line.
    lines: Mutex<BTreeMap<String, (usize, Vec<u8>)>>,
}

impl Progress {
    pub(super) fn new(printer: &Printer, global: &GlobalArgs) -> Progress {
        use super::ProgressMode;
        let mode = match (global.progress, global.quiet) {
            (Some(mode), _) => mode,
            (None, true) => ProgressMode::Quiet,
            (None, false) if std::io::stderr().is_terminal() && !printer.json => ProgressMode::Tty,
            (None, false) => ProgressMode::Plain,
        };
        Progress {
            bars: (mode == ProgressMode::Tty)
                .then(|| (indicatif::MultiProgress::new(), Mutex::new(BTreeMap::new()))),
            quiet: mode == ProgressMode::Quiet,
            lines: Mutex::new(BTreeMap::new()),
        }
    }

    /// Print the complete lines of a RUN's output as `[image:line] text`, keeping an
    /// unfinished one until the rest comes (or the step ends).
    fn output(&self, image: &str, bytes: &[u8]) {
        let Ok(mut lines) = self.lines.lock() else { return };
        let (line, pending) = lines.entry(image.to_string()).or_default();
        pending.extend_from_slice(bytes);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            eprintln!("[{image}:{line}] {}", String::from_utf8_lossy(&text[..end]).trim_end());
        }
    }

    /// A new step of `image`: the rest of the previous step's output first.
    fn step(&self, image: &str, new_line: Option<usize>) {
        let Ok(mut lines) = self.lines.lock() else { return };
        let (line, pending) = lines.entry(image.to_string()).or_default();
        if !pending.is_empty() {
            eprintln!("[{image}:{line}] {}", String::from_utf8_lossy(pending).trim_end());
            pending.clear();
        }
        if let Some(l) = new_line {
            *line = l;
        }
    }

    pub(super) fn event(&self, event: FleetEvent<'_>) {
        if self.quiet {
            return;
        }
        match (&self.bars, event) {
            (Some((multi, bars)), FleetEvent::Started(image)) => {
                let bar = multi.add(indicatif::ProgressBar::new_spinner());
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {prefix:16} {wide_msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                bar.set_prefix(image.to_string());
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
                if let Ok(mut b) = bars.lock() {
                    b.insert(image.to_string(), bar);
                }
            }
            (Some((_, bars)), FleetEvent::Step { image, line, text, .. }) => {
                if let Some(bar) = bars.lock().ok().and_then(|b| b.get(image).cloned()) {
                    bar.set_message(format!("line {line}: {text}"));
                }
            }
            (Some((_, bars)), FleetEvent::Finished { image, report }) => {
                if let Some(bar) = bars.lock().ok().and_then(|b| b.get(image).cloned()) {
                    bar.finish_with_message(match report.status {
                        ImageStatus::Built => {
                            format!("done {}", report.digest.as_deref().unwrap_or_default())
                        }
                        _ => "failed".to_string(),
                    });
                }
            }
            (Some(_), FleetEvent::Output { .. }) => {}
            (None, FleetEvent::Started(image)) => eprintln!("[{image}] building"),
            (None, FleetEvent::Step { image, line, text, .. }) => {
                self.step(image, Some(line));
                eprintln!("[{image}] line {line}: {text}")
            }
            (None, FleetEvent::Output { image, bytes }) => self.output(image, bytes),
            (None, FleetEvent::Finished { image, report }) => {
                self.step(image, None);
                match report.status {
                    ImageStatus::Built => {
                        eprintln!("[{image}] done {}", report.digest.as_deref().unwrap_or_default())
                    }
                    _ => eprintln!("[{image}] failed"),
                }
            }
        }
    }

    pub(super) fn finish(&self) {
        if let Some((multi, _)) = &self.bars {
            let _ = multi.clear();
        }
    }
}
