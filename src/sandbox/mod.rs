//! RUN sandbox (DESIGN.md section 8).

/// The hidden first argument with which ferry re-executes itself as the sandbox's init
/// process. `main` hands such invocations here before any argument parsing.
pub const INIT_ARG: &str = "__ferry-sandbox-init";

/// If this process was started as the sandbox init, run it and return its exit code.
pub fn run_init_if_requested() -> Option<i32> {
    let mut args = std::env::args_os();
    let _exe = args.next();
    if args.next().as_deref() != Some(std::ffi::OsStr::new(INIT_ARG)) {
        return None;
    }
    // Filled in by the sandbox module.
    Some(125)
}
