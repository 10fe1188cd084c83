//! `ferry pull REF`: fetch an image from its registry into the store. Also the registry
//! helpers the registry commands share.

use clap::Args;
use ferry::oci::Platform;
use ferry::reference::Reference;
use ferry::registry::{self, PullOptions, RegistryClient, RegistryConfig, RegistryError};

use super::images::{human_size, open_store};
use super::{CliError, CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image: [HOST[:PORT]/]PATH[:TAG][@DIGEST].
    pub reference: String,
    /// The platform to pick from a multi-platform image (os/arch[/variant]); default: this machine's.
    #[arg(long)]
    pub platform: Option<String>,
}

pub fn run(global: &GlobalArgs, args: PullArgs, printer: &Printer) -> CliResult {
    let reference =
        Reference::parse(&args.reference).map_err(|e| CliError::invalid(miette::miette!("{e}")))?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p).ok_or_else(|| {
            CliError::invalid(miette::miette!(
                "invalid --platform {p:?}: expected os/arch[/variant], e.g. linux/arm64"
            ))
        })?,
        None => Platform::host(),
    };
    let store = open_store(global)?;
    let client = RegistryClient::new(registry_config(global));
    let opts = PullOptions { platform, jobs: global.jobs.unwrap_or(4).max(1), set_ref: true };
    printer.status(&format!("Pulling {}", reference.familiar()));
    let report = registry::pull(&store, &client, &reference, &opts).map_err(registry_error)?;
    if printer.json {
        printer.json(&serde_json::to_value(&report).unwrap_or_default());
        return Ok(ExitStatus::Success);
    }
    printer.status(&format!(
        "Fetched {} blob(s), {}; {} already present",
        report.blobs_fetched,
        human_size(report.bytes_fetched),
        report.blobs_present
    ));
    let digest = report.index_digest.as_ref().unwrap_or(&report.descriptor.digest);
    printer.status(&format!("Digest: {digest}"));
    printer.text(&reference.to_string());
    Ok(ExitStatus::Success)
}

/// Registry settings for commands run outside a project: docker-style certs directories.
/// (Inside a project the manifest's `[registries]` add to these.)
/// Registry settings: images.toml's `[registries]` when the project has one, over the
/// environment's.
pub(super) fn registry_config(global: &GlobalArgs) -> RegistryConfig {
    match ferry::manifest::Manifest::load(&global.file) {
        Ok(manifest) => RegistryConfig::for_manifest(&manifest),
        Err(_) => RegistryConfig::from_environment(),
    }
}

/// Registry failures are the environment's: exit 2; a local disk failure is exit 1.
pub(super) fn registry_error(e: RegistryError) -> CliError {
    match e {
        RegistryError::Store(s) => super::images::store_error(s),
        RegistryError::Io { .. } => CliError::failure(miette::miette!("{e}")),
        other => CliError::invalid(miette::miette!("{other}")),
    }
}
