//! `ferry prune`: remove what no name reaches.

use clap::Args;
use ferry::store::PruneMode;

use super::images::{human_size, open_store, store_error};
use super::{CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Also remove images no tag names (pulled or loaded by digest only).
    #[arg(short, long)]
    pub all: bool,
}

pub fn run(global: &GlobalArgs, args: PruneArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let mode = if args.all { PruneMode::All } else { PruneMode::Dangling };
    let report = store.prune(mode, || cache_roots(&store)).map_err(store_error)?;
    if printer.json {
        printer.json(&serde_json::to_value(&report).unwrap_or_default());
        return Ok(ExitStatus::Success);
    }
    let mut out = String::new();
    for n in &report.removed_names {
        out.push_str(&format!("Untagged: {n}\n"));
    }
    for d in &report.removed_blobs {
        out.push_str(&format!("Deleted: {d}\n"));
    }
    out.push_str(&format!("Total reclaimed space: {}\n", human_size(report.freed_bytes)));
    printer.text(&out);
    Ok(ExitStatus::Success)
}

/// Blobs the build cache and the compression variants still point at: prune keeps them (a
/// layer cached but no longer in any image still saves a rebuild; a gzip variant a re-push).
pub(super) fn cache_roots(store: &ferry::store::Store) -> Vec<ferry::digest::Digest> {
    let mut roots =
        ferry::build::cache::CacheIndex::open(store).map(|c| c.blobs()).unwrap_or_default();
    if let Ok(variants) = ferry::release::variants::Variants::open(store) {
        roots.extend(variants.blobs());
    }
    roots
}
