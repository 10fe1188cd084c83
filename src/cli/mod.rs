//! Subcommands: one file each; arguments in, library calls out, output through the printer.
//! Exit codes (DESIGN.md section 4): 0 success, 1 the work failed, 2 invalid input or
//! environment.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod build;
mod check;
mod fleet;
mod graph;
mod output;
mod plan;
// Image management and registry commands (store/registry).
mod cache;
mod history;
mod images;
mod inspect;
mod load;
mod login;
mod prune;
mod pull;
mod push;
mod rmi;
mod save;
mod tag;
// Releases.
mod promote;
mod registries;

pub use output::Printer;

/// What a command's failure means for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success = 0,
    /// A step, a policy check or an immutable-tag conflict failed.
    Failure = 1,
    /// The input (manifest, Dockerfile, arguments) or the environment (registry) is invalid.
    Invalid = 2,
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> ExitCode {
        ExitCode::from(s as u8)
    }
}

/// An error as the CLI reports it: a rendered diagnostic and the exit status it maps to.
pub struct CliError {
    pub status: ExitStatus,
    pub report: miette::Report,
}

impl CliError {
    pub fn invalid(report: impl Into<miette::Report>) -> CliError {
        CliError { status: ExitStatus::Invalid, report: report.into() }
    }
    pub fn failure(report: impl Into<miette::Report>) -> CliError {
        CliError { status: ExitStatus::Failure, report: report.into() }
    }
}

pub type CliResult = Result<ExitStatus, CliError>;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Build, tag, push and promote a monorepo's container images"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Run as if ferry was started in DIR.
    #[arg(short = 'C', global = true, value_name = "DIR")]
    pub directory: Option<PathBuf>,
    /// The manifest, relative to the working directory.
    #[arg(
        short = 'f',
        long = "file",
        global = true,
        value_name = "FILE",
        default_value = "images.toml"
    )]
    pub file: PathBuf,
    /// The content store; default $FERRY_STORE, else $XDG_DATA_HOME/ferry.
    #[arg(long, global = true, value_name = "DIR", env = "FERRY_STORE")]
    pub store: Option<PathBuf>,
    /// How many images, steps and uploads run at once; default: the number of cores.
    #[arg(long, short = 'j', global = true, value_name = "N")]
    pub jobs: Option<usize>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Less output.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More output (-vv for debug logs).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// How build progress shows on stderr: `tty` (a live line per image), `plain` (every
    /// step and every line a RUN prints, prefixed `[image:line]`, as BuildKit's plain
    /// progress), `quiet`; default tty on a terminal, plain otherwise.
    #[arg(long, global = true, value_enum, value_name = "MODE")]
    pub progress: Option<ProgressMode>,
}

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    Tty,
    Plain,
    Quiet,
}

impl GlobalArgs {
    /// `--jobs`, default the number of cores.
    pub fn jobs(&self) -> usize {
        self.jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show what would be built, in which order, with which tags.
    Plan(plan::PlanArgs),
    /// Show the image graph.
    Graph(graph::GraphArgs),
    /// Build the fleet (or the named images and their ancestors).
    Build(build::BuildArgs),
    /// Fetch an image from a registry into the store.
    Pull(pull::PullArgs),
    /// List local images.
    Images(images::ImagesArgs),
    /// Show an image's digest, config, layers and sizes as JSON.
    Inspect(inspect::InspectArgs),
    /// Show an image's build steps.
    History(history::HistoryArgs),
    /// Give a local image another name.
    Tag(tag::TagArgs),
    /// Untag images; delete an image when its last name goes.
    Rmi(rmi::RmiArgs),
    /// Remove images and blobs nothing names.
    Prune(prune::PruneArgs),
    /// Write images to a docker (or OCI) archive.
    Save(save::SaveArgs),
    /// Read images from a docker or OCI archive.
    Load(load::LoadArgs),
    /// Store credentials for a registry in docker's config.json.
    Login(login::LoginArgs),
    /// Inspect and maintain the store.
    Cache(cache::CacheArgs),
    /// Build, upload and tag the images for an environment (tags move only once every image is uploaded).
    Push(push::PushArgs),
    /// Check the semantic-version policy (for CI): semver, release_only, bumps.
    Check(check::CheckArgs),
    /// Copy images from one environment to another by digest, then apply its tags.
    Promote(promote::PromoteArgs),
}

/// Parse arguments, run the command, print errors, return the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitStatus::Invalid.into()
            } else {
                ExitStatus::Success.into()
            };
        }
    };
    init_logging(&cli.global);
    // Long messages stay on one line: they are grepped by users and CI logs.
    let _ = miette::set_hook(Box::new(|_| {
        Box::new(miette::MietteHandlerOpts::new().wrap_lines(false).build())
    }));
    if let Some(dir) = &cli.global.directory {
        if let Err(e) = std::env::set_current_dir(dir) {
            eprintln!("error: cannot change to directory {}: {e}", dir.display());
            return ExitStatus::Invalid.into();
        }
    }
    let printer = Printer::new(&cli.global);
    match run(cli, &printer) {
        Ok(status) => status.into(),
        Err(err) => {
            printer.error(&err.report);
            err.status.into()
        }
    }
}

fn run(cli: Cli, printer: &Printer) -> CliResult {
    match cli.command {
        Command::Plan(args) => plan::run(&cli.global, args, printer),
        Command::Graph(args) => graph::run(&cli.global, args, printer),
        Command::Build(args) => build::run(&cli.global, args, printer),
        Command::Pull(args) => pull::run(&cli.global, args, printer),
        Command::Images(args) => images::run(&cli.global, args, printer),
        Command::Inspect(args) => inspect::run(&cli.global, args, printer),
        Command::History(args) => history::run(&cli.global, args, printer),
        Command::Tag(args) => tag::run(&cli.global, args, printer),
        Command::Rmi(args) => rmi::run(&cli.global, args, printer),
        Command::Prune(args) => prune::run(&cli.global, args, printer),
        Command::Save(args) => save::run(&cli.global, args, printer),
        Command::Load(args) => load::run(&cli.global, args, printer),
        Command::Login(args) => login::run(&cli.global, args, printer),
        Command::Cache(args) => cache::run(&cli.global, args, printer),
        Command::Push(args) => push::run(&cli.global, args, printer),
        Command::Check(args) => check::run(&cli.global, args, printer),
        Command::Promote(args) => promote::run(&cli.global, args, printer),
    }
}

fn init_logging(global: &GlobalArgs) {
    use tracing_subscriber::EnvFilter;
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // The TLS verifier logs every refused certificate as an error of its own; ferry reports
    // the same failure with the registry and what to do, so that line is only noise.
    let default = match global.verbose {
        0 | 1 => format!("{default},rustls_platform_verifier=off"),
        _ => default.to_string(),
    };
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
