//! ferry killed with SIGKILL at many points of `build`, `pull`, `push`, `promote`, `prune`
//! and `rmi`. After every kill the store passes `ferry cache verify`, every name in it
//! points at a complete, hash-correct image, nothing a later run trusts (cache entries,
//! compression variants, snapshots) is wrong, no process of the killed run survives, and
//! the next un-killed run completes with the digests of a reference run in a fresh store
//! and leaves no temporary file of the dead run behind. After a killed push or promotion,
//! no tag in the registry names a manifest whose blobs are missing.
//!
//! The kill points are spread from ~5 ms to past the end of one un-killed run of the same
//! operation on this machine, so they adapt to its speed; nothing is asserted about time.

mod crash_support;
mod push_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crash_support::*;
use push_support::{common, fixture};

/// How many kill points per operation.
const POINTS: usize = 10;

/// Per-test scratch: stores, and the TMPDIR of every ferry process (its sandbox scratch).
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmpdir")).unwrap();
        Work { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// `ferry` in project `dir` with `store`.
    fn ferry(&self, dir: &Path, store: &Path) -> Command {
        let mut c = fixture::ferry(dir);
        c.arg("--store").arg(store).env("TMPDIR", self.path("tmpdir"));
        c
    }
}

/// Run ferry to success; its JSON output.
fn ok_json(cmd: &mut Command, what: &str) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"))
}

/// What must hold right after a kill: the store as the killed process left it is
/// consistent (when it got as far as creating one), verify passes, and it is still
/// consistent after the clean-up that opening it does.
fn after_kill(w: &Work, dir: &Path, store: &Path, why: &str) -> StoreState {
    if store.join("index.json").exists() {
        check_store(store, &format!("{why}, as left"));
    }
    assert_verify(&mut w.ferry(dir, store), why);
    assert!(mounts_under(store).is_empty(), "{why}: mounts left: {:?}", mounts_under(store));
    check_store(store, why)
}

/// What must hold after the un-killed re-run: consistency and nothing left behind.
fn after_rerun(w: &Work, dir: &Path, store: &Path, why: &str) -> StoreState {
    assert_verify(&mut w.ferry(dir, store), why);
    let state = check_store(store, why);
    let left = leftovers(store);
    assert!(left.is_empty(), "{why}: temporary files of the killed run are left: {left:?}");
    state
}

/// Image name → digest from a `build --json` report.
fn build_digests(report: &serde_json::Value) -> BTreeMap<String, String> {
    let d = fixture::digests(report);
    assert!(d.values().all(|v| v.starts_with("sha256:")), "{report}");
    d
}

/// The names a build records for its images must point at the reported digests.
fn assert_refs(state: &StoreState, want: &BTreeMap<String, String>, why: &str) {
    for (name, digest) in want {
        assert_eq!(state.refs.get(name), Some(digest), "{why}: ref {name}");
    }
}

