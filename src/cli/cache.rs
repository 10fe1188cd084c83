//! `ferry cache …`: the build cache's size and pruning, and the store's health.

use std::time::Duration;

use clap::{Args, Subcommand};
use ferry::build::cache::Clock;
use ferry::build::cache_prune::{self, parse_age, parse_size, PrunePolicy};

use super::images::{human_age, human_size, open_store, store_error};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// What the build cache keeps: entries, layers and their bytes (shared with images or
    /// reclaimable), snapshots, and when entries were last used.
    Stats,
    /// Remove build-cache entries, then the layers and snapshots nothing else needs.
    Prune(CachePruneArgs),
    /// Re-hash every blob and check every image has all its blobs.
    Verify,
}

/// Which entries go. One of --keep-bytes, --older-than or --all is needed: a prune that
/// guessed could throw away hours of builds.
#[derive(Args, Debug)]
pub struct CachePruneArgs {
    /// Remove least recently used entries and RUN caches (`--mount=type=cache`) until the
    /// layers only the cache keeps and the RUN caches take at most N bytes (500MB, 10GB,
    /// 2GiB); layers images also use cost nothing.
    #[arg(long, value_name = "N", value_parser = parse_size)]
    pub keep_bytes: Option<u64>,
    /// Remove entries unused for at least DURATION (72h, 7d, 2w); with --keep-bytes, only
    /// such entries and RUN caches, and only as many as the budget needs. Alone, also the
    /// RUN caches no step used for that long.
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    pub older_than: Option<Duration>,
    /// Remove every entry (the next build is cold, with the same digests) and every RUN
    /// cache no step is using.
    #[arg(long, conflicts_with_all = ["keep_bytes", "older_than"])]
    pub all: bool,
    /// Show what would be removed, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(global: &GlobalArgs, args: CacheArgs, printer: &Printer) -> CliResult {
    match args.command {
        CacheCommand::Stats => stats(global, printer),
        CacheCommand::Prune(args) => prune(global, args, printer),
        CacheCommand::Verify => verify(global, printer),
    }
}

fn cache_error(e: cache_prune::CachePruneError) -> CliError {
    CliError::invalid(miette::miette!("{e}"))
}

fn stats(global: &GlobalArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let s = cache_prune::stats(&store, Clock::from_env(), || super::prune::variant_roots(&store))
        .map_err(cache_error)?;
    if printer.json {
        printer.json(&serde_json::to_value(&s).unwrap_or_default());
        return Ok(ExitStatus::Success);
    }
    let mut out = format!("Cache entries:  {}\n", s.entries);
    if s.dangling_entries + s.unreadable_entries > 0 {
        out.push_str(&format!(
            "  broken:       {} whose layer is gone, {} unreadable (builds miss them; any prune removes them)\n",
            s.dangling_entries, s.unreadable_entries
        ));
    }
    out.push_str(&format!("Layers:         {}, {}\n", s.layers, human_size(s.layer_bytes)));
    out.push_str(&format!(
        "  shared:       {}, {} (images in the store keep them anyway)\n",
        s.shared_layers,
        human_size(s.shared_bytes)
    ));
    out.push_str(&format!(
        "  reclaimable:  {}, {}\n",
        s.reclaimable_layers,
        human_size(s.reclaimable_bytes)
    ));
    out.push_str(&format!(
        "Snapshots:      {}, {} ({} reclaimable)\n",
        s.snapshots,
        human_size(s.snapshot_bytes),
        human_size(s.reclaimable_snapshot_bytes)
    ));
    out.push_str(&format!(
        "RUN caches:     {}, {} (--mount=type=cache; prune --all, --older-than or --keep-bytes removes them)\n",
        s.run_caches,
        human_size(s.run_cache_bytes)
    ));
    if let (Some(oldest), Some(newest)) = (&s.oldest_last_used, &s.newest_last_used) {
        out.push_str(&format!(
            "Last used:      {oldest} ({}) to {newest} ({})\n",
            human_age(oldest),
            human_age(newest)
        ));
    }
    printer.text(&out);
    Ok(ExitStatus::Success)
}

