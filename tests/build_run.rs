//! `ferry build` with RUN steps in the real sandbox on a busybox base: whiteouts, opaque
//! directories, failures, mounts, secrets, and the Dockerfile features around RUN.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::fixture;

use fixture::{
    build_json, ferry, layer_listings, project, skopeo_config, stat, store_contains, umoci_unpack,
    BUSYBOX_BASE,
};

const MANIFEST: &str = "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.child]\ncontext = \"child\"\n";

fn two_level(base_extra: &str, child: &str) -> tempfile::TempDir {
    project(&[
        ("images.toml", MANIFEST),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}{base_extra}")),
        ("child/Dockerfile", child),
    ])
}

#[test]
fn deleting_a_lower_file_is_a_whiteout_and_replacing_a_directory_is_opaque() {
    let dir = two_level(
        "RUN mkdir -p /data/old && echo x > /data/old/f && echo y > /etc/gone\n",
        "FROM bb\nRUN rm /etc/gone\nRUN rm -rf /data && mkdir /data && echo new > /data/n\n",
    );
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let layers = layer_listings(store.path(), "child");
    let whiteout_layer = &layers[layers.len() - 2];
    assert!(
        whiteout_layer.iter().any(|n| n.trim_end_matches('/') == "etc/.wh.gone"),
        "{whiteout_layer:?}"
    );
    let opaque_layer = &layers[layers.len() - 1];
    assert!(opaque_layer.iter().any(|n| n == "data/.wh..wh..opq"), "{opaque_layer:?}");
    assert!(opaque_layer.iter().any(|n| n == "data/n"), "{opaque_layer:?}");
    // Nothing of the sandbox's own set-up is captured.
    for l in &layers[layers.len() - 2..] {
        for n in l {
            assert!(
                !n.starts_with("proc")
                    && !n.starts_with("dev")
                    && !n.contains("resolv.conf")
                    && !n.starts_with("sys"),
                "{n} in {l:?}"
            );
        }
    }
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    assert!(!rootfs.join("etc/gone").exists());
    assert!(!rootfs.join("data/old").exists());
    assert_eq!(std::fs::read_to_string(rootfs.join("data/n")).unwrap(), "new\n");
}

#[test]
fn a_failed_run_names_image_stage_line_and_exit_code_and_leaves_no_layer_or_ref() {
    let dir = two_level("", "FROM bb AS build\nRUN echo preparing && touch /marker-of-failure && echo about to fail >&2 && exit 3\n");
    let store = tempfile::tempdir().unwrap();
    let out = ferry(dir.path()).arg("--store").arg(store.path()).arg("build").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "child/Dockerfile:2: RUN failed with exit code 3 (image `child`, stage build)"
        ),
        "{err}"
    );
    assert!(err.contains("about to fail"), "the output tail is shown: {err}");
    let index = std::fs::read_to_string(store.path().join("index.json")).unwrap();
    assert!(index.contains("\"bb\""), "the parent is built and named");
    assert!(!index.contains("\"child\""), "no ref for the failed image: {index}");
    assert!(
        store_contains(store.path(), b"marker-of-failure").is_empty(),
        "no layer holds the failed step's files"
    );
}

#[test]
fn keep_going_builds_what_does_not_depend_on_the_failure() {
    let dir = project(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.bad]\ncontext = \"bad\"\n\n[images.below]\ncontext = \"below\"\n\n[images.good]\ncontext = \"good\"\n"),
        ("bb/Dockerfile", BUSYBOX_BASE),
        ("bad/Dockerfile", "FROM bb\nRUN false\n"),
        ("below/Dockerfile", "FROM bad\nRUN true\n"),
        ("good/Dockerfile", "FROM bb\nRUN echo ok > /ok\n"),
    ]);
    let store = tempfile::tempdir().unwrap();
    let out = ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["build", "--keep-going", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = |n: &str| {
        report["images"].as_array().unwrap().iter().find(|i| i["name"] == n).unwrap()["status"]
            .clone()
    };
    assert_eq!(status("bb"), "built");
    assert_eq!(status("good"), "built");
    assert_eq!(status("bad"), "failed");
    assert_eq!(status("below"), "skipped");
}

