//! `ferry push --env E [IMAGES]`: build what is needed, upload every blob and manifest by
//! digest, then move the tags of all images together.

use std::collections::BTreeMap;

use clap::Args;
use ferry::build::ImageStatus;
use ferry::manifest::{Environment, Manifest};
use ferry::plan::{Plan, SourceInfo};
use ferry::reference::{Reference, Repository};
use ferry::registry::RegistryClient;
use ferry::release::layer_compression;
use ferry::release::push::{
    self, BlobAction, ImageSource, PushEvent, PushImage, PushOptions, PushPlan, PushReport,
    PushStatus, TagAction,
};
use ferry::release::variants::{PushableManifest, Variants};
use ferry::store::Store;

use super::build::human_size;
use super::build::{build_selected, BuildInputs, BuildMode};
use super::fleet::{graph_error, load_graph, load_manifest, open_store, Selection};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The environment to publish to (a table of `[environments]` in images.toml).
    #[arg(long, value_name = "ENV")]
    pub env: String,
    /// Images to push (their ancestors come with them); default: all.
    pub images: Vec<String>,
    /// Build, then print what would be uploaded and tagged; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Publish the images whose whole ancestry succeeded, even if others failed.
    #[arg(long)]
    pub keep_going: bool,
    #[command(flatten)]
    pub inputs: BuildInputs,
}

fn failure(message: String) -> CliError {
    CliError { status: ExitStatus::Failure, report: miette::Report::msg(message) }
}

fn invalid(message: impl std::fmt::Display) -> CliError {
    CliError::invalid(miette::Report::msg(message.to_string()))
}

/// The environment named by `--env`, with a suggestion when it does not exist.
pub(super) fn environment<'m>(
    manifest: &'m Manifest,
    name: &str,
) -> Result<&'m Environment, CliError> {
    manifest.environments.get(name).ok_or_else(|| {
        let hint =
            ferry::diagnostic::did_you_mean(name, manifest.environments.keys().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
        invalid(format!("unknown environment `{name}` in {}{hint}", manifest.file.name))
    })
}

/// `<env.registry>/<image.repository>` as a registry repository.
pub(super) fn env_repository(repository: &str) -> Result<Repository, CliError> {
    Reference::parse(repository)
        .map(|r| r.repository)
        .map_err(|e| invalid(format!("repository `{repository}`: {e}")))
}

/// Build the selected images and derive, per image, the manifest environment `env`
/// receives (re-written when its compression differs from the store's).
pub(super) struct BuiltForEnv {
    pub store: Store,
    /// Per image in build order: the manifest to push, or why there is none.
    pub images: Vec<(String, Result<PushableManifest, String>)>,
    _gc_guard: ferry::store::LockGuard,
}

pub(super) fn build_for_env(
    global: &GlobalArgs,
    printer: &Printer,
    fleet: &Selection<'_>,
    env: &Environment,
    keep_going: bool,
    inputs: &BuildInputs,
) -> Result<BuiltForEnv, CliError> {
    let store = open_store(global)?;
    // Taken before the bases are pinned and the images built: the images are then read by
    // digest, and a name moved by another process would leave one unnamed, so a prune must
    // not run in between; variant blobs are named by nothing until they are pushed either.
    let gc_guard = store.gc_guard().map_err(invalid)?;
    let mode = BuildMode { keep_going, ..BuildMode::default() };
    let (report, _) = build_selected(global, printer, fleet, &store, inputs, mode)?;
    let variants = Variants::open(&store).map_err(invalid)?;
    let to = layer_compression(env.compression);
    let mut images = Vec::new();
    for img in &report.images {
        let result = match (img.status, &img.digest) {
            // By the digest this build made: the name may point elsewhere by now, if another
            // project that shares the store and the image's key built meanwhile.
            (ImageStatus::Built, Some(digest)) => digest
                .parse::<ferry::digest::Digest>()
                .map_err(|e| format!("image `{}`: {e}", img.name))
                .and_then(|d| store.manifest_descriptor(&d).map_err(|e| e.to_string()))
                .and_then(|desc| store.image(&desc).map_err(|e| e.to_string()))
                .and_then(|image| {
                    variants
                        .manifest(
                            &image.descriptor,
                            &image.manifest,
                            &image.config.rootfs.diff_ids,
                            to,
                        )
                        .map_err(|e| e.to_string())
                }),
            _ => Err(img.error.clone().unwrap_or_else(|| "not built".to_string())),
        };
        images.push((img.name.clone(), result));
    }
    Ok(BuiltForEnv { store, images, _gc_guard: gc_guard })
}

