//! Several ferry processes on one store at once: builds of overlapping fleets (shared
//! parents, images in common, images of their own, one image key with other content in
//! another project), RUN builds in the real sandbox, and prunes while a build runs. Every
//! process must succeed with the digests a build alone in a fresh store gives, the store
//! must pass `ferry cache verify` and an independent walk, and prune must never take what a
//! build made or what the build cache records.

mod crash_support;
mod push_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crash_support::*;
use push_support::{common, fixture};

/// A project for a concurrent run, with the digests it builds alone in a fresh store.
struct Project {
    dir: tempfile::TempDir,
    /// Arguments after `build` (a selection).
    select: Vec<String>,
    want: BTreeMap<String, String>,
}

fn ferry(dir: &Path, store: &Path) -> Command {
    let mut c = fixture::ferry(dir);
    c.arg("--store").arg(store);
    c
}

fn spawn_build(dir: &Path, store: &Path, extra: &[&str]) -> Child {
    ferry(dir, store)
        .args(["--json", "build"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for a build; its image → digest, requiring success.
fn finish_build(child: Child, what: &str) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn digests_of(report: &serde_json::Value) -> BTreeMap<String, String> {
    let d = fixture::digests(report);
    assert!(d.values().all(|v| v.starts_with("sha256:")), "{report}");
    d
}

impl Project {
    /// Build it alone in a fresh store for the reference digests.
    fn new(dir: tempfile::TempDir, select: &[&str], scratch: &Path) -> Project {
        let store = scratch.join(format!("reference-{}", scratch.read_dir().unwrap().count()));
        let want =
            digests_of(&finish_build(spawn_build(dir.path(), &store, select), "reference build"));
        Project { dir, select: select.iter().map(|s| s.to_string()).collect(), want }
    }

    fn spawn(&self, store: &Path, extra: &[&str]) -> Child {
        let mut args: Vec<&str> = self.select.iter().map(String::as_str).collect();
        args.extend(extra);
        spawn_build(self.dir.path(), store, &args)
    }
}

/// The heavy fleet plus an image of its own (`extra`, on top of api, with its own data,
/// through a build stage).
fn fleet_with_extra() -> tempfile::TempDir {
    // Added in a commit of its own: the images in common then keep the same history, so
    // the same revision label and digest, as in the plain fleet.
    let dir = heavy_fleet("127.0.0.1:9", "");
    let toml = dir.path().join("images.toml");
    let mut manifest = std::fs::read_to_string(&toml).unwrap();
    manifest.push_str("\n[images.extra]\ncontext = \"examples/extra\"\nversion = \"0.1.0\"\n");
    std::fs::write(&toml, manifest).unwrap();
    let ctx = dir.path().join("examples/extra");
    std::fs::create_dir_all(&ctx).unwrap();
    // The `gen` stage's layer is in no image, only in the build cache.
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM api AS gen\nCOPY more.bin /tmp/gen/more.bin\n\nFROM api\nCOPY --from=gen /tmp/gen/more.bin /opt/more.bin\n",
    )
    .unwrap();
    std::fs::write(ctx.join("more.bin"), common::noise(3 << 20, 99)).unwrap();
    fixture::git_commit(dir.path(), "extra");
    dir
}

/// The heavy fleet with api configured differently: same image key, other content.
fn fleet_with_other_api() -> tempfile::TempDir {
    let dir = heavy_fleet("127.0.0.1:9", "");
    let conf = dir.path().join("examples/static/services/api/config/api.toml");
    std::fs::write(&conf, "# another deployment\nport = 9090\n").unwrap();
    fixture::git_commit(dir.path(), "other api");
    dir
}

/// After all processes ended: the store is consistent and complete, and every name points
/// at a digest one of the projects built under that name (names two projects share with
/// different content belong to whichever recorded last).
fn check_after(store: &Path, dir: &Path, projects: &[&Project], why: &str) {
    let out = ferry(dir, store).args(["cache", "verify"]).output().unwrap();
    assert!(out.status.success(), "{why}: verify: {}", String::from_utf8_lossy(&out.stdout));
    let state = check_store(store, why);
    for p in projects {
        for (name, digest) in &p.want {
            let candidates: BTreeSet<&String> =
                projects.iter().filter_map(|q| q.want.get(name)).collect();
            let got = state.refs.get(name);
            assert!(got.is_some(), "{why}: {name} is not named");
            assert!(candidates.contains(got.unwrap()), "{why}: {name} -> {got:?}, built {digest}");
        }
    }
    let left = leftovers(store);
    assert!(left.is_empty(), "{why}: temporary files left: {left:?}");
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let refs = d.path().join("references");
    std::fs::create_dir_all(&refs).unwrap();
    (d, refs)
}

#[test]
fn two_processes_build_overlapping_fleets_into_one_store() {
    let (work, refs) = scratch();
    let full = Project::new(heavy_fleet("127.0.0.1:9", ""), &[], &refs);
    let extra = Project::new(fleet_with_extra(), &[], &refs);
    assert_eq!(full.want.len(), 6);
    assert_eq!(extra.want.len(), 7);
    // Shared parents and images in common have one digest in both projects.
    for (name, d) in &full.want {
        assert_eq!(extra.want.get(name), Some(d), "{name}");
    }
    for round in 0..2 {
        let store = work.path().join(format!("store-{round}"));
        let a = full.spawn(&store, &[]);
        let b = extra.spawn(&store, &[]);
        let (ra, rb) = (finish_build(a, "full fleet"), finish_build(b, "fleet with extra"));
        assert_eq!(digests_of(&ra), full.want, "round {round}");
        assert_eq!(digests_of(&rb), extra.want, "round {round}");
        check_after(&store, full.dir.path(), &[&full, &extra], &format!("round {round}"));
    }
}

#[test]
fn four_processes_build_overlapping_fleets_into_one_store() {
    let (work, refs) = scratch();
    let full = Project::new(heavy_fleet("127.0.0.1:9", ""), &[], &refs);
    let extra = Project::new(fleet_with_extra(), &[], &refs);
    let other = Project::new(fleet_with_other_api(), &[], &refs);
    let only_api = Project::new(heavy_fleet("127.0.0.1:9", ""), &["api"], &refs);
    assert_ne!(other.want["api"], full.want["api"], "the other api has other content");
    assert_eq!(other.want["runtime"], full.want["runtime"]);
    assert_eq!(
        only_api.want.keys().collect::<Vec<_>>(),
        ["api", "base", "runtime", "tools"],
        "a selection builds its ancestors"
    );
    let store = work.path().join("store");
    let children = [
        ("full", full.spawn(&store, &[])),
        ("extra", extra.spawn(&store, &[])),
        ("other api", other.spawn(&store, &[])),
        ("only api, --no-cache", only_api.spawn(&store, &["--no-cache"])),
    ];
    let wants = [&full.want, &extra.want, &other.want, &only_api.want];
    for ((what, child), want) in children.into_iter().zip(wants) {
        assert_eq!(&digests_of(&finish_build(child, what)), want, "{what}");
    }
    // api is the one name two projects build with different content: skip it in the
    // name check of the project that may have lost it, check the rest.
    check_after(&store, full.dir.path(), &[&full, &extra, &other, &only_api], "four builds");
    // Every digest any of them built is complete in the store, named or not.
    for want in wants {
        for d in want.values() {
            assert!(store.join("blobs/sha256").join(&d[7..]).is_file(), "{d} missing");
        }
    }
}

#[test]
fn two_processes_build_the_same_run_fleet_into_one_store() {
    let (work, refs) = scratch();
    let marker = format!("concurrency-marker-{}", std::process::id());
    let a = Project::new(run_fleet(&marker), &[], &refs);
    let b = Project::new(run_fleet(&marker), &[], &refs);
    assert_eq!(a.want, b.want);
    let store = work.path().join("store");
    let (ca, cb) = (a.spawn(&store, &[]), b.spawn(&store, &[]));
    assert_eq!(digests_of(&finish_build(ca, "RUN fleet a")), a.want);
    assert_eq!(digests_of(&finish_build(cb, "RUN fleet b")), b.want);
    check_after(&store, a.dir.path(), &[&a, &b], "two RUN builds");
    assert!(mounts_under(&store).is_empty());
}

#[test]
fn prune_while_building_takes_nothing_the_build_made_or_caches() {
    let (work, refs) = scratch();
    let extra = Project::new(fleet_with_extra(), &[], &refs);
    let store = work.path().join("store");
    // Something for the prunes to remove: an earlier build of another api, now unnamed.
    let other = Project::new(fleet_with_other_api(), &["api"], &refs);
    finish_build(other.spawn(&store, &[]), "the other api");

    let mut build = extra.spawn(&store, &[]);
    // Prune, alternately with --all, until the build is over; count the prunes that started
    // while it ran (each of those waits for it, or it for them).
    let mut during = 0;
    for round in 0.. {
        let running = build.try_wait().unwrap().is_none();
        let mut c = ferry(extra.dir.path(), &store);
        c.arg("prune");
        if round % 2 == 0 {
            c.arg("--all");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "prune: {}", String::from_utf8_lossy(&out.stderr));
        if !running {
            break;
        }
        during += 1;
    }
    assert!(during >= 1, "no prune started while the build ran");
    let report = finish_build(build, "build during prunes");
    assert_eq!(digests_of(&report), extra.want);
    // One more prune now that nothing runs: the other api's blobs go, the fleet stays.
    let out = ferry(extra.dir.path(), &store).args(["prune", "--all"]).output().unwrap();
    assert!(out.status.success());
    check_after(&store, extra.dir.path(), &[&extra], "prune while building");
    assert!(
        !store.join("blobs/sha256").join(&other.want["api"][7..]).exists(),
        "prune removed the unnamed image"
    );
    // Prune kept every layer the build cache records (extra's gen stage, in no image, too):
    // a rebuild runs no step.
    let again = finish_build(extra.spawn(&store, &[]), "rebuild");
    assert_eq!(digests_of(&again), extra.want);
    assert_eq!(again["steps_built"], 0, "prune dropped layers the cache records: {again}");
}

#[test]
fn push_publishes_what_it_built_while_another_project_renames_the_same_key() {
    let reg = push_support::start_registry();
    let (work, refs) = scratch();
    // This project's `slow` image builds long after api is done and named; meanwhile another
    // project that shares the store and the key `api` (with other content) rebuilds it again
    // and again, moving the name `api` to its own image.
    let dir = heavy_fleet(&reg.host, "[images.slow]\ncontext = \"examples/slow\"\n");
    let ctx = dir.path().join("examples/slow");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM runtime\nCOPY big.bin /opt/big.bin\n").unwrap();
    std::fs::write(ctx.join("big.bin"), common::noise(24 << 20, 5)).unwrap();
    fixture::git_commit(dir.path(), "slow");
    let mine = Project::new(dir, &[], &refs);
    let other = Project::new(fleet_with_other_api(), &["api"], &refs);
    assert_ne!(mine.want["api"], other.want["api"]);

    let store = work.path().join("store");
    finish_build(other.spawn(&store, &[]), "the other project");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let renames = std::thread::scope(|scope| {
        let renamer = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                finish_build(other.spawn(&store, &[]), "the other project");
                n += 1;
            }
            n
        });
        let out = ferry(mine.dir.path(), &store).args(["push", "--env", "dev"]).output().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        renamer.join().unwrap()
    });
    assert!(renames >= 1);
    let pushed = registry_tags(&reg.host, "dev/", "push");
    assert_eq!(pushed.len(), 7 * 2, "{pushed:?}");
    for (reference, digest) in &pushed {
        let image = reference.trim_start_matches("dev/acme/").split(':').next().unwrap();
        assert_eq!(Some(digest), mine.want.get(image), "{reference} is not what this push built");
    }
    check_after(&store, mine.dir.path(), &[&mine, &other], "push while renaming");
}
