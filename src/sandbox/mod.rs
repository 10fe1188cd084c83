//! RUN sandbox (DESIGN.md section 8).
//!
//! A RUN step executes in an overlay whose lower dirs are the image's extracted layers and
//! whose upper dir, fresh for the step, becomes the step's layer. [`Sandbox`] is the seam the
//! build engine calls; [`NamespaceSandbox`] is the real implementation (Linux namespaces,
//! overlayfs, pivot_root) and [`FakeSandbox`] a scripted one for unit tests of the executor.
//!
//! The upper dir a run leaves behind is a plain overlayfs diff: new and changed files as they
//! are, a deleted lower entry as a 0/0 character device, a directory that replaces a lower
//! one as a directory carrying the overlay "opaque" xattr (see [`OverlayXattrs`]). Nothing the
//! sandbox itself needed (mount points, `/dev`, `/proc`, resolv.conf, secrets, caches) is left
//! in it.

mod fake;
mod init;
mod namespace;
mod output;
mod protocol;
mod rootfs;
mod stubs;

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use fake::{FakeChange, FakeRun, FakeSandbox};
pub use namespace::NamespaceSandbox;
pub use output::OutputTail;

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
    Some(init::main())
}

/// Everything one RUN step needs. The build engine resolves the Dockerfile's words, the
/// stage's USER/WORKDIR/ENV and the `--mount`/`--network` flags into this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Extracted base layers, top-most first; empty for `FROM scratch`.
    pub lower_dirs: Vec<PathBuf>,
    /// Fresh and empty; after the run it holds the step's diff.
    pub upper_dir: PathBuf,
    /// The overlay work dir: empty, on the same filesystem as `upper_dir`.
    pub work_dir: PathBuf,
    /// The program and its arguments, already resolved (the shell form arrives as
    /// `["/bin/sh", "-c", cmd]`). A program without a `/` is looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The complete environment of the process.
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Absolute working directory inside the rootfs; created (and captured) if missing.
    pub cwd: String,
    pub network: Network,
    pub mounts: Vec<RunMount>,
    pub hostname: String,
}

/// `RUN --network=…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Network {
    /// Docker's default is a bridge; without a daemon to own one we share the host's network.
    #[default]
    Default,
    /// A fresh network namespace with only the loopback interface, up.
    None,
    /// The host's network.
    Host,
}

/// `RUN --mount=…`, resolved by the build engine. Targets are absolute paths in the rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunMount {
    /// A host file or directory (typically a build context or another stage's rootfs).
    Bind { source: PathBuf, target: String, readonly: bool },
    /// A persistent host directory from the store's cache area, mounted read-write.
    Cache { host_dir: PathBuf, target: String },
    /// A fresh tmpfs; `size` in bytes, `None` for the kernel's default.
    Tmpfs { target: String, size: Option<u64> },
    /// A read-only file holding `bytes`, kept in memory (a private tmpfs), never on disk.
    Secret { target: String, bytes: SecretBytes, mode: u32, uid: u32, gid: u32 },
}

impl RunMount {
    /// The absolute path inside the rootfs where this mount appears.
    pub fn target(&self) -> &str {
        match self {
            RunMount::Bind { target, .. }
            | RunMount::Cache { target, .. }
            | RunMount::Tmpfs { target, .. }
            | RunMount::Secret { target, .. } => target,
        }
    }
}

/// A secret's value. Its `Debug` form never shows the bytes, so a spec can be logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<secret: {} bytes>", self.0.len())
    }
}

/// How the RUN process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => {
                let name = nix::sys::signal::Signal::try_from(*signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {signal}"));
                write!(f, "killed by {name}")
            }
        }
    }
}

pub use crate::layer::{IdMapping, OverlayXattrs};

/// Whether an upper-dir entry is an overlayfs whiteout (a deleted lower entry): a character
/// device with device number 0/0.
pub fn is_whiteout(metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    metadata.file_type().is_char_device() && metadata.rdev() == 0
}

/// What a finished RUN step reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// The last lines of the combined stdout/stderr, for the error message of a failed step.
    pub output_tail: Vec<String>,
    /// How to read overlay metadata in the upper dir.
    pub xattrs: OverlayXattrs,
    /// How owners in the upper dir (as ferry sees them) translate to the image's, when the
    /// sandbox made a user namespace of its own: the host ids it mapped, as the container
    /// ids they were inside. Empty: the owners on disk are the image's already (as root,
    /// or in the user namespace of a rootless ferry).
    pub uid_map: Vec<IdMapping>,
    pub gid_map: Vec<IdMapping>,
    /// For a failed step, what may explain it: a rootless sandbox with only the caller's
    /// id mapped says so, and what to add to have more.
    pub note: Option<String>,
}

impl Default for RunOutcome {
    fn default() -> Self {
        RunOutcome {
            status: ExitStatus::Code(0),
            output_tail: Vec::new(),
            xattrs: OverlayXattrs::default(),
            uid_map: Vec::new(),
            gid_map: Vec::new(),
            note: None,
        }
    }
}

/// Runs RUN steps. `output` receives the process's stdout and stderr, interleaved as written.
pub trait Sandbox: Send + Sync {
    fn run(
        &self,
        spec: &RunSpec,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<RunOutcome, SandboxError>;
}

/// Why a RUN step could not be run (a step that ran and failed is a [`RunOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid RUN step: {0}")]
    InvalidSpec(String),

    #[error("cannot start the sandbox process {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "rootless RUN needs a user namespace, but the kernel refused to create one ({reason}); \
         run ferry as root, or allow unprivileged user namespaces"
    )]
    RootlessUnavailable { reason: String },

    #[error("setting up the RUN sandbox failed while trying to {step}: {message}")]
    Setup { step: String, message: String },

    #[error("cannot run {program:?}: {message}")]
    Exec { program: String, message: String },

    #[error("the RUN sandbox's init process ended unexpectedly ({status})")]
    InitDied { status: String },

    #[error("the RUN sandbox's init process sent an unexpected message: {0}")]
    Protocol(String),

    #[error("the fake sandbox could not apply {change}: {source}")]
    Fake {
        change: String,
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SandboxError::Io { context: context.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_bytes_never_show_in_debug() {
        let mount = RunMount::Secret {
            target: "/run/secrets/token".into(),
            bytes: SecretBytes(b"hunter2".to_vec()),
            mode: 0o400,
            uid: 0,
            gid: 0,
        };
        let shown = format!("{mount:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<secret: 7 bytes>"), "{shown}");
    }

    #[test]
    fn exit_status_display_names_signals() {
        assert_eq!(ExitStatus::Code(3).to_string(), "exit code 3");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by SIGKILL");
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(15).success());
    }
}
