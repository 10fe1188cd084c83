//! `ferry promote --from E1 --to E2 [IMAGES]`: copy the images published in E1 into E2 by
//! digest, with their referrers, then apply E2's tags. Needs only images.toml: nothing is
//! built, so build contexts need not exist.

use std::collections::BTreeMap;

use clap::Args;
use ferry::digest::Digest;
use ferry::manifest::Manifest;
use ferry::plan::SourceInfo;
use ferry::registry::RegistryClient;
use ferry::release::promote::{
    self, ImagePlan, ImageStatus, Outcome, PromoteError, PromoteRequest, PromotionReport, TagAction,
};

use super::images::human_size;
use super::registries::registry_config;
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The environment the images are published in.
    #[arg(long, value_name = "ENV")]
    pub from: String,
    /// The environment to promote them into.
    #[arg(long, value_name = "ENV")]
    pub to: String,
    /// Images to promote (images.toml keys); default: all.
    pub images: Vec<String>,
    /// Print what would be copied and tagged; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Promote this digest of an image instead of the one its version's tag names in the
    /// source environment (repeatable).
    #[arg(long = "digest", value_name = "IMAGE=DIGEST", value_parser = parse_digest_arg)]
    pub digests: Vec<(String, Digest)>,
    /// Do not copy referrers (signatures, SBOMs, attestations).
    #[arg(long)]
    pub no_referrers: bool,
}

fn parse_digest_arg(s: &str) -> Result<(String, Digest), String> {
    let (image, digest) =
        s.split_once('=').ok_or_else(|| format!("expected IMAGE=sha256:<hex>, got {s:?}"))?;
    if image.is_empty() {
        return Err(format!("expected IMAGE=sha256:<hex>, got {s:?}"));
    }
    let digest = digest.parse::<Digest>().map_err(|e| e.to_string())?;
    Ok((image.to_string(), digest))
}

pub fn run(global: &GlobalArgs, args: PromoteArgs, printer: &Printer) -> CliResult {
    let manifest =
        Manifest::load_for_release(&global.file).map_err(|e| CliError::invalid(e.into_report()))?;
    let mut digests = BTreeMap::new();
    for (image, digest) in args.digests {
        if digests.insert(image.clone(), digest).is_some() {
            return Err(CliError::invalid(miette::miette!(
                "--digest names image `{image}` more than once"
            )));
        }
    }
    let request = PromoteRequest {
        from: args.from,
        to: args.to,
        images: args.images,
        digests,
        referrers: !args.no_referrers,
        jobs: global.jobs.unwrap_or(8).max(1),
    };
    let client = RegistryClient::new(registry_config(&manifest));
    // The source tag names the image; the destination tags are applied.
    let templates = [&request.from, &request.to]
        .into_iter()
        .filter_map(|env| manifest.environments.get(env))
        .flat_map(|env| &env.tags)
        .chain(manifest.images.values().flat_map(|image| &image.tags));
    let info = SourceInfo::discover_for(&manifest.root, templates);
    printer.status(&format!("Planning the promotion from {} to {}", request.from, request.to));
    // Bad input and unusable registries are the environment's fault: exit 2.
    let plan = promote::plan(&manifest, &client, &request, &info)
        .map_err(|e: PromoteError| CliError::invalid(miette::miette!("{e}")))?;
    let report = if args.dry_run {
        PromotionReport::dry_run(&plan)
    } else {
        plan.execute(&client, request.jobs)
    };
    for w in &report.warnings {
        printer.warn(w);
    }
    if printer.json {
        printer.json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        printer.text(&to_text(&report, args.dry_run));
    }
    if !report.failures.is_empty() {
        return Err(CliError::failure(miette::miette!(
            "promotion from {} to {} failed:\n  {}",
            report.from,
            report.to,
            report.failures.join("\n  ")
        )));
    }
    Ok(ExitStatus::Success)
}

fn to_text(report: &PromotionReport, dry_run: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let width = report.images.iter().map(|i| i.image.len()).max().unwrap_or(0);
    for img in &report.images {
        let _ = writeln!(s, "{:<width$}  {}", img.image, image_line(img));
        for t in &img.tags {
            let what = match &t.action {
                TagAction::Create => "new".to_string(),
                TagAction::Unchanged => "unchanged".to_string(),
                TagAction::Move { from } => format!("moves from {from}"),
                TagAction::Conflict { existing } => {
                    format!("CONFLICT: immutable, names {existing}")
                }
                TagAction::Keep { existing } => format!("kept: names {existing}"),
            };
            let _ = writeln!(s, "{:<width$}    {}:{}  {what}", "", img.destination, t.tag);
        }
    }
    let n = report.images.len();
    let plural = if n == 1 { "" } else { "s" };
    let summary = match report.outcome {
        Outcome::NothingToDo => format!(
            "Nothing to do: {n} image{plural} already in {} with {} tags",
            report.to,
            if n == 1 { "its" } else { "their" }
        ),
        Outcome::Failed => format!(
            "Promotion failed{}",
            if dry_run { " (dry run)" } else { "; no tag was moved unless listed above" }
        ),
        Outcome::Planned => {
            let copy = report.images.iter().filter(|i| i.status == ImageStatus::Copy).count();
            let blobs: usize = report.images.iter().map(|i| i.blobs_to_copy).sum();
            let bytes: u64 = report.images.iter().map(|i| i.bytes_to_copy).sum();
            format!(
                "Dry run: {copy} of {n} image{plural} to copy, {blobs} blob(s), {}; nothing was changed",
                human_size(bytes)
            )
        }
        Outcome::Promoted => {
            let st = &report.stats;
            format!(
                "Promoted {n} image{plural} from {} to {}: {} manifest(s) copied, {} blob(s) mounted, {} streamed ({}), {} referrer(s), {} tag(s) moved",
                report.from,
                report.to,
                st.manifests_copied,
                st.blobs_mounted,
                st.blobs_streamed,
                human_size(st.bytes_streamed),
                st.referrers_copied,
                st.tags_moved
            )
        }
    };
    let _ = writeln!(s, "{summary}");
    s
}

fn image_line(img: &ImagePlan) -> String {
    let digest = img.digest.as_ref().map(ToString::to_string).unwrap_or_default();
    match img.status {
        ImageStatus::MissingInSource => {
            format!("missing in source: {}", img.error.as_deref().unwrap_or("not found"))
        }
        ImageStatus::AlreadyThere => {
            let refs = img.referrers.iter().filter(|r| !r.present).count();
            if refs > 0 {
                format!("already there  {digest}  ({refs} referrer(s) to copy)")
            } else {
                format!("already there  {digest}")
            }
        }
        ImageStatus::Copy => format!(
            "copy  {digest}  {} manifest(s), {} blob(s) {} ({}), {} referrer(s)",
            img.manifests_to_copy,
            img.blobs_to_copy,
            if img.mount { "to mount" } else { "to stream" },
            human_size(img.bytes_to_copy),
            img.referrers.len()
        ),
    }
}
