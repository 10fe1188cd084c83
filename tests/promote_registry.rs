//! `ferry promote` against real registries: within one registry (blobs mounted, counted
//! through a proxy), across two registry processes (blobs streamed), referrers, re-runs.

mod common;
mod promote_support;

use common::*;
use promote_support::*;

fn envs(staging: &str, prod: &str) -> String {
    format!(
        r#"
[environments.staging]
registry = "{staging}/acme-staging"
tags = ["{{version}}-rc", "staging"]

[environments.prod]
registry = "{prod}/acme-prod"
tags = ["{{version}}", "{{major}}.{{minor}}", "latest"]
immutable = true
promote_from = "staging"
"#
    )
}

#[test]
fn within_one_registry_only_mounts_and_keeps_digests() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let proxy = FaultProxy::forwarding(&reg.host);
    let work = tempfile::tempdir().unwrap();
    let api = publish(&reg, work.path(), "api", 1, 2, 200_000, "acme-staging/acme/api:1.0.0-rc");
    let (web, web_children) =
        publish_index(&reg, work.path(), "acme-staging/acme/web", "2.1.0-rc", 10);
    let (artifact, cosign) =
        attach_signature(&reg.host, "acme-staging/acme/api", &api, work.path());
    let project =
        Project::new(&[("api", "1.0.0"), ("web", "2.1.0")], &envs(&proxy.host, &proxy.host));
    assert!(!project.path().join("services").exists(), "no build context is needed");

    proxy.take();
    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "promote failed: {}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["outcome"], "promoted");

    // No layer byte moved: every blob was mounted, none downloaded or uploaded.
    let seen = proxy.take();
    for r in &seen {
        let blob_read = r.method == "GET" && r.path.contains("/blobs/");
        let upload = (r.method == "PUT" || r.method == "PATCH") && r.path.contains("/blobs/");
        assert!(!blob_read && !upload, "a blob was transferred: {r:?}");
        if r.method == "POST" {
            assert!(r.path.contains("mount="), "an upload that is not a mount: {r:?}");
            assert_eq!(r.status, 201, "the mount was refused: {r:?}");
        }
    }
    // api: config + 2 layers + the signature's empty config and payload; web: 2 children
    // with a config and a layer each.
    let mounts = seen.iter().filter(|r| r.method == "POST").count();
    assert_eq!(mounts, 3 + 2 + 4, "{seen:#?}");
    assert_eq!(report["stats"]["blobs_mounted"], 9);
    assert_eq!(report["stats"]["blobs_streamed"], 0);

    // Digests in prod are the digests in staging, under every prod tag.
    for tag in ["1.0.0", "1.0", "latest"] {
        assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", tag).as_deref(), Some(&*api));
    }
    for tag in ["2.1.0", "2.1", "latest"] {
        assert_eq!(digest_of(&reg.host, "acme-prod/acme/web", tag).as_deref(), Some(&*web));
    }
    for child in &web_children {
        assert_eq!(digest_of(&reg.host, "acme-prod/acme/web", child).as_deref(), Some(&**child));
    }
    // The signature came along: the artifact, its fallback index, the cosign tag.
    let hex = &api["sha256:".len()..];
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", &artifact).as_deref(), Some(&*artifact));
    assert_eq!(
        digest_of(&reg.host, "acme-prod/acme/api", &format!("sha256-{hex}.sig")).as_deref(),
        Some(&*cosign)
    );
    let referrers = {
        use ferry::registry::Registry;
        client()
            .referrers(&repo(&reg.host, "acme-prod/acme/api"), &api.parse().unwrap(), None)
            .unwrap()
    };
    let listed: Vec<String> = referrers.manifests.iter().map(|d| d.digest.to_string()).collect();
    assert_eq!(listed, [artifact.as_str()]);
    assert_eq!(
        tags_of(&reg.host, "acme-prod/acme/api"),
        ["1.0", "1.0.0", "latest", &format!("sha256-{hex}"), &format!("sha256-{hex}.sig")]
    );
    assert_eq!(tags_of(&reg.host, "acme-prod/acme/web"), ["2.1", "2.1.0", "latest"]);

    // Again: nothing changes, and ferry says so.
    proxy.take();
    let out = project.run(&["promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "second promote failed: {}", stderr(&out));
    assert!(stdout(&out).contains("Nothing to do"), "{}", stdout(&out));
    let seen = proxy.take();
    let writes = writes(&seen);
    assert!(writes.is_empty(), "a finished promotion wrote again: {writes:?}");
}

#[test]
fn across_two_registries_streams_blobs_and_skopeo_sees_the_tags() {
    let staging = TestRegistry::start(RegistryOptions::default());
    let prod = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let api =
        publish(&staging, work.path(), "api", 2, 3, 150_000, "acme-staging/acme/api:1.0.0-rc");
    let (web, _) = publish_index(&staging, work.path(), "acme-staging/acme/web", "2.1.0-rc", 20);
    let (artifact, cosign) =
        attach_signature(&staging.host, "acme-staging/acme/api", &api, work.path());
    let project =
        Project::new(&[("api", "1.0.0"), ("web", "2.1.0")], &envs(&staging.host, &prod.host));

    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "promote failed: {}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["stats"]["blobs_mounted"], 0);
    // api: config, 3 layers, signature config and payload; web: 2 configs and 2 layers.
    assert_eq!(report["stats"]["blobs_streamed"], 6 + 4);
    let planned: u64 = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["bytes_to_copy"].as_u64().unwrap())
        .sum();
    assert_eq!(report["stats"]["bytes_streamed"].as_u64().unwrap(), planned);
    assert!(planned > 450_000, "the layers' bytes were counted: {planned}");

    let hex = &api["sha256:".len()..];
    let (prod_api, prod_web) =
        (format!("{}/acme-prod/acme/api", prod.host), format!("{}/acme-prod/acme/web", prod.host));
    assert_eq!(
        skopeo_tags(&prod_api),
        ["1.0", "1.0.0", "latest", &format!("sha256-{hex}"), &format!("sha256-{hex}.sig")]
    );
    assert_eq!(skopeo_tags(&prod_web), ["2.1", "2.1.0", "latest"]);
    for tag in ["1.0.0", "latest"] {
        assert_eq!(skopeo_digest(&format!("{prod_api}:{tag}")).as_deref(), Some(&*api));
    }
    assert_eq!(skopeo_digest(&format!("{prod_web}:2.1.0")).as_deref(), Some(&*web));
    assert_eq!(skopeo_digest(&format!("{prod_api}:sha256-{hex}.sig")).as_deref(), Some(&*cosign));
    // skopeo copies the whole image out of prod: every blob arrived intact.
    let out = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{}/acme-prod/acme/web:2.1.0", prod.host))
        .arg(format!("oci:{}:web", work.path().join("check").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy from prod: {}", stderr(&out));
    assert_eq!(digest_of(&prod.host, "acme-prod/acme/api", &artifact).as_deref(), Some(&*artifact));

    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "second promote failed: {}", stderr(&out));
    assert_eq!(json(&out)["outcome"], "nothing_to_do");
}

#[test]
fn without_referrers_only_the_image_moves() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let api = publish(&reg, work.path(), "api", 3, 1, 10_000, "acme-staging/acme/api:1.0.0-rc");
    let (artifact, _) = attach_signature(&reg.host, "acme-staging/acme/api", &api, work.path());
    let project = Project::new(&[("api", "1.0.0")], &envs(&reg.host, &reg.host));
    let out = project.run(&["promote", "--from", "staging", "--to", "prod", "--no-referrers"]);
    assert!(out.status.success(), "promote failed: {}", stderr(&out));
    assert_eq!(tags_of(&reg.host, "acme-prod/acme/api"), ["1.0", "1.0.0", "latest"]);
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", &artifact), None);
}

