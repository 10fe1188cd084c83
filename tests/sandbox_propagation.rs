//! The sandbox's mounts must never propagate to the namespace that started it, even when
//! that namespace's mounts are shared (as systemd makes them on most hosts). This test runs
//! in its own mount namespace (of its thread only) with every mount made shared, so it
//! neither depends on nor changes the host's propagation settings.

use std::os::unix::fs::PermissionsExt;

use ferry::sandbox::{ExitStatus, NamespaceSandbox, Network, RunMount, RunSpec, Sandbox};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

#[test]
fn mounts_do_not_propagate_to_a_shared_parent_namespace() {
    // Only this thread moves to the new namespace; the init ferry spawns from it follows.
    unshare(CloneFlags::CLONE_NEWNS).unwrap();
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SHARED, None::<&str>)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let lower = dir.path().join("lower");
    std::fs::create_dir_all(lower.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", lower.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", lower.join("bin").join(applet)).unwrap();
    }
    let gate = dir.path().join("gate");
    for d in ["upper", "work", "gate"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    nix::unistd::mkfifo(&gate.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap();
    let spec = RunSpec {
        lower_dirs: vec![lower],
        upper_dir: dir.path().join("upper"),
        work_dir: dir.path().join("work"),
        argv: vec!["/bin/sh".into(), "-c".into(), "echo started; cat /gate/fifo".into()],
        env: vec![("PATH".into(), "/bin".into())],
        uid: 0,
        gid: 0,
        additional_gids: vec![],
        cwd: "/".into(),
        network: Network::Default,
        mounts: vec![RunMount::Cache { host_dir: gate.clone(), target: "/gate".into() }],
        hostname: "propagation".into(),
    };
    let mut seen: Option<Vec<String>> = None;
    let mut output = Vec::new();
    let outcome = NamespaceSandbox::new(env!("CARGO_BIN_EXE_ferry"))
        .run(&spec, &mut |bytes| {
            output.extend_from_slice(bytes);
            if seen.is_none() && output.starts_with(b"started\n") {
                // While the sandbox is up, with its rootfs and /gate mounted.
                let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
                seen = Some(
                    mountinfo
                        .lines()
                        .filter(|l| l.contains("ferry-run-") || l.contains(" overlay "))
                        .map(str::to_string)
                        .collect(),
                );
                std::fs::write(gate.join("fifo"), b"released\n").unwrap();
            }
        })
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&output), "started\nreleased\n");
    assert_eq!(seen, Some(vec![]), "the sandbox's mounts propagated");
}
