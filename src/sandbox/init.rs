//! The sandbox's init: ferry re-executed as `ferry __ferry-sandbox-init`.
//!
//! Being a fresh, single-threaded process is what makes `fork` after `unshare` safe here
//! (ferry itself runs thread pools). Three processes take part:
//!
//! * the *outer init* reads the [`InitRequest`] from its stdin (a socket to ferry), enters a
//!   user namespace when not root, unshares the mount, PID, UTS, IPC (and network)
//!   namespaces and forks;
//! * its child is *PID 1* of the new PID namespace: it builds the rootfs (overlay, /proc,
//!   /dev, /sys, resolv.conf, hosts, the RUN mounts), reports `Ready`, waits for ferry's go,
//!   pivots into the rootfs, creates the working directory, forks the RUN process and reaps
//!   every orphan until that process ends. Its exit then kills whatever is left in the
//!   namespace, and the namespace's mounts die with it;
//! * the *RUN process* drops capabilities and ids, and execs the command.
//!
//! stdout and stderr of all three are ferry's output pipe; none of them writes to it, so
//! only the command's output reaches it. Everything else goes over the control socket.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{self, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::{umask, Mode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid};

use super::protocol::{
    read_message_line, write_message, InitMessage, InitRequest, UserNamespace, GO,
};
use super::rootfs::{ensure_in_root, TargetKind};
use super::{ExitStatus, Network, RunMount};

/// Exit code of an init that could not run the command (docker uses 125 for the same).
const SETUP_FAILED: i32 = 125;
/// Exit code of the RUN process when exec failed.
const EXEC_FAILED: i32 = 127;

/// The limit on the overlay mount's option string: one page, with its terminating NUL.
const MOUNT_OPTIONS_LIMIT: usize = 4095;

/// Docker's default capability set for a container's root: a RUN step as root gets these
/// and nothing more (no CAP_SYS_ADMIN, so it cannot undo the sandbox's mounts).
const DEFAULT_CAPABILITIES: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// /proc entries docker hides (they leak host information or are host-wide knobs)...
const MASKED_PROC_PATHS: [&str; 9] = [
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
];
/// ...and those it makes read-only.
const READONLY_PROC_PATHS: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];

/// Device nodes bound from the host into the sandbox's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The PATH docker gives a process whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A failed set-up step: what was being done, and why it failed.
struct StepError {
    step: String,
    message: String,
}

fn step_error(step: impl Into<String>) -> impl FnOnce(Errno) -> StepError {
    let step = step.into();
    move |errno| StepError { step, message: errno.desc().to_string() }
}

fn step_failed(step: impl Into<String>, message: impl Into<String>) -> StepError {
    StepError { step: step.into(), message: message.into() }
}

/// The control socket, shared by the three processes; close-on-exec so the command never
/// sees it.
struct Control {
    socket: File,
}

impl Control {
    fn send(&self, message: &InitMessage) {
        // If ferry has gone away there is nobody to tell; PR_SET_PDEATHSIG ends us anyway.
        let _ = write_message(&mut &self.socket, message);
    }

    fn fail(&self, error: StepError) -> i32 {
        self.send(&InitMessage::Failed { step: error.step, message: error.message });
        SETUP_FAILED
    }
}

pub fn main() -> i32 {
    let control = match take_control_socket() {
        Ok(socket) => Control { socket },
        // Without the socket there is no one to report to.
        Err(_) => return SETUP_FAILED,
    };
    let request: InitRequest = {
        let mut reader = BufReader::new(&control.socket);
        match read_message_line(&mut reader) {
            Ok(Some(line)) => match serde_json::from_str(&line) {
                Ok(request) => request,
                Err(e) => {
                    return control.fail(step_failed("read the RUN specification", e.to_string()))
                }
            },
            Ok(None) => return SETUP_FAILED,
            Err(e) => return control.fail(step_failed("read the RUN specification", e)),
        }
    };
    outer_init(&control, &request)
}

