//! mtimes in layers and in the filesystem RUN sees: kept from the context (docker's
//! behaviour) and clamped to the epoch when one applies (SOURCE_DATE_EPOCH, images.toml's
//! `source_date_epoch`, or by default HEAD's commit time in a git checkout). Never 1970
//! unless asked for: `gzip -k` refuses such files.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::fixture;

use fixture::{
    blob_path, digests, ferry, layer_digests, project, skopeo_config, store_manifest, BUSYBOX_BASE,
};

/// An mtime long before the build (2001-09-09T01:46:40Z).
const OLD: i64 = 1_000_000_000;
/// The commit time of the git tests (2025-06-01T00:00:00Z): before the files are written,
/// as a checkout is newer than its commit.
const COMMIT_DATE: &str = "2025-06-01T00:00:00Z";
const COMMIT: i64 = 1_748_736_000;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn set_mtime(path: &Path, mtime: i64) {
    filetime::set_file_mtime(path, filetime::FileTime::from_unix_time(mtime, 0)).unwrap();
}

fn mtime_of(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mtime()
}

/// A fleet of `bb` (busybox) and `app` (`app/Dockerfile` = `dockerfile`), with
/// `app/static/old.txt` (mtime [`OLD`]) and `app/static/new.txt` (mtime now).
fn fleet(project_extra: &str, dockerfile: &str) -> tempfile::TempDir {
    let manifest = format!(
        "[project]\nname = \"t\"\n{project_extra}\n[images.bb]\ncontext = \"bb\"\n\n[images.app]\ncontext = \"app\"\n"
    );
    let dir = project(&[
        ("images.toml", &manifest),
        ("bb/Dockerfile", BUSYBOX_BASE),
        ("app/Dockerfile", dockerfile),
        ("app/static/old.txt", "old\n"),
        ("app/static/new.txt", "new\n"),
    ]);
    set_mtime(&dir.path().join("app/static/old.txt"), OLD);
    dir
}

/// `ferry build --json` with `epoch` as SOURCE_DATE_EPOCH (None: unset); returns the report.
fn build(dir: &Path, store: &Path, epoch: Option<&str>) -> serde_json::Value {
    let mut cmd = ferry(dir);
    cmd.env_remove("SOURCE_DATE_EPOCH");
    if let Some(e) = epoch {
        cmd.env("SOURCE_DATE_EPOCH", e);
    }
    let out = cmd.arg("--store").arg(store).args(["build", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "ferry build failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// Path → (mtime, content) of every entry of every layer of a store image, upper layers
/// winning.
fn layer_entries(store: &Path, name: &str) -> BTreeMap<String, (i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for l in store_manifest(store, name)["layers"].as_array().unwrap() {
        let blob = std::fs::read(blob_path(store, l["digest"].as_str().unwrap())).unwrap();
        let raw = if blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            zstd::decode_all(blob.as_slice()).unwrap()
        } else {
            blob
        };
        for e in tar::Archive::new(raw.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
            let mtime = e.header().mtime().unwrap() as i64;
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut content).unwrap();
            out.insert(path, (mtime, content));
        }
    }
    out
}

fn mtime_in(entries: &BTreeMap<String, (i64, Vec<u8>)>, path: &str) -> i64 {
    entries.get(path).unwrap_or_else(|| panic!("no {path} in {:?}", entries.keys())).0
}

fn content_in(entries: &BTreeMap<String, (i64, Vec<u8>)>, path: &str) -> String {
    let bytes = &entries.get(path).unwrap_or_else(|| panic!("no {path}")).1;
    String::from_utf8_lossy(bytes).to_string()
}

fn created(store: &Path, name: &str) -> i64 {
    let cfg = skopeo_config(store, name);
    chrono::DateTime::parse_from_rfc3339(cfg["created"].as_str().unwrap()).unwrap().timestamp()
}

/// GNU gzip (which refuses files dated 1970, as the issue found) with its loader and
/// libraries, into `dir`: run it in the image as `/gnu/ld.so --library-path /gnu /gnu/gzip`.
fn add_gnu_gzip(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let gzip = Path::new("/usr/bin/gzip");
    assert!(gzip.exists(), "GNU gzip is needed");
    std::fs::copy(gzip, dir.join("gzip")).unwrap();
    let ldd = Command::new("ldd").arg(gzip).output().expect("ldd is needed");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [_, "=>", lib, ..] if lib.starts_with('/') => {
                let name = Path::new(lib).file_name().unwrap();
                std::fs::copy(lib, dir.join(name)).unwrap();
            }
            [loader, ..] if loader.starts_with('/') => {
                std::fs::copy(loader, dir.join("ld.so")).unwrap();
            }
            _ => {}
        }
    }
    assert!(dir.join("ld.so").exists(), "no loader in `ldd /usr/bin/gzip`");
}