fn prune(global: &GlobalArgs, args: CachePruneArgs, printer: &Printer) -> CliResult {
    if !args.all && args.keep_bytes.is_none() && args.older_than.is_none() {
        return Err(CliError::invalid(miette::miette!(
            help = "`ferry cache stats` shows what the cache keeps; add --dry-run to see what a prune would remove",
            "say what to prune: --keep-bytes N (least recently used first), --older-than DURATION, or --all"
        )));
    }
    let policy =
        PrunePolicy { all: args.all, older_than: args.older_than, keep_bytes: args.keep_bytes };
    let store = open_store(global)?;
    let report = cache_prune::prune(&store, &policy, args.dry_run, Clock::from_env(), || {
        super::prune::variant_roots(&store)
    })
    .map_err(cache_error)?;
    if printer.json {
        printer.json(&serde_json::to_value(&report).unwrap_or_default());
        return Ok(ExitStatus::Success);
    }
    let would = if report.dry_run { "Would delete" } else { "Deleted" };
    let mut out = String::new();
    for d in &report.removed_blobs {
        out.push_str(&format!("{would} layer: {d}\n"));
    }
    for id in &report.removed_snapshots {
        out.push_str(&format!("{would} snapshot: {id}\n"));
    }
    for name in &report.removed_run_caches {
        out.push_str(&format!("{would} RUN cache: {name}\n"));
    }
    for failure in &report.failed_run_caches {
        printer.warn(&format!("RUN cache {failure}; it stays"));
    }
    out.push_str(&format!(
        "{} {} cache {} ({} kept)\n",
        if report.dry_run { "Would remove" } else { "Removed" },
        report.entries_removed,
        if report.entries_removed == 1 { "entry" } else { "entries" },
        report.entries_kept
    ));
    out.push_str(&format!(
        "Total {} space: {}\n",
        if report.dry_run { "reclaimable" } else { "reclaimed" },
        human_size(report.reclaimed_bytes)
    ));
    printer.text(&out);
    Ok(ExitStatus::Success)
}

fn verify(global: &GlobalArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let report = store.verify().map_err(store_error)?;
    if printer.json {
        printer.json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        let mut out = format!(
            "Checked {} blob(s), {}\n",
            report.blobs_checked,
            human_size(report.bytes_checked)
        );
        for c in &report.corrupt {
            out.push_str(&format!("corrupt: {} ({})\n", c.digest, c.problem));
        }
        for m in &report.missing {
            out.push_str(&format!("missing: {} (needed by {})\n", m.digest, m.image));
        }
        for s in &report.stray_files {
            out.push_str(&format!("stray file: {}\n", s.display()));
        }
        printer.text(&out);
    }
    if report.is_ok() {
        Ok(ExitStatus::Success)
    } else {
        Err(CliError::failure(miette::miette!(
            "the store has {} corrupt and {} missing blob(s); remove the affected images (`ferry rmi`) and pull or build them again",
            report.corrupt.len(),
            report.missing.len()
        )))
    }
}

/// After a build: keep the build cache within its budget (`FERRY_CACHE_KEEP_BYTES`, default
/// a tenth of the store's filesystem), at most once an hour and never waiting for another
/// process. Call it with the store's gc guard released. A failure is a warning: the build
/// it follows is done.
pub(super) fn auto_prune(store: &ferry::store::Store, printer: &Printer) {
    let setting = std::env::var(cache_prune::AUTO_KEEP_BYTES_ENV).ok();
    let keep = match cache_prune::auto_keep_bytes(store, setting.as_deref()) {
        Ok(Some(keep)) => keep,
        Ok(None) => return,
        Err(e) => {
            printer.warn(&format!("the build cache is not pruned: {e}"));
            return;
        }
    };
    let roots = || super::prune::variant_roots(store);
    match cache_prune::auto_prune(store, keep, Clock::from_env(), roots) {
        Ok(Some(r)) => {
            for failed in &r.failed_run_caches {
                printer.warn(&format!("RUN cache not removed: {failed}"));
            }
            if r.reclaimed_bytes == 0 {
                return;
            }
            let runs = r.removed_run_caches.len();
            printer.status(&format!(
                "build cache over {}: pruned {} entr{} and {runs} RUN cache{} least recently used, {} freed ({} sets the budget)",
                human_size(keep),
                r.entries_removed,
                if r.entries_removed == 1 { "y" } else { "ies" },
                if runs == 1 { "" } else { "s" },
                human_size(r.reclaimed_bytes),
                cache_prune::AUTO_KEEP_BYTES_ENV
            ))
        }
        Ok(None) => {}
        Err(e) => printer.warn(&format!("automatic build cache prune: {e}")),
    }
}
