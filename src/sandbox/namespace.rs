//! The real sandbox: Linux namespaces and overlayfs, run by ferry's own binary as init.

use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::output::OutputTail;
use super::protocol::{read_message, InitMessage, InitRequest, UserNamespace, GO};
use super::stubs::SetupResidue;
use super::{OverlayXattrs, RunOutcome, RunSpec, Sandbox, SandboxError, INIT_ARG};
use crate::userns::IdMaps;

/// Runs each RUN step in fresh mount, PID, UTS and IPC namespaces (and a network namespace for
/// `--network=none`), on an overlay of the image's layers.
///
/// As root, the command runs with docker's default capabilities and /proc masks. A rootless
/// ferry normally runs in a user namespace of its own with the caller's subordinate ids
/// (see [`crate::userns`]) as its root: the steps stay in it, every mapped id exists inside
/// and owners on disk are the image's. Without one (no range; or with
/// [`rootless_as`](Self::rootless_as)), each step makes a user namespace where the invoking
/// user is root and no other id exists: another `uid`/`gid` is a [`SandboxError::Setup`]
/// that says what to add, supplementary groups cannot be set, lower files owned by other
/// host users appear as `nobody`, and [`RunOutcome::uid_map`] says how to read the upper
/// dir's owners. Either way a rootless upper dir carries `user.` overlay xattrs
/// ([`RunOutcome::xattrs`]).
#[derive(Debug, Clone)]
pub struct NamespaceSandbox {
    init_exe: PathBuf,
    run_as: Option<(u32, u32)>,
    single_id_note: OnceLock<String>,
}

impl NamespaceSandbox {
    /// `init_exe` is the ferry binary (`std::env::current_exe()`), re-executed as the init.
    pub fn new(init_exe: impl Into<PathBuf>) -> Self {
        NamespaceSandbox {
            init_exe: init_exe.into(),
            run_as: None,
            single_id_note: OnceLock::new(),
        }
    }

    /// Runs the steps rootless as host user `uid`:`gid` even when ferry is root: the sandbox
    /// then has no privilege on the host at all, and only `uid`:`gid` exist inside, as 0:0.
    /// The layer, work and scratch directories must be writable by that user and the lower
    /// dirs readable.
    pub fn rootless_as(mut self, uid: u32, gid: u32) -> Self {
        self.run_as = Some((uid, gid));
        self
    }

    fn user_namespace(&self) -> UserNamespace {
        if self.run_as.is_some() {
            UserNamespace::SingleId
        } else if crate::userns::is_host_root() {
            UserNamespace::Host
        } else if nix::unistd::Uid::effective().is_root() {
            UserNamespace::Inherited
        } else {
            UserNamespace::SingleId
        }
    }

    /// The host ids a single-id sandbox maps to 0:0.
    fn own_ids(&self) -> (u32, u32) {
        self.run_as.unwrap_or_else(|| {
            (nix::unistd::Uid::effective().as_raw(), nix::unistd::Gid::effective().as_raw())
        })
    }

    /// When the steps will have only the caller's ids (a rootless ferry without a
    /// subordinate range): what that means and what to add. `None` when every id exists.
    pub fn rootless_note(&self) -> Option<String> {
        (self.user_namespace() == UserNamespace::SingleId).then(|| self.single_id_note())
    }

    fn single_id_note(&self) -> String {
        self.single_id_note
            .get_or_init(|| {
                let (uid, gid) = self.own_ids();
                let why = match crate::userns::subordinate_maps(uid, gid) {
                    Err(no_range) => no_range.to_string(),
                    Ok(_) => format!(
                        "the user has subordinate ids, but ferry runs without its user \
                         namespace ({}=off, or a test's rootless_as)",
                        crate::userns::USERNS_ENV
                    ),
                };
                format!(
                    "this rootless build maps only uid {uid} and gid {gid} into the RUN \
                     sandbox, as 0:0, so no other user or group exists there (USER, chown and \
                     files owned by others need them): {why}"
                )
            })
            .clone()
    }
}