/// The git of the tests, with a fixed identity and commit date.
fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env("GIT_AUTHOR_DATE", COMMIT_DATE)
        .env("GIT_COMMITTER_DATE", COMMIT_DATE)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn git_init_and_commit(dir: &Path) {
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["config", "commit.gpgsign", "false"]);
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "fleet"]);
}

#[test]
fn outside_git_copy_keeps_the_context_mtimes_and_run_sees_them() {
    let dockerfile = "FROM bb\nCOPY gnu /gnu\nCOPY static /srv/app/static\n\
        RUN stat -c %Y /srv/app/static/old.txt > /seen-mtime\n\
        RUN --mount=type=bind,source=static,target=/ctx,rw stat -c %Y /ctx/old.txt > /bind-seen\n\
        RUN /gnu/ld.so --library-path /gnu /gnu/gzip -k -9 -r /srv/app/static\n";
    let dir = fleet("", dockerfile);
    add_gnu_gzip(&dir.path().join("app/gnu"));
    let new_mtime = mtime_of(&dir.path().join("app/static/new.txt"));
    let store = tempfile::tempdir().unwrap();
    let start = now();
    build(dir.path(), store.path(), None);
    let end = now();

    let entries = layer_entries(store.path(), "app");
    // The context's mtimes, as they are: no epoch applies outside git with nothing set.
    assert_eq!(mtime_in(&entries, "srv/app/static/old.txt"), OLD);
    assert_eq!(mtime_in(&entries, "srv/app/static/new.txt"), new_mtime);
    // RUN saw the mtime in its filesystem, and gzip (which refuses 1970) kept it.
    assert_eq!(content_in(&entries, "seen-mtime").trim(), OLD.to_string());
    assert_eq!(content_in(&entries, "bind-seen").trim(), OLD.to_string(), "writable bind mount");
    assert_eq!(mtime_in(&entries, "srv/app/static/old.txt.gz"), OLD);
    let gz = &entries["srv/app/static/old.txt.gz"].1;
    assert_eq!(i64::from(u32::from_le_bytes(gz[4..8].try_into().unwrap())), OLD, "gzip's MTIME");
    // What RUN writes keeps its own time; what ferry creates with no source (the parents
    // COPY makes, `created`) gets the build's.
    let run_made = mtime_in(&entries, "seen-mtime");
    assert!((start..=end).contains(&run_made), "{run_made} not in {start}..={end}");
    for generated in ["srv", "srv/app"] {
        let m = mtime_in(&entries, generated);
        assert!((start..=end).contains(&m), "{generated}: {m} not in {start}..={end}");
    }
    let c = created(store.path(), "app");
    assert!((start..=end).contains(&c), "created {c} not in {start}..={end}");
}

