//! `ferry plan`: what would be built, in which order, with which tags.

use clap::Args;

use super::{CliError, CliResult, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Images to plan (their ancestors come with them); default: all.
    pub images: Vec<String>,
    /// Render tags for this environment only.
    #[arg(long)]
    pub env: Option<String>,
}

pub fn run(_global: &GlobalArgs, _args: PlanArgs, _printer: &Printer) -> CliResult {
    Err(CliError::invalid(miette::miette!("ferry plan is being written")))
}