/// Moves the control socket off fd 0 (to a close-on-exec descriptor) and puts /dev/null
/// there: a RUN command reads no input, as under docker.
fn take_control_socket() -> nix::Result<File> {
    // SAFETY: fd 0 is open for the duration of this call: ferry started us with the socket
    // there.
    let socket = nix::fcntl::fcntl(
        unsafe { std::os::fd::BorrowedFd::borrow_raw(0) },
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3),
    )?;
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    unistd::dup2_stdin(&null)?;
    drop(null);
    // A descriptor some library of ferry leaked without close-on-exec would live as long as
    // the sandbox (and keep, say, another step's output pipe from ending): close them all.
    close_inherited_descriptors(socket);
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(socket) }))
}

fn close_inherited_descriptors(keep: i32) {
    let open: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
        Err(_) => return,
    };
    for fd in open {
        if fd > 2 && fd != keep {
            // SAFETY: nothing in this fresh process owns these descriptors (the directory
            // listing's own one is already closed; closing it again only fails).
            unsafe { libc::close(fd) };
        }
    }
}

fn outer_init(control: &Control, request: &InitRequest) -> i32 {
    // If ferry dies, so does the sandbox (PID 1 follows us the same way).
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    let rootless = request.user_namespace.rootless();
    if request.user_namespace == UserNamespace::SingleId {
        if let Err(reason) = enter_user_namespace() {
            control.send(&InitMessage::RootlessRefused { reason });
            return SETUP_FAILED;
        }
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if request.spec.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(e) = unshare(flags) {
        return control.fail(step_failed(
            "create the mount, PID, UTS, IPC and network namespaces",
            format!("{}{}", e.desc(), if e == Errno::EPERM && !rootless {
                " (ferry runs as root but lacks CAP_SYS_ADMIN, as inside an unprivileged container)"
            } else {
                ""
            }),
        ));
    }
    // Nothing mounted from here on may propagate back to the host.
    if let Err(e) =
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
    {
        return control.fail(step_error("make the sandbox's mounts private")(e));
    }
    // SAFETY: this process is single-threaded (a fresh exec of ferry that started no threads).
    match unsafe { unistd::fork() } {
        Err(e) => control.fail(step_error("fork the sandbox's PID 1")(e)),
        Ok(ForkResult::Child) => std::process::exit(pid1(control, request)),
        Ok(ForkResult::Parent { child }) => match wait_for(child) {
            Some(ExitStatus::Code(code)) => code,
            Some(ExitStatus::Signal(signal)) => 128 + signal,
            None => SETUP_FAILED,
        },
    }
}

fn wait_for(child: Pid) -> Option<ExitStatus> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Some(ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                return Some(ExitStatus::Signal(signal as i32))
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

/// Maps the caller's uid and gid to 0 in a new user namespace.
fn enter_user_namespace() -> Result<(), String> {
    let uid = Uid::effective();
    let gid = Gid::effective();
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
        return Err(user_namespace_refusal(e));
    }
    let write = |file: &str, content: String| {
        std::fs::write(file, content.as_bytes()).map_err(|e| {
            format!(
                "writing {file} failed: {e}{}",
                restriction_hint().map(|h| format!("; {h}")).unwrap_or_default()
            )
        })
    };
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    // An unprivileged process may map its gid only after giving up setgroups(2).
    write("/proc/self/setgroups", "deny\n".to_string())?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))?;
    Ok(())
}

fn user_namespace_refusal(errno: Errno) -> String {
    let mut reason = format!("unshare(CLONE_NEWUSER): {}", errno.desc());
    if let Some(hint) = restriction_hint() {
        reason.push_str("; ");
        reason.push_str(&hint);
    } else if errno == Errno::ENOSPC {
        reason.push_str("; the limit on user namespaces (user.max_user_namespaces) is reached");
    } else if errno == Errno::EPERM {
        reason.push_str(
            "; no sysctl forbids it, so a seccomp filter (as in a container) or a chroot does",
        );
    }
    reason
}