#[test]
fn in_git_layers_clamp_to_the_commit_time_and_two_clones_give_the_same_digests() {
    let dockerfile = "FROM bb\nCOPY static /srv/app/static\n\
        RUN stat -c %Y /srv/app/static/new.txt > /seen-mtime && mkdir -p /var/made\n";
    let dir = fleet("", dockerfile);
    git_init_and_commit(dir.path());
    let first_store = tempfile::tempdir().unwrap();
    let store = &first_store;
    let first = digests(&build(dir.path(), store.path(), None));

    let entries = layer_entries(store.path(), "app");
    // Every file is newer than the commit (written after it, or by RUN): all clamp to it;
    // one older keeps its own time.
    assert_eq!(mtime_in(&entries, "srv/app/static/new.txt"), COMMIT);
    assert_eq!(mtime_in(&entries, "srv/app/static/old.txt"), OLD);
    assert_eq!(mtime_in(&entries, "srv"), COMMIT);
    assert_eq!(mtime_in(&entries, "var/made"), COMMIT);
    assert_eq!(mtime_in(&entries, "seen-mtime"), COMMIT);
    assert_eq!(content_in(&entries, "seen-mtime").trim(), COMMIT.to_string());
    assert_eq!(mtime_in(&entries, "bin/busybox"), COMMIT);
    assert_eq!(skopeo_config(store.path(), "app")["created"], COMMIT_DATE);

    // Two clones of the commit, every file checked out now (old.txt too), one of them with
    // its mtimes changed since: the same digests in two empty stores.
    let clones = tempfile::tempdir().unwrap();
    let mut got = Vec::new();
    for (name, touch) in [("a", None), ("b", Some(now() + 3600))] {
        git(clones.path(), &["clone", "-q", &dir.path().display().to_string(), name]);
        let clone = clones.path().join(name);
        if let Some(t) = touch {
            for f in ["app/static/old.txt", "app/static/new.txt", "app/Dockerfile", "bb/busybox"] {
                set_mtime(&clone.join(f), t);
            }
        }
        let store = tempfile::tempdir().unwrap();
        got.push(digests(&build(&clone, store.path(), None)));
        if touch.is_some() {
            // The original tree differs from the clones in old.txt's mtime (older than the
            // commit) and the source label (the clones' origin): bb's layers are the same.
            assert_eq!(layer_digests(store.path(), "bb"), layer_digests(first_store.path(), "bb"));
        }
    }
    assert_eq!(got[0], got[1], "two clones of one commit, two empty stores");
    assert!(got[0]["app"].starts_with("sha256:"));
    assert_ne!(first["app"], got[0]["app"]);
}

#[test]
fn source_date_epoch_and_the_setting_clamp_and_none_keeps_mtimes_in_git() {
    let dockerfile = "FROM scratch\nCOPY static /static\n";
    let built = |extra: &str, env: Option<&str>| {
        let dir = fleet(extra, dockerfile);
        let new_mtime = mtime_of(&dir.path().join("app/static/new.txt"));
        let store = tempfile::tempdir().unwrap();
        build(dir.path(), store.path(), env);
        let entries = layer_entries(store.path(), "app");
        let got = (
            mtime_in(&entries, "static/old.txt"),
            mtime_in(&entries, "static/new.txt"),
            created(store.path(), "app"),
        );
        (got, new_mtime)
    };
    // The environment: a later mtime clamps to it, an earlier one stays.
    let (got, _) = built("", Some("1500000000"));
    assert_eq!(got, (OLD, 1_500_000_000, 1_500_000_000));
    // images.toml.
    let (got, _) = built("source_date_epoch = 1200000000\n", None);
    assert_eq!(got, (OLD, 1_200_000_000, 1_200_000_000));
    // The environment wins over images.toml.
    let (got, _) = built("source_date_epoch = 1200000000\n", Some("1500000000"));
    assert_eq!(got, (OLD, 1_500_000_000, 1_500_000_000));
    // 0 is an explicit ask for 1970, in either place.
    assert_eq!(built("source_date_epoch = 0\n", None).0, (0, 0, 0));
    assert_eq!(built("", Some("0")).0, (0, 0, 0));
    // "none" outside git is the default's behaviour: nothing is clamped.
    let (got, new_mtime) = built("source_date_epoch = \"none\"\n", None);
    assert_eq!((got.0, got.1), (OLD, new_mtime));

    // In git, "none" asks for docker's behaviour: mtimes kept, not the commit's time.
    let dir = fleet("source_date_epoch = \"none\"\n", dockerfile);
    git_init_and_commit(dir.path());
    let new_mtime = now() + 3600;
    set_mtime(&dir.path().join("app/static/new.txt"), new_mtime);
    let store = tempfile::tempdir().unwrap();
    build(dir.path(), store.path(), None);
    let entries = layer_entries(store.path(), "app");
    assert_eq!(mtime_in(&entries, "static/new.txt"), new_mtime);
    assert_eq!(mtime_in(&entries, "static/old.txt"), OLD);
    // And an explicit epoch still wins over the commit time there.
    let store = tempfile::tempdir().unwrap();
    build(dir.path(), store.path(), Some("1500000000"));
    let entries = layer_entries(store.path(), "app");
    assert_eq!(mtime_in(&entries, "static/new.txt"), 1_500_000_000);
}

