//! The `ferry` command line: parse, run one command, map the outcome to an exit code.

mod cli;

fn main() -> std::process::ExitCode {
    // The sandbox re-executes this binary as the init process of a RUN step; that path
    // must not go through argument parsing or logging set-up.
    if let Some(code) = ferry::sandbox::run_init_if_requested() {
        std::process::exit(code);
    }
    cli::main()
}