impl Sandbox for NamespaceSandbox {
    fn run(
        &self,
        spec: &RunSpec,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<RunOutcome, SandboxError> {
        let spec = validated(spec)?;
        let user_namespace = self.user_namespace();
        let xattrs =
            if user_namespace.rootless() { OverlayXattrs::User } else { OverlayXattrs::Trusted };
        let id_note = (user_namespace == UserNamespace::SingleId).then(|| self.single_id_note());
        let scratch = Scratch::create(self.run_as, spec.work_dir.parent())?;
        let request = InitRequest {
            spec,
            rootfs: scratch.rootfs.clone(),
            empty_lower: scratch.empty_lower.clone(),
            secrets_staging: scratch.secrets.clone(),
            user_namespace,
            id_note: id_note.clone(),
        };
        let mut request_line = serde_json::to_vec(&request)
            .map_err(|e| SandboxError::Protocol(format!("cannot encode the request: {e}")))?;
        request_line.push(b'\n');

        let (control, init_control) = UnixStream::pair()
            .map_err(|e| SandboxError::io("cannot create the sandbox's control socket", e))?;
        let (mut output_reader, output_writer) = std::io::pipe()
            .map_err(|e| SandboxError::io("cannot create the sandbox's output pipe", e))?;
        let output_writer_2 = output_writer
            .try_clone()
            .map_err(|e| SandboxError::io("cannot create the sandbox's output pipe", e))?;
        crate::report::work::process_started();
        let mut command = Command::new(&self.init_exe);
        command
            .arg(INIT_ARG)
            .env_clear()
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(init_control)))
            .stdout(output_writer)
            .stderr(output_writer_2);
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        let mut child = command
            .spawn()
            .map_err(|source| SandboxError::Spawn { exe: self.init_exe.clone(), source })?;
        // The command holds our copies of the pipe's write end and the init's socket end;
        // they must be closed for end-of-file to arrive when the sandbox is gone.
        drop(command);
        tracing::debug!(argv = ?request.spec.argv, pid = child.id(), "RUN sandbox started");

        let upper = request.spec.upper_dir.clone();
        let mut tail = OutputTail::default();
        let (wait, control) = std::thread::scope(|scope| {
            let control_thread = scope.spawn(|| converse(control, &request_line, &upper));
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match output_reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        tail.push(&buf[..n]);
                        output(&buf[..n]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("reading the RUN output failed: {e}");
                        break;
                    }
                }
            }
            let wait = child.wait();
            let control = control_thread
                .join()
                .unwrap_or_else(|_| Conversation::broken("the control thread panicked"));
            (wait, control)
        });
        // The init has exited, so the overlay is unmounted: the upper dir may be edited now.
        let cleaned = match &control.residue {
            Some(residue) => residue.remove(&upper, &request.spec.lower_dirs, xattrs),
            // Set-up failed before the command could start: all the upper dir holds (it was
            // empty) is mount points.
            None => empty_dir(&upper),
        };
        cleaned.map_err(|e| {
            SandboxError::io(
                format!("cannot remove the sandbox's mount points from {}", upper.display()),
                e,
            )
        })?;
        let init_status = match wait {
            Ok(status) => status.to_string(),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        if let Some(error) = control.error {
            return Err(SandboxError::Protocol(error));
        }
        match control.end {
            Some(InitMessage::Exited { status }) => {
                let output_tail = tail.finish();
                tracing::debug!(%status, "RUN finished");
                let (uid_map, gid_map) = match user_namespace {
                    UserNamespace::SingleId => {
                        let maps = IdMaps::single(self.own_ids().0, self.own_ids().1);
                        (maps.uid, maps.gid)
                    }
                    UserNamespace::Host | UserNamespace::Inherited => (Vec::new(), Vec::new()),
                };
                Ok(RunOutcome { status, output_tail, xattrs, uid_map, gid_map, note: id_note })
            }
            Some(InitMessage::RootlessRefused { reason }) => {
                Err(SandboxError::RootlessUnavailable { reason })
            }
            Some(InitMessage::Failed { step, message }) => {
                Err(SandboxError::Setup { step, message })
            }
            Some(InitMessage::ExecFailed { program, message }) => {
                Err(SandboxError::Exec { program, message })
            }
            Some(InitMessage::Ready) | None => Err(SandboxError::InitDied { status: init_status }),
        }
    }
}

/// What the control thread learnt from the init.
struct Conversation {
    /// What set-up left in the upper dir, once the init was ready.
    residue: Option<SetupResidue>,
    /// The init's final word.
    end: Option<InitMessage>,
    error: Option<String>,
}

impl Conversation {
    fn broken(error: &str) -> Self {
        Conversation { residue: None, end: None, error: Some(error.to_string()) }
    }
}

