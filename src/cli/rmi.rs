//! `ferry rmi REF…`: untag; delete an image when its last name goes.

use clap::Args;

use super::images::{human_size, open_store, store_error};
use super::{CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Images: names, digests or image ids.
    #[arg(required = true)]
    pub references: Vec<String>,
    /// Also delete an image other images are built on, or every name of an image id.
    /// (Long form only: `-f` is the global manifest flag.)
    #[arg(long)]
    pub force: bool,
}

pub fn run(global: &GlobalArgs, args: RmiArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let mut out = String::new();
    let mut reports = Vec::new();
    for r in &args.references {
        let report = store
            .remove_image(r, args.force, || super::prune::cache_roots(&store))
            .map_err(store_error)?;
        for n in &report.untagged {
            out.push_str(&format!("Untagged: {n}\n"));
        }
        for d in &report.deleted {
            out.push_str(&format!("Deleted: {d}\n"));
        }
        if report.freed_bytes > 0 {
            out.push_str(&format!("Reclaimed: {}\n", human_size(report.freed_bytes)));
        }
        reports.push(report);
    }
    if printer.json {
        printer.json(&serde_json::to_value(&reports).unwrap_or_default());
    } else {
        printer.text(&out);
    }
    Ok(ExitStatus::Success)
}