/// The sysctl that forbids unprivileged user namespaces on this machine, if one does.
fn restriction_hint() -> Option<String> {
    let read = |path: &str| std::fs::read_to_string(path).ok().map(|s| s.trim().to_string());
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Some("the sysctl kernel.unprivileged_userns_clone is 0".into());
    }
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Some("the sysctl user.max_user_namespaces is 0".into());
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return Some(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns = 1)"
                .into(),
        );
    }
    None
}

fn pid1(control: &Control, request: &InitRequest) -> i32 {
    let rootless = request.user_namespace.rootless();
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Mount points and the working directory get docker's modes whatever ferry's umask.
    umask(Mode::from_bits_truncate(0o022));
    let spec = &request.spec;
    if let Err(error) = build_rootfs(request, rootless) {
        return control.fail(error);
    }
    if !spec.hostname.is_empty() {
        if let Err(e) = unistd::sethostname(&spec.hostname) {
            return control.fail(step_error(format!("set the hostname {:?}", spec.hostname))(e));
        }
    }
    if spec.network == Network::None {
        if let Err(e) = loopback_up() {
            return control.fail(step_failed("bring up the loopback interface", e.to_string()));
        }
    }

    control.send(&InitMessage::Ready);
    let mut go = [0u8; 1];
    match (&control.socket).read(&mut go) {
        Ok(1) if go[0] == GO => {}
        // ferry gave up (its side closed or sent something else): do not run anything.
        _ => return SETUP_FAILED,
    }

    if let Err(error) = pivot_into(&request.rootfs) {
        return control.fail(error);
    }
    if let Err(message) = ensure_in_root(Path::new("/"), &spec.cwd, TargetKind::Dir) {
        return control
            .fail(step_failed(format!("create the working directory {}", spec.cwd), message));
    }

    // SAFETY: single-threaded, see `outer_init`.
    let child = match unsafe { unistd::fork() } {
        Err(e) => return control.fail(step_error("fork the RUN process")(e)),
        Ok(ForkResult::Child) => {
            let error = exec_command(request);
            control.send(&error);
            // SAFETY: _exit skips destructors and atexit handlers of the copied process image.
            unsafe { libc::_exit(EXEC_FAILED) }
        }
        Ok(ForkResult::Parent { child }) => child,
    };

    // As PID 1 we inherit every orphan of the namespace; reap them until the command ends.
    let status = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => break ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                break ExitStatus::Signal(signal as i32)
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return control.fail(step_error("wait for the RUN process")(e)),
        }
    };
    control.send(&InitMessage::Exited { status });
    0
}

