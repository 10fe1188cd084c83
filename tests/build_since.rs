//! `plan --since REF` and `build --since REF`: only the images whose inputs changed since a
//! git ref (uncommitted changes included), their dependents, and the ancestors they need.

mod push_support;

use std::collections::BTreeSet;
use std::path::Path;

use push_support::*;
use serde_json::Value;

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

fn names(report: &Value, key: &str) -> BTreeSet<String> {
    report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i[key].as_str().unwrap().to_string())
        .collect()
}

fn changed(report: &Value) -> Vec<(String, String)> {
    report["since"]["changed"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn since_selects_what_changed_its_dependents_and_their_ancestors() {
    let dir = fleet("127.0.0.1:1", "");
    let dir = dir.path();
    let store = tempfile::tempdir().unwrap();
    let store = store.path();

    // Nothing changed: nothing to plan or build, and it says so.
    let plan = json(dir, store, &["plan", "--since", "HEAD"], 0);
    assert!(names(&plan, "name").is_empty(), "{plan}");
    assert_eq!(plan["since"]["ref"], "HEAD");
    assert!(changed(&plan).is_empty());
    let out = fixture::ferry(dir)
        .arg("--store")
        .arg(store)
        .args(["build", "--since", "HEAD"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("Nothing changed since HEAD"), "{}", stderr(&out));
    let images =
        fixture::ferry(dir).arg("--store").arg(store).args(["images", "-q"]).output().unwrap();
    assert_eq!(stdout(&images).trim(), "", "nothing was to be built");

    // An uncommitted change to api's context: api, and the ancestors it needs (runtime, and
    // tools it copies from).
    edit(dir, "examples/static/services/api/config/api.toml", "8080", "9090");
    let plan = json(dir, store, &["plan", "--since", "HEAD"], 0);
    assert_eq!(names(&plan, "name"), set(&["base", "runtime", "tools", "api"]));
    assert_eq!(changed(&plan).len(), 1, "{plan}");
    assert_eq!(changed(&plan)[0].0, "api");
    assert!(changed(&plan)[0].1.contains("context"), "{plan}");

    // Committed, then tools changes too: api and worker copy from tools, so they changed as
    // well; web did not.
    push_support::fixture::git_commit(dir, "api on 9090");
    edit(dir, "examples/static/images/tools/bin/entrypoint", "", "# changed\n");
    let build = json(dir, store, &["build", "--since", "HEAD~1"], 0);
    assert_eq!(names(&build, "name"), set(&["base", "runtime", "api", "tools", "worker"]));
    let plan = json(dir, store, &["plan", "--since", "HEAD~1"], 0);
    let why: std::collections::BTreeMap<String, String> = changed(&plan).into_iter().collect();
    assert_eq!(why.keys().cloned().collect::<BTreeSet<_>>(), set(&["api", "tools", "worker"]));
    assert!(why["worker"].contains("`tools`"), "{why:?}");

    // Named images narrow it: web did not change.
    let plan = json(dir, store, &["plan", "--since", "HEAD~1", "web"], 0);
    assert!(names(&plan, "name").is_empty(), "{plan}");
    let plan = json(dir, store, &["plan", "--since", "HEAD~1", "worker"], 0);
    assert_eq!(names(&plan, "name"), set(&["base", "runtime", "tools", "worker"]));

    // A new image is a change.
    std::fs::write(
        dir.join("images.toml"),
        std::fs::read_to_string(dir.join("images.toml")).unwrap()
            + "\n[images.api2]\ncontext = \"examples/static/services/api\"\nversion = \"1.0.0\"\n",
    )
    .unwrap();
    let plan = json(dir, store, &["plan", "--since", "HEAD"], 0);
    let why: std::collections::BTreeMap<String, String> = changed(&plan).into_iter().collect();
    assert_eq!(why.get("api2").map(String::as_str), Some("new since HEAD"), "{why:?}");

    // A ref git does not know is invalid input, named.
    let out = fixture::ferry(dir)
        .arg("--store")
        .arg(store)
        .args(["plan", "--since", "no-such-ref"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--since no-such-ref"), "{}", stderr(&out));
}
