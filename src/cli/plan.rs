//! `ferry plan`: what would be built, in which order, with which tags.

use clap::Args;
use ferry::plan::{Plan, SourceInfo};

use super::fleet::{describe_changes, load_graph, load_manifest, parse_build_arg, select_images};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Images to plan (their ancestors come with them); default: all.
    pub images: Vec<String>,
    /// Render tags for this environment only.
    #[arg(long)]
    pub env: Option<String>,
    /// Also select the descendants of the named images.
    #[arg(long)]
    pub with_dependents: bool,
    /// Only the images whose inputs changed since this git ref (commit, branch, tag), and
    /// their dependents.
    #[arg(long, value_name = "GIT_REF")]
    pub since: Option<String>,
    /// A build arg for every image, overriding images.toml (repeatable).
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_build_arg)]
    pub args: Vec<(String, String)>,
}

pub fn run(global: &GlobalArgs, args: PlanArgs, printer: &Printer) -> CliResult {
    let manifest = load_manifest(global)?;
    let graph = load_graph(&manifest, &args.args.iter().cloned().collect())?;
    let (selected, changed) = select_images(
        &manifest,
        &graph,
        &args.images,
        args.with_dependents,
        args.since.as_deref(),
    )?;
    let info = SourceInfo::discover(&manifest.root);
    // Bases the store already has are shown with the digest a build would use; plan never
    // touches the network.
    let mut pins = std::collections::BTreeMap::new();
    if let Ok(store) = super::fleet::open_store_if_exists(global) {
        for node in graph.build_order() {
            for r in &node.external_bases {
                if let Ok(resolved) = store.resolve(r) {
                    pins.insert(r.clone(), resolved.descriptor.digest.to_string());
                }
            }
        }
    }
    let plan = Plan::new(&manifest, &graph, &selected, args.env.as_deref(), &info, &pins)
        .map_err(|e| CliError::invalid(miette::Report::msg(e.to_string())))?;
    let since = args.since.as_deref().zip(changed.as_ref());
    if printer.json {
        let mut value = serde_json::to_value(&plan).unwrap_or_default();
        if let Some((git_ref, changed)) = since {
            value["since"] = serde_json::json!({ "ref": git_ref, "changed": changed });
        }
        printer.json(&value);
    } else {
        let mut text = String::new();
        if let Some((git_ref, changed)) = since {
            text.push_str(&describe_changes(git_ref, changed));
            text.push('\n');
        }
        text.push_str(&plan.to_text());
        printer.text(&text);
    }
    Ok(ExitStatus::Success)
}
