//! `ferry promote` refusing: an image missing in the source, an immutable tag held by
//! another digest, a source environment that `promote_from` does not allow; and the plan
//! (`--dry-run`, `--digest`) that changes nothing.

mod common;
mod promote_support;

use common::*;
use promote_support::*;

fn envs(host: &str) -> String {
    format!(
        r#"
[environments.dev]
registry = "{host}/acme-dev"
tags = ["{{version}}-dev"]

[environments.staging]
registry = "{host}/acme-staging"
tags = ["{{version}}-rc", "staging"]

[environments.prod]
registry = "{host}/acme-prod"
tags = ["{{version}}", "latest"]
immutable = true
promote_from = "staging"
"#
    )
}

#[test]
fn an_image_missing_in_the_source_fails_and_no_tag_moves() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    publish(&reg, work.path(), "api", 1, 1, 20_000, "acme-staging/acme/api:1.0.0-rc");
    // web 2.0.0 was never published to staging.
    publish(&reg, work.path(), "web", 2, 1, 20_000, "acme-staging/acme/web:1.9.0-rc");
    let project = Project::new(&[("api", "1.0.0"), ("web", "2.0.0")], &envs(&reg.host));

    let out = project.run(&["promote", "--from", "staging", "--to", "prod"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(
        err.contains("image `web`")
            && err.contains(&format!("{}/acme-staging/acme/web:2.0.0-rc", reg.host))
            && err.contains("does not exist in the source environment"),
        "{err}"
    );
    assert!(stdout(&out).contains("missing in source"), "{}", stdout(&out));
    assert!(tags_of(&reg.host, "acme-prod/acme/api").is_empty(), "a tag moved");
    assert!(tags_of(&reg.host, "acme-prod/acme/web").is_empty(), "a tag moved");
}

#[test]
fn an_immutable_tag_with_another_digest_stops_everything() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let api = publish(&reg, work.path(), "api", 1, 1, 20_000, "acme-staging/acme/api:1.0.0-rc");
    let web = publish(&reg, work.path(), "web", 2, 1, 20_000, "acme-staging/acme/web:2.0.0-rc");
    // prod already has api 1.0.0 with the same digest (fine) and web 2.0.0 with another.
    publish(&reg, work.path(), "api", 1, 1, 20_000, "acme-prod/acme/api:1.0.0");
    let other = publish(&reg, work.path(), "web", 99, 1, 20_000, "acme-prod/acme/web:2.0.0");
    assert_ne!(other, web);
    let project = Project::new(&[("api", "1.0.0"), ("web", "2.0.0")], &envs(&reg.host));

    let out = project.run(&["promote", "--from", "staging", "--to", "prod"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(
        err.contains("image `web`")
            && err.contains(&format!("{}/acme-prod/acme/web:2.0.0", reg.host))
            && err.contains(&other)
            && err.contains(&web),
        "the conflict names image, tag and both digests: {err}"
    );
    assert!(!err.contains("image `api`"), "the same digest is no conflict: {err}");
    // Nothing moved: api did not get `latest`, web keeps its old digest.
    assert_eq!(tags_of(&reg.host, "acme-prod/acme/api"), ["1.0.0"]);
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", "1.0.0").as_deref(), Some(&*api));
    assert_eq!(tags_of(&reg.host, "acme-prod/acme/web"), ["2.0.0"]);
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/web", "2.0.0").as_deref(), Some(&*other));
    // Promoting only api works: its existing tag is the same digest, a no-op.
    let out = project.run(&["promote", "--from", "staging", "--to", "prod", "api"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(tags_of(&reg.host, "acme-prod/acme/api"), ["1.0.0", "latest"]);
}

#[test]
fn promote_from_is_enforced() {
    // No registry runs: the refusal comes before any request.
    let project = Project::new(&[("api", "1.0.0")], &envs("127.0.0.1:9"));
    let out = project.run(&["promote", "--from", "dev", "--to", "prod"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(
        err.contains("`prod` accepts promotions only from `staging`")
            && err.contains("not from `dev`"),
        "{err}"
    );
    let out = project.run(&["promote", "--from", "staging", "--to", "prdo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("did you mean `prod`?"), "{}", error_text(&out));
    let out = project.run(&["promote", "--from", "staging", "--to", "prod", "apii"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("unknown image `apii`"), "{}", error_text(&out));
}

#[test]
fn dry_run_plans_per_image_and_changes_nothing() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let api = publish(&reg, work.path(), "api", 1, 2, 30_000, "acme-staging/acme/api:1.0.0-rc");
    // web's build was tested under another tag: name it by digest.
    let web = publish(&reg, work.path(), "web", 2, 1, 10_000, "acme-staging/acme/web:candidate");
    let project =
        Project::new(&[("api", "1.0.0"), ("web", "2.0.0"), ("worker", "0.3.0")], &envs(&reg.host));
    // prod already has api (under another tag): "already there", only tags to apply.
    publish(&reg, work.path(), "api", 1, 2, 30_000, "acme-prod/acme/api:old");

    let digest_arg = format!("web={web}");
    let out = project.run(&[
        "--json",
        "promote",
        "--from",
        "staging",
        "--to",
        "prod",
        "--dry-run",
        "--digest",
        &digest_arg,
    ]);
    assert_eq!(out.status.code(), Some(1), "worker is missing: {}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["outcome"], "planned");
    let images = report["images"].as_array().unwrap();
    let by_name = |n: &str| images.iter().find(|i| i["image"] == n).unwrap().clone();
    let a = by_name("api");
    assert_eq!(a["status"], "already_there");
    assert_eq!(a["digest"], api.as_str());
    assert_eq!(a["blobs_to_copy"], 0);
    assert_eq!(a["tags"][0], serde_json::json!({"tag": "1.0.0", "action": "create"}));
    let w = by_name("web");
    assert_eq!(w["status"], "copy");
    assert_eq!(w["source"], format!("{}/acme-staging/acme/web@{web}", reg.host));
    assert_eq!(w["blobs_to_copy"], 2, "config and one layer");
    assert!(w["bytes_to_copy"].as_u64().unwrap() > 10_000);
    assert_eq!(w["mount"], true);
    let k = by_name("worker");
    assert_eq!(k["status"], "missing_in_source");
    assert!(error_text(&out).contains("image `worker`"), "{}", error_text(&out));

    // Nothing was written.
    assert_eq!(tags_of(&reg.host, "acme-prod/acme/api"), ["old"]);
    assert!(tags_of(&reg.host, "acme-prod/acme/web").is_empty());
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/web", &web), None);

    // The same without the missing image, for real.
    let out = project.run(&[
        "promote",
        "--from",
        "staging",
        "--to",
        "prod",
        "api",
        "web",
        "--digest",
        &digest_arg,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/web", "2.0.0").as_deref(), Some(&*web));
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", "latest").as_deref(), Some(&*api));
}
