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
    let snapshots = prune_snapshots(&store).map_err(|e| {
        super::CliError::invalid(miette::miette!("removing unused layer snapshots: {e}"))
    })?;
    if printer.json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        value["removed_snapshots"] = serde_json::json!(snapshots);
        printer.json(&value);
        return Ok(ExitStatus::Success);
    }
    let mut out = String::new();
    for n in &report.removed_names {
        out.push_str(&format!("Untagged: {n}\n"));
    }
    for d in &report.removed_blobs {
        out.push_str(&format!("Deleted: {d}\n"));
    }
    for id in &snapshots {
        out.push_str(&format!("Deleted snapshot: {id}\n"));
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
    roots.extend(variant_roots(store));
    roots
}

/// Blobs the compression variants point at (kept by `cache prune` as by prune). A store
/// without variants is left as it is (`cache prune --dry-run` and `cache stats` only read).
pub(super) fn variant_roots(store: &ferry::store::Store) -> Vec<ferry::digest::Digest> {
    if !store.root().join("compressed").is_dir() {
        return Vec::new();
    }
    ferry::release::variants::Variants::open(store).map(|v| v.blobs()).unwrap_or_default()
}

/// Remove the extracted layers (RUN's lower dirs) of layers that neither an image left in
/// the store nor the build cache has any more. Under the gc lock: builds hold it shared
/// while they use snapshots.
fn prune_snapshots(store: &ferry::store::Store) -> Result<Vec<String>, String> {
    let _gc = store.lock("gc").map_err(|e| e.to_string())?;
    let mut keep: std::collections::HashSet<String> = std::collections::HashSet::new();
    let cache = ferry::build::cache::CacheIndex::open(store).map_err(|e| e.to_string())?;
    for diff_id in cache.diff_ids() {
        keep.insert(ferry::layer::snapshot_id(&diff_id));
    }
    let host = ferry::oci::Platform::host();
    for (_, desc) in store.list_refs().map_err(|e| e.to_string())? {
        // An unreadable image keeps nothing here; `cache verify` is where it is reported.
        if let Ok(image) = store.image_for_platform(&desc, &host) {
            for diff_id in &image.config.rootfs.diff_ids {
                keep.insert(ferry::layer::snapshot_id(diff_id));
            }
        }
    }
    let dir = store.state_dir("snapshots").map_err(|e| e.to_string())?;
    ferry::layer::prune_snapshots(&dir, &|id| keep.contains(id)).map_err(|e| e.to_string())
}