#[test]
fn across_two_registries_a_shared_blob_crosses_once() {
    let staging = TestRegistry::start(RegistryOptions::default());
    let prod = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    // Two images built from the same layers (as a fleet shares its base).
    let api =
        publish(&staging, work.path(), "base", 4, 2, 60_000, "acme-staging/acme/api:1.0.0-rc");
    staging.push(&work.path().join("layout-base-4"), "t", "acme-staging/acme/web:2.1.0-rc");
    let project =
        Project::new(&[("api", "1.0.0"), ("web", "2.1.0")], &envs(&staging.host, &prod.host));

    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "promote failed: {}", stderr(&out));
    let report = json(&out);
    // Config and two layers: streamed into one repository, mounted into the other.
    assert_eq!(report["stats"]["blobs_streamed"], 3, "{report:#}");
    assert_eq!(report["stats"]["blobs_mounted"], 3, "{report:#}");
    let planned: Vec<u64> = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["bytes_to_copy"].as_u64().unwrap())
        .collect();
    assert_eq!(report["stats"]["bytes_streamed"].as_u64().unwrap(), planned[0]);
    for path in ["acme-prod/acme/api", "acme-prod/acme/web"] {
        assert_eq!(skopeo_digest(&format!("{}/{path}:latest", prod.host)).as_deref(), Some(&*api));
    }
    // skopeo reads every blob out of the repository that got them by mount.
    let out = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/acme-prod/acme/web:2.1.0", prod.host))
        .arg(format!("oci:{}:web", work.path().join("check").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy from prod: {}", stderr(&out));
}

/// What a promotion asks the registry. Into a fresh destination: one tag listing per image
/// and no HEAD of any destination manifest; the referrers API, which this registry lacks,
/// once for the whole fleet. Into a destination that holds some of the tags: only those
/// are asked about, and the plan still says where each moves from.
#[test]
fn a_promotion_asks_only_what_it_cannot_know() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let proxy = FaultProxy::forwarding(&reg.host);
    let work = tempfile::tempdir().unwrap();
    let names = ["api", "web", "worker"];
    for (seed, name) in names.iter().enumerate() {
        let dest = format!("acme-staging/acme/{name}:1.0.0-rc");
        publish(&reg, work.path(), name, seed as u64 + 1, 1, 20_000, &dest);
    }
    let envs = |version: &str| {
        let images: Vec<(&str, &str)> = names.iter().map(|n| (*n, "1.0.0")).collect();
        let mut images = images;
        images[0].1 = version;
        Project::new(
            &images,
            &format!(
                r#"
[environments.staging]
registry = "{0}/acme-staging"
tags = ["{{version}}-rc"]

[environments.prod]
registry = "{0}/acme-prod"
tags = ["{{version}}", "{{major}}.{{minor}}", "latest"]
promote_from = "staging"
"#,
                proxy.host
            ),
        )
    };
    let project = envs("1.0.0");
    proxy.take();
    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "promote failed: {}", stderr(&out));
    let seen = proxy.take();
    let to_prod = |r: &SeenRequest| r.path.starts_with("/v2/acme-prod/");
    let heads: Vec<_> = seen.iter().filter(|r| r.method == "HEAD" && to_prod(r)).collect();
    assert!(heads.is_empty(), "a fresh destination was asked about manifests: {heads:#?}");
    let listings = seen.iter().filter(|r| to_prod(r) && r.path.contains("/tags/list")).count();
    assert_eq!(listings, names.len(), "{seen:#?}");
    let referrers = seen.iter().filter(|r| r.path.contains("/referrers/")).count();
    assert_eq!(referrers, 1, "the referrers API was asked more than once: {seen:#?}");
    // Within one registry an image without referrers goes in with its tags: no PUT by
    // digest first (the registry holds these very bytes already).
    let by_digest: Vec<_> = seen
        .iter()
        .filter(|r| r.method == "PUT" && to_prod(r) && r.path.contains("/manifests/sha256:"))
        .collect();
    assert!(by_digest.is_empty(), "{by_digest:#?}");
    let report = json(&out);
    assert_eq!(report["stats"]["manifests_copied"], names.len());
    assert_eq!(report["stats"]["tags_moved"], 3 * names.len());
    for name in names {
        assert_eq!(
            tags_of(&reg.host, &format!("acme-prod/acme/{name}")),
            ["1.0", "1.0.0", "latest"]
        );
    }

    // api 1.0.1: its 1.0 and latest exist in prod (and move), 1.0.1 does not.
    let api_old = digest_of(&reg.host, "acme-prod/acme/api", "1.0.0").unwrap();
    let api_new = publish(&reg, work.path(), "api", 9, 1, 20_000, "acme-staging/acme/api:1.0.1-rc");
    let project = envs("1.0.1");
    proxy.take();
    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "promote failed: {}", stderr(&out));
    let seen = proxy.take();
    let asked = |path: &str| {
        seen.iter().filter(|r| r.method == "HEAD" && r.path == format!("/v2/{path}")).count()
    };
    assert_eq!(asked("acme-prod/acme/api/manifests/1.0.1"), 0, "{seen:#?}");
    assert_eq!(asked("acme-prod/acme/api/manifests/1.0"), 1, "{seen:#?}");
    assert_eq!(asked("acme-prod/acme/api/manifests/latest"), 1, "{seen:#?}");
    // No tag names the new digest, so whether prod has it is asked.
    assert_eq!(asked(&format!("acme-prod/acme/api/manifests/{api_new}")), 1, "{seen:#?}");
    // web's tags all name its digest already: that proves the manifest is there.
    assert_eq!(asked("acme-prod/acme/web/manifests/latest"), 1, "{seen:#?}");
    let web_digest_heads = seen
        .iter()
        .filter(|r| {
            r.method == "HEAD" && r.path.starts_with("/v2/acme-prod/acme/web/manifests/sha256:")
        })
        .count();
    assert_eq!(web_digest_heads, 0, "{seen:#?}");

    let report = json(&out);
    let api = report["images"].as_array().unwrap().iter().find(|i| i["image"] == "api").unwrap();
    assert_eq!(api["status"], "copy");
    let tags = &api["tags"];
    assert_eq!(tags[0], serde_json::json!({"tag": "1.0.1", "action": "create"}));
    assert_eq!(tags[1], serde_json::json!({"tag": "1.0", "action": "move", "from": api_old}));
    assert_eq!(tags[2], serde_json::json!({"tag": "latest", "action": "move", "from": api_old}));
    let web = report["images"].as_array().unwrap().iter().find(|i| i["image"] == "web").unwrap();
    assert_eq!(web["status"], "already_there");
    for tag in ["1.0.1", "1.0", "latest"] {
        assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", tag).as_deref(), Some(&*api_new));
    }
    assert_eq!(digest_of(&reg.host, "acme-prod/acme/api", "1.0.0").as_deref(), Some(&*api_old));
}
