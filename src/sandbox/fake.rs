//! A scripted sandbox for unit tests of the build executor: it records the specs it is given
//! and writes scripted changes into the upper dir in overlayfs's format, without running
//! anything.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{ExitStatus, OverlayXattrs, RunOutcome, RunSpec, Sandbox, SandboxError};
use crate::sandbox::output::OutputTail;

/// One change to the rootfs, as overlayfs records it in the upper dir. Paths are absolute
/// paths in the rootfs; missing parent directories are created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeChange {
    /// A new or rewritten file.
    File { path: String, contents: Vec<u8>, mode: u32 },
    /// A new directory.
    Dir { path: String },
    /// A deleted lower entry: a 0/0 character device.
    Delete { path: String },
    /// A directory that replaces a lower one and hides all it contained.
    OpaqueDir { path: String },
}

/// What one scripted run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRun {
    pub changes: Vec<FakeChange>,
    pub status: ExitStatus,
    pub output: Vec<u8>,
}

impl Default for FakeRun {
    fn default() -> Self {
        FakeRun { changes: Vec::new(), status: ExitStatus::Code(0), output: Vec::new() }
    }
}

/// Plays scripted runs in order; once they are used up, every run succeeds and changes
/// nothing.
#[derive(Debug)]
pub struct FakeSandbox {
    script: Mutex<VecDeque<FakeRun>>,
    received: Mutex<Vec<RunSpec>>,
    xattrs: OverlayXattrs,
}

impl Default for FakeSandbox {
    fn default() -> Self {
        FakeSandbox::new()
    }
}

impl FakeSandbox {
    pub fn new() -> Self {
        // Marks opaque directories the way the real sandbox would as this user.
        let xattrs = OverlayXattrs::native();
        FakeSandbox {
            script: Mutex::new(VecDeque::new()),
            received: Mutex::new(Vec::new()),
            xattrs,
        }
    }

    /// Queues the next run's behaviour.
    pub fn push_run(&self, run: FakeRun) {
        lock(&self.script).push_back(run);
    }

    /// The specs received so far, in order.
    pub fn received(&self) -> Vec<RunSpec> {
        lock(&self.received).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not hide what was recorded from the others.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sandbox for FakeSandbox {
    fn run(
        &self,
        spec: &RunSpec,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<RunOutcome, SandboxError> {
        lock(&self.received).push(spec.clone());
        let run = lock(&self.script).pop_front().unwrap_or_default();
        for change in &run.changes {
            apply(&spec.upper_dir, change, self.xattrs)
                .map_err(|source| SandboxError::Fake { change: format!("{change:?}"), source })?;
        }
        if !run.output.is_empty() {
            output(&run.output);
        }
        let mut tail = OutputTail::default();
        tail.push(&run.output);
        Ok(RunOutcome {
            status: run.status,
            output_tail: tail.finish(),
            xattrs: self.xattrs,
            ..RunOutcome::default()
        })
    }
}

fn apply(upper: &Path, change: &FakeChange, xattrs: OverlayXattrs) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let in_upper = |path: &str| -> PathBuf { upper.join(path.trim_start_matches('/')) };
    let with_parent = |path: &Path| -> std::io::Result<()> {
        match path.parent() {
            Some(parent) => std::fs::create_dir_all(parent),
            None => Ok(()),
        }
    };
    match change {
        FakeChange::File { path, contents, mode } => {
            let path = in_upper(path);
            with_parent(&path)?;
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
        }
        FakeChange::Dir { path } => std::fs::create_dir_all(in_upper(path)),
        FakeChange::Delete { path } => {
            let path = in_upper(path);
            with_parent(&path)?;
            // Creating a 0/0 character device needs no privilege since Linux 5.8.
            nix::sys::stat::mknod(
                &path,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .map_err(std::io::Error::from)
        }
        FakeChange::OpaqueDir { path } => {
            let path = in_upper(path);
            std::fs::create_dir_all(&path)?;
            xattr::set(&path, xattrs.opaque_name(), b"y")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{is_whiteout, Network};

    fn spec(upper: &Path) -> RunSpec {
        RunSpec {
            lower_dirs: vec![],
            upper_dir: upper.to_path_buf(),
            work_dir: upper.to_path_buf(),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec![],
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            cwd: "/".into(),
            network: Network::Default,
            mounts: vec![],
            hostname: "x".into(),
        }
    }

    #[test]
    fn applies_scripted_changes_in_overlay_format() {
        let upper = tempfile::tempdir().unwrap();
        let sandbox = FakeSandbox::new();
        sandbox.push_run(FakeRun {
            changes: vec![
                FakeChange::File {
                    path: "/etc/motd".into(),
                    contents: b"hi".to_vec(),
                    mode: 0o644,
                },
                FakeChange::Dir { path: "/srv".into() },
                FakeChange::Delete { path: "/bin/old".into() },
                FakeChange::OpaqueDir { path: "/var/lib".into() },
            ],
            status: ExitStatus::Code(3),
            output: b"line one\nline two\n".to_vec(),
        });
        let mut seen = Vec::new();
        let outcome = sandbox.run(&spec(upper.path()), &mut |b| seen.extend_from_slice(b)).unwrap();
        assert_eq!(outcome.status, ExitStatus::Code(3));
        assert_eq!(outcome.output_tail, vec!["line one", "line two"]);
        assert_eq!(seen, b"line one\nline two\n");
        let u = upper.path();
        assert_eq!(std::fs::read(u.join("etc/motd")).unwrap(), b"hi");
        assert!(u.join("srv").is_dir());
        assert!(is_whiteout(&std::fs::symlink_metadata(u.join("bin/old")).unwrap()));
        assert!(outcome.xattrs.is_opaque_dir(&u.join("var/lib")).unwrap());
        assert_eq!(sandbox.received(), vec![spec(upper.path())]);
    }

    #[test]
    fn unscripted_runs_succeed_and_change_nothing() {
        let upper = tempfile::tempdir().unwrap();
        let sandbox = FakeSandbox::default();
        let outcome = sandbox.run(&spec(upper.path()), &mut |_| {}).unwrap();
        assert!(outcome.status.success());
        assert!(std::fs::read_dir(upper.path()).unwrap().next().is_none());
        assert_eq!(sandbox.received().len(), 1);
    }
}
