//! Rootless builds: `ferry build` run as an ordinary user gives the same images as root.
//!
//! The tests run as root and start ferry as a uid of their own (util-linux's setpriv). That
//! user, and its subordinate id range, exist only in a private mount namespace in which an
//! overlay on /etc adds them to passwd, group, subuid and subgid: newuidmap reads them
//! there, and the machine's own files stay as they were.

#[path = "fixture/mod.rs"]
mod fixture;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use fixture::{blob_path, digests, ferry_command, project, store_manifest, BUSYBOX_BASE};

const MANIFEST: &str = "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n\
                        [images.app]\ncontext = \"app\"\n";

/// The base: files made by root, some given to 33 (www-data) and 1000, a sticky /tmp.
const BASE_STEPS: &str = "RUN mkdir -m 1777 /tmp && mkdir -p /srv/www /home/app /etc \
     && echo hi > /srv/www/index && chown -R 33:33 /srv/www \
     && echo x > /home/app/owned && chown 1000:1000 /home/app /home/app/owned\n";

/// On top: a copied-up lower file owned by 33, new directories, `COPY --from` (owners
/// kept), a cache mount given to 1000, and steps as USER 1000.
const APP: &str = "FROM bb\n\
     RUN echo more >> /srv/www/index && mkdir /made && touch /made/f && ls -ln /srv/www > /listing\n\
     COPY --from=bb /home/app /copied\n\
     COPY Dockerfile /from-context\n\
     USER 1000\n\
     RUN --mount=type=cache,target=/var/cache/app,uid=1000,gid=1000 \
         echo u > /tmp/by-1000 && mkdir /home/app/sub && id > /home/app/id \
         && touch /var/cache/app/seen && ls /var/cache/app > /home/app/cache\n";

/// A user for a test: its own uid, a subordinate range or none.
struct User {
    uid: u32,
    range: Option<(u32, u32)>,
}

impl User {
    fn name(&self) -> String {
        format!("ferry-rootless-{}", self.uid)
    }

    /// Runs `ferry args…` in `dir` as this user, with its account visible (see the module
    /// documentation).
    fn ferry(&self, dir: &Path, args: &[&str]) -> Output {
        let etc = tempfile::tempdir().unwrap();
        for d in ["upper", "work"] {
            std::fs::create_dir(etc.path().join(d)).unwrap();
        }
        let name = self.name();
        let mut script = format!(
            "set -e\n\
             mount -t overlay ferry-test-etc -o lowerdir=/etc,upperdir={0}/upper,workdir={0}/work /etc\n\
             echo '{name}:x:{uid}:{uid}::/nonexistent:/bin/sh' >> /etc/passwd\n\
             echo '{name}:x:{uid}:' >> /etc/group\n",
            etc.path().display(),
            uid = self.uid,
        );
        if let Some((start, count)) = self.range {
            for file in ["/etc/subuid", "/etc/subgid"] {
                script.push_str(&format!("echo '{name}:{start}:{count}' >> {file}\n"));
            }
        }
        script.push_str(&format!(
            "exec setpriv --reuid={0} --regid={0} --clear-groups \"$@\"\n",
            self.uid
        ));
        let reference = ferry_command();
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "sh", "-c", &script, "sh"])
            .arg(reference.get_program())
            .args(args)
            .current_dir(dir)
            .env("HOME", "/nonexistent")
            .stdin(std::process::Stdio::null());
        for (key, value) in reference.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command.output().unwrap()
    }

    /// Gives the user `path` and everything below it.
    fn own(&self, path: &Path) {
        for entry in walkdir::WalkDir::new(path) {
            let entry = entry.unwrap();
            std::os::unix::fs::lchown(entry.path(), Some(self.uid), Some(self.uid)).unwrap();
        }
    }
}