#[test]
fn run_sees_env_args_user_and_workdir() {
    let dir = two_level(
        "RUN mkdir -m 1777 /tmp && echo 'app:x:10001:10002::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:10002:' >> /etc/group\n",
        "FROM bb\nARG GREETING=hello\nENV WHO=world\nWORKDIR /work/dir\nRUN echo \"$GREETING $WHO\" > msg && pwd > pwd\nUSER app\nRUN id -u > /tmp/uid && id -g >> /tmp/uid\n",
    );
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &["--arg", "GREETING=hi"]);
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    assert_eq!(std::fs::read_to_string(rootfs.join("work/dir/msg")).unwrap(), "hi world\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("work/dir/pwd")).unwrap(), "/work/dir\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("tmp/uid")).unwrap(), "10001\n10002\n");
    assert_eq!(stat(&rootfs.join("tmp/uid")).1, 10001);
    // ARGs are visible to RUN but not kept in the image.
    let env = skopeo_config(store.path(), "child")["config"]["Env"].clone();
    assert!(env.as_array().unwrap().contains(&serde_json::json!("WHO=world")));
    assert!(!env.to_string().contains("GREETING"), "{env}");
}

#[test]
fn cache_mounts_persist_and_secrets_never_land_anywhere() {
    let secret_value = "s3cr3t-value-4242";
    let dir = two_level(
        "",
        "FROM bb\nARG BUST=1\nRUN --mount=type=cache,target=/cache echo run-$BUST >> /cache/log && cp /cache/log /log-copy\nRUN --mount=type=secret,id=tok wc -c < /run/secrets/tok > /secret-len\n",
    );
    let secret = dir.path().join("tok.txt");
    std::fs::write(&secret, secret_value).unwrap();
    let store = tempfile::tempdir().unwrap();
    let secret_arg = format!("id=tok,src={}", secret.display());
    build_json(dir.path(), store.path(), &["--secret", &secret_arg]);
    let out = ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["-vv", "build", "--json", "--arg", "BUST=2", "--secret", &secret_arg])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("log-copy")).unwrap(),
        "run-1\nrun-2\n",
        "the cache mount persisted"
    );
    assert!(!rootfs.join("cache/log").exists(), "cache content is not in the image");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("secret-len")).unwrap().trim(),
        secret_value.len().to_string(),
        "the secret was readable"
    );
    assert!(!rootfs.join("run/secrets/tok").exists());
    assert!(
        store_contains(store.path(), secret_value.as_bytes()).is_empty(),
        "no blob holds the secret"
    );
    let everything =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!everything.contains(secret_value), "the secret is in the output");
    let mut cache_files = String::new();
    for e in walk(&store.path().join("cache")) {
        cache_files.push_str(&std::fs::read_to_string(e).unwrap_or_default());
    }
    assert!(!cache_files.contains(secret_value), "the secret is in the cache index");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn heredocs_onbuild_and_shell() {
    let dir = project(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.parent]\ncontext = \"parent\"\n\n[images.child]\ncontext = \"child\"\n"),
        ("bb/Dockerfile", BUSYBOX_BASE),
        ("parent/Dockerfile", "FROM bb\nONBUILD RUN echo triggered > /onbuild\nRUN <<EOF\nset -e\necho one > /heredoc\necho two >> /heredoc\nEOF\nCOPY <<notes.txt /etc/\nfirst line\nEOF-not-the-end\nnotes.txt\nSHELL [\"/bin/sh\", \"-e\", \"-c\"]\nRUN echo \"$0 $-\" > /via-shell\nENV WHO=shell\nRUN cat <<EOT > /shell-heredoc && cat <<'RAW' >> /shell-heredoc\nfrom a $WHO heredoc\nEOT\nkept $WHO\nRAW\nRUN --network=none <<ONE cat > /first && <<TWO cat > /second\nI am $WHO first\nONE\nI am second\nTWO\n"),
        ("child/Dockerfile", "FROM parent\nRUN test -f /onbuild\n"),
    ]);
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let parent = umoci_unpack(store.path(), "parent", work.path());
    assert_eq!(std::fs::read_to_string(parent.join("heredoc")).unwrap(), "one\ntwo\n");
    assert_eq!(
        std::fs::read_to_string(parent.join("etc/notes.txt")).unwrap(),
        "first line\nEOF-not-the-end\n"
    );
    let shell = std::fs::read_to_string(parent.join("via-shell")).unwrap();
    assert!(shell.starts_with("/bin/sh ") && shell.contains('e'), "SHELL applies to RUN: {shell}");
    assert_eq!(
        std::fs::read_to_string(parent.join("shell-heredoc")).unwrap(),
        "from a shell heredoc\nkept $WHO\n"
    );
    assert_eq!(std::fs::read_to_string(parent.join("first")).unwrap(), "I am shell first\n");
    assert_eq!(std::fs::read_to_string(parent.join("second")).unwrap(), "I am second\n");
    assert!(!parent.join("onbuild").exists(), "a trigger does not run in its own image");
    let cfg = fixture::raw_config(store.path(), "parent");
    assert_eq!(cfg["config"]["OnBuild"], serde_json::json!(["RUN echo triggered > /onbuild"]));
    let work = tempfile::tempdir().unwrap();
    let child = umoci_unpack(store.path(), "child", work.path());
    assert_eq!(std::fs::read_to_string(child.join("onbuild")).unwrap(), "triggered\n");
    assert!(
        fixture::raw_config(store.path(), "child")["config"]["OnBuild"].is_null(),
        "triggers are not inherited"
    );
}

