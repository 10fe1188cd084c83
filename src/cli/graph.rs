//! `ferry graph`: the image graph as text, dot or mermaid.

use clap::Args;

use super::{CliError, CliResult, GlobalArgs, Printer};

#[derive(Args, Debug)]
pub struct GraphArgs {
    #[arg(long, default_value = "text")]
    pub format: String,
}

pub fn run(_global: &GlobalArgs, _args: GraphArgs, _printer: &Printer) -> CliResult {
    Err(CliError::invalid(miette::miette!("ferry graph is being written")))
}
