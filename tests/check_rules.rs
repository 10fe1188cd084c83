//! `ferry check`, one test per rule, against a real registry where a rule needs one.

mod push_support;

use push_support::*;
use serde_json::Value;
use std::path::Path;

fn violations(report: &Value) -> Vec<(String, String, String)> {
    report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["rule"].as_str().unwrap().to_string(),
                v["image"].as_str().unwrap().to_string(),
                v["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn rules_and_images(report: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> =
        violations(report).into_iter().map(|(r, i, _)| (r, i)).collect();
    v.sort();
    v
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> =
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    v.sort();
    v
}

fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{file} has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn every_version_must_be_semver() {
    let dir = fleet("127.0.0.1:1", "");
    edit(dir.path(), "images.toml", "version = \"0.3.0\"", "version = \"0.3\"");
    edit(dir.path(), "images.toml", "version = \"1.0.0\"", "version = \"v1\"");
    let store = tempfile::tempdir().unwrap();
    let report = json(dir.path(), store.path(), &["check"], 1);
    assert_eq!(
        rules_and_images(&report),
        pairs(&[("not_semver", "tools"), ("not_semver", "worker")])
    );
    let msgs: Vec<String> = violations(&report).into_iter().map(|(_, _, m)| m).collect();
    assert!(
        msgs.iter().any(|m| m.starts_with("images.toml:19: `0.3` is not a semantic version")),
        "{msgs:?}"
    );

    // Text output: one line per violation.
    let out = run(dir.path(), store.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out).matches("error[not-semver]").count(), 2, "{}", stdout(&out));
}

#[test]
fn without_violations_check_passes() {
    let dir = fleet("127.0.0.1:1", "");
    let store = tempfile::tempdir().unwrap();
    let report = json(dir.path(), store.path(), &["check"], 0);
    assert_eq!(report["ok"], true);
    assert!(violations(&report).is_empty());
}

#[test]
fn release_only_environments_reject_pre_releases_and_require_version_needs_one() {
    let registry = start_registry();
    let dir = fleet(&registry.host, "");
    // tools loses its version; staging requires one.
    edit(dir.path(), "images.toml", "version = \"0.3.0\"\n", "");
    let store = tempfile::tempdir().unwrap();

    let report = json(dir.path(), store.path(), &["check", "--env", "prod"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("pre_release", "web")]));
    let (_, _, msg) = &violations(&report)[0];
    assert!(msg.contains("2.1.0-rc.1") && msg.contains("`prod`") && msg.contains("2.1.0"), "{msg}");

    let report = json(dir.path(), store.path(), &["check", "--env", "staging"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("version_required", "tools")]));

    // dev asks for neither.
    json(dir.path(), store.path(), &["check", "--env", "dev"], 0);
}

#[test]
fn a_digest_that_changed_under_a_published_version_must_bump() {
    let registry = start_registry();
    let extra = format!(
        "[environments.old]\nregistry = \"{}/old\"\ntags = [\"{{version}}\"]\ncompression = \"gzip\"\n",
        registry.host
    );
    let dir = fleet(&registry.host, &extra);
    // Publish the current build under its version tags.
    edit(
        dir.path(),
        "images.toml",
        "tags = [\"{version}-dev.{git_short}\", \"dev\"]",
        "tags = [\"{version}\"]",
    );
    let store = tempfile::tempdir().unwrap();
    let store = store.path();
    json(dir.path(), store, &["push", "--env", "dev"], 0);
    json(dir.path(), store, &["push", "--env", "old"], 0);
    // The same build is fine, also where the pushed manifest is a re-written (gzip) one.
    json(dir.path(), store, &["check", "--env", "dev"], 0);
    json(dir.path(), store, &["check", "--env", "old"], 0);
    let published = skopeo_digest(&format!("{}/dev/acme/api:2.0.0", registry.host)).unwrap();

    // api's content changes, its version does not.
    edit(dir.path(), "examples/static/services/api/config/api.toml", "8080", "9090");
    let report = json(dir.path(), store, &["check", "--env", "dev"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("digest_changed_without_bump", "api")]));
    let (_, _, msg) = &violations(&report)[0];
    let build = json(dir.path(), store, &["build"], 0);
    let built = build["images"].as_array().unwrap().iter().find(|i| i["name"] == "api").unwrap()
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(built, published);
    for part in [&built, &published, "2.0.1", "2.1.0", "3.0.0", "2.0.0"] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
    let report = json(dir.path(), store, &["check", "--env", "old"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("digest_changed_without_bump", "api")]));

    // With a bump, there is nothing published under the new version: fine.
    edit(dir.path(), "images.toml", "version = \"2.0.0\"", "version = \"2.0.1\"");
    json(dir.path(), store, &["check", "--env", "dev"], 0);
}

