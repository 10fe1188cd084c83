//! `ferry cache stats` and `ferry cache prune` over real builds (`FROM scratch` + `COPY`
//! fleets): the numbers against what is on disk, least-recently-used order, ages, `--all`,
//! `--dry-run`, layers that tagged images keep, a prune racing builds, and prunes killed
//! with SIGKILL. Every expectation about the store is read from its files, not from ferry.
//!
//! Time: builds and prunes run with `FERRY_TEST_NOW` (seconds since the epoch; documented
//! in `build::cache` as a test-only clock) so that "last used an hour / a week ago" needs
//! no waiting. Nothing is timed.

mod crash_support;
mod push_support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use crash_support::{check_store, copy_store, kill_after, outcomes_line, spread, timed};
use push_support::{common, fixture};
use serde_json::Value;

/// An arbitrary "now" for the test clock, and its units.
const T0: u64 = 1_800_000_000;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// A project and a store of its own.
struct Work {
    project: tempfile::TempDir,
    _scratch: tempfile::TempDir,
    store: PathBuf,
}

/// `ferry` in `dir` on `store`, in the tests' clean environment.
fn ferry_on(dir: &Path, store: &Path) -> Command {
    let mut c = fixture::ferry(dir);
    c.arg("--store").arg(store);
    c
}

impl Work {
    fn new(files: &[(&str, &str)]) -> Work {
        let scratch = tempfile::tempdir().unwrap();
        let store = scratch.path().join("store");
        Work { project: fixture::project(files), _scratch: scratch, store }
    }

    fn dir(&self) -> &Path {
        self.project.path()
    }

    /// `ferry` in the project with the store, at test time `now` (seconds).
    fn ferry(&self, now: u64) -> Command {
        let mut c = ferry_on(self.dir(), &self.store);
        c.env("FERRY_TEST_NOW", now.to_string());
        c
    }

    fn run(&self, now: u64, args: &[&str]) -> Output {
        self.ferry(now).args(args).output().unwrap()
    }

    /// `ferry --json ARGS` at `now`, which must succeed; its document.
    fn json(&self, now: u64, args: &[&str]) -> Value {
        let out = self.ferry(now).arg("--json").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?} failed ({:?}):\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn build(&self, now: u64, args: &[&str]) -> Value {
        let mut all = vec!["build"];
        all.extend(args);
        self.json(now, &all)
    }

    fn write(&self, path: &str, content: &[u8]) {
        std::fs::write(self.dir().join(path), content).unwrap();
    }

    fn verify(&self) {
        crash_support::assert_verify(&mut ferry_on(self.dir(), &self.store), "verify");
    }
}

/// A fleet of three images: `a` (two COPY layers), `b` on top of `a` (two more), and `c`
/// copying from `a` (an alias entry beside a content entry). Each COPY on top of a layer
/// extracts that layer's snapshot.
fn abc() -> Work {
    Work::new(&[
        (
            "images.toml",
            "[project]\nname = \"t\"\n\n[images.a]\ncontext = \"a\"\n\n[images.b]\ncontext = \"b\"\n\n[images.c]\ncontext = \"c\"\n",
        ),
        ("a/Dockerfile", "FROM scratch\nCOPY a1 /a1\nCOPY a2 /a2\n"),
        ("a/a1", "first file of a\n"),
        ("a/a2", "second file of a\n"),
        ("b/Dockerfile", "FROM a\nCOPY b1 /b1\nCOPY b2 /b2\n"),
        ("b/b1", "b, first version\n"),
        ("b/b2", "b2\n"),
        ("c/Dockerfile", "FROM scratch\nCOPY --from=a /a1 /c1\nCOPY c2 /c2\n"),
        ("c/c2", "c\n"),
    ])
}

/// `bb`, a busybox base, and `app` on it, built from `dockerfile`.
fn busybox_app(dockerfile: &str) -> Work {
    Work::new(&[
        (
            "images.toml",
            "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.app]\ncontext = \"app\"\n",
        ),
        ("bb/Dockerfile", fixture::BUSYBOX_BASE),
        ("app/Dockerfile", dockerfile),
    ])
}

/// One image, `app`, whose single layer is the file `data`.
fn one_layer_app() -> Work {
    Work::new(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.app]\ncontext = \"app\"\n"),
        ("app/Dockerfile", "FROM scratch\nCOPY data /data\n"),
        ("app/data", ""),
    ])
}

// ---------------------------------------------------------------------------------------
// The store, read from its files