/// Mounts the overlay and everything the command sees beside the image.
fn build_rootfs(request: &InitRequest, rootless: bool) -> Result<(), StepError> {
    let spec = &request.spec;
    let rootfs = &request.rootfs;
    mount_overlay(request, rootless)?;
    mount_proc(rootfs)?;
    mount_dev(rootfs, rootless && !id_mapped("gid_map", 5))?;
    mount_sys(rootfs)?;
    mask_proc(rootfs)?;
    for file in ["/etc/resolv.conf", "/etc/hosts"] {
        // A host without the file gives the sandbox none either; the image's own, if any,
        // then shows through.
        if Path::new(file).exists() {
            let target = ensure(rootfs, file, TargetKind::File)?;
            bind(Path::new(file), &target, false)?;
            remount_readonly(&target, MsFlags::empty())?;
        }
    }

    // Parents before children, so that a mount inside another lands on top of it.
    let mut mounts: Vec<&RunMount> = spec.mounts.iter().collect();
    mounts.sort_by_key(|m| Path::new(m.target()).components().count());
    let mut secrets_mounted = false;
    for (index, run_mount) in mounts.into_iter().enumerate() {
        match run_mount {
            RunMount::Bind { source, target, readonly } => {
                let kind = target_kind_of(source)?;
                let target = ensure(rootfs, target, kind)?;
                bind(source, &target, true)?;
                // nodev: a device node in the source, or one the step makes, stays closed.
                if *readonly {
                    remount_readonly(&target, MsFlags::MS_NODEV)?;
                } else {
                    remount_bind(&target, MsFlags::MS_NODEV)?;
                }
            }
            RunMount::Cache { host_dir, target } => {
                if !host_dir.is_dir() {
                    return Err(step_failed(
                        format!("mount the cache {}", host_dir.display()),
                        "it is not a directory",
                    ));
                }
                let target = ensure(rootfs, target, TargetKind::Dir)?;
                bind(host_dir, &target, true)?;
                remount_bind(&target, MsFlags::MS_NODEV)?;
            }
            RunMount::Tmpfs { target, size } => {
                let host = ensure(rootfs, target, TargetKind::Dir)?;
                let data = size.map(|bytes| format!("size={bytes}"));
                mount(
                    Some("tmpfs"),
                    &host,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    data.as_deref(),
                )
                .map_err(step_error(format!("mount a tmpfs on {target}")))?;
            }
            RunMount::Secret { target, bytes, mode, uid, gid } => {
                if !secrets_mounted {
                    // Secret values live in memory only: a tmpfs no one else can see.
                    mount(
                        Some("tmpfs"),
                        &request.secrets_staging,
                        Some("tmpfs"),
                        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                        Some("mode=0700,size=16m"),
                    )
                    .map_err(step_error("mount the in-memory secrets store"))?;
                    secrets_mounted = true;
                }
                let step = || format!("provide the secret at {target}");
                let staged = request.secrets_staging.join(index.to_string());
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&staged)
                    .map_err(|e| step_failed(step(), e.to_string()))?;
                file.write_all(&bytes.0).map_err(|e| step_failed(step(), e.to_string()))?;
                unistd::fchown(&file, Some(Uid::from_raw(*uid)), Some(Gid::from_raw(*gid)))
                    .map_err(|e| {
                        step_failed(
                            step(),
                            format!(
                                "cannot give it to {uid}:{gid}: {}{}",
                                e.desc(),
                                unmapped_note(request, e)
                            ),
                        )
                    })?;
                file.set_permissions(std::fs::Permissions::from_mode(*mode & 0o7777))
                    .map_err(|e| step_failed(step(), e.to_string()))?;
                drop(file);
                let host = ensure(rootfs, target, TargetKind::File)?;
                bind(&staged, &host, false)?;
                remount_readonly(
                    &host,
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                )?;
            }
        }
    }
    if secrets_mounted {
        // The bind mounts keep the files alive; the staging mount itself is no longer needed.
        umount2(&request.secrets_staging, MntFlags::MNT_DETACH)
            .map_err(step_error("detach the secrets store"))?;
    }
    Ok(())
}

fn ensure(rootfs: &Path, target: &str, kind: TargetKind) -> Result<PathBuf, StepError> {
    ensure_in_root(rootfs, target, kind)
        .map_err(|message| step_failed(format!("prepare the mount point {target}"), message))
}

fn target_kind_of(source: &Path) -> Result<TargetKind, StepError> {
    match std::fs::metadata(source) {
        Ok(meta) if meta.is_dir() => Ok(TargetKind::Dir),
        Ok(_) => Ok(TargetKind::File),
        Err(e) => Err(step_failed(format!("bind-mount {}", source.display()), e.to_string())),
    }
}