/// Whether this machine can run rootless builds at all: unprivileged user namespaces
/// (asked of util-linux's unshare, as an unrelated user) and the uidmap helpers.
fn rootless_possible() -> bool {
    let userns = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .args(["unshare", "--user", "--map-root-user", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let helpers =
        ["/usr/bin/newuidmap", "/usr/bin/newgidmap"].iter().all(|p| Path::new(p).exists());
    if !(userns && helpers) {
        eprintln!(
            "skipped: unprivileged user namespaces ({userns}) and newuidmap ({helpers}) are needed"
        );
    }
    userns && helpers
}

fn build(output: Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "ferry build failed ({:?}):\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON document")
}

/// Per layer of a store image, bottom first: tar path → (uid, gid).
fn layer_owners(store: &Path, name: &str) -> Vec<BTreeMap<String, (u64, u64)>> {
    store_manifest(store, name)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            let blob = std::fs::read(blob_path(store, layer["digest"].as_str().unwrap())).unwrap();
            let mut tar = Vec::new();
            zstd::Decoder::new(blob.as_slice()).unwrap().read_to_end(&mut tar).unwrap();
            tar::Archive::new(tar.as_slice())
                .entries()
                .unwrap()
                .map(|entry| {
                    let entry = entry.unwrap();
                    let path =
                        entry.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
                    let header = entry.header();
                    (path, (header.uid().unwrap(), header.gid().unwrap()))
                })
                .collect()
        })
        .collect()
}

/// The owner every layer of `name` that has `path` gives it.
fn owners_of(layers: &[BTreeMap<String, (u64, u64)>], path: &str) -> Vec<(u64, u64)> {
    layers.iter().filter_map(|l| l.get(path).copied()).collect()
}

