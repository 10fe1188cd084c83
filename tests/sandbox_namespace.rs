//! The real RUN sandbox against real namespaces and overlayfs, with busybox as the image.
//! These tests need root (as the build engine's RUN does without a user namespace); one
//! test drops to an unprivileged user to exercise the rootless path.

use std::collections::BTreeMap;
use std::os::unix::fs::{chown, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry::sandbox::{
    is_whiteout, ExitStatus, IdMapping, NamespaceSandbox, Network, OverlayXattrs, RunMount,
    RunOutcome, RunSpec, Sandbox, SandboxError, SecretBytes,
};

const BUSYBOX: &str = "/bin/busybox";
const NOBODY: u32 = 65534;

fn sandbox() -> NamespaceSandbox {
    NamespaceSandbox::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A busybox rootfs in a lower dir, plus fresh upper and work dirs.
struct Fixture {
    dir: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    lower_before: Tree,
}

impl Fixture {
    fn new() -> Self {
        Fixture::with_lower(|_| {})
    }

    /// `extra` adds files to the image before it is recorded.
    fn with_lower(extra: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let lower = dir.path().join("lower");
        let bin = lower.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy(BUSYBOX, bin.join("busybox")).unwrap();
        let list = std::process::Command::new(BUSYBOX).arg("--list").output().unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
            }
        }
        // What every real image has: the runtime's mount points and an /etc for resolv.conf
        // and hosts (a mount point the image lacks stays in the layer, as docker keeps it).
        for d in ["dev", "proc", "sys", "etc"] {
            std::fs::create_dir(lower.join(d)).unwrap();
        }
        extra(&lower);
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&work).unwrap();
        let lower_before = Tree::of(&lower);
        Fixture { dir, lower, upper, work, lower_before }
    }

    fn spec(&self, script: &str) -> RunSpec {
        RunSpec {
            lower_dirs: vec![self.lower.clone()],
            upper_dir: self.upper.clone(),
            work_dir: self.work.clone(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/bin".into())],
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            cwd: "/".into(),
            network: Network::Default,
            mounts: vec![],
            hostname: "ferry-test".into(),
        }
    }

    /// A second upper/work pair for another run over the same image.
    fn next_layer(&mut self, name: &str) {
        self.upper = self.dir.path().join(format!("{name}-upper"));
        self.work = self.dir.path().join(format!("{name}-work"));
        std::fs::create_dir(&self.upper).unwrap();
        std::fs::create_dir(&self.work).unwrap();
    }

    fn upper_tree(&self) -> Tree {
        Tree::of(&self.upper)
    }

    fn assert_lower_unchanged(&self) {
        assert_eq!(Tree::of(&self.lower), self.lower_before, "the lower dir changed");
    }
}

/// A directory tree: path → type, mode, owner, size, content or link target, xattrs.
#[derive(Debug, PartialEq, Eq)]
struct Tree(BTreeMap<String, String>);