pub fn run(global: &GlobalArgs, args: PushArgs, printer: &Printer) -> CliResult {
    let manifest = load_manifest(global)?;
    let env = environment(&manifest, &args.env)?;
    if let Some(source) = &env.promote_from {
        return Err(failure(format!(
            "environment `{}` accepts only promoted images (promote_from = \"{source}\"), never a direct push; run `ferry promote --from {source} --to {}`",
            env.name, env.name
        )));
    }
    let graph = load_graph(&manifest, &args.inputs.build_args())?;
    let selected = graph.select(&args.images, false).map_err(|e| graph_error(&manifest, e))?;
    let info = SourceInfo::discover(&manifest.root);
    let plan = Plan::new(&manifest, &graph, &selected, Some(&env.name), &info, &BTreeMap::new())
        .map_err(invalid)?;
    if env.release_only {
        let pre: Vec<String> = plan
            .images
            .iter()
            .filter_map(|i| {
                let v = manifest.images.get(&i.name)?.version.as_ref()?;
                (!v.pre.is_empty()).then(|| format!("`{}` ({v})", i.name))
            })
            .collect();
        if !pre.is_empty() {
            return Err(failure(format!(
                "environment `{}` is release_only: pre-release versions cannot be pushed: {}",
                env.name,
                pre.join(", ")
            )));
        }
    }

    let fleet = Selection { manifest: &manifest, graph: &graph, selected: &selected };
    let built = build_for_env(global, printer, &fleet, env, args.keep_going, &args.inputs)?;
    let mut by_name: BTreeMap<String, Result<PushableManifest, String>> =
        built.images.into_iter().collect();
    let mut images = Vec::new();
    for planned in &plan.images {
        let tags = planned.environments.get(&env.name).cloned().unwrap_or_default();
        let source = match by_name.remove(&planned.name) {
            Some(Ok(m)) => ImageSource::Built(Box::new(m)),
            Some(Err(why)) => ImageSource::NotBuilt(why),
            None => ImageSource::NotBuilt("not built".to_string()),
        };
        images.push(PushImage {
            name: planned.name.clone(),
            repository: env_repository(&tags.repository)?,
            tags: tags.tags,
            parents: planned.parents.clone(),
            source,
        });
    }

    let client = RegistryClient::new(ferry::registry::RegistryConfig::for_manifest(&manifest));
    let push_plan =
        push::plan(&client, &env.name, env.immutable, images, global.jobs()).map_err(invalid)?;
    if args.dry_run {
        if printer.json {
            printer.json(&serde_json::json!({ "dry_run": true, "plan": push_plan }));
        } else {
            printer.text(&plan_text(&push_plan));
        }
        return Ok(if push_plan.conflicts.is_empty() {
            ExitStatus::Success
        } else {
            ExitStatus::Failure
        });
    }
    if !push_plan.conflicts.is_empty() {
        let list: Vec<String> = push_plan.conflicts.iter().map(|c| format!("  {c}")).collect();
        if printer.json {
            printer.json(&serde_json::json!({ "plan": push_plan, "refused": true }));
        }
        return Err(failure(format!(
            "environment `{}` is immutable and {} tag{} would move; nothing was uploaded or tagged:\n{}",
            env.name,
            list.len(),
            if list.len() == 1 { "" } else { "s" },
            list.join("\n")
        )));
    }

    let quiet = global.quiet || printer.json;
    let on_event = |e: PushEvent<'_>| {
        if quiet {
            return;
        }
        match e {
            PushEvent::Blob { image, digest, action, bytes } => {
                eprintln!("[{image}] {action} {digest} ({})", human_size(bytes))
            }
            PushEvent::Manifest { image, digest } => eprintln!("[{image}] manifest {digest}"),
            PushEvent::Tag { image, reference } => eprintln!("[{image}] tagged {reference}"),
            PushEvent::Failed { image, error } => eprintln!("[{image}] failed: {error}"),
        }
    };
    let options = PushOptions { jobs: global.jobs(), keep_going: args.keep_going };
    let report =
        push::execute(&push_plan, &built.store, &client, &options, &on_event).map_err(invalid)?;
    if printer.json {
        printer.json(&serde_json::json!({ "plan": push_plan, "report": report }));
    } else {
        printer.text(&report_text(&report));
    }
    drop(built._gc_guard);
    super::cache::auto_prune(&built.store, printer);
    if report.all_published() {
        Ok(ExitStatus::Success)
    } else {
        for img in report.images.iter().filter(|i| i.error.is_some()) {
            eprintln!("error: image `{}`: {}", img.name, img.error.as_deref().unwrap_or_default());
        }
        Ok(ExitStatus::Failure)
    }
}