/// Mounts the overlay on `request.rootfs`.
fn mount_overlay(request: &InitRequest, rootless: bool) -> Result<(), StepError> {
    let spec = &request.spec;
    let lowers: Vec<&Path> = if spec.lower_dirs.is_empty() {
        vec![request.empty_lower.as_path()]
    } else {
        spec.lower_dirs.iter().map(PathBuf::as_path).collect()
    };
    let (base, options) = overlay_options(&lowers, &spec.upper_dir, &spec.work_dir, rootless)
        .map_err(|message| step_failed("mount the overlay", message))?;
    unistd::chdir(&base).map_err(step_error(format!("enter {}", base.display())))?;
    // nodev, as docker's device cgroup would: root may make a device node (the layer keeps
    // it) or find one in a base image's layers, but cannot open it and reach a host device.
    // setuid programs keep working (no nosuid), as in docker.
    mount(
        Some("overlay"),
        &request.rootfs,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| {
        step_failed(
            "mount the overlay",
            format!(
                "{} ({} lower dirs; options {options:?} in {})",
                e.desc(),
                lowers.len(),
                base.display()
            ),
        )
    })?;
    unistd::chdir("/").map_err(step_error("leave the layer directory"))?;
    Ok(())
}

/// The overlay's mount options, and the directory they are relative to. The layer dirs are
/// given relative to their common parent (the working directory during the mount) so that
/// many layers fit in the one page the kernel takes.
fn overlay_options(
    lowers: &[&Path],
    upper: &Path,
    work: &Path,
    rootless: bool,
) -> Result<(PathBuf, String), String> {
    let mut all: Vec<&Path> = lowers.to_vec();
    all.push(upper);
    all.push(work);
    let base = common_parent(&all);
    let relative = |path: &Path| -> String {
        let rel = path.strip_prefix(&base).unwrap_or(path);
        if rel.as_os_str().is_empty() {
            ".".to_string()
        } else {
            rel.display().to_string()
        }
    };
    let mut options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.iter().map(|p| relative(p)).collect::<Vec<_>>().join(":"),
        relative(upper),
        relative(work),
    );
    // The upper dir must stay a plain diff: no index, no redirect xattrs (a renamed lower
    // directory is copied instead; lower dirs are extracted layers and have none to follow,
    // and `userxattr` forbids following them), no metadata-only copy-ups.
    options.push_str(",index=off,redirect_dir=nofollow,metacopy=off");
    if rootless {
        options.push_str(",userxattr");
    }
    if options.len() > MOUNT_OPTIONS_LIMIT {
        return Err(format!(
            "{} lower dirs need {} bytes of mount options, more than the kernel's {}; \
             keep the layer directories under one short parent",
            lowers.len(),
            options.len(),
            MOUNT_OPTIONS_LIMIT
        ));
    }
    Ok((base, options))
}

/// The longest common ancestor of absolute paths.
fn common_parent(paths: &[&Path]) -> PathBuf {
    let mut common: Vec<Component> = match paths.first() {
        Some(first) => first.components().collect(),
        None => return PathBuf::from("/"),
    };
    for path in &paths[1..] {
        let shared = common.iter().zip(path.components()).take_while(|(a, b)| *a == b).count();
        common.truncate(shared);
    }
    let joined: PathBuf = common.into_iter().collect();
    if joined.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        joined
    }
}

fn mount_proc(rootfs: &Path) -> Result<(), StepError> {
    let target = ensure(rootfs, "/proc", TargetKind::Dir)?;
    mount(
        Some("proc"),
        &target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step_error("mount /proc"))
}

