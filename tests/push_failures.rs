//! A push in which something fails moves no tag: an upload refused for one repository, a
//! build that fails, an immutable tag that would move, an environment that only accepts
//! promotions. With --keep-going, the images whose whole ancestry succeeded are published.

mod push_support;

use push_support::*;
use serde_json::Value;

fn status(report: &Value, image: &str) -> String {
    report["report"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == image)
        .unwrap_or_else(|| panic!("{image} not in {report}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

const IMAGES: [&str; 6] = ["base", "tools", "runtime", "api", "web", "worker"];

fn repo(host: &str, env: &str, image: &str) -> String {
    format!("{host}/{env}/acme/{image}")
}

#[test]
fn an_upload_refused_for_one_repository_moves_no_tag_and_keep_going_publishes_its_non_descendants()
{
    let registry = start_registry();
    let proxy = FaultProxy::forwarding(&registry.host);
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();
    let store = store.path();
    // The registry refuses every upload into runtime's repository (403 is never retried).
    proxy.set_rule(|r| {
        if r.method != "GET" && r.method != "HEAD" && r.path.starts_with("/v2/dev/acme/runtime/") {
            Action::Respond(403, vec![])
        } else {
            Action::Forward
        }
    });

    let out = run(dir.path(), store, &["--json", "push", "--env", "dev"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status(&report, "runtime"), "failed");
    for image in ["base", "tools", "api", "web", "worker"] {
        assert_eq!(status(&report, image), "uploaded_untagged", "{image}: {report}");
    }
    assert!(stderr(&out).contains("image `runtime`"), "{}", stderr(&out));
    for image in IMAGES {
        assert_eq!(skopeo_tags(&repo(&proxy.host, "dev", image)), Vec::<String>::new(), "{image}");
    }
    // The untagged images are really there, by digest.
    let api = &report["report"]["images"].as_array().unwrap()[3];
    assert_eq!(api["name"], "api");
    let digest = api["digest"].as_str().unwrap();
    let by_digest = format!("{}@{digest}", repo(&proxy.host, "dev", "api"));
    assert!(skopeo_inspect(&by_digest).is_some(), "{by_digest}");

    // Text output says which images went up untagged.
    let out = run(dir.path(), store, &["push", "--env", "dev"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains("uploaded untagged (no tag moved for them): base, tools, api, web, worker"),
        "{text}"
    );

    // --keep-going: base and tools do not descend from runtime; api, web, worker do.
    let report = json(dir.path(), store, &["push", "--env", "dev", "--keep-going"], 1);
    assert_eq!(status(&report, "base"), "published");
    assert_eq!(status(&report, "tools"), "published");
    assert_eq!(status(&report, "runtime"), "failed");
    for image in ["api", "web", "worker"] {
        assert_eq!(status(&report, image), "uploaded_untagged", "{image}");
        assert!(skopeo_tags(&repo(&proxy.host, "dev", image)).is_empty(), "{image}");
    }
    assert_eq!(skopeo_tags(&repo(&proxy.host, "dev", "base")).len(), 2);
    assert_eq!(skopeo_tags(&repo(&proxy.host, "dev", "tools")).len(), 2);

    // Once the registry accepts runtime, everything is published.
    proxy.set_rule(|_| Action::Forward);
    let report = json(dir.path(), store, &["push", "--env", "dev"], 0);
    for image in IMAGES {
        assert_eq!(status(&report, image), "published", "{image}");
        assert!(!skopeo_tags(&repo(&proxy.host, "dev", image)).is_empty(), "{image}");
    }
}

#[test]
fn a_failed_build_moves_no_tag_and_keep_going_publishes_the_rest() {
    let registry = start_registry();
    let dir = fleet(&registry.host, "");
    let store = tempfile::tempdir().unwrap();
    let store = store.path();
    // worker's COPY source is gone: its build fails.
    std::fs::remove_file(dir.path().join("examples/static/services/worker/worker.conf")).unwrap();

    let out = run(dir.path(), store, &["--json", "push", "--env", "dev"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status(&report, "worker"), "not_built");
    for image in IMAGES {
        assert!(skopeo_tags(&repo(&registry.host, "dev", image)).is_empty(), "{image}");
    }

    let report = json(dir.path(), store, &["push", "--env", "dev", "--keep-going"], 1);
    assert_eq!(status(&report, "worker"), "not_built");
    for image in ["base", "tools", "runtime", "api", "web"] {
        assert_eq!(status(&report, image), "published", "{image}");
        assert_eq!(
            skopeo_tags(&repo(&registry.host, "dev", image)).len(),
            2 + usize::from(image == "api"),
            "{image}"
        );
    }
    assert!(skopeo_tags(&repo(&registry.host, "dev", "worker")).is_empty());
}

const RELEASE_ENVS: &str = r#"
[environments.rel]
registry = "HOST/rel"
tags = ["{version}", "stable"]
immutable = true

[environments.rel2]
registry = "HOST/rel2"
tags = ["{version}", "stable"]
immutable = true
"#;

#[test]
fn an_immutable_tag_with_another_digest_stops_the_push_before_any_upload() {
    let registry = start_registry();
    let proxy = FaultProxy::forwarding(&registry.host);
    let dir = fleet(&proxy.host, &RELEASE_ENVS.replace("HOST", &proxy.host));
    let store = tempfile::tempdir().unwrap();
    let store = store.path();
    // Someone already published another image as api 2.0.0.
    let layout = tempfile::tempdir().unwrap();
    let layer = vec![file("foreign", b"foreign\n", 0o644)];
    make_oci_image(layout.path(), "img", &[layer], Comp::None);
    registry.push(layout.path(), "img", "rel/acme/api:2.0.0");
    let api_ref = format!("{}:2.0.0", repo(&proxy.host, "rel", "api"));
    let foreign = skopeo_digest(&api_ref).unwrap();
    proxy.take();

    let out = run(dir.path(), store, &["push", "--env", "rel"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(err.contains("image `api`"), "{err}");
    assert!(err.contains(&api_ref), "{err}");
    assert!(err.contains(&foreign), "{err}");
    let ours = json(dir.path(), store, &["push", "--env", "dev", "--dry-run"], 0)["plan"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "api")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains(&ours), "both digests are named: {err}");
    let seen = proxy.take();
    assert!(writes(&seen).is_empty(), "nothing was uploaded or tagged: {:?}", writes(&seen));
    assert_eq!(skopeo_digest(&api_ref).unwrap(), foreign, "the tag did not move");
    for image in ["base", "tools", "runtime", "web", "worker"] {
        assert!(skopeo_tags(&repo(&proxy.host, "rel", image)).is_empty(), "{image}");
    }

    // The same digest under an immutable tag is a no-op.
    json(dir.path(), store, &["push", "--env", "rel2"], 0);
    let again = json(dir.path(), store, &["push", "--env", "rel2"], 0);
    assert_eq!(again["report"]["tags_moved"], 0);
    assert_eq!(
        again["report"]["tags_unchanged"], 13,
        "6 images × 2 tags, and api's own {{version}}-{{git_short}}"
    );
}

#[test]
fn an_environment_fed_by_promotion_refuses_a_direct_push() {
    let registry = start_registry();
    let proxy = FaultProxy::forwarding(&registry.host);
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();
    let out = run(dir.path(), store.path(), &["push", "--env", "prod"]);
    assert_eq!(out.status.code(), Some(1));
    let err = error_text(&out);
    assert!(err.contains("ferry promote --from staging --to prod"), "{err}");
    assert!(proxy.take().is_empty(), "the registry was not contacted");
}

#[test]
fn a_release_only_environment_refuses_pre_releases() {
    let registry = start_registry();
    let extra = format!(
        "[environments.stable]\nregistry = \"{}/stable\"\ntags = [\"{{version}}\"]\nrelease_only = true\n",
        registry.host
    );
    let dir = fleet(&registry.host, &extra);
    let store = tempfile::tempdir().unwrap();
    let out = run(dir.path(), store.path(), &["push", "--env", "stable"]);
    assert_eq!(out.status.code(), Some(1));
    let err = error_text(&out);
    assert!(err.contains("`web` (2.1.0-rc.1)"), "{err}");
    // Without the pre-release, it goes.
    run(dir.path(), store.path(), &["push", "--env", "stable", "api"]);
    let tags = skopeo_tags(&repo(&registry.host, "stable", "api"));
    assert_eq!(tags.len(), 2, "{{version}} and api's own {{version}}-{{git_short}}: {tags:?}");
    assert_eq!(tags[0], "2.0.0");
}