/// Sends the request, records the set-up residue at `Ready` and lets the init go on, then
/// waits for the final message. Returns at end of stream, i.e. once the init is gone.
fn converse(control: UnixStream, request_line: &[u8], upper: &Path) -> Conversation {
    let mut conversation = Conversation { residue: None, end: None, error: None };
    let mut writer = &control;
    if let Err(e) = writer.write_all(request_line) {
        // The init died before reading; its exit status tells more.
        tracing::debug!("cannot send the RUN request: {e}");
    }
    let mut reader = BufReader::new(&control);
    loop {
        match read_message(&mut reader) {
            Ok(None) => break,
            Ok(Some(InitMessage::Ready)) if conversation.residue.is_none() => {
                match SetupResidue::record(upper) {
                    Ok(residue) => {
                        conversation.residue = Some(residue);
                        if let Err(e) = writer.write_all(&[GO]) {
                            tracing::debug!("cannot tell the sandbox to go on: {e}");
                        }
                    }
                    Err(e) => {
                        conversation.error = Some(format!(
                            "cannot record the mount points in {}: {e}",
                            upper.display()
                        ));
                        // Without a record we could not clean up: the init must not run the
                        // command. Closing our side ends its wait.
                        let _ = control.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            Ok(Some(message)) => {
                if conversation.end.is_none() {
                    conversation.end = Some(message);
                }
            }
            Err(e) => {
                conversation.error.get_or_insert(e);
                break;
            }
        }
    }
    conversation
}

fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// The spec with its directories made absolute and checked.
fn validated(spec: &RunSpec) -> Result<RunSpec, SandboxError> {
    let invalid = |m: String| Err(SandboxError::InvalidSpec(m));
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return invalid("the command is empty".into());
    }
    if !spec.cwd.starts_with('/') {
        return invalid(format!("the working directory {:?} is not an absolute path", spec.cwd));
    }
    for mount in &spec.mounts {
        if !mount.target().starts_with('/') {
            return invalid(format!(
                "the mount target {:?} is not an absolute path",
                mount.target()
            ));
        }
        if Path::new(mount.target()).components().count() < 2 {
            return invalid("a mount on / is not allowed".into());
        }
    }
    for (key, _) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return invalid(format!("invalid environment variable name {key:?}"));
        }
    }
    if spec.hostname.len() > 64 {
        return invalid(format!("the hostname {:?} is longer than 64 bytes", spec.hostname));
    }
    let layer_dir = |what: &str, path: &Path| -> Result<PathBuf, SandboxError> {
        let absolute = path.canonicalize().map_err(|e| {
            SandboxError::io(format!("the {what} {} is not usable", path.display()), e)
        })?;
        if !absolute.is_dir() {
            return Err(SandboxError::InvalidSpec(format!(
                "the {what} {} is not a directory",
                path.display()
            )));
        }
        // The overlay's option string separates with these and cannot escape them all.
        if absolute.to_string_lossy().contains([',', ':', '\\', '\n']) {
            return Err(SandboxError::InvalidSpec(format!(
                "the {what} {} contains ',', ':', '\\' or a newline, which overlayfs cannot take",
                absolute.display()
            )));
        }
        Ok(absolute)
    };
    let mut checked = spec.clone();
    checked.lower_dirs = spec
        .lower_dirs
        .iter()
        .map(|dir| layer_dir("layer directory", dir))
        .collect::<Result<_, _>>()?;
    checked.upper_dir = layer_dir("upper directory", &spec.upper_dir)?;
    checked.work_dir = layer_dir("overlay work directory", &spec.work_dir)?;
    let upper_is_empty = std::fs::read_dir(&checked.upper_dir)
        .map_err(|e| SandboxError::io(format!("cannot read {}", checked.upper_dir.display()), e))?
        .next()
        .is_none();
    if !upper_is_empty {
        return invalid(format!(
            "the upper directory {} is not empty",
            checked.upper_dir.display()
        ));
    }
    Ok(checked)
}

/// Directories the init needs for one run, removed afterwards.
struct Scratch {
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    empty_lower: PathBuf,
    secrets: PathBuf,
}

impl Scratch {
    /// In `near` (the work dir's parent: with ferry's store, a directory a crash of ferry
    /// does not leave behind), else (or if that fails) in the system's temporary directory.
    fn create(owner: Option<(u32, u32)>, near: Option<&Path>) -> Result<Self, SandboxError> {
        let io = |e| SandboxError::io("cannot create the sandbox's scratch directory", e);
        let mut builder = tempfile::Builder::new();
        builder.prefix("ferry-run-");
        let dir = match near.filter(|p| !p.as_os_str().is_empty()) {
            Some(near) => builder.tempdir_in(near).or_else(|_| builder.tempdir()),
            None => builder.tempdir(),
        }
        .map_err(io)?;
        let rootfs = dir.path().join("rootfs");
        let empty_lower = dir.path().join("empty");
        let secrets = dir.path().join("secrets");
        for path in [&rootfs, &empty_lower, &secrets] {
            std::fs::create_dir(path).map_err(io)?;
        }
        if let Some((uid, gid)) = owner {
            for path in [dir.path(), &rootfs, &empty_lower, &secrets] {
                chown(path, Some(uid), Some(gid)).map_err(io)?;
            }
        }
        // The empty lower dir is the root directory of a FROM scratch image.
        std::fs::set_permissions(&empty_lower, std::fs::Permissions::from_mode(0o755))
            .map_err(io)?;
        Ok(Scratch { _dir: dir, rootfs, empty_lower, secrets })
    }
}