fn plan_text(plan: &PushPlan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "push to {}: {} image{}; {} blob{} to upload ({}), {} to mount, {} already present ({})",
        plan.environment,
        plan.images.len(),
        if plan.images.len() == 1 { "" } else { "s" },
        plan.blobs_to_upload,
        if plan.blobs_to_upload == 1 { "" } else { "s" },
        human_size(plan.upload_bytes),
        plan.blobs_to_mount,
        plan.blobs_present,
        human_size(plan.present_bytes)
    );
    for img in &plan.images {
        let _ = writeln!(s);
        let Some(digest) = &img.digest else {
            let _ = writeln!(
                s,
                "{}  not built: {}",
                img.name,
                img.not_built.as_deref().unwrap_or_default()
            );
            continue;
        };
        let _ = writeln!(s, "{}  {}@{digest}", img.name, img.repository);
        if let Some(store) = &img.store_digest {
            let _ = writeln!(
                s,
                "    re-written  layers re-compressed for this environment; the store has {store}"
            );
        }
        for t in &img.tags {
            let what = match (t.action, &t.current) {
                (TagAction::Create, _) => "new".to_string(),
                (TagAction::Unchanged, _) => "unchanged".to_string(),
                (TagAction::Move, Some(c)) => format!("moves from {c}"),
                (TagAction::Move, None) => "moves".to_string(),
            };
            let _ = writeln!(s, "    tag         {}:{} ({what})", img.repository, t.tag);
        }
        let up = img.blobs.iter().filter(|b| b.action == BlobAction::Upload).count();
        let mount =
            img.blobs.iter().filter(|b| matches!(b.action, BlobAction::Mount { .. })).count();
        let present = img.blobs.iter().filter(|b| b.action == BlobAction::Present).count();
        let _ = writeln!(
            s,
            "    blobs       {up} to upload ({}), {mount} to mount, {present} present ({}){}",
            human_size(img.upload_bytes),
            human_size(img.present_bytes),
            if img.manifest_present { "; manifest present" } else { "" }
        );
        for b in &img.blobs {
            let what = match &b.action {
                BlobAction::Present => "present".to_string(),
                BlobAction::Upload => "upload".to_string(),
                BlobAction::Mount { from } => format!("mount from {from}"),
            };
            let _ = writeln!(s, "      {}  {:>8}  {what}", b.digest, human_size(b.size));
        }
    }
    for c in &plan.conflicts {
        let _ = writeln!(s, "\nconflict: {c}");
    }
    s
}

fn report_text(report: &PushReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for img in &report.images {
        let status = match img.status {
            PushStatus::Published => "published",
            PushStatus::UploadedUntagged => "uploaded, untagged",
            PushStatus::Failed => "failed",
            PushStatus::NotBuilt => "not built",
        };
        let at = img.digest.as_ref().map(|d| format!("@{d}")).unwrap_or_default();
        let _ = writeln!(s, "{:<16} {status:<18} {}{at}", img.name, img.repository);
        if !img.tags.is_empty() {
            let _ = writeln!(s, "{:<16} tags: {}", "", img.tags.join(", "));
        }
        if let Some(store) = &img.store_digest {
            let _ = writeln!(
                s,
                "{:<16} re-written manifest (layers re-compressed): the tags point at {}, the store has {store}",
                "",
                img.digest.as_ref().map(ToString::to_string).unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        s,
        "{}: {} blob{} uploaded ({}), {} mounted, {} already present; {} manifest{} pushed; {} tag{} moved, {} unchanged",
        report.environment,
        report.blobs_uploaded,
        if report.blobs_uploaded == 1 { "" } else { "s" },
        human_size(report.bytes_uploaded),
        report.blobs_mounted,
        report.blobs_present,
        report.manifests_pushed,
        if report.manifests_pushed == 1 { "" } else { "s" },
        report.tags_moved,
        if report.tags_moved == 1 { "" } else { "s" },
        report.tags_unchanged
    );
    if !report.all_published() {
        let untagged: Vec<&str> = report
            .images
            .iter()
            .filter(|i| i.status == PushStatus::UploadedUntagged)
            .map(|i| i.name.as_str())
            .collect();
        let failed: Vec<&str> = report
            .images
            .iter()
            .filter(|i| matches!(i.status, PushStatus::Failed | PushStatus::NotBuilt))
            .map(|i| i.name.as_str())
            .collect();
        let _ = writeln!(s, "failed: {}", failed.join(", "));
        if !untagged.is_empty() {
            let _ =
                writeln!(s, "uploaded untagged (no tag moved for them): {}", untagged.join(", "));
        }
    }
    s
}