#[test]
fn since_a_ref_a_changed_image_must_bump_and_no_version_may_decrease() {
    let dir = fleet("127.0.0.1:1", "");
    let store = tempfile::tempdir().unwrap();
    let store = store.path();
    let root = dir.path();
    // Nothing changed.
    json(root, store, &["check", "--since", "HEAD"], 0);

    // An uncommitted change to a leaf: only api.
    edit(root, "examples/static/services/api/config/api.toml", "8080", "9090");
    let report = json(root, store, &["check", "--since", "HEAD"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("changed_without_bump", "api")]));
    let (_, _, msg) = &violations(&report)[0];
    assert!(msg.contains("examples/static/services/api") && msg.contains("2.0.1"), "{msg}");

    // Committed, against the commit before: still api; a bump clears it.
    fixture::git_commit(root, "api: port 9090");
    json(root, store, &["check", "--since", "HEAD"], 0);
    let report = json(root, store, &["check", "--since", "HEAD~1"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("changed_without_bump", "api")]));
    edit(root, "images.toml", "version = \"2.0.0\"", "version = \"2.1.0\"");
    json(root, store, &["check", "--since", "HEAD~1"], 0);
    fixture::git_commit(root, "api 2.1.0");

    // A parent's change changes its descendants; web is a pre-release: 2.1.0-rc.1 → rc.2 is
    // an increase.
    edit(root, "examples/static/images/runtime/files/runtime.conf", "", "# tuned\n");
    edit(root, "images.toml", "version = \"2.1.0-rc.1\"", "version = \"2.1.0-rc.2\"");
    let report = json(root, store, &["check", "--since", "HEAD"], 1);
    assert_eq!(
        rules_and_images(&report),
        pairs(&[
            ("changed_without_bump", "api"),
            ("changed_without_bump", "runtime"),
            ("changed_without_bump", "worker"),
        ])
    );
    let changed: Vec<&str> = report["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["image"].as_str().unwrap())
        .collect();
    assert_eq!(changed, ["api", "runtime", "web", "worker"]);

    // images.toml settings are inputs too (args of worker).
    let root_reset = |r: &Path| {
        let out = std::process::Command::new("git")
            .current_dir(r)
            .args(["checkout", "-q", "--", "."])
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    root_reset(root);
    edit(
        root,
        "images.toml",
        "args = { BASE = \"runtime\" }",
        "args = { BASE = \"runtime\", X = \"1\" }",
    );
    let report = json(root, store, &["check", "--since", "HEAD"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("changed_without_bump", "worker")]));
    root_reset(root);

    // A version that goes down is refused even without a change.
    edit(root, "images.toml", "version = \"0.3.0\"", "version = \"0.2.9\"");
    let report = json(root, store, &["check", "--since", "HEAD"], 1);
    assert_eq!(rules_and_images(&report), pairs(&[("version_decreased", "tools")]));

    // An unknown ref is a clear error.
    let out = run(root, store, &["check", "--since", "no-such-ref"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("--since no-such-ref"), "{}", error_text(&out));
}
