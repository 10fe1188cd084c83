//! The `ferry` command line: parse, run one command, map the outcome to an exit code.

mod cli;

fn main() -> std::process::ExitCode {
    // The sandbox re-executes this binary as the init process of a RUN step; that path
    // must not go through argument parsing or logging set-up.
    if let Some(code) = ferry::sandbox::run_init_if_requested() {
        std::process::exit(code);
    }
    // Rootless with a subordinate id range: the whole command runs again inside a user
    // namespace with that range, where it is root (see `ferry::userns`).
    if let Some(code) = ferry::userns::reexec_if_rootless() {
        std::process::exit(code);
    }
    cli::main()
}