/// `without_tty_group`: gid 5 (tty) does not exist in the sandbox's user namespace.
fn mount_dev(rootfs: &Path, without_tty_group: bool) -> Result<(), StepError> {
    let dev = ensure(rootfs, "/dev", TargetKind::Dir)?;
    // nodev: only the devices bound below open (each bind keeps the host mount's flags).
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(step_error("mount a tmpfs on /dev"))?;
    // Device nodes are bound from the host rather than created: mknod is not allowed in a
    // user namespace, and a bind works the same for both modes.
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        File::create(&target)
            .map_err(|e| step_failed(format!("create /dev/{name}"), e.to_string()))?;
        bind(&host, &target, false)?;
    }
    let pts = dev.join("pts");
    std::fs::create_dir(&pts).map_err(|e| step_failed("create /dev/pts", e.to_string()))?;
    let pts_options = if without_tty_group {
        "newinstance,ptmxmode=0666,mode=0620"
    } else {
        "newinstance,ptmxmode=0666,mode=0620,gid=5"
    };
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(pts_options),
    )
    .map_err(step_error("mount /dev/pts"))?;
    let shm = dev.join("shm");
    std::fs::create_dir(&shm).map_err(|e| step_failed("create /dev/shm", e.to_string()))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(step_error("mount /dev/shm"))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        symlink(target, dev.join(link))
            .map_err(|e| step_failed(format!("create /dev/{link}"), e.to_string()))?;
    }
    Ok(())
}

/// A read-only /sys, as docker gives. Mounting sysfs needs a network namespace of one's own
/// when in a user namespace; otherwise the host's is bound (read-only at its top).
fn mount_sys(rootfs: &Path) -> Result<(), StepError> {
    let target = ensure(rootfs, "/sys", TargetKind::Dir)?;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mount(Some("sysfs"), &target, Some("sysfs"), flags, None::<&str>) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => {
            bind(Path::new("/sys"), &target, true)?;
            remount_readonly(&target, MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC)
        }
        Err(e) => Err(step_error("mount /sys")(e)),
    }
}

fn mask_proc(rootfs: &Path) -> Result<(), StepError> {
    let proc = rootfs.join("proc");
    for name in MASKED_PROC_PATHS {
        let path = proc.join(name);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                mount(Some("tmpfs"), &path, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=0"))
                    .map_err(step_error(format!("hide /proc/{name}")))?
            }
            Ok(_) => bind(Path::new("/dev/null"), &path, false)?,
            Err(_) => continue,
        }
    }
    for name in READONLY_PROC_PATHS {
        let path = proc.join(name);
        if path.exists() {
            bind(&path, &path, true)?;
            remount_readonly(&path, MsFlags::empty())?;
        }
    }
    Ok(())
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<(), StepError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| {
        step_failed(format!("bind-mount {} on {}", source.display(), target.display()), e.desc())
    })
}

/// Makes a bind mount read-only. The flags the mount already has are kept: in a user
/// namespace, dropping a flag such as nosuid that the host mount carries is refused.
fn remount_readonly(target: &Path, extra: MsFlags) -> Result<(), StepError> {
    remount_bind(target, MsFlags::MS_RDONLY | extra)
}