#[test]
fn a_rootless_build_gives_the_same_images_as_root() {
    if !rootless_possible() {
        return;
    }
    let user = User { uid: 23456, range: Some((231072, 65536)) };
    let files = [
        ("images.toml", MANIFEST),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}{BASE_STEPS}")),
        ("app/Dockerfile", APP),
    ];

    let root_dir = project(&files);
    let root_store = tempfile::tempdir().unwrap();
    let root = build(
        ferry_command()
            .current_dir(root_dir.path())
            .arg("--store")
            .arg(root_store.path())
            .args(["build", "--json"])
            .output()
            .unwrap(),
    );

    let rootless_dir = project(&files);
    let rootless_store = tempfile::tempdir().unwrap();
    user.own(rootless_dir.path());
    user.own(rootless_store.path());
    let store_arg = rootless_store.path().to_str().unwrap();
    let output = user.ferry(rootless_dir.path(), &["--store", store_arg, "build", "--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let rootless = build(output);
    assert!(!stderr.contains("warning:"), "a user with a range is not warned:\n{stderr}");

    assert_eq!(digests(&rootless), digests(&root), "rootless and root builds differ");

    for store in [root_store.path(), rootless_store.path()] {
        let layers = layer_owners(store, "app");
        let at = |path: &str| owners_of(&layers, path);
        // Made by root in a RUN step: 0:0, never the caller's uid.
        assert_eq!(at("made"), [(0, 0)], "{}", store.display());
        assert_eq!(at("made/f"), [(0, 0)]);
        assert_eq!(at("listing"), [(0, 0)]);
        // Given to 33 in the base, copied up by the next step: still 33.
        assert_eq!(at("srv/www/index"), [(33, 33), (33, 33)]);
        // chown 1000:1000 in a RUN, kept by COPY --from, made as USER 1000.
        assert_eq!(at("home/app/owned"), [(1000, 1000)]);
        assert_eq!(at("copied/owned"), [(1000, 1000)]);
        assert_eq!(at("home/app/sub"), [(1000, 1000)]);
        assert_eq!(at("tmp/by-1000"), [(1000, 1000)]);
        // COPY from the context: root's, whoever checked it out.
        assert_eq!(at("from-context"), [(0, 0)]);
    }

    // The rootless build really ran in the user's namespace: its snapshots hold 33's files
    // as the 33rd subordinate id, not as the caller.
    let www_owners: Vec<u32> = std::fs::read_dir(rootless_store.path().join("snapshots"))
        .unwrap()
        .filter_map(|e| std::fs::symlink_metadata(e.unwrap().path().join("srv/www/index")).ok())
        .map(|m| m.uid())
        .collect();
    assert!(!www_owners.is_empty());
    assert!(www_owners.iter().all(|&uid| uid == 231072 + 32), "{www_owners:?}");

    // The store's upkeep runs in the namespace too: the caller could not remove those
    // files from outside it.
    for command in [
        &["rmi", "app", "t/app"][..],
        &["rmi", "bb", "t/bb"],
        &["cache", "prune", "--all"],
        &["prune"],
    ] {
        let mut args = vec!["--store", store_arg];
        args.extend_from_slice(command);
        let output = user.ferry(rootless_dir.path(), &args);
        assert!(
            output.status.success(),
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let left: Vec<_> = walkdir::WalkDir::new(rootless_store.path())
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.metadata().unwrap().uid() >= 231072)
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(left.is_empty(), "files of subordinate ids left behind: {left:?}");
}

#[test]
fn without_a_range_rootless_says_what_to_add_and_fails_only_what_needs_other_ids() {
    if !rootless_possible() {
        return;
    }
    let user = User { uid: 23457, range: None };
    let name = user.name();
    let files = [
        ("images.toml", "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.user]\ncontext = \"user\"\n\n[images.chown]\ncontext = \"chown\"\n"),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}RUN mkdir -m 1777 /tmp && echo hi > /hi\n")),
        ("user/Dockerfile", "FROM bb\nUSER 1000\nRUN touch /tmp/x\n"),
        ("chown/Dockerfile", "FROM bb\nRUN touch /x && chown 1000:1000 /x\n"),
    ];
    let dir = project(&files);
    let store = tempfile::tempdir().unwrap();
    user.own(dir.path());
    user.own(store.path());
    let store_arg = store.path().to_str().unwrap();

    // Only id 0 needed: it builds, with a warning that says what is missing and what to add,
    // and gives root's image.
    let output = user.ferry(dir.path(), &["--store", store_arg, "build", "--json", "bb"]);
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let rootless = build(output);
    let hint = format!("`{name}:100000:65536`");
    assert!(stderr.contains("warning: this rootless build maps only uid 23457"), "{stderr}");
    assert!(
        stderr.contains("has no subordinate id range in /etc/subuid and /etc/subgid"),
        "{stderr}"
    );
    assert!(stderr.contains(&hint) && stderr.contains("uidmap package"), "{stderr}");
    let root_store = tempfile::tempdir().unwrap();
    let root = build(
        ferry_command()
            .current_dir(dir.path())
            .arg("--store")
            .arg(root_store.path())
            .args(["build", "--json", "bb"])
            .output()
            .unwrap(),
    );
    assert_eq!(digests(&rootless)["bb"], digests(&root)["bb"]);
    let layers = layer_owners(store.path(), "bb");
    assert_eq!(owners_of(&layers, "hi"), [(0, 0)], "the caller's uid is root in the image");

    // USER 1000 cannot run, and the error says why and what to add.
    let output = user.ferry(dir.path(), &["--store", store_arg, "build", "user"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("1000 does not exist in a rootless sandbox"), "{stderr}");
    assert!(stderr.contains(&hint) && stderr.contains("/etc/subgid"), "{stderr}");

    // chown to 1000 fails inside the step; the failure carries the same note.
    let output = user.ferry(dir.path(), &["--store", store_arg, "build", "chown"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("RUN failed with exit code 1"), "{stderr}");
    assert!(stderr.contains("note: this rootless build maps only uid 23457"), "{stderr}");
    assert!(stderr.contains(&hint), "{stderr}");
}