#[test]
fn a_touched_but_unchanged_file_is_a_cache_hit() {
    let dir = fleet("", "FROM scratch\nCOPY static /static\n");
    let store = tempfile::tempdir().unwrap();
    let first = build(dir.path(), store.path(), Some("1500000000"));
    set_mtime(&dir.path().join("app/static/old.txt"), OLD + 1);
    set_mtime(&dir.path().join("app/static/new.txt"), OLD + 2);
    let second = build(dir.path(), store.path(), Some("1500000000"));
    assert_eq!(digests(&first), digests(&second));
    let app = second["images"].as_array().unwrap().iter().find(|i| i["name"] == "app").unwrap();
    let steps: Vec<&str> =
        app["steps"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert!(steps.contains(&"cached") && !steps.contains(&"built"), "{app}");
}

#[test]
fn add_keeps_the_archive_mtimes_up_to_the_epoch() {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, mtime) in [("early.txt", 1_100_000_000u64), ("late.txt", 1_600_000_000)] {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append(&h, &b"abc"[..]).unwrap();
    }
    let dir = fleet("", "FROM scratch\nADD files.tar /x/\n");
    std::fs::write(dir.path().join("app/files.tar"), tar.into_inner().unwrap()).unwrap();
    let store = tempfile::tempdir().unwrap();
    build(dir.path(), store.path(), Some("1500000000"));
    let entries = layer_entries(store.path(), "app");
    assert_eq!(mtime_in(&entries, "x/early.txt"), 1_100_000_000);
    assert_eq!(mtime_in(&entries, "x/late.txt"), 1_500_000_000);

    let store = tempfile::tempdir().unwrap();
    build(dir.path(), store.path(), None);
    let entries = layer_entries(store.path(), "app");
    assert_eq!(mtime_in(&entries, "x/late.txt"), 1_600_000_000, "no epoch: the archive's");
}

#[test]
fn a_warm_cache_from_another_epoch_gives_the_digests_of_a_clean_build() {
    // COPY keeps the context's mtimes, RUN writes new ones: under each epoch both are
    // clamped differently, so a layer cached under one epoch is not the layer of another.
    let dir = fleet("", "FROM bb\nCOPY static /srv/static\nRUN echo made > /made\n");
    let late = (now() - 10).to_string();
    let early = (OLD + 5).to_string();

    let warm = tempfile::tempdir().unwrap();
    build(dir.path(), warm.path(), Some(&late));
    let warm_early = digests(&build(dir.path(), warm.path(), Some(&early)));
    let clean = tempfile::tempdir().unwrap();
    let clean_early = digests(&build(dir.path(), clean.path(), Some(&early)));
    assert_eq!(warm_early, clean_early, "a cached layer of another epoch was reused");
    let entries = layer_entries(warm.path(), "app");
    assert_eq!(mtime_in(&entries, "srv/static/new.txt"), OLD + 5);
    assert_eq!(mtime_in(&entries, "made"), OLD + 5);
    // Back to the first epoch: its cache entries are still there and still right.
    let again = build(dir.path(), warm.path(), Some(&late));
    let clean_late = digests(&build(dir.path(), clean.path(), Some(&late)));
    assert_eq!(digests(&again), clean_late);
}