#[test]
fn build_killed_anywhere_then_rebuilt() {
    let w = Work::new();
    let dir = heavy_fleet("127.0.0.1:9", "");
    let dir = dir.path();
    let reference = w.path("reference");
    let (out, took) = timed(w.ferry(dir, &reference).args(["--json", "build"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = build_digests(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(want.len(), 6);

    let mut outcomes = Vec::new();
    for (i, after) in spread(took, POINTS).into_iter().enumerate() {
        let store = w.path(&format!("k{i}"));
        let why = format!("build killed after {after:?}");
        let ended = kill_after(w.ferry(dir, &store).arg("build"), after);
        outcomes.push((after, ended));
        let state = after_kill(&w, dir, &store, &why);
        // Whatever names exist already point at the right images.
        for (name, digest) in &state.refs {
            if let Some(expected) = want.get(name) {
                assert_eq!(digest, expected, "{why}: {name}");
            }
        }
        // A second kill on top of what the first one left.
        let why2 = format!("{why}, then again");
        kill_after(w.ferry(dir, &store).arg("build"), after);
        after_kill(&w, dir, &store, &why2);

        let report = ok_json(w.ferry(dir, &store).args(["--json", "build"]), &why);
        assert_eq!(build_digests(&report), want, "{why}");
        let state = after_rerun(&w, dir, &store, &why);
        assert_refs(&state, &want, &why);
        std::fs::remove_dir_all(&store).unwrap();
    }
    eprintln!("{}", outcomes_line("build", &outcomes));
    assert!(outcomes.iter().any(|(_, e)| *e == Ended::Killed), "no kill landed mid-build");
}

#[test]
fn build_with_run_steps_killed_inside_the_sandbox_then_rebuilt() {
    let w = Work::new();
    let marker = format!("crash-marker-{}", std::process::id());
    let dir = run_fleet(&marker);
    let dir = dir.path();
    let reference = w.path("reference");
    let (out, took) = timed(w.ferry(dir, &reference).args(["--json", "build"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = build_digests(&serde_json::from_slice(&out.stdout).unwrap());
    assert_eq!(want.len(), 3);

    let mut outcomes = Vec::new();
    for (i, after) in spread(took, 8).into_iter().enumerate() {
        let store = w.path(&format!("k{i}"));
        let why = format!("RUN build killed after {after:?}");
        let ended = kill_after(w.ferry(dir, &store).arg("build"), after);
        outcomes.push((after, ended));
        assert_no_process_with(&marker);
        assert!(mounts_under(&w.path("tmpdir")).is_empty(), "{why}: mounts left in TMPDIR");
        after_kill(&w, dir, &store, &why);

        let report = ok_json(w.ferry(dir, &store).args(["--json", "build"]), &why);
        assert_eq!(build_digests(&report), want, "{why}");
        let state = after_rerun(&w, dir, &store, &why);
        assert_refs(&state, &want, &why);
        std::fs::remove_dir_all(&store).unwrap();
    }
    eprintln!("{}", outcomes_line("build with RUN", &outcomes));
    // The sandboxes' scratch directories live in the store's session, not in TMPDIR, so a
    // killed build leaves nothing there either.
    let tmpdir: Vec<_> =
        std::fs::read_dir(w.path("tmpdir")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(tmpdir.is_empty(), "left in TMPDIR: {tmpdir:?}");
    assert!(outcomes.iter().any(|(_, e)| *e == Ended::Killed), "no kill landed mid-build");
}

/// `[environments.NAME]` tables for `names`, all in `host`, each under its own namespace.
fn envs(host: &str, names: &[String], body: &str) -> String {
    names
        .iter()
        .map(|n| format!("[environments.{n}]\nregistry = \"{host}/{n}\"\n{body}\n"))
        .collect()
}

#[test]
fn push_killed_anywhere_never_tags_an_incomplete_image_and_completes_on_rerun() {
    let reg = push_support::start_registry();
    let w = Work::new();
    // Even points push to zstd environments (layers as stored), odd points to gzip ones (layers
    // re-compressed into the store during the push).
    let zstd: Vec<String> =
        (0..POINTS).step_by(2).map(|i| format!("k{i}")).chain(["rz".into()]).collect();
    let gzip: Vec<String> =
        (1..POINTS).step_by(2).map(|i| format!("k{i}")).chain(["rg".into()]).collect();
    let tags = "tags = [\"{version}\", \"latest\", \"b{build}\"]\n";
    let extra = format!(
        "{}{}",
        envs(&reg.host, &zstd, tags),
        envs(&reg.host, &gzip, &format!("{tags}compression = \"gzip\"\n"))
    );
    let dir = heavy_fleet(&reg.host, &extra);
    let dir = dir.path();
    let built = w.path("built");
    ok_json(w.ferry(dir, &built).args(["--json", "build"]), "the first build");

    let reference = |env: &str| {
        let store = w.path(&format!("ref-{env}"));
        copy_store(&built, &store);
        let (out, took) = timed(w.ferry(dir, &store).args(["push", "--env", env]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tags = registry_tags(&reg.host, &format!("{env}/"), "reference push");
        assert!(tags.len() >= 6 * 2, "{tags:?}");
        (strip_prefix(&tags, &format!("{env}/")), took)
    };
    let (want_zstd, _) = reference("rz");
    let (want_gzip, took) = reference("rg");
    assert!(!differences(&want_zstd, &want_gzip).is_empty(), "gzip pushes other digests");

    let mut outcomes = Vec::new();
    for (i, after) in spread(took, POINTS).into_iter().enumerate() {
        let env = format!("k{i}");
        let want = if i % 2 == 0 { &want_zstd } else { &want_gzip };
        let store = w.path(&format!("store-{env}"));
        copy_store(&built, &store);
        let why = format!("push --env {env} killed after {after:?}");
        let ended = kill_after(w.ferry(dir, &store).args(["push", "--env", &env]), after);
        outcomes.push((after, ended));
        after_kill(&w, dir, &store, &why);
        // Every tag that exists names a complete image, and the one the finished push sets.
        let tags =
            strip_prefix(&registry_tags(&reg.host, &format!("{env}/"), &why), &format!("{env}/"));
        for (tag, digest) in &tags {
            assert_eq!(Some(digest), want.get(tag), "{why}: {tag}");
        }

        let out = w.ferry(dir, &store).args(["push", "--env", &env]).output().unwrap();
        assert!(out.status.success(), "{why}: re-run: {}", String::from_utf8_lossy(&out.stderr));
        let tags =
            strip_prefix(&registry_tags(&reg.host, &format!("{env}/"), &why), &format!("{env}/"));
        assert_eq!(&tags, want, "{why}: {:?}", differences(&tags, want));
        after_rerun(&w, dir, &store, &why);
        std::fs::remove_dir_all(&store).unwrap();
    }
    eprintln!("{}", outcomes_line("push", &outcomes));
    assert!(outcomes.iter().any(|(_, e)| *e == Ended::Killed), "no kill landed mid-push");
}

#[test]
fn promote_killed_anywhere_never_tags_an_incomplete_image_and_completes_on_rerun() {
    let reg = push_support::start_registry();
    let w = Work::new();
    let names: Vec<String> = (0..POINTS).map(|i| format!("p{i}")).chain(["pref".into()]).collect();
    let extra = envs(
        &reg.host,
        &names,
        "tags = [\"{version}\", \"{major}.{minor}\", \"latest\"]\nimmutable = true\npromote_from = \"staging\"\n",
    );
    let dir = heavy_fleet(&reg.host, &extra);
    let dir = dir.path();
    let store = w.path("store");
    let out = w.ferry(dir, &store).args(["push", "--env", "staging"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let promote = |env: &str| {
        let mut c = w.ferry(dir, &store);
        c.args(["promote", "--from", "staging", "--to", env]);
        c
    };
    let (out, took) = timed(&mut promote("pref"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = strip_prefix(&registry_tags(&reg.host, "pref/", "reference promotion"), "pref/");
    assert!(want.len() >= 6, "{want:?}");
    // The promoted digests are the staging ones.
    let staging = registry_tags(&reg.host, "staging/", "staging");
    for (tag, digest) in &want {
        let repo = tag.split(':').next().unwrap();
        assert!(
            staging.iter().any(|(t, d)| t.starts_with(&format!("staging/{repo}:")) && d == digest),
            "{tag} {digest} is not a staging digest"
        );
    }

    let mut outcomes = Vec::new();
    for (i, after) in spread(took, POINTS).into_iter().enumerate() {
        let env = format!("p{i}");
        let why = format!("promote to {env} killed after {after:?}");
        let ended = kill_after(&mut promote(&env), after);
        outcomes.push((after, ended));
        let tags =
            strip_prefix(&registry_tags(&reg.host, &format!("{env}/"), &why), &format!("{env}/"));
        for (tag, digest) in &tags {
            assert_eq!(Some(digest), want.get(tag), "{why}: {tag}");
        }
        let out = promote(&env).output().unwrap();
        assert!(out.status.success(), "{why}: re-run: {}", String::from_utf8_lossy(&out.stderr));
        let tags =
            strip_prefix(&registry_tags(&reg.host, &format!("{env}/"), &why), &format!("{env}/"));
        assert_eq!(tags, want, "{why}: {:?}", differences(&tags, &want));
    }
    after_rerun(&w, dir, &store, "promotions");
    eprintln!("{}", outcomes_line("promote", &outcomes));
    assert!(outcomes.iter().any(|(_, e)| *e == Ended::Killed), "no kill landed mid-promotion");
}

#[test]
fn pull_killed_anywhere_then_pulled_again() {
    let reg = push_support::start_registry();
    let w = Work::new();
    let dir = heavy_fleet(&reg.host, "");
    let dir = dir.path();
    let built = w.path("built");
    let out = w.ferry(dir, &built).args(["push", "--env", "dev"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = format!("{}/dev/acme/api:dev", reg.host);

    let pull = |store: &Path| {
        let mut c = w.ferry(dir, store);
        c.args(["pull", &reference]);
        c
    };
    let fresh = w.path("reference");
    let (out, took) = timed(&mut pull(&fresh));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = check_store(&fresh, "reference pull").refs;
    assert_eq!(want.len(), 1, "{want:?}");

    let mut outcomes = Vec::new();
    for (i, after) in spread(took, POINTS).into_iter().enumerate() {
        let store = w.path(&format!("k{i}"));
        let why = format!("pull killed after {after:?}");
        let ended = kill_after(&mut pull(&store), after);
        outcomes.push((after, ended));
        let state = after_kill(&w, dir, &store, &why);
        for (name, digest) in &state.refs {
            assert_eq!(Some(digest), want.get(name), "{why}: {name}");
        }
        let out = pull(&store).output().unwrap();
        assert!(out.status.success(), "{why}: re-run: {}", String::from_utf8_lossy(&out.stderr));
        let state = after_rerun(&w, dir, &store, &why);
        assert_eq!(state.refs, want, "{why}");
        std::fs::remove_dir_all(&store).unwrap();
    }
    eprintln!("{}", outcomes_line("pull", &outcomes));
    assert!(outcomes.iter().any(|(_, e)| *e == Ended::Killed), "no kill landed mid-pull");
}

/// Write `n` blobs nothing names (correctly named, so `cache verify` accepts them); their
/// file names.
fn orphan_blobs(store: &Path, n: usize) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    (0..n)
        .map(|i| {
            let bytes = common::noise(256, 1000 + i as u64);
            let hex = sha256(&bytes)[7..].to_string();
            let p = store.join("blobs/sha256").join(&hex);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
            hex
        })
        .collect()
}

#[test]
fn prune_and_rmi_killed_anywhere_keep_every_named_image() {
    let w = Work::new();
    let dir = heavy_fleet("127.0.0.1:9", "");
    let dir = dir.path();
    let built = w.path("built");
    let want = build_digests(&ok_json(w.ferry(dir, &built).args(["--json", "build"]), "build"));
    let plain = w.path("plain");
    copy_store(&built, &plain);
    // For prune: an image only `prune --all` removes (named by digest only), and orphan blobs.
    let loaded = w.path("loaded");
    let layer = vec![common::file("foreign", b"foreign\n", 0o644)];
    common::make_oci_image(&loaded, "img", &[layer], common::Comp::None);
    let archive = w.path("loaded.tar");
    let out = Command::new("tar")
        .arg("-cf")
        .arg(&archive)
        .arg("-C")
        .arg(&loaded)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = w.ferry(dir, &built).args(["load", "-i"]).arg(&archive).output().unwrap();
    assert!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));
    assert!(check_store(&built, "loaded").refs.len() > want.len());
    let orphans = orphan_blobs(&built, 1000);

    let ops = [
        ("prune", vec!["prune", "--all"], &built, POINTS),
        ("rmi", vec!["rmi", "worker"], &plain, 6),
    ];
    for (op, args, source, n) in ops {
        let timing = w.path(&format!("timing-{op}"));
        copy_store(source, &timing);
        let (out, took) = timed(w.ferry(dir, &timing).args(&args));
        assert!(out.status.success(), "{op}: {}", String::from_utf8_lossy(&out.stderr));
        let mut outcomes = Vec::new();
        // How many orphans each killed prune left: a count strictly between none and all
        // means the kill landed in the middle of the deletions.
        let mut orphans_left = Vec::new();
        let mut points = spread(took, n);
        let mut i = 0;
        while i < points.len() {
            let after = points[i];
            i += 1;
            let store = w.path(&format!("{op}-k{i}"));
            copy_store(source, &store);
            let why = format!("{op} killed after {after:?}");
            let ended = kill_after(w.ferry(dir, &store).args(&args), after);
            outcomes.push((after, ended));
            orphans_left.push(
                orphans.iter().filter(|h| store.join("blobs/sha256").join(h).exists()).count(),
            );
            let state = after_kill(&w, dir, &store, &why);
            for (name, digest) in &want {
                if op == "rmi" && name == "worker" {
                    continue;
                }
                assert_eq!(state.refs.get(name), Some(digest), "{why}: {name} lost");
            }
            // Re-run (an `rmi` that had finished now finds no image: that is its answer).
            let out = w.ferry(dir, &store).args(&args).output().unwrap();
            assert!(
                out.status.success() || (op == "rmi" && out.status.code() == Some(2)),
                "{why}: re-run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The fleet still builds to the same digests, from the cache.
            let report = ok_json(w.ferry(dir, &store).args(["--json", "build"]), &why);
            assert_eq!(build_digests(&report), want, "{why}");
            if op == "prune" {
                assert_eq!(report["steps_built"], 0, "{why}: prune dropped cached layers");
            }
            let state = after_rerun(&w, dir, &store, &why);
            assert_refs(&state, &want, &why);
            std::fs::remove_dir_all(&store).unwrap();
            // Aim a few more kills between the last one that left every orphan and the first
            // that left none, until one lands among the deletions.
            if op == "prune" && i >= POINTS && points.len() < POINTS + 4 {
                let mid = orphans_left.iter().any(|&n| n > 0 && n < orphans.len());
                let before =
                    (0..i).filter(|&j| orphans_left[j] == orphans.len()).map(|j| points[j]).max();
                let after_all = (0..i).filter(|&j| orphans_left[j] == 0).map(|j| points[j]).min();
                if let (false, Some(a), Some(b)) = (mid, before, after_all) {
                    if a < b {
                        points.push((a + b) / 2);
                    }
                }
            }
        }
        if op == "prune" {
            eprintln!("{}; orphan blobs left: {orphans_left:?}", outcomes_line(op, &outcomes));
        } else {
            eprintln!("{}", outcomes_line(op, &outcomes));
        }
    }
}