fn blob_path(store: &Path, digest: &str) -> PathBuf {
    store.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

fn has_blob(store: &Path, digest: &str) -> bool {
    blob_path(store, digest).is_file()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A cache entry file: its parsed content and modification time.
struct Entry {
    path: PathBuf,
    json: Value,
    mtime: SystemTime,
}

impl Entry {
    fn blob(&self) -> String {
        self.json["blob"]["digest"].as_str().unwrap().to_string()
    }
    fn diff_id(&self) -> String {
        self.json["diff_id"].as_str().unwrap().to_string()
    }
}

/// Every cache entry (`cache/<2 hex>/<64 hex>.json`).
fn entries(store: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(store.join("cache")).into_iter().flatten().flatten() {
        if !dir.file_type().unwrap().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.len() == 69 && name.ends_with(".json") {
                let meta = f.metadata().unwrap();
                out.push(Entry {
                    path: f.path(),
                    json: read_json(&f.path()),
                    mtime: meta.modified().unwrap(),
                });
            }
        }
    }
    out
}

/// Every blob any `index.json` entry reaches (manifests, configs, layers), and the diffIDs
/// of their layers.
fn image_blobs(store: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut blobs = BTreeSet::new();
    let mut diff_ids = BTreeSet::new();
    let mut queue: Vec<String> = read_json(&store.join("index.json"))["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    while let Some(d) = queue.pop() {
        if !blobs.insert(d.clone()) {
            continue;
        }
        let m = read_json(&blob_path(store, &d));
        for child in m["manifests"].as_array().into_iter().flatten() {
            queue.push(child["digest"].as_str().unwrap().to_string());
        }
        if let Some(config) = m["config"]["digest"].as_str() {
            blobs.insert(config.to_string());
            let c = read_json(&blob_path(store, config));
            for id in c["rootfs"]["diff_ids"].as_array().into_iter().flatten() {
                diff_ids.insert(id.as_str().unwrap().to_string());
            }
        }
        for l in m["layers"].as_array().into_iter().flatten() {
            blobs.insert(l["digest"].as_str().unwrap().to_string());
        }
    }
    (blobs, diff_ids)
}

/// The snapshots on disk of the layers of the images in the store.
fn image_snapshots(store: &Path) -> BTreeSet<String> {
    let (_, diff_ids) = image_blobs(store);
    let ids: BTreeSet<String> = diff_ids.iter().map(|d| snapshot_of(d)).collect();
    snapshots(store).intersection(&ids).cloned().collect()
}

/// Extracted snapshot directories by id.
fn snapshots(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn snapshot_of(diff_id: &str) -> String {
    diff_id.trim_start_matches("sha256:")[..12].to_string()
}

/// Disk usage in bytes as `du` counts it.
fn du(path: &Path) -> u64 {
    let out = Command::new("du").args(["-s", "-B1"]).arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap()
}

/// Every file and directory of the store with its size, mtime and inode.
fn tree(store: &Path) -> BTreeMap<PathBuf, (u64, i64, i64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![store.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
        }
    }
    // A process's own temporary session directory is not the store's content.
    out.retain(|p, _| !p.starts_with(store.join("tmp")) && !p.starts_with(store.join("locks")));
    out
}

/// No cache entry may name a blob that is not there.
fn assert_no_dangling_entry(store: &Path, why: &str) {
    for e in entries(store) {
        assert!(has_blob(store, &e.blob()), "{why}: {} names a missing blob", e.path.display());
    }
}

fn rfc3339(secs: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn steps_built(report: &Value) -> u64 {
    report["steps_built"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------------------

#[test]
fn stats_match_what_is_on_disk() {
    let w = abc();
    w.build(T0, &[]);
    // b changes: its old layer is now only in the cache. Two hours on, every other entry is
    // hit (and so used again); the old b entry is not.
    w.write("b/b1", b"b, second version, a little longer\n");
    let second = w.build(T0 + 2 * HOUR, &[]);
    assert_eq!(steps_built(&second), 2, "{second}");
    let stats = w.json(T0 + 3 * HOUR, &["cache", "stats"]);

    let entries = entries(&w.store);
    let kept = image_blobs(&w.store).0;
    let layers: BTreeSet<String> = entries.iter().map(Entry::blob).collect();
    let size = |d: &String| std::fs::metadata(blob_path(&w.store, d)).unwrap().len();
    let (shared, reclaimable): (Vec<&String>, Vec<&String>) =
        layers.iter().partition(|d| kept.contains(*d));
    // The first b1 layer; the b2 layer, under a new key, is the same blob as before.
    assert_eq!(reclaimable.len(), 1, "the first b1 layer");
    // An alias entry shares its layer with a content entry: fewer layers than entries.
    assert!(layers.len() < entries.len(), "{} entries, {} layers", entries.len(), layers.len());
    let entry_snapshots: BTreeSet<String> =
        entries.iter().map(|e| snapshot_of(&e.diff_id())).collect();
    let on_disk: Vec<String> =
        snapshots(&w.store).into_iter().filter(|s| entry_snapshots.contains(s)).collect();
    assert!(!on_disk.is_empty(), "COPY on top of a layer extracts it");
    let image_snapshots = image_snapshots(&w.store);
    let snapshot_bytes: u64 = on_disk.iter().map(|s| du(&w.store.join("snapshots").join(s))).sum();
    let reclaimable_snapshot_bytes: u64 = on_disk
        .iter()
        .filter(|s| !image_snapshots.contains(*s))
        .map(|s| du(&w.store.join("snapshots").join(s)))
        .sum();
    assert!(reclaimable_snapshot_bytes > 0, "the first b1 layer was extracted for COPY b2");
    let oldest = entries.iter().map(|e| e.mtime).min().unwrap();
    let newest = entries.iter().map(|e| e.mtime).max().unwrap();
    assert_eq!(oldest, SystemTime::UNIX_EPOCH + Duration::from_secs(T0));
    assert_eq!(newest, SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + 2 * HOUR));

    let want = serde_json::json!({
        "entries": entries.len(),
        "dangling_entries": 0,
        "unreadable_entries": 0,
        "layers": layers.len(),
        "layer_bytes": layers.iter().map(size).sum::<u64>(),
        "shared_layers": shared.len(),
        "shared_bytes": shared.iter().map(|d| size(d)).sum::<u64>(),
        "reclaimable_layers": reclaimable.len(),
        "reclaimable_bytes": reclaimable.iter().map(|d| size(d)).sum::<u64>(),
        "snapshots": on_disk.len(),
        "snapshot_bytes": snapshot_bytes,
        "reclaimable_snapshot_bytes": reclaimable_snapshot_bytes,
        "oldest_last_used": rfc3339(T0),
        "newest_last_used": rfc3339(T0 + 2 * HOUR),
        "run_caches": 0,
        "run_cache_bytes": 0,
    });
    assert_eq!(stats, want);

    // The text form says the same.
    let out = w.run(T0 + 3 * HOUR, &["cache", "stats"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("Cache entries:  {}\n", entries.len())), "{text}");
    assert!(text.contains(&rfc3339(T0)), "{text}");

    // Broken entries are counted apart: one whose blob is gone, one that does not parse.
    let victim = entries.iter().find(|e| e.blob() == *reclaimable[0]).unwrap();
    std::fs::remove_file(blob_path(&w.store, reclaimable[0])).unwrap();
    let junk = victim.path.with_file_name(format!(
        "{}{}.json",
        &victim.path.file_name().unwrap().to_string_lossy()[..2],
        "0".repeat(62)
    ));
    std::fs::write(&junk, b"{ not an entry").unwrap();
    let stats = w.json(T0 + 3 * HOUR, &["cache", "stats"]);
    assert_eq!(stats["entries"], entries.len() - 1);
    assert_eq!(stats["dangling_entries"], 1);
    assert_eq!(stats["unreadable_entries"], 1);
    assert_eq!(stats["reclaimable_layers"], 0);
    // Any prune removes them, even one that keeps everything else.
    let report = w.json(T0 + 3 * HOUR, &["cache", "prune", "--keep-bytes", "10GB"]);
    assert_eq!(report["entries_removed"], 2, "{report}");
    assert!(!junk.exists() && !victim.path.exists());
    w.verify();
}

#[test]
fn keep_bytes_removes_the_least_recently_used_layers_first() {
    let w = one_layer_app();
    let (a, b, c) = (common::noise(40_000, 1), common::noise(20_000, 2), common::noise(10_000, 3));
    w.write("app/data", &a);
    let first_a = w.build(T0, &[]);
    let layer_a = fixture::layer_digests(&w.store, "app")[0].clone();
    w.write("app/data", &b);
    let first_b = w.build(T0 + HOUR, &[]);
    let layer_b = fixture::layer_digests(&w.store, "app")[0].clone();
    // A again, as a no-op: its entry counts as used now.
    w.write("app/data", &a);
    let again = w.build(T0 + 2 * HOUR, &[]);
    assert_eq!(steps_built(&again), 0, "{again}");
    // Within the hour, a no-op build writes nothing at all (not even a last-use time).
    let before = tree(&w.store);
    let quiet = w.build(T0 + 2 * HOUR + 1800, &[]);
    assert_eq!(steps_built(&quiet), 0);
    let after = tree(&w.store);
    let changed: Vec<&PathBuf> = after
        .iter()
        .filter(|(p, v)| before.get(*p) != Some(*v) && p.starts_with(w.store.join("cache")))
        .map(|(p, _)| p)
        .collect();
    assert!(changed.is_empty(), "a no-op build within the hour changed {changed:?}");
    // C is tagged now: A and B are only in the cache, A used more recently than B although
    // B was built later.
    w.write("app/data", &c);
    w.build(T0 + 3 * HOUR, &[]);
    let layer_c = fixture::layer_digests(&w.store, "app")[0].clone();
    let size = |d: &str| std::fs::metadata(blob_path(&w.store, d)).unwrap().len();
    let (size_a, size_b) = (size(&layer_a), size(&layer_b));
    assert!(size_b < size_a, "B is the smaller: size alone would pick A");
    let stats = w.json(T0 + 4 * HOUR, &["cache", "stats"]);
    assert_eq!(stats["reclaimable_bytes"], size_a + size_b);

    // Room for one of them: B (least recently used) goes, A stays.
    let budget = size_a.to_string();
    let report = w.json(T0 + 4 * HOUR, &["cache", "prune", "--keep-bytes", &budget]);
    assert_eq!(report["entries_removed"], 1, "{report}");
    assert_eq!(report["removed_blobs"], serde_json::json!([layer_b]));
    assert_eq!(report["blob_bytes"], size_b);
    assert!(!has_blob(&w.store, &layer_b));
    assert!(has_blob(&w.store, &layer_a) && has_blob(&w.store, &layer_c));
    w.verify();

    w.write("app/data", &a);
    let rebuilt_a = w.build(T0 + 5 * HOUR, &[]);
    assert_eq!(steps_built(&rebuilt_a), 0, "A was kept: {rebuilt_a}");
    assert_eq!(fixture::digests(&rebuilt_a), fixture::digests(&first_a));
    w.write("app/data", &b);
    let rebuilt_b = w.build(T0 + 5 * HOUR, &[]);
    assert_eq!(steps_built(&rebuilt_b), 1, "B was removed: {rebuilt_b}");
    assert_eq!(fixture::digests(&rebuilt_b), fixture::digests(&first_b));
    assert!(has_blob(&w.store, &layer_b));

    // Sizes take units; a budget the cache fits in removes nothing.
    let report = w.json(T0 + 5 * HOUR, &["cache", "prune", "--keep-bytes", "1GB"]);
    assert_eq!(report["entries_removed"], 0);
    let out = w.run(T0, &["cache", "prune", "--keep-bytes", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`lots` is not a size"));
}

#[test]
fn older_than_removes_entries_unused_for_that_long() {
    let w = one_layer_app();
    w.write("app/data", b"x, built on day 0\n");
    let first_x = w.build(T0, &[]);
    let layer_x = fixture::layer_digests(&w.store, "app")[0].clone();
    w.write("app/data", b"y, built on day 5\n");
    w.build(T0 + 5 * DAY, &[]);
    let layer_y = fixture::layer_digests(&w.store, "app")[0].clone();
    let now = T0 + 5 * DAY + HOUR;

    let report = w.json(now, &["cache", "prune", "--older-than", "7d"]);
    assert_eq!(report["entries_removed"], 0, "{report}");
    let report = w.json(now, &["cache", "prune", "--older-than", "72h"]);
    assert_eq!(report["entries_removed"], 1, "{report}");
    assert_eq!(report["entries_kept"], 1);
    assert_eq!(report["removed_blobs"], serde_json::json!([layer_x]));
    assert!(!has_blob(&w.store, &layer_x) && has_blob(&w.store, &layer_y));
    let left = entries(&w.store);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].blob(), layer_y);
    w.verify();

    w.write("app/data", b"x, built on day 0\n");
    let again = w.build(now, &[]);
    assert_eq!(steps_built(&again), 1, "x's entry was removed: {again}");
    assert_eq!(fixture::digests(&again), fixture::digests(&first_x));

    let out = w.run(now, &["cache", "prune", "--older-than", "a week"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a duration"));
    // No option: nothing is removed, and the error says what to pass.
    let before = tree(&w.store);
    let out = w.run(now, &["cache", "prune"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--keep-bytes") && err.contains("--older-than") && err.contains("--all"));
    assert_eq!(tree(&w.store), before);
}

#[test]
fn dry_run_changes_nothing_and_tells_what_the_prune_does() {
    let w = abc();
    w.build(T0, &[]);
    w.write("a/a2", b"a's second file, changed\n");
    w.build(T0 + DAY, &[]);
    let before = tree(&w.store);
    let mut dry = Vec::new();
    for args in [&["--all"][..], &["--keep-bytes", "0"], &["--older-than", "1h"]] {
        let mut all = vec!["cache", "prune", "--dry-run"];
        all.extend(args);
        dry.push(w.json(T0 + 2 * DAY, &all));
        let out = w.run(T0 + 2 * DAY, &all);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Would remove"));
        assert_eq!(tree(&w.store), before, "--dry-run {args:?} changed the store");
    }
    assert!(dry[0]["entries_removed"].as_u64().unwrap() > 0);
    assert!(!dry[0]["removed_blobs"].as_array().unwrap().is_empty());
    assert!(!dry[0]["removed_snapshots"].as_array().unwrap().is_empty());
    let mut real = w.json(T0 + 2 * DAY, &["cache", "prune", "--all"]);
    assert_eq!(real["dry_run"], false);
    real["dry_run"] = Value::Bool(true);
    assert_eq!(real, dry[0]);
    for d in real["removed_blobs"].as_array().unwrap() {
        assert!(!has_blob(&w.store, d.as_str().unwrap()));
    }
    for s in real["removed_snapshots"].as_array().unwrap() {
        assert!(!w.store.join("snapshots").join(s.as_str().unwrap()).exists());
    }
}

#[test]
fn all_then_a_cold_rebuild_gives_the_same_digests() {
    let w = abc();
    let cold = w.build(T0, &[]);
    w.write("b/b1", b"b, changed\n");
    let built = w.build(T0, &[]);
    let want = fixture::digests(&built);
    let old_b = entries(&w.store)
        .into_iter()
        .map(|e| e.blob())
        .find(|d| !image_blobs(&w.store).0.contains(d))
        .expect("the first b layer is only in the cache");

    let image_snapshots = image_snapshots(&w.store);
    assert!(!image_snapshots.is_empty());

    let report = w.json(T0, &["cache", "prune", "--all"]);
    assert!(report["entries_removed"].as_u64().unwrap() >= 6, "{report}");
    assert_eq!(report["entries_kept"], 0);
    assert_eq!(report["removed_blobs"], serde_json::json!([old_b]));
    assert!(entries(&w.store).is_empty());
    let stats = w.json(T0, &["cache", "stats"]);
    assert_eq!((stats["entries"].as_u64(), stats["layers"].as_u64()), (Some(0), Some(0)));
    // What the images hold stays: every blob, every snapshot of their layers.
    let (kept, _) = image_blobs(&w.store);
    assert!(kept.iter().all(|d| has_blob(&w.store, d)));
    assert!(image_snapshots.is_subset(&snapshots(&w.store)), "an image layer's snapshot went");
    w.verify();
    check_store(&w.store, "after --all");

    let rebuilt = w.build(T0, &[]);
    assert_eq!(rebuilt["steps_cached"], 0, "{rebuilt}");
    assert_eq!(rebuilt["steps_built"], cold["steps_built"]);
    assert_eq!(fixture::digests(&rebuilt), want);
    w.verify();
}

#[test]
fn layers_shared_with_tagged_images_are_never_removed() {
    let w = abc();
    w.build(T0, &[]);
    let kept = image_blobs(&w.store).0;
    let image_snapshots = image_snapshots(&w.store);
    assert!(!image_snapshots.is_empty());
    // Every layer is an image's: they cost the cache nothing, so no budget removes them.
    let report = w.json(T0 + 30 * DAY, &["cache", "prune", "--keep-bytes", "0"]);
    assert_eq!(report["entries_removed"], 0, "{report}");
    let again = w.build(T0 + 30 * DAY, &[]);
    assert_eq!(steps_built(&again), 0);
    // Removing every entry by age leaves them too.
    let report = w.json(T0 + 60 * DAY, &["cache", "prune", "--older-than", "0s"]);
    assert!(report["entries_removed"].as_u64().unwrap() > 0);
    assert_eq!(report["removed_blobs"], serde_json::json!([]));
    assert_eq!(report["removed_snapshots"], serde_json::json!([]));
    assert!(entries(&w.store).is_empty());
    assert!(kept.iter().all(|d| has_blob(&w.store, d)));
    assert!(image_snapshots.is_subset(&snapshots(&w.store)));
    w.verify();
}

#[test]
fn a_prune_racing_builds_leaves_a_store_that_verifies() {
    let w = abc();
    // The builds alternate two versions of a and c, so that every build both hits entries
    // and leaves layers only the cache keeps; the prunes alternate between removing those
    // and removing everything.
    let versions = [("one", "uno"), ("two", "dos")];
    let mut want = Vec::new();
    for (i, (a, c)) in versions.iter().enumerate() {
        w.write("a/a2", a.as_bytes());
        w.write("c/c2", c.as_bytes());
        let reference = tempfile::tempdir().unwrap();
        let mut cmd = ferry_on(w.dir(), reference.path());
        let out = cmd.args(["--json", "build"]).output().unwrap();
        assert!(out.status.success(), "reference build {i}");
        want.push(fixture::digests(&serde_json::from_slice(&out.stdout).unwrap()));
    }

    let stop = std::sync::atomic::AtomicBool::new(false);
    let removing = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let pruner = s.spawn(|| {
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let args: &[&str] =
                    if round % 2 == 0 { &["--keep-bytes", "0"] } else { &["--all"] };
                let out = ferry_on(w.dir(), &w.store)
                    .args(["--json", "cache", "prune"])
                    .args(args)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
                let report: Value = serde_json::from_slice(&out.stdout).unwrap();
                if report["entries_removed"].as_u64().unwrap() > 0 {
                    removing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                round += 1;
            }
        });
        let mut builds = 0;
        while builds < 6 || removing.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            assert!(builds < 60, "no prune removed anything between 60 builds");
            let v = builds % 2;
            w.write("a/a2", versions[v].0.as_bytes());
            w.write("c/c2", versions[v].1.as_bytes());
            let out = ferry_on(w.dir(), &w.store).args(["--json", "build"]).output().unwrap();
            assert!(
                out.status.success(),
                "build {builds}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(fixture::digests(&report), want[v], "build {builds}");
            // A prune may run now, but never takes what the images just built hold.
            for name in ["a", "b", "c"] {
                for l in fixture::layer_digests(&w.store, name) {
                    assert!(has_blob(&w.store, &l), "build {builds}: {name} lost layer {l}");
                }
            }
            builds += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        pruner.join().unwrap();
    });
    w.verify();
    check_store(&w.store, "after racing prunes");
    assert_no_dangling_entry(&w.store, "after racing prunes");
    let report = w.build(T0, &[]);
    assert_eq!(fixture::digests(&report), want[1]);
    w.verify();
}

/// Many small layers, twice over: the first version's layers (and their snapshots) are only
/// in the cache once the second is built, so a prune has a lot to delete.
fn wide_fleet() -> Work {
    let mut files = vec![(
        "images.toml".to_string(),
        "[project]\nname = \"t\"\n\n[images.p]\ncontext = \"p\"\n\n[images.q]\ncontext = \"q\"\n"
            .to_string(),
    )];
    for image in ["p", "q"] {
        let mut dockerfile = String::from("FROM scratch\n");
        for i in 0..24 {
            dockerfile.push_str(&format!("COPY f{i} /d/f{i}\n"));
            files.push((format!("{image}/f{i}"), format!("{image} {i} v1\n")));
        }
        files.push((format!("{image}/Dockerfile"), dockerfile));
    }
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    Work::new(&refs)
}

#[test]
fn a_prune_killed_anywhere_leaves_a_store_that_verifies_and_builds() {
    let w = wide_fleet();
    w.build(T0, &[]);
    let v1_layers: BTreeMap<String, String> =
        entries(&w.store).iter().map(|e| (e.blob(), snapshot_of(&e.diff_id()))).collect();
    for image in ["p", "q"] {
        for i in 0..24 {
            w.write(&format!("{image}/f{i}"), format!("{image} {i} v2\n").as_bytes());
        }
    }
    let want = fixture::digests(&w.build(T0, &[]));
    let source = w._scratch.path().join("source");
    copy_store(&w.store, &source);
    let (images, _) = image_blobs(&source);
    let v1_only: BTreeMap<&String, &String> =
        v1_layers.iter().filter(|(d, _)| !images.contains(*d)).collect();
    assert_eq!(v1_only.len(), 48);
    let v1_snapshots: BTreeSet<&String> =
        v1_only.values().copied().filter(|s| snapshots(&source).contains(*s)).collect();
    assert!(v1_snapshots.len() >= 40, "each layer below a COPY is extracted");

    let args = ["cache", "prune", "--all"];
    let timing = w._scratch.path().join("timing");
    copy_store(&source, &timing);
    let (out, took) = timed(ferry_on(w.dir(), &timing).args(args));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entries_before = entries(&source).len();
    let mut outcomes = Vec::new();
    // What each kill left: 0 untouched, 1 in the middle of the deletions, 2 all done.
    let mut states = Vec::new();
    let mut points = spread(took, 10);
    let mut i = 0;
    while i < points.len() {
        let after = points[i];
        i += 1;
        let store = w._scratch.path().join(format!("k{i}"));
        copy_store(&source, &store);
        let why = format!("cache prune killed after {after:?}");
        let ended = kill_after(ferry_on(w.dir(), &store).args(args), after);
        outcomes.push((after, ended));
        let journal = store.join("cache/prune-journal").exists();
        let entries_left = entries(&store).len();
        let v1_left = v1_only.keys().filter(|d| has_blob(&store, d)).count();
        states.push(if entries_left == entries_before && !journal {
            0
        } else if entries_left == 0 && v1_left == 0 && !journal {
            2
        } else {
            1
        });
        // As the kill left it: consistent, no entry without its blob, verify passes.
        check_store(&store, &why);
        assert_no_dangling_entry(&store, &why);
        crash_support::assert_verify(&mut ferry_on(w.dir(), &store), &why);
        // The next build works and gives the same images.
        let out = ferry_on(w.dir(), &store).args(["--json", "build"]).output().unwrap();
        assert!(out.status.success(), "{why}: build: {}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(fixture::digests(&report), want, "{why}");
        // The next prune finishes what the killed one started: no first-version layer or
        // snapshot is left behind.
        let out = ferry_on(w.dir(), &store).args(args).output().unwrap();
        assert!(out.status.success(), "{why}: re-run: {}", String::from_utf8_lossy(&out.stderr));
        let left: Vec<&&String> = v1_only.keys().filter(|d| has_blob(&store, d)).collect();
        assert!(left.is_empty(), "{why}: first-version layers left: {left:?}");
        let snaps = snapshots(&store);
        let left: Vec<&&String> = v1_snapshots.iter().filter(|s| snaps.contains(**s)).collect();
        assert!(left.is_empty(), "{why}: first-version snapshots left: {left:?}");
        assert!(!store.join("cache/prune-journal").exists(), "{why}");
        crash_support::assert_verify(&mut ferry_on(w.dir(), &store), &why);
        std::fs::remove_dir_all(&store).unwrap();
        // Until a kill lands among the deletions, aim between the last kill that left the
        // store untouched and the first that found the prune done.
        if i >= points.len() && !states.contains(&1) && points.len() < 18 {
            let untouched = (0..i).filter(|&j| states[j] == 0).map(|j| points[j]).max();
            let done = (0..i).filter(|&j| states[j] == 2).map(|j| points[j]).min();
            if let (Some(a), Some(b)) = (untouched, done) {
                if a < b {
                    points.push((a + b) / 2);
                }
            }
        }
    }
    eprintln!("{}; states {states:?}", outcomes_line("cache prune --all", &outcomes));
    assert!(states.contains(&1), "no kill landed among the deletions: {states:?}");
}

#[test]
fn run_caches_are_counted_and_removed_by_all_or_when_unused() {
    let work = busybox_app(
        "FROM bb\nARG RUN=1\nRUN --mount=type=cache,target=/c,id=pkgs \
         head -c 100000 /dev/zero > /c/blob-$RUN && ls /c | wc -l > /seen\n",
    );
    work.build(T0, &[]);
    let mounts = work.store.join("mounts");
    let caches: Vec<PathBuf> = std::fs::read_dir(&mounts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    let stats = work.json(T0, &["cache", "stats"]);
    assert_eq!(stats["run_caches"], 1, "{stats}");
    assert_eq!(stats["run_cache_bytes"].as_u64().unwrap(), du(&caches[0]), "{stats}");
    assert!(du(&caches[0]) >= 100_000);

    // Used a day ago: a budget it fits in and --older-than 2d leave it; dry runs that would
    // remove it change nothing.
    for (args, listed) in [
        (&["--keep-bytes", "10MB"][..], 0),
        (&["--keep-bytes", "0", "--dry-run"], 1),
        (&["--older-than", "2d"], 0),
        (&["--older-than", "12h", "--dry-run"], 1),
        (&["--all", "--dry-run"], 1),
    ] {
        let mut all = vec!["cache", "prune"];
        all.extend(args);
        let report = work.json(T0 + DAY, &all);
        assert!(caches[0].is_dir(), "{args:?} removed the RUN cache");
        let removed = report["removed_run_caches"].as_array().unwrap().len();
        assert_eq!(removed, listed, "{args:?}: {report}");
    }
    // Used again by a step that runs (a cached step does not use it): not old any more.
    work.build(T0 + DAY, &["--arg", "RUN=3"]);
    let report = work.json(T0 + DAY + HOUR, &["cache", "prune", "--older-than", "12h"]);
    assert!(report["removed_run_caches"].as_array().unwrap().is_empty(), "{report}");
    assert!(caches[0].is_dir());
    let report = work.json(T0 + 2 * DAY, &["cache", "prune", "--older-than", "12h"]);
    assert_eq!(report["removed_run_caches"].as_array().unwrap().len(), 1, "{report}");
    assert!(report["run_cache_bytes"].as_u64().unwrap() >= 200_000, "{report}");
    assert!(!caches[0].exists());
    assert_eq!(work.json(T0 + 2 * DAY, &["cache", "stats"])["run_caches"], 0);

    // The next build starts from an empty cache: its step sees only its own file.
    work.build(T0 + 2 * DAY, &["--arg", "RUN=2"]);
    let scratch = tempfile::tempdir().unwrap();
    let root = fixture::umoci_unpack(&work.store, "app", scratch.path());
    assert_eq!(std::fs::read_to_string(root.join("seen")).unwrap().trim(), "1");
    // And --all takes every cache, whatever its age.
    let report = work.json(T0 + 2 * DAY, &["cache", "prune", "--all"]);
    assert_eq!(report["removed_run_caches"].as_array().unwrap().len(), 1, "{report}");
}

#[test]
fn a_build_keeps_the_cache_within_its_budget_at_most_hourly_and_never_waits() {
    const BUDGET: &str = "FERRY_CACHE_KEEP_BYTES";
    let w = one_layer_app();
    let (a, b) = (common::noise(40_000, 1), common::noise(20_000, 2));
    // A prune that waited for the store would hang the build: each gets two minutes.
    let build = |now: u64, budget: &str| {
        let mut child = w
            .ferry(now)
            .env(BUDGET, budget)
            .arg("build")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the build at {now} with budget {budget} waited for the store");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        err
    };
    w.write("app/data", &a);
    build(T0, "10GB");
    let layer_a = fixture::layer_digests(&w.store, "app")[0].clone();
    w.write("app/data", &b);
    // Over a one-byte budget now that A is only in the cache, but a build at T0 stamped the
    // store (its 10GB budget removed nothing): not before an hour.
    let err = build(T0 + 1800, "1");
    assert!(!err.contains("build cache over"), "{err}");
    assert!(has_blob(&w.store, &layer_a));
    let layer_b = fixture::layer_digests(&w.store, "app")[0].clone();

    // An hour on, a build (a no-op) prunes: A goes, B (tagged) stays.
    let err = build(T0 + 2 * HOUR, "1");
    assert!(err.contains("build cache over 1B: pruned 1 entry and 0 RUN caches"), "{err}");
    assert!(!has_blob(&w.store, &layer_a));
    assert!(has_blob(&w.store, &layer_b));
    w.verify();

    // `off` (any case) never prunes.
    w.write("app/data", &a);
    build(T0 + 4 * HOUR, "OFF");
    w.write("app/data", &b);
    let err = build(T0 + 6 * HOUR, "off");
    assert!(!err.contains("build cache over"), "{err}");
    assert!(has_blob(&w.store, &layer_a));

    // A store another process is using (here: holding the gc lock as a build does) is left
    // alone, without waiting, and without a stamp: the next build prunes.
    let store = ferry::store::Store::open(&w.store).unwrap();
    let busy = store.gc_guard().unwrap();
    let err = build(T0 + 8 * HOUR, "1");
    assert!(!err.contains("build cache over"), "{err}");
    assert!(has_blob(&w.store, &layer_a));
    drop(busy);
    let err = build(T0 + 8 * HOUR + 1, "1");
    assert!(err.contains("pruned 1 entry"), "{err}");
    assert!(!has_blob(&w.store, &layer_a));

    // A budget that is not a size is a warning naming the variable; the build is done.
    let err = build(T0 + 10 * HOUR, "lots");
    assert!(err.contains("FERRY_CACHE_KEEP_BYTES: `lots` is not a size"), "{err}");
    w.verify();
}

#[test]
fn keep_bytes_takes_run_caches_and_layers_least_recently_used_first() {
    let work = busybox_app(
        "FROM bb\nARG A=1\nRUN --mount=type=cache,target=/c,id=old head -c 100000 /dev/zero > /c/f-$A\n\
          ARG B=1\nRUN --mount=type=cache,target=/c,id=new head -c 200000 /dev/zero > /c/f-$B\n",
    );
    work.build(T0, &[]);
    // A day later only the second step runs: the `new` cache is used, `old` is not.
    work.build(T0 + DAY, &["--arg", "B=2"]);
    // Cache directories are named by the id's digest: `new` is the one the second run wrote
    // its second file into.
    let dirs: Vec<PathBuf> = std::fs::read_dir(work.store.join("mounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let (new, old): (Vec<PathBuf>, Vec<PathBuf>) =
        dirs.into_iter().partition(|d| d.join("f-2").exists());
    let (new, old) = (new[0].clone(), old[0].clone());
    assert!(du(&new) > du(&old), "the newer cache is the larger");
    // Room for `new` and a little more: `old`, used least recently, goes, though smaller.
    let budget = (du(&new) + 2000).to_string();
    let report = work.json(T0 + DAY + HOUR, &["cache", "prune", "--keep-bytes", &budget]);
    let old_name = old.file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(report["removed_run_caches"], serde_json::json!([old_name]), "{report}");
    assert!(!old.exists() && new.is_dir());
    work.verify();
    // The automatic prune after a build takes the same budget.
    let out = work
        .ferry(T0 + 3 * DAY)
        .env("FERRY_CACHE_KEEP_BYTES", "1")
        .args(["build", "--arg", "B=3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!new.exists(), "{}", String::from_utf8_lossy(&out.stderr));
}