#[test]
fn more_than_127_layers_is_a_clear_error() {
    let mut df = String::from("FROM scratch\n");
    for i in 0..130 {
        df.push_str(&format!("COPY f /f{i}\n"));
    }
    let dir = project(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.deep]\ncontext = \"deep\"\n"),
        ("deep/Dockerfile", &df),
        ("deep/f", "x"),
    ]);
    let store = tempfile::tempdir().unwrap();
    let out = ferry(dir.path()).arg("--store").arg(store.path()).arg("build").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("deep/Dockerfile:129:") && err.contains("the limit is 127"), "{err}");
}

#[test]
fn independent_stages_run_concurrently() {
    // Each stage waits for the other's marker in a shared cache mount: built one after the
    // other, the first would give up and fail.
    let wait = |me: &str, other: &str| {
        format!(
            "RUN --mount=type=cache,target=/sync,id=sync touch /sync/{me} && i=0; while [ ! -f /sync/{other} ]; do i=$((i+1)); [ $i -gt 100 ] && exit 7; sleep 0.1; done; echo {me} > /{me}\n"
        )
    };
    let child = format!(
        "FROM bb AS a\n{}\nFROM bb AS b\n{}\nFROM bb\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
        wait("a", "b"),
        wait("b", "a")
    );
    let dir = two_level("", &child);
    let store = tempfile::tempdir().unwrap();
    let report = build_json(dir.path(), store.path(), &["--jobs", "2"]);
    let child = report["images"].as_array().unwrap().iter().find(|i| i["name"] == "child").unwrap();
    assert_eq!(child["status"], "built");
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    assert_eq!(std::fs::read_to_string(rootfs.join("a")).unwrap(), "a\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("b")).unwrap(), "b\n");
}

/// Build the fleet in `dir` into a new store; the store, and `child` unpacked from it.
fn build_child(dir: &Path, args: &[&str]) -> (tempfile::TempDir, tempfile::TempDir, PathBuf) {
    let store = tempfile::tempdir().unwrap();
    build_json(dir, store.path(), args);
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    (store, work, rootfs)
}

/// Stages `a` and `b` run at once (see `independent_stages_run_concurrently`), each with
/// `mount` over /c running `script`; the child image copies what each wrote to /out.
fn concurrent_cache_steps(mount: &str, script: &str) -> tempfile::TempDir {
    let stage = |me: &str| format!("FROM bb AS {me}\nRUN {mount} ME={me}; {script}\n");
    let child = format!(
        "{}{}FROM bb\nCOPY --from=a /out /a\nCOPY --from=b /out /b\n",
        stage("a"),
        stage("b")
    );
    two_level("", &child)
}

#[test]
fn cache_mount_sharing_locked_runs_one_step_at_a_time() {
    // Each step holds /c/busy for a second. Shared, both steps would be in at once (the
    // test above proves they run together) and one would fail its mkdir.
    let dir = concurrent_cache_steps(
        "--mount=type=cache,target=/c,id=apt,sharing=locked",
        "mkdir /c/busy || exit 9; sleep 1; rmdir /c/busy; echo $ME > /out",
    );
    let (_store, _work, rootfs) = build_child(dir.path(), &["--jobs", "2"]);
    assert_eq!(std::fs::read_to_string(rootfs.join("a")).unwrap(), "a\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("b")).unwrap(), "b\n");
}

#[test]
fn cache_mount_sharing_private_gives_a_busy_cache_another_directory() {
    // Each step leaves its mark, waits for the other to have started, and lists the cache:
    // private, each sees only its own mark. (Shared, both would see both.)
    let dir = concurrent_cache_steps(
        "--mount=type=cache,target=/c,id=pool,sharing=private \
         --mount=type=cache,target=/sync,id=sync",
        "touch /c/$ME /sync/$ME; i=0; while [ $(ls /sync | wc -l) -lt 2 ]; do i=$((i+1)); \
         [ $i -gt 100 ] && exit 7; sleep 0.1; done; ls /c > /out",
    );
    let (store, _work, rootfs) = build_child(dir.path(), &["--jobs", "2"]);
    assert_eq!(std::fs::read_to_string(rootfs.join("a")).unwrap(), "a\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("b")).unwrap(), "b\n");
    // Only ferry's user may enter the caches (a step may leave device nodes in them).
    let mode = std::fs::metadata(store.path().join("mounts")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // The pool keeps both directories for later steps.
    let pool = std::fs::read_dir(store.path().join("mounts"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(pool, 3, "pool, pool-1 and sync");
}

#[test]
fn cache_mount_owner_mode_and_one_id_twice_apply_and_unknown_options_are_refused() {
    let dir = two_level(
        "",
        "FROM bb\nRUN --mount=type=cache,target=/c,id=go touch /c/by-root\n\
         RUN --mount=type=cache,target=/home/app/.cache,id=go,uid=1000,gid=1001,mode=0700 \
         stat -c '%u %g %a' /home/app/.cache > /owner && ls /home/app/.cache > /owned-sees\n\
         RUN --mount=type=cache,target=/a,id=x,sharing=locked \
         --mount=type=cache,target=/b,id=x,sharing=locked touch /a/f && ls /b > /both\n",
    );
    let (store, _work, rootfs) = build_child(dir.path(), &[]);
    // Another owner, another cache (as BuildKit's): root's cache of the same id was made
    // first and is not the one the uid=1000 step gets.
    assert_eq!(std::fs::read_to_string(rootfs.join("owner")).unwrap(), "1000 1001 700\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("owned-sees")).unwrap(), "");
    // Two mounts of one locked id share its directory (and do not wait for each other).
    assert_eq!(std::fs::read_to_string(rootfs.join("both")).unwrap(), "f\n");

    for (mount, expected) in [
        ("sharing=lockd", "sharing `lockd` is not shared, private or locked"),
        ("mode=rwx", "mode `rwx` is not an octal mode"),
        ("from=bb", "option `from` is not supported"),
    ] {
        let dir =
            two_level("", &format!("FROM bb\nRUN --mount=type=cache,target=/c,{mount} true\n"));
        let out = ferry(dir.path()).arg("--store").arg(store.path()).arg("build").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mount}: {err}");
        assert!(err.contains("child/Dockerfile:2:") && err.contains(expected), "{mount}: {err}");
    }
}

#[test]
fn network_bind_tmpfs_healthcheck_maintainer_escape() {
    let child = "# escape=`\nFROM --platform=$BUILDPLATFORM bb AS tools\nRUN mkdir -p /opt && echo from-tools > /opt/t\n\nFROM bb\nMAINTAINER Acme Ops <ops@example.com>\nRUN --network=none cat /proc/net/dev | grep -c : > /ifaces\nRUN --mount=type=bind,source=data.txt,target=/in/data.txt cp /in/data.txt /copied `\n && test ! -w /in/data.txt || true\nRUN --mount=type=bind,from=tools,source=/opt,target=/mnt/tools cp /mnt/tools/t /from-tools\nRUN --mount=type=bind,target=/ctx,rw echo changed > /ctx/data.txt && cat /ctx/data.txt > /rw-context\nRUN --mount=type=bind,from=tools,source=/opt,target=/mnt/tools,rw echo more >> /mnt/tools/t && cat /mnt/tools/t > /rw-tools\nRUN --mount=type=bind,from=tools,source=/opt,target=/mnt/tools cp /mnt/tools/t /tools-again\nRUN --mount=type=tmpfs,target=/scratch echo temp > /scratch/f && cp /scratch/f /tmpfs-worked\nHEALTHCHECK --interval=5s --retries=2 CMD wget -q -O- localhost || exit 1\n";
    let dir = project(&[
        ("images.toml", MANIFEST),
        ("bb/Dockerfile", BUSYBOX_BASE),
        ("child/Dockerfile", child),
        ("child/data.txt", "context data\n"),
    ]);
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    // /proc/net/dev has two header lines with ':'? It has one per interface: only `lo`.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("ifaces")).unwrap().trim(),
        "1",
        "--network=none sees only lo"
    );
    assert_eq!(std::fs::read_to_string(rootfs.join("copied")).unwrap(), "context data\n");
    // A bound file's stub is removed; the directory made for it stays, empty, as docker
    // leaves it.
    assert!(!rootfs.join("in/data.txt").exists(), "a bound file leaves no stub");
    assert_eq!(std::fs::read_dir(rootfs.join("in")).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(rootfs.join("from-tools")).unwrap(), "from-tools\n");
    assert_eq!(std::fs::read_dir(rootfs.join("mnt/tools")).unwrap().count(), 0);
    // Writable bind mounts: the step sees its writes, which are then thrown away.
    assert_eq!(std::fs::read_to_string(rootfs.join("rw-context")).unwrap(), "changed\n");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("child/data.txt")).unwrap(),
        "context data\n",
        "a writable mount never writes into the build context"
    );
    assert_eq!(std::fs::read_to_string(rootfs.join("rw-tools")).unwrap(), "from-tools\nmore\n");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tools-again")).unwrap(),
        "from-tools\n",
        "a writable mount from a stage never changes that stage"
    );
    assert_eq!(std::fs::read_to_string(rootfs.join("tmpfs-worked")).unwrap(), "temp\n");
    // The tmpfs's content is not captured; its mount point stays, empty.
    assert_eq!(std::fs::read_dir(rootfs.join("scratch")).unwrap().count(), 0);
    let cfg = fixture::raw_config(store.path(), "child");
    assert_eq!(cfg["author"], "Acme Ops <ops@example.com>");
    assert_eq!(cfg["config"]["Labels"]["maintainer"], "Acme Ops <ops@example.com>");
    assert_eq!(
        cfg["config"]["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "wget -q -O- localhost || exit 1"])
    );
    assert_eq!(cfg["config"]["Healthcheck"]["Interval"], 5_000_000_000u64);
    assert_eq!(cfg["config"]["Healthcheck"]["Retries"], 2);
}

#[test]
fn push_builds_with_the_secrets_build_takes() {
    let registry = common::TestRegistry::start(common::RegistryOptions::default());
    let manifest = format!(
        "{MANIFEST}\n[environments.dev]\nregistry = \"{}/dev\"\ntags = [\"dev\"]\n",
        registry.host
    );
    let dir = project(&[
        ("images.toml", &manifest),
        ("bb/Dockerfile", BUSYBOX_BASE),
        (
            "child/Dockerfile",
            "FROM bb\nRUN --mount=type=secret,id=tok cp /run/secrets/tok /copied\n",
        ),
    ]);
    let secret = dir.path().join("tok.txt");
    std::fs::write(&secret, "not-really-secret").unwrap();
    let store = tempfile::tempdir().unwrap();
    let out = ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["push", "--env", "dev", "--secret"])
        .arg(format!("id=tok,src={}", secret.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "child", work.path());
    assert_eq!(std::fs::read_to_string(rootfs.join("copied")).unwrap(), "not-really-secret");
}

#[test]
fn prune_removes_the_snapshots_of_layers_the_store_no_longer_has() {
    let dir = two_level("", "FROM bb\nRUN echo ran > /ran\n");
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let snapshots = store.path().join("snapshots");
    let in_use: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.contains('.'))
        .collect();
    assert!(!in_use.is_empty(), "the RUN used the base's layers as snapshots");
    // The snapshot of a layer that is gone (an image removed, its blobs pruned).
    let gone = snapshots.join("0123456789ab");
    std::fs::create_dir_all(gone.join("etc")).unwrap();
    std::fs::write(gone.join("etc/f"), "x").unwrap();
    std::fs::write(snapshots.join("0123456789ab.lock"), "").unwrap();
    std::fs::write(snapshots.join("0123456789ab.unsynced"), "boot").unwrap();

    let out = ferry(dir.path()).arg("--store").arg(store.path()).args(["prune"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Deleted snapshot: 0123456789ab"));
    let left: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(left.iter().all(|n| !n.starts_with("0123456789ab")), "{left:?}");
    for id in &in_use {
        assert!(snapshots.join(id).is_dir(), "snapshot {id} of a live layer was removed");
    }
    // And the next build still runs nothing.
    let report = build_json(dir.path(), store.path(), &[]);
    assert_eq!(report["steps_built"], 0, "{report}");
}

#[test]
fn a_bind_mount_cannot_follow_a_context_symlink_out_of_the_context() {
    for rw in ["", ",rw"] {
        let child = format!(
            "FROM bb\nRUN --mount=type=bind,source=out,target=/x{rw} cat /x/hostname > /leak\n"
        );
        let dir = project(&[
            ("images.toml", MANIFEST),
            ("bb/Dockerfile", BUSYBOX_BASE),
            ("child/Dockerfile", &child),
        ]);
        std::os::unix::fs::symlink("/etc", dir.path().join("child/out")).unwrap();
        let store = tempfile::tempdir().unwrap();
        let out = ferry(dir.path()).arg("--store").arg(store.path()).arg("build").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a bind mount{rw} read the host's /etc");
        assert!(
            stderr.contains("Dockerfile:2: source \"out\" is outside build context"),
            "{stderr}"
        );
    }
}

#[test]
fn plain_progress_streams_each_run_line_prefixed_by_image_and_line_and_quiet_shows_none() {
    let dir = two_level(
        "",
        "FROM bb\nENV X=1\nRUN echo first-line && printf 'no newline at the end'\nRUN echo on-stderr >&2\n",
    );
    let store = tempfile::tempdir().unwrap();
    let run = |mode: &str| {
        let out = ferry(dir.path())
            .arg("--store")
            .arg(store.path())
            .args(["--progress", mode, "build", "--no-cache"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let plain = run("plain");
    assert!(plain.contains("[child:3] first-line\n"), "{plain}");
    assert!(plain.contains("[child:3] no newline at the end\n"), "an unfinished line too: {plain}");
    assert!(plain.contains("[child:4] on-stderr\n"), "{plain}");
    assert!(plain.contains("[child] line 4: RUN echo on-stderr >&2"), "{plain}");
    let quiet = run("quiet");
    assert!(!quiet.contains("first-line") && !quiet.contains("[child]"), "{quiet}");
}
