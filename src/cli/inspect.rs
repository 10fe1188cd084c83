//! `ferry inspect REF…`: an image's manifest digest, config, layers and sizes, as JSON.

use clap::Args;
use ferry::store::Store;
use serde_json::json;

use super::images::{open_store, store_error};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Images: a store name, a docker reference, a digest or an image id (prefix).
    #[arg(required = true)]
    pub references: Vec<String>,
}

pub fn run(global: &GlobalArgs, args: InspectArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let mut out = Vec::new();
    for r in &args.references {
        out.push(inspect(&store, r)?);
    }
    printer.json(&serde_json::Value::Array(out));
    Ok(ExitStatus::Success)
}

fn inspect(store: &Store, input: &str) -> Result<serde_json::Value, CliError> {
    let resolved = store.resolve(input).map_err(store_error)?;
    let img = store.image(&resolved.descriptor).map_err(store_error)?;
    let names = store.names_of(&resolved.descriptor.digest).map_err(store_error)?;
    let diff_ids = &img.config.rootfs.diff_ids;
    let layers: Vec<serde_json::Value> = img
        .manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "Digest": l.digest,
                "DiffID": diff_ids.get(i),
                "MediaType": l.media_type,
                "Size": l.size,
            })
        })
        .collect();
    Ok(json!({
        "Name": resolved.name,
        "Id": img.id(),
        "Digest": img.digest(),
        "IndexDigest": img.index.as_ref().map(|i| &i.digest),
        "RepoTags": names,
        "MediaType": img.descriptor.media_type,
        "Created": img.config.created,
        "Author": img.config.author,
        "Architecture": img.config.architecture,
        "Os": img.config.os,
        "Variant": img.config.variant,
        "Config": img.config.config,
        "RootFS": img.config.rootfs,
        "Layers": layers,
        "Size": img.size(),
        "ConfigSize": img.manifest.config.size,
        "ManifestSize": img.descriptor.size,
        "Annotations": img.manifest.annotations,
    }))
}
