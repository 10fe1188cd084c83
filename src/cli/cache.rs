//! `ferry cache …`: the store's health.

use clap::{Args, Subcommand};

use super::images::{human_size, open_store, store_error};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Re-hash every blob and check every image has all its blobs.
    Verify,
}

pub fn run(global: &GlobalArgs, args: CacheArgs, printer: &Printer) -> CliResult {
    match args.command {
        CacheCommand::Verify => verify(global, printer),
    }
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
