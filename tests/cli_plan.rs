//! `ferry plan` and `ferry graph` on the example fleets, pinned with snapshots, and the exit
//! codes and diagnostics of invalid input.

mod fixture;

use fixture::{ferry, top_level_fleet};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn plan_text_of_the_top_level_fleet() {
    let dir = top_level_fleet();
    let out = ferry(dir.path()).arg("plan").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    snapshot(dir.path(), || insta::assert_snapshot!(stdout(&out)));
}

/// Run snapshot assertions with the commit sha filtered out.
fn snapshot(dir: &std::path::Path, f: impl FnOnce()) {
    let filters = fixture::sha_filters(dir);
    let mut settings = insta::Settings::clone_current();
    for (from, to) in &filters {
        settings.add_filter(&regex_escape(from), *to);
    }
    settings.bind(f);
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\{c}") })
        .collect()
}

#[test]
fn plan_json_lists_every_image_with_level_and_parents() {
    let dir = top_level_fleet();
    let out = ferry(dir.path()).args(["plan", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("exactly one JSON document");
    let images = plan["images"].as_array().unwrap();
    let summary: Vec<(String, u64, Vec<String>)> = images
        .iter()
        .map(|i| {
            let parents = i["parents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect();
            (i["name"].as_str().unwrap().to_string(), i["level"].as_u64().unwrap(), parents)
        })
        .collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        summary,
        vec![
            ("base".to_string(), 0, vec![]),
            ("tools".to_string(), 0, vec![]),
            ("runtime".to_string(), 1, s(&["base"])),
            ("api".to_string(), 2, s(&["runtime", "tools"])),
            ("web".to_string(), 2, s(&["runtime"])),
            ("worker".to_string(), 2, s(&["runtime", "tools"])),
        ]
    );
    snapshot(dir.path(), || insta::assert_json_snapshot!(plan));
}

#[test]
fn plan_of_the_busybox_fleet() {
    let dir = top_level_fleet();
    let out = ferry(&dir.path().join("examples/busybox")).arg("plan").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    snapshot(dir.path(), || insta::assert_snapshot!(stdout(&out)));
    let out =
        ferry(&dir.path().join("examples/busybox")).args(["plan", "--json"]).output().unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    snapshot(dir.path(), || insta::assert_json_snapshot!(plan));
}

#[test]
fn selecting_an_image_brings_its_ancestors_and_with_dependents_its_descendants() {
    let dir = top_level_fleet();
    let names = |args: &[&str]| -> Vec<String> {
        let out = ferry(dir.path()).args(["plan", "--json"]).args(args).output().unwrap();
        assert!(out.status.success());
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        plan["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&["api"]), ["base", "tools", "runtime", "api"]);
    assert_eq!(
        names(&["base", "--with-dependents"]),
        ["base", "tools", "runtime", "api", "web", "worker"]
    );
    assert_eq!(
        names(&["tools", "--with-dependents"]),
        ["base", "tools", "runtime", "api", "worker"]
    );
}

#[test]
fn plan_for_one_environment_and_the_prerelease_rule() {
    let dir = top_level_fleet();
    let out =
        ferry(dir.path()).args(["plan", "--env", "prod", "--json", "web", "api"]).output().unwrap();
    assert!(out.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tags = |name: &str| -> Vec<String> {
        let img = plan["images"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap();
        assert_eq!(img["environments"].as_object().unwrap().keys().collect::<Vec<_>>(), ["prod"]);
        img["environments"]["prod"]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    // web is 2.1.0-rc.1: no floating tags.
    assert_eq!(tags("web"), ["2.1.0-rc.1"]);
    assert_eq!(tags("api")[..4], ["2.0.0", "2.0", "2", "latest"]);
}

#[test]
fn graph_formats() {
    let dir = top_level_fleet();
    for format in ["text", "dot", "mermaid"] {
        let out = ferry(dir.path()).args(["graph", "--format", format]).output().unwrap();
        assert!(out.status.success());
        insta::assert_snapshot!(format!("graph_{format}"), stdout(&out));
    }
}

#[test]
fn invalid_manifest_exits_2_with_file_line_and_column() {
    let dir = top_level_fleet();
    let toml = std::fs::read_to_string(dir.path().join("images.toml")).unwrap();
    std::fs::write(
        dir.path().join("images.toml"),
        toml.replace("version = \"2.0.0\"", "version = \"2.0\""),
    )
    .unwrap();
    let out = ferry(dir.path()).arg("plan").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("images.toml:27:11: image `api`: `2.0` is not a semantic version"),
        "{err}"
    );
}

#[test]
fn invalid_tag_render_names_image_environment_and_template() {
    let dir = top_level_fleet();
    let toml = std::fs::read_to_string(dir.path().join("images.toml")).unwrap();
    std::fs::write(dir.path().join("images.toml"), toml.replace("\"dev\"]", "\".{image}\"]"))
        .unwrap();
    let out = ferry(dir.path()).arg("plan").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("image `base`, environment `dev`: tag template `.{image}` renders `.base`, which is not a valid tag"), "{err}");
}

#[test]
fn unknown_image_and_environment_exit_2() {
    let dir = top_level_fleet();
    let out = ferry(dir.path()).args(["plan", "apii"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown image `apii`; did you mean `api`?")
    );
    let out = ferry(dir.path()).args(["plan", "--env", "stage"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("unknown environment `stage`; did you mean `staging`?"));
}

#[test]
fn dockerfile_error_exits_2_naming_file_and_line() {
    let dir = top_level_fleet();
    std::fs::write(
        dir.path().join("examples/static/services/api/Dockerfile"),
        "FROM runtime\nCOPY onlyone\n",
    )
    .unwrap();
    let out = ferry(dir.path()).arg("plan").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("examples/static/services/api/Dockerfile:2:"), "{err}");
}
