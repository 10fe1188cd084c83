//! `ferry tag SRC DST`: give an image another name.

use clap::Args;
use ferry::reference::Reference;

use super::images::{open_store, store_error};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct TagArgs {
    /// The image to name.
    pub source: String,
    /// The new name: [HOST[:PORT]/]PATH[:TAG].
    pub target: String,
}

pub fn run(global: &GlobalArgs, args: TagArgs, printer: &Printer) -> CliResult {
    let target =
        Reference::parse(&args.target).map_err(|e| CliError::invalid(miette::miette!("{e}")))?;
    if target.digest.is_some() {
        return Err(CliError::invalid(miette::miette!(
            "cannot tag {:?}: a new name has a tag, not a digest",
            args.target
        )));
    }
    let store = open_store(global)?;
    // From resolving the source to naming it: an `rmi` of its last name (which deletes the
    // image under the exclusive gc lock) must not land in between and leave the new name
    // pointing at removed blobs.
    let _gc = store.gc_guard().map_err(store_error)?;
    let resolved = store.resolve(&args.source).map_err(store_error)?;
    store.set_ref(&target.store_name(), &resolved.descriptor).map_err(store_error)?;
    printer.status(&format!("Tagged {} as {}", args.source, target.familiar()));
    Ok(ExitStatus::Success)
}