impl Tree {
    fn of(root: &Path) -> Tree {
        let mut entries = BTreeMap::new();
        for entry in walkdir::WalkDir::new(root).min_depth(1) {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            let path = entry.path();
            let kind = if meta.is_dir() {
                "dir".to_string()
            } else if meta.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(path).unwrap().display())
            } else if meta.file_type().is_char_device() {
                format!("char {}", meta.rdev())
            } else {
                format!("file {:?}", String::from_utf8_lossy(&std::fs::read(path).unwrap()))
            };
            let mut xattrs: Vec<String> = xattr::list(path)
                .map(|names| names.map(|n| n.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            xattrs.sort();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            entries.insert(
                rel,
                format!(
                    "{kind} mode={:o} owner={}:{} xattrs={xattrs:?}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            );
        }
        Tree(entries)
    }

    fn paths(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    fn get(&self, path: &str) -> &str {
        self.0.get(path).unwrap_or_else(|| panic!("{path} not in {:#?}", self.0))
    }
}

/// Runs and returns the outcome and the full output.
fn run(sandbox: &dyn Sandbox, spec: &RunSpec) -> (RunOutcome, String) {
    let (result, output) = try_run(sandbox, spec);
    (result.unwrap(), output)
}

fn try_run(sandbox: &dyn Sandbox, spec: &RunSpec) -> (Result<RunOutcome, SandboxError>, String) {
    let mut output = Vec::new();
    let result = sandbox.run(spec, &mut |bytes| output.extend_from_slice(bytes));
    (result, String::from_utf8_lossy(&output).into_owned())
}

fn run_ok(fixture: &Fixture, spec: &RunSpec) -> String {
    let (outcome, output) = run(&sandbox(), spec);
    assert_eq!(outcome.status, ExitStatus::Code(0), "output: {output}");
    assert_eq!(outcome.xattrs, OverlayXattrs::Trusted);
    fixture.assert_lower_unchanged();
    output
}

#[test]
fn written_files_land_only_in_the_upper_dir() {
    let fixture = Fixture::new();
    let output = run_ok(
        &fixture,
        &fixture.spec(
            "echo hello > /newfile && mkdir -p /opt/app && echo y > /opt/app/conf && echo done",
        ),
    );
    assert_eq!(output, "done\n");
    let upper = fixture.upper_tree();
    // Nothing of /dev, /proc, /sys or /etc (resolv.conf, hosts), none of which the image has.
    assert_eq!(upper.paths(), vec!["newfile", "opt", "opt/app", "opt/app/conf"]);
    assert!(upper.get("newfile").starts_with("file \"hello\\n\" mode=644 owner=0:0"));
    assert!(!fixture.lower.join("newfile").exists());
}

#[test]
fn deleting_a_lower_file_leaves_a_whiteout() {
    let fixture = Fixture::with_lower(|lower| {
        std::fs::create_dir(lower.join("data")).unwrap();
        std::fs::write(lower.join("data/old"), b"old").unwrap();
        std::fs::write(lower.join("data/kept"), b"kept").unwrap();
    });
    run_ok(&fixture, &fixture.spec("rm /data/old && test ! -e /data/old && cat /data/kept"));
    let upper = fixture.upper_tree();
    assert_eq!(upper.paths(), vec!["data", "data/old"]);
    let whiteout = std::fs::symlink_metadata(fixture.upper.join("data/old")).unwrap();
    assert!(is_whiteout(&whiteout), "{}", upper.get("data/old"));
    assert!(upper.get("data/old").starts_with("char 0 mode=0 owner=0:0"));
}

#[test]
fn replacing_a_lower_directory_leaves_an_opaque_directory() {
    let fixture = Fixture::with_lower(|lower| {
        std::fs::create_dir_all(lower.join("srv/sub")).unwrap();
        std::fs::write(lower.join("srv/a"), b"a").unwrap();
        std::fs::write(lower.join("srv/sub/b"), b"b").unwrap();
    });
    let output = run_ok(
        &fixture,
        &fixture.spec("rm -rf /srv && mkdir /srv && echo new > /srv/c && ls -A /srv"),
    );
    assert_eq!(output, "c\n");
    let upper = fixture.upper_tree();
    assert_eq!(upper.paths(), vec!["srv", "srv/c"]);
    assert!(OverlayXattrs::Trusted.is_opaque_dir(&fixture.upper.join("srv")).unwrap());
}

#[test]
fn exit_codes_and_signals_propagate() {
    let fixture = Fixture::new();
    let (outcome, output) = run(&sandbox(), &fixture.spec("echo to-stderr >&2; exit 7"));
    assert_eq!(outcome.status, ExitStatus::Code(7));
    assert_eq!(output, "to-stderr\n");
    assert_eq!(outcome.output_tail, vec!["to-stderr"]);

    let mut fixture = fixture;
    fixture.next_layer("signal");
    let (outcome, _) = run(&sandbox(), &fixture.spec("kill -KILL $$"));
    assert_eq!(outcome.status, ExitStatus::Signal(9));

    fixture.next_layer("missing");
    let mut spec = fixture.spec("");
    spec.argv = vec!["no-such-program".into()];
    let (result, _) = try_run(&sandbox(), &spec);
    match result {
        Err(SandboxError::Exec { program, message }) => {
            assert_eq!(program, "no-such-program");
            assert!(message.contains("not found in $PATH"), "{message}");
        }
        other => panic!("expected an exec error, got {other:?}"),
    }
    assert!(fixture.upper_tree().paths().is_empty(), "{:?}", fixture.upper_tree());
    fixture.assert_lower_unchanged();
}

#[test]
fn output_tail_keeps_the_last_lines() {
    let fixture = Fixture::new();
    let (outcome, output) = run(&sandbox(), &fixture.spec("seq 1 100; exit 1"));
    assert_eq!(outcome.status, ExitStatus::Code(1));
    assert_eq!(output.lines().count(), 100);
    let expected: Vec<String> = (81..=100).map(|n| n.to_string()).collect();
    assert_eq!(outcome.output_tail, expected);
    fixture.assert_lower_unchanged();
}

#[test]
fn user_groups_cwd_env_and_hostname_apply() {
    let fixture = Fixture::new();
    let mut spec = fixture
        .spec("id -u; id -g; id -G; pwd; env | sort; hostname; touch here 2>&1 || echo no-write");
    spec.uid = 1000;
    spec.gid = 1001;
    spec.additional_gids = vec![1001, 2000];
    spec.cwd = "/home/app/src".into();
    spec.env.push(("GREETING".into(), "hello world".into()));
    let output = run_ok(&fixture, &spec);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(&lines[..4], &["1000", "1001", "1001 2000", "/home/app/src"]);
    // Exactly the spec's environment (busybox sh adds PWD, SHLVL and _ itself).
    let env: Vec<&str> = lines[4..]
        .iter()
        .copied()
        .filter(|l| l.contains('='))
        .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
        .collect();
    assert_eq!(env, vec!["GREETING=hello world", "PATH=/bin"]);
    assert!(lines.contains(&"ferry-test"), "{output}");
    // The created working directory is owned by root, so user 1000 cannot write to it.
    assert_eq!(lines.last(), Some(&"no-write"), "{output}");
    // A missing working directory is created and captured, as docker does.
    let upper = fixture.upper_tree();
    assert_eq!(upper.paths(), vec!["home", "home/app", "home/app/src"]);
    assert!(upper.get("home/app/src").starts_with("dir mode=755 owner=0:0"));
}

#[test]
fn root_runs_with_dockers_capabilities_only() {
    let fixture = Fixture::new();
    let output = run_ok(
        &fixture,
        &fixture.spec(
            "grep CapEff /proc/self/status; mount -t tmpfs none /mnt 2>/dev/null || echo no-mount; \
             wc -c < /proc/timer_list; (echo h > /proc/sysrq-trigger) 2>/dev/null || echo sysrq-ro",
        ),
    );
    // /proc/timer_list (not empty on a host) is masked, /proc/sysrq-trigger read-only.
    assert!(output.ends_with("no-mount\n0\nsysrq-ro\n"), "{output}");
    // Docker's default set: chown dac_override fowner fsetid kill setgid setuid setpcap
    // net_bind_service net_raw sys_chroot mknod audit_write setfcap.
    assert!(output.contains("CapEff:\t00000000a80425fb"), "{output}");
    assert!(output.contains("no-mount"), "{output}");
}

/// Docker lets root mknod any device but open only its default ones (its device cgroup).
/// Here every filesystem a RUN step can write to is `nodev`: a node it makes is recorded
/// (a layer may carry one) but cannot be opened, so a build cannot reach the host's disks.
#[test]
fn root_can_make_device_nodes_but_open_only_the_default_devices() {
    let fixture = Fixture::new();
    let cache = fixture.dir.path().join("cache");
    let rw = fixture.dir.path().join("rw");
    std::fs::create_dir(&cache).unwrap();
    std::fs::create_dir(&rw).unwrap();
    // c 1 3 is /dev/null's number: harmless should the open succeed.
    let script = "for d in /node /dev/node /cache/node /rw/node /tmpfs/node; do \
                    mknod $d c 1 3 || echo mknod-failed; \
                    if (echo x > $d) 2>/dev/null; then echo $d opened; else echo $d refused; fi; \
                  done; \
                  echo x > /dev/null && head -c 3 /dev/zero | wc -c && head -c 3 /dev/urandom | wc -c";
    let mut spec = fixture.spec(script);
    spec.mounts = vec![
        RunMount::Cache { host_dir: cache.clone(), target: "/cache".into() },
        RunMount::Bind { source: rw.clone(), target: "/rw".into(), readonly: false },
        RunMount::Tmpfs { target: "/tmpfs".into(), size: None },
    ];
    let output = run_ok(&fixture, &spec);
    assert_eq!(
        output,
        "/node refused\n/dev/node refused\n/cache/node refused\n/rw/node refused\n\
         /tmpfs/node refused\n3\n3\n",
        "every node was made, none opened; the default devices work"
    );
    assert!(fixture.upper_tree().get("node").starts_with("char "), "the layer keeps the node");
}

#[test]
fn resolv_conf_and_hosts_leave_no_trace_and_new_mount_points_stay_empty() {
    let fixture = Fixture::with_lower(|lower| {
        std::fs::write(lower.join("etc/os-release"), b"ID=test\n").unwrap();
        std::fs::create_dir(lower.join("var")).unwrap();
    });
    let host_files = fixture.dir.path().join("host-files");
    std::fs::create_dir(&host_files).unwrap();
    std::fs::write(host_files.join("input"), b"from the host\n").unwrap();
    let cache = fixture.dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let mut spec = fixture.spec(
        "cat /etc/resolv.conf > /dev/null && cat /etc/hosts > /dev/null && \
         cat /src/input && echo cached > /var/cache/pkg/x && echo t > /scratch/deep/t && \
         ls /dev && echo -n abc > /dev/null && head -c 3 /dev/zero | wc -c",
    );
    spec.mounts = vec![
        RunMount::Bind { source: host_files.clone(), target: "/src".into(), readonly: true },
        RunMount::Cache { host_dir: cache.clone(), target: "/var/cache/pkg".into() },
        RunMount::Tmpfs { target: "/scratch/deep".into(), size: Some(1 << 20) },
    ];
    let output = run_ok(&fixture, &spec);
    assert!(output.starts_with("from the host\n"), "{output}");
    for device in ["null", "zero", "full", "random", "urandom", "tty", "pts", "shm"] {
        assert!(output.lines().any(|l| l == device), "no /dev/{device} in {output}");
    }
    assert!(output.ends_with("3\n"), "{output}");
    // The image's /etc was copied up to create resolv.conf and hosts stubs in it; with the
    // stubs gone it is unchanged, and is not in the layer. The mount points the image
    // lacked stay, empty and 0755, as docker leaves them.
    let tree = fixture.upper_tree();
    assert_eq!(
        tree.paths(),
        vec!["scratch", "scratch/deep", "src", "var", "var/cache", "var/cache/pkg"]
    );
    assert!(tree.get("var/cache/pkg").starts_with("dir mode=755 owner=0:0"), "{tree:?}");
    assert_eq!(std::fs::read(cache.join("x")).unwrap(), b"cached\n");
    assert_eq!(Tree::of(&host_files).paths(), vec!["input"]);
}

#[test]
fn host_resolv_conf_and_hosts_are_visible_read_only() {
    let fixture = Fixture::with_lower(|lower| {
        std::fs::write(lower.join("etc/hosts"), b"image hosts\n").unwrap();
    });
    let output = run_ok(
        &fixture,
        &fixture.spec("cat /etc/hosts; (echo x >> /etc/hosts) 2>/dev/null || echo read-only"),
    );
    let host = std::fs::read_to_string("/etc/hosts").unwrap();
    assert_eq!(output, format!("{host}read-only\n"));
    assert!(fixture.upper_tree().paths().is_empty());
}

#[test]
fn network_none_has_only_loopback_and_it_is_up() {
    let fixture = Fixture::new();
    let mut spec = fixture
        .spec("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/flags");
    spec.network = Network::None;
    let output = run_ok(&fixture, &spec);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "lo", "{output}");
    assert_eq!(lines.len(), 2, "{output}");
    let flags = u32::from_str_radix(lines[1].trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is not up: {output}");

    // The default network is the host's.
    let mut fixture = fixture;
    fixture.next_layer("default");
    let output = run_ok(&fixture, &fixture.spec("tail -n +3 /proc/net/dev | wc -l"));
    let host_interfaces = std::fs::read_to_string("/proc/net/dev").unwrap().lines().count() - 2;
    assert_eq!(output.trim(), host_interfaces.to_string());
}

#[test]
fn the_init_is_pid_1_and_takes_every_process_with_it() {
    let fixture = Fixture::new();
    let output = run_ok(
        &fixture,
        &fixture.spec("echo $$; tr '\\0' ' ' < /proc/1/cmdline; echo; sleep 1000 & echo started"),
    );
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "2", "{output}");
    assert!(lines[1].ends_with("__ferry-sandbox-init "), "{output}");
    // `sleep 1000` was left running: returning at all means the namespace was killed.
    assert_eq!(lines[2], "started");
}

#[test]
fn a_cache_mount_persists_across_runs_and_never_enters_the_layer() {
    let mut fixture = Fixture::new();
    let cache = fixture.dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let script = "echo run >> /root/.cache/log && wc -l < /root/.cache/log";
    let mut spec = fixture.spec(script);
    spec.mounts = vec![RunMount::Cache { host_dir: cache.clone(), target: "/root/.cache".into() }];
    assert_eq!(run_ok(&fixture, &spec), "1\n");
    // Only the mount point stays, empty, as docker leaves it.
    assert_eq!(fixture.upper_tree().paths(), vec!["root", "root/.cache"]);

    fixture.next_layer("second");
    spec.upper_dir = fixture.upper.clone();
    spec.work_dir = fixture.work.clone();
    assert_eq!(run_ok(&fixture, &spec), "2\n");
    assert_eq!(fixture.upper_tree().paths(), vec!["root", "root/.cache"]);
    assert_eq!(std::fs::read(cache.join("log")).unwrap(), b"run\nrun\n");
}

#[test]
fn a_secret_is_readable_inside_and_absent_afterwards() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec(
        "cat /run/secrets/token; echo; stat -c '%a %u:%g' /run/secrets/token; \
         (echo x > /run/secrets/token) 2>/dev/null || echo read-only; \
         cp /run/secrets/token /copied",
    );
    spec.mounts = vec![RunMount::Secret {
        target: "/run/secrets/token".into(),
        bytes: SecretBytes(b"s3cr3t-value".to_vec()),
        mode: 0o440,
        uid: 0,
        gid: 42,
    }];
    let output = run_ok(&fixture, &spec);
    assert_eq!(output, "s3cr3t-value\n440 0:42\nread-only\n");
    // A copy the command made on purpose is its business; the secret's stub file is not
    // (its directory stays, as docker leaves it).
    assert_eq!(fixture.upper_tree().paths(), vec!["copied", "run", "run/secrets"]);
}

#[test]
fn from_scratch_with_a_bind_mounted_busybox() {
    let fixture = Fixture::new();
    let scratch_upper = fixture.dir.path().join("scratch-upper");
    std::fs::create_dir(&scratch_upper).unwrap();
    let mut spec =
        fixture.spec("/busybox/bin/busybox echo hi > /out; /busybox/bin/busybox ls -A /");
    spec.lower_dirs = vec![];
    spec.upper_dir = scratch_upper.clone();
    spec.mounts = vec![RunMount::Bind {
        source: fixture.lower.clone(),
        target: "/busybox".into(),
        readonly: true,
    }];
    spec.argv[0] = "/busybox/bin/sh".into();
    let output = run_ok(&fixture, &spec);
    let listed: Vec<&str> = output.lines().collect();
    for entry in ["busybox", "dev", "etc", "out", "proc", "sys"] {
        assert!(listed.contains(&entry), "{entry} missing in {output}");
    }
    // The mount points a scratch image lacks stay, as docker's runtime leaves them.
    assert_eq!(
        Tree::of(&scratch_upper).paths(),
        vec!["busybox", "dev", "etc", "out", "proc", "sys"]
    );
}

#[test]
fn two_sandboxes_run_in_parallel_without_interfering() {
    let fixture_a = Fixture::new();
    let fixture_b = Fixture::new();
    let script = "hostname > /who && echo $$ >> /who && ls /tmp-in-run 2>/dev/null; \
                  mkdir /tmp-in-run && cat /who";
    let mut spec_a = fixture_a.spec(script);
    spec_a.hostname = "alpha".into();
    let mut spec_b = fixture_b.spec(script);
    spec_b.hostname = "beta".into();
    std::thread::scope(|scope| {
        let a = scope.spawn(|| run_ok(&fixture_a, &spec_a));
        let b = scope.spawn(|| run_ok(&fixture_b, &spec_b));
        assert_eq!(a.join().unwrap(), "alpha\n2\n");
        assert_eq!(b.join().unwrap(), "beta\n2\n");
    });
    for (fixture, name) in [(&fixture_a, "alpha"), (&fixture_b, "beta")] {
        assert_eq!(fixture.upper_tree().paths(), vec!["tmp-in-run", "who"]);
        assert_eq!(
            std::fs::read_to_string(fixture.upper.join("who")).unwrap(),
            format!("{name}\n2\n")
        );
    }
}

#[test]
fn bad_specs_are_refused_before_anything_runs() {
    let fixture = Fixture::new();
    std::fs::write(fixture.upper.join("leftover"), b"").unwrap();
    let (result, _) = try_run(&sandbox(), &fixture.spec("true"));
    let err = result.unwrap_err();
    assert!(matches!(err, SandboxError::InvalidSpec(_)), "{err:?}");
    assert!(err.to_string().contains("is not empty"), "{err}");
    std::fs::remove_file(fixture.upper.join("leftover")).unwrap();

    let mut spec = fixture.spec("true");
    spec.cwd = "relative".into();
    let err = try_run(&sandbox(), &spec).0.unwrap_err();
    assert!(err.to_string().contains("not an absolute path"), "{err}");

    let mut spec = fixture.spec("true");
    spec.lower_dirs.push(fixture.dir.path().join("missing"));
    let err = try_run(&sandbox(), &spec).0.unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    // A mount target the image has as a file cannot take a directory.
    let mut spec = fixture.spec("true");
    spec.mounts = vec![RunMount::Tmpfs { target: "/bin/busybox".into(), size: None }];
    let err = try_run(&sandbox(), &spec).0.unwrap_err();
    match &err {
        SandboxError::Setup { step, message } => {
            assert!(step.contains("/bin/busybox"), "{err}");
            assert!(message.contains("not a directory"), "{err}");
        }
        other => panic!("expected a set-up error, got {other:?}"),
    }
    assert!(fixture.upper_tree().paths().is_empty());
    fixture.assert_lower_unchanged();
}

/// Whether the kernel lets an unprivileged user create a user namespace, asked of an
/// independent tool (util-linux's setpriv and unshare).
fn kernel_allows_rootless() -> bool {
    std::process::Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["unshare", "--user", "--map-root-user", "--mount", "true"])
        .status()
        .expect("setpriv and unshare (util-linux) are needed to probe user namespaces")
        .success()
}

