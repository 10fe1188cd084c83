//! `ferry save -o FILE REF…`: write images to a docker archive (or an OCI archive).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use ferry::store::{ArchiveFormat, ArchiveImage};

use super::images::{open_store, store_error};
use super::{CliResult, ExitStatus, GlobalArgs, Printer};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SaveFormat {
    /// What `docker load` reads.
    Docker,
    /// A tar of an OCI image layout.
    Oci,
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The archive to write.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Archive format.
    #[arg(long, value_enum, default_value = "docker")]
    pub format: SaveFormat,
    /// Images to save.
    #[arg(required = true)]
    pub references: Vec<String>,
}

pub fn run(global: &GlobalArgs, args: SaveArgs, printer: &Printer) -> CliResult {
    let store = open_store(global)?;
    let mut images = Vec::new();
    for r in &args.references {
        let resolved = store.resolve(r).map_err(store_error)?;
        images.push(ArchiveImage { name: resolved.name, descriptor: resolved.descriptor });
    }
    let format = match args.format {
        SaveFormat::Docker => ArchiveFormat::Docker,
        SaveFormat::Oci => ArchiveFormat::Oci,
    };
    store.save_archive(&images, format, &args.output).map_err(store_error)?;
    printer.status(&format!("Saved {} image(s) to {}", images.len(), args.output.display()));
    Ok(ExitStatus::Success)
}
