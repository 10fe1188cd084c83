//! `ferry load [-i FILE]`: read a docker or OCI archive (plain or compressed) into the store.

use std::path::PathBuf;

use clap::Args;

use super::images::{open_store, store_error};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// The archive; default: standard input.
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

pub fn run(global: &GlobalArgs, args: LoadArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let loaded = match &args.input {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(|e| {
                CliError::invalid(miette::miette!("cannot open {}: {e}", p.display()))
            })?;
            store.load_archive(f, p)
        }
        None => store.load_archive(std::io::stdin().lock(), std::path::Path::new("<stdin>")),
    }
    .map_err(store_error)?;
    if printer.json {
        printer.json(&serde_json::to_value(&loaded).unwrap_or_default());
        return Ok(ExitStatus::Success);
    }
    let mut out = String::new();
    for l in &loaded {
        if l.names.is_empty() {
            out.push_str(&format!("Loaded image ID: {}\n", l.id));
        }
        for n in &l.names {
            out.push_str(&format!("Loaded image: {n}\n"));
        }
    }
    printer.text(&out);
    Ok(ExitStatus::Success)
}