#[test]
fn rootless_runs_as_mapped_root_or_says_why_it_cannot() {
    let fixture = Fixture::with_lower(|lower| {
        std::fs::create_dir(lower.join("data")).unwrap();
        std::fs::write(lower.join("data/old"), b"old").unwrap();
        std::fs::create_dir_all(lower.join("srv/sub")).unwrap();
        std::fs::write(lower.join("srv/sub/f"), b"f").unwrap();
        for entry in walkdir::WalkDir::new(lower) {
            let entry = entry.unwrap();
            std::os::unix::fs::lchown(entry.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        }
    });
    for dir in [&fixture.upper, &fixture.work] {
        chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let sandbox = sandbox().rootless_as(NOBODY, NOBODY);
    let mut spec = fixture.spec(
        "id -u; echo new > /newfile; rm /data/old; rm -rf /srv; mkdir /srv; \
         cat /run/secrets/s; echo; tail -n +3 /proc/net/dev | wc -l; echo $$",
    );
    spec.network = Network::None;
    spec.mounts = vec![RunMount::Secret {
        target: "/run/secrets/s".into(),
        bytes: SecretBytes(b"rootless-secret".to_vec()),
        mode: 0o400,
        uid: 0,
        gid: 0,
    }];
    let (result, output) = try_run(&sandbox, &spec);
    if !kernel_allows_rootless() {
        let err = result.unwrap_err();
        assert!(matches!(err, SandboxError::RootlessUnavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("user namespace"), "{err}");
        return;
    }
    let outcome = result.unwrap_or_else(|e| panic!("{e}\noutput: {output}"));
    assert_eq!(outcome.status, ExitStatus::Code(0), "{output}");
    assert_eq!(outcome.xattrs, OverlayXattrs::User);
    // Only the invoking user exists inside, as 0: the outcome says how to read the upper
    // dir's owners, so that the layer records 0:0 rather than the host's 65534.
    let only_nobody = vec![IdMapping { container: 0, host: NOBODY, size: 1 }];
    assert_eq!((&outcome.uid_map, &outcome.gid_map), (&only_nobody, &only_nobody));
    assert_eq!(output, "0\nrootless-secret\n1\n2\n");
    let upper = fixture.upper_tree();
    assert_eq!(upper.paths(), vec!["data", "data/old", "newfile", "run", "run/secrets", "srv"]);
    assert!(upper.get("newfile").contains("owner=65534:65534"), "{upper:?}");
    assert!(is_whiteout(&std::fs::symlink_metadata(fixture.upper.join("data/old")).unwrap()));
    assert!(OverlayXattrs::User.is_opaque_dir(&fixture.upper.join("srv")).unwrap());
    fixture.assert_lower_unchanged();

    // With the host's network, /sys cannot be mounted anew in a user namespace; the host's
    // is bound read-only instead.
    let mut fixture = fixture;
    fixture.next_layer("host-network");
    for dir in [&fixture.upper, &fixture.work] {
        chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let spec = fixture.spec(
        "ls /sys/class/net | wc -l; (echo 1 > /sys/kernel/uevent_helper) 2>/dev/null || echo ro",
    );
    let (outcome, output) = run(&sandbox, &spec);
    assert_eq!(outcome.status, ExitStatus::Code(0), "{output}");
    let host_interfaces = std::fs::read_dir("/sys/class/net").unwrap().count();
    assert_eq!(output, format!("{host_interfaces}\nro\n"));
    assert!(fixture.upper_tree().paths().is_empty());

    // Only the invoking user exists inside: another uid is a clear error.
    fixture.next_layer("other-user");
    for dir in [&fixture.upper, &fixture.work] {
        chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let mut spec = fixture.spec("true");
    spec.uid = 1000;
    let err = try_run(&sandbox, &spec).0.unwrap_err().to_string();
    assert!(err.contains("user 1000 does not exist in a rootless sandbox"), "{err}");
    // ... that says what to add for more.
    assert!(err.contains("/etc/subuid") && err.contains("uidmap"), "{err}");
    assert!(err.contains("`nobody:100000:65536`"), "{err}");
}

#[test]
fn lower_dirs_stack_top_most_first_with_their_whiteouts() {
    let mut fixture = Fixture::new();
    let top = fixture.dir.path().join("top");
    let bottom = fixture.dir.path().join("bottom");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::create_dir_all(bottom.join("etc")).unwrap();
    std::fs::write(bottom.join("etc/conf"), b"bottom\n").unwrap();
    std::fs::write(top.join("etc/conf"), b"top\n").unwrap();
    std::fs::write(bottom.join("etc/removed"), b"gone\n").unwrap();
    nix::sys::stat::mknod(
        &top.join("etc/removed"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let layers_before = (Tree::of(&top), Tree::of(&bottom));
    fixture.next_layer("stacked");
    let mut spec = fixture.spec("cat /etc/conf; test -e /etc/removed && echo visible; ls /etc");
    spec.lower_dirs = vec![top.clone(), bottom.clone(), fixture.lower.clone()];
    let output = run_ok(&fixture, &spec);
    // resolv.conf and hosts are the sandbox's mount points, seen but not captured.
    assert_eq!(output, "top\nconf\nhosts\nresolv.conf\n");
    assert!(fixture.upper_tree().paths().is_empty());
    assert_eq!((Tree::of(&top), Tree::of(&bottom)), layers_before);
}

#[test]
fn many_layers_under_a_long_path_fit_in_one_mount() {
    let mut fixture = Fixture::new();
    // Absolute paths would need about 150 × 120 bytes, far more than the kernel's page.
    let snapshots = fixture.dir.path().join(format!("store-{}/snapshots", "x".repeat(120)));
    let mut lowers = Vec::new();
    for i in 0..150 {
        let layer = snapshots.join(format!("{i:03}"));
        std::fs::create_dir_all(layer.join("layers")).unwrap();
        std::fs::write(layer.join(format!("layers/{i:03}")), b"").unwrap();
        lowers.push(layer);
    }
    // The image's own layer lives with the others, as in the store.
    let busybox_layer = snapshots.join("bb");
    std::fs::rename(&fixture.lower, &busybox_layer).unwrap();
    fixture.lower = busybox_layer;
    lowers.push(fixture.lower.clone());
    let run_dir = snapshots.parent().unwrap().join("tmp");
    std::fs::create_dir(&run_dir).unwrap();
    fixture.upper = run_dir.join("upper");
    fixture.work = run_dir.join("work");
    std::fs::create_dir(&fixture.upper).unwrap();
    std::fs::create_dir(&fixture.work).unwrap();
    let mut spec = fixture.spec("ls /layers | wc -l");
    spec.lower_dirs = lowers;
    assert_eq!(run_ok(&fixture, &spec), "150\n");
}

#[test]
fn an_image_symlink_cannot_point_a_mount_point_into_the_host() {
    let host_dir = tempfile::tempdir().unwrap();
    let escape = host_dir.path().join("stub-resolv.conf");
    let fixture = Fixture::with_lower(|lower| {
        // As systemd-resolved images have it, but pointing at a host path.
        std::os::unix::fs::symlink(&escape, lower.join("etc/resolv.conf")).unwrap();
    });
    let output = run_ok(&fixture, &fixture.spec("cat /etc/resolv.conf > /dev/null && echo ok"));
    assert_eq!(output, "ok\n");
    assert!(!escape.exists(), "the mount point was created on the host");
    // The stub file made at the link's in-image target is gone too; the directories made
    // for it stay, as new mount-point directories do.
    let tree = fixture.upper_tree();
    assert!(tree.0.values().all(|e| e.starts_with("dir")), "{tree:?}");
    assert!(!tree.paths().is_empty(), "the stub's directories are kept");
}

#[test]
fn the_host_never_sees_the_sandboxs_mounts() {
    let fixture = Fixture::new();
    let gate = fixture.dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();
    nix::unistd::mkfifo(&gate.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600))
        .unwrap();
    // The command waits on a FIFO until the test has looked at the host's mount table.
    let mut spec = fixture.spec("echo started; cat /gate/fifo");
    spec.mounts = vec![RunMount::Cache { host_dir: gate.clone(), target: "/gate".into() }];
    let fixture_dir = fixture.dir.path().to_string_lossy().into_owned();
    let mut leaked: Option<Vec<String>> = None;
    let mut output = Vec::new();
    let outcome = sandbox()
        .run(&spec, &mut |bytes| {
            output.extend_from_slice(bytes);
            if leaked.is_none() && output.starts_with(b"started\n") {
                let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                leaked = Some(
                    mountinfo
                        .lines()
                        .filter(|l| l.contains(&fixture_dir) || l.contains("ferry-run-"))
                        .map(str::to_string)
                        .collect(),
                );
                std::fs::write(gate.join("fifo"), b"released\n").unwrap();
            }
        })
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&output), "started\nreleased\n");
    assert_eq!(leaked, Some(vec![]), "sandbox mounts visible on the host");
    fixture.assert_lower_unchanged();
}