/// Adds `extra` to a bind mount's flags, keeping those it has (see [`remount_readonly`]).
fn remount_bind(target: &Path, extra: MsFlags) -> Result<(), StepError> {
    let step = || format!("restrict the mount {}", target.display());
    let stat = nix::sys::statvfs::statvfs(target).map_err(|e| step_failed(step(), e.desc()))?;
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra;
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if stat.flags().contains(fs) {
            flags |= ms;
        }
    }
    // Neither noatime nor relatime: the mount has strictatime, which a remount must name
    // (left out, the kernel picks relatime, and a user namespace refuses that change).
    if !stat.flags().intersects(FsFlags::ST_NOATIME | FsFlags::ST_RELATIME) {
        flags |= MsFlags::MS_STRICTATIME;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| step_failed(step(), e.desc()))
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a descriptor owned here, with a zeroed ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn pivot_into(rootfs: &Path) -> Result<(), StepError> {
    unistd::chdir(rootfs).map_err(step_error("enter the rootfs"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    // only the rootfs, with no path back to the host.
    unistd::pivot_root(".", ".").map_err(step_error("pivot_root into the rootfs"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step_error("detach the host's root"))?;
    unistd::chdir("/").map_err(step_error("enter the new root"))?;
    Ok(())
}

/// In the RUN process: drops privileges and execs the command. Returns only on failure.
fn exec_command(request: &InitRequest) -> InitMessage {
    let spec = &request.spec;
    let rootless = request.user_namespace.rootless();
    let failed =
        |step: &str, message: String| InitMessage::Failed { step: step.to_string(), message };
    let _ = unistd::setsid();
    // Rust ignores SIGPIPE and the init may have blocked signals; the command starts clean.
    for signal in Signal::iterator() {
        if signal != Signal::SIGKILL && signal != Signal::SIGSTOP {
            // SAFETY: restoring default dispositions; no handler code is installed.
            let _ = unsafe { signal::signal(signal, SigHandler::SigDfl) };
        }
    }
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    if let Err(message) = drop_capabilities() {
        return failed("drop capabilities", message);
    }
    let unmapped = |what: &str, kind: &str, id: u32, e: Errno| {
        if rootless && e == Errno::EINVAL && !id_mapped(kind, id) {
            format!(
                "{what} {id} does not exist in a rootless sandbox{}",
                match &request.id_note {
                    Some(note) => format!(": {note}"),
                    None => format!(": {}", mapped_ids_note()),
                }
            )
        } else {
            format!("cannot switch to {what} {id}: {}", e.desc())
        }
    };
    // A user namespace whose gid map newgidmap wrote from a subordinate range allows
    // setgroups; one the init made itself does not (and leaves the groups as they are).
    if !rootless || setgroups_allowed() {
        let groups: Vec<Gid> = spec.additional_gids.iter().map(|g| Gid::from_raw(*g)).collect();
        if let Err(e) = unistd::setgroups(&groups) {
            return failed("set the supplementary groups", e.desc().to_string());
        }
    }
    let gid = Gid::from_raw(spec.gid);
    if let Err(e) = unistd::setresgid(gid, gid, gid) {
        return failed("switch group", unmapped("group", "gid_map", spec.gid, e));
    }
    let uid = Uid::from_raw(spec.uid);
    if let Err(e) = unistd::setresuid(uid, uid, uid) {
        return failed("switch user", unmapped("user", "uid_map", spec.uid, e));
    }
    if let Err(e) = unistd::chdir(spec.cwd.as_str()) {
        return failed("enter the working directory", format!("{}: {}", spec.cwd, e.desc()));
    }
    let program_name = spec.argv.first().cloned().unwrap_or_default();
    let exec_failed =
        |message: String| InitMessage::ExecFailed { program: program_name.clone(), message };
    let to_cstring = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let argv: Result<Vec<CString>, String> = spec.argv.iter().map(|a| to_cstring(a)).collect();
    let envp: Result<Vec<CString>, String> =
        spec.env.iter().map(|(k, v)| to_cstring(&format!("{k}={v}"))).collect();
    let (argv, envp) = match (argv, envp) {
        (Ok(argv), Ok(envp)) => (argv, envp),
        (Err(m), _) | (_, Err(m)) => return exec_failed(m),
    };
    let path_var = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let program = match find_program(&program_name, path_var) {
        Ok(program) => program,
        Err(message) => return exec_failed(message),
    };
    let program = match CString::new(program.as_os_str().as_bytes()) {
        Ok(program) => program,
        Err(_) => return exec_failed("the program path contains a NUL byte".into()),
    };
    let error = unistd::execve(&program, &argv, &envp).unwrap_err();
    exec_failed(error.desc().to_string())
}

/// Whether container id `id` exists in this process's user namespace (`kind`: "uid_map" or
/// "gid_map"). Outside any user namespace every id does.
fn id_mapped(kind: &str, id: u32) -> bool {
    crate::userns::own_map(kind)
        .iter()
        .any(|m| id.checked_sub(m.container).is_some_and(|o| o < m.size))
}

/// Which ids a rootless build's namespace has, for an error about one it has not.
fn mapped_ids_note() -> String {
    let top = |kind: &str| {
        crate::userns::own_map(kind)
            .iter()
            .map(|m| m.container.saturating_add(m.size.saturating_sub(1)))
            .max()
            .unwrap_or(0)
    };
    format!(
        "this rootless build maps uids 0-{} and gids 0-{} (its subordinate ranges in {} and {})",
        top("uid_map"),
        top("gid_map"),
        crate::userns::SUBUID_FILE,
        crate::userns::SUBGID_FILE
    )
}

/// Why chown to a secret's owner failed, when the reason is the rootless id map.
fn unmapped_note(request: &InitRequest, errno: Errno) -> String {
    if !request.user_namespace.rootless() || errno != Errno::EINVAL {
        return String::new();
    }
    match &request.id_note {
        Some(note) => format!(" ({note})"),
        None => format!(" ({})", mapped_ids_note()),
    }
}

fn setgroups_allowed() -> bool {
    std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "allow")
}

/// Docker's (and execvp's) lookup, but in the command's PATH rather than the init's.
fn find_program(name: &str, path_var: &str) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("the command is empty".into());
    }
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let mut denied = None;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => {
                if unistd::access(&candidate, unistd::AccessFlags::X_OK).is_ok() {
                    return Ok(candidate);
                }
                denied.get_or_insert(candidate);
            }
            _ => continue,
        }
    }
    match denied {
        Some(path) => Err(format!("{} is not executable", path.display())),
        None => Err(format!("executable file not found in $PATH ({path_var})")),
    }
}

fn drop_capabilities() -> Result<(), String> {
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    for cap in 0..=last {
        if DEFAULT_CAPABILITIES.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(format!("capability {cap}: {err}"));
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_parent_of_layer_paths() {
        let paths = [
            Path::new("/store/snapshots/a1"),
            Path::new("/store/snapshots/b2"),
            Path::new("/store/tmp/run-1/upper"),
        ];
        assert_eq!(common_parent(&paths), PathBuf::from("/store"));
        assert_eq!(common_parent(&[Path::new("/a/b"), Path::new("/c")]), PathBuf::from("/"));
    }

    #[test]
    fn overlay_options_are_relative_to_the_common_parent() {
        let lowers = [Path::new("/s/snapshots/aa"), Path::new("/s/snapshots/bb")];
        let (base, options) =
            overlay_options(&lowers, Path::new("/s/tmp/u"), Path::new("/s/tmp/w"), false).unwrap();
        assert_eq!(base, PathBuf::from("/s"));
        assert_eq!(
            options,
            "lowerdir=snapshots/aa:snapshots/bb,upperdir=tmp/u,workdir=tmp/w,\
             index=off,redirect_dir=nofollow,metacopy=off"
        );
        let (_, options) =
            overlay_options(&lowers, Path::new("/s/tmp/u"), Path::new("/s/tmp/w"), true).unwrap();
        assert!(options.ends_with(",userxattr"), "{options}");
    }

    #[test]
    fn too_many_layers_for_one_page_is_a_clear_error() {
        let names: Vec<PathBuf> =
            (0..300).map(|i| PathBuf::from(format!("/s/snapshots/{i:016}"))).collect();
        let lowers: Vec<&Path> = names.iter().map(PathBuf::as_path).collect();
        let err =
            overlay_options(&lowers, Path::new("/s/u"), Path::new("/s/w"), false).unwrap_err();
        assert!(err.starts_with("300 lower dirs need"), "{err}");
        assert!(err.contains("more than the kernel's 4095"), "{err}");
    }

    #[test]
    fn program_lookup_uses_the_commands_path() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path_var = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(find_program("tool", &path_var).unwrap(), tool);
        assert_eq!(find_program("./x/y", "/bin").unwrap(), PathBuf::from("./x/y"));
        let err = find_program("missing-tool", &path_var).unwrap_err();
        assert!(err.contains("not found in $PATH"), "{err}");
        assert!(find_program("", "/bin").is_err());
    }
}
