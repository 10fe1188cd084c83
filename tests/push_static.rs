//! `ferry push` of the example fleet to a real registry: tags as planned, digests as in the
//! store (skopeo reads them back), a second push that uploads nothing, gzip environments.

mod push_support;

use push_support::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Image name → (repository, tags) for `env`, from `ferry plan`.
fn planned_tags(dir: &Path, store: &Path, env: &str) -> BTreeMap<String, (String, Vec<String>)> {
    let plan = json(dir, store, &["plan", "--env", env], 0);
    plan["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let e = &i["environments"][env];
            let tags =
                e["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string());
            (
                i["name"].as_str().unwrap().to_string(),
                (e["repository"].as_str().unwrap().to_string(), tags.collect()),
            )
        })
        .collect()
}

/// The manifest digest the store records under `name`.
fn store_digest(store: &Path, name: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
        .unwrap_or_else(|| panic!("{name} not in the store"))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn push_tags_every_image_with_the_store_digest_and_a_second_push_uploads_nothing() {
    let registry = start_registry();
    let proxy = FaultProxy::forwarding(&registry.host);
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();
    let store = store.path();

    let report = json(dir.path(), store, &["push", "--env", "dev"], 0);
    let first = proxy.take();
    let expected = planned_tags(dir.path(), store, "dev");
    assert_eq!(expected.len(), 6);
    let images = report["report"]["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    for img in images {
        assert_eq!(img["status"], "published", "{img}");
        assert_eq!(img["rewritten"], false);
    }
    assert!(report["report"]["bytes_uploaded"].as_u64().unwrap() > 0);
    assert_eq!(
        report["report"]["bytes_uploaded"].as_u64().unwrap() as usize,
        upload_bytes(&first),
        "the report counts the bytes that went over the wire"
    );
    // Shared layers (runtime's are in api, web and worker) are sent once and mounted.
    assert!(report["report"]["blobs_mounted"].as_u64().unwrap() > 0, "{report}");
    assert!(first.iter().any(|r| r.method == "POST" && r.path.contains("mount=")), "{first:?}");

    for (name, (repository, tags)) in &expected {
        let want = store_digest(store, name);
        assert!(!tags.is_empty());
        for tag in tags {
            let reference = format!("{repository}:{tag}");
            assert_eq!(skopeo_digest(&reference).as_deref(), Some(want.as_str()), "{reference}");
        }
        let mut listed = tags.clone();
        listed.sort();
        assert_eq!(skopeo_tags(repository), listed, "{repository}: exactly the planned tags");
        // An independent client copies it into a layout with the same digest.
        let layout = tempfile::tempdir().unwrap();
        let copied = skopeo_copy_digest(&format!("{repository}:{}", tags[0]), layout.path());
        assert_eq!(copied, want, "{name}");
    }

    // Everything is there: a second push sends no blob byte and moves no tag.
    let again = json(dir.path(), store, &["push", "--env", "dev"], 0);
    let second = proxy.take();
    assert_eq!(upload_bytes(&second), 0, "{:?}", writes(&second));
    assert!(writes(&second).is_empty(), "nothing is written: {:?}", writes(&second));
    assert_eq!(again["report"]["bytes_uploaded"], 0);
    assert_eq!(again["report"]["blobs_uploaded"], 0);
    assert_eq!(again["report"]["manifests_pushed"], 0);
    assert_eq!(again["report"]["tags_moved"], 0);
    let tag_count: usize = expected.values().map(|(_, t)| t.len()).sum();
    assert_eq!(again["report"]["tags_unchanged"].as_u64().unwrap() as usize, tag_count);
}

#[test]
fn a_gzip_environment_gets_rewritten_manifests_whose_variants_are_computed_once() {
    let registry = start_registry();
    let extra = format!(
        "[environments.old]\nregistry = \"{h}/old\"\ntags = [\"{{version}}\"]\ncompression = \"gzip\"\n\n[environments.old2]\nregistry = \"{h}/old2\"\ntags = [\"{{version}}\"]\ncompression = \"gzip\"\n",
        h = registry.host
    );
    let dir = fleet(&registry.host, &extra);
    let store = tempfile::tempdir().unwrap();
    let store = store.path();

    let report = json(dir.path(), store, &["push", "--env", "old"], 0);
    let computed = |r: &serde_json::Value| -> u64 {
        r["plan"]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["variants_computed"].as_u64().unwrap())
            .sum()
    };
    assert!(computed(&report) > 0);
    for img in report["report"]["images"].as_array().unwrap() {
        let name = img["name"].as_str().unwrap();
        assert_eq!(img["status"], "published");
        assert_eq!(img["rewritten"], true, "{name}");
        let pushed = img["digest"].as_str().unwrap();
        assert_eq!(img["store_digest"].as_str().unwrap(), store_digest(store, name));
        assert_ne!(
            pushed,
            store_digest(store, name),
            "{name}: a gzip manifest is another manifest"
        );
        let repository = img["repository"].as_str().unwrap();
        let version = &img["tags"][0];
        let reference = format!("{repository}:{}", version.as_str().unwrap());
        assert_eq!(
            skopeo_digest(&reference).as_deref(),
            Some(pushed),
            "the tag points at the re-written manifest"
        );
        let raw = skopeo_inspect(&reference).unwrap();
        for layer in raw["layers"].as_array().unwrap() {
            assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip", "{name}");
        }
        let layout = tempfile::tempdir().unwrap();
        assert_eq!(skopeo_copy_digest(&reference, layout.path()), pushed);
    }
    // The text report says so.
    let out = run(dir.path(), store, &["push", "--env", "old"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("re-written manifest (layers re-compressed)"),
        "{}",
        stdout(&out)
    );

    // Another gzip environment reuses every variant: same digests, nothing recomputed.
    let second = json(dir.path(), store, &["push", "--env", "old2"], 0);
    assert_eq!(computed(&second), 0, "variants come from the store's index");
    let digests = |r: &serde_json::Value| -> Vec<String> {
        r["report"]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["digest"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(digests(&report), digests(&second));
}

#[test]
fn dry_run_prints_the_plan_and_sends_nothing() {
    let registry = start_registry();
    let proxy = FaultProxy::forwarding(&registry.host);
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();
    let store = store.path();

    let plan = json(dir.path(), store, &["push", "--env", "dev", "--dry-run"], 0);
    let seen = proxy.take();
    assert!(writes(&seen).is_empty(), "{:?}", writes(&seen));
    let plan = &plan["plan"];
    let expected = planned_tags(dir.path(), store, "dev");
    let images = plan["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    let mut total = 0;
    for img in images {
        let name = img["name"].as_str().unwrap();
        assert_eq!(img["repository"], expected[name].0.as_str());
        assert_eq!(img["digest"].as_str().unwrap(), store_digest(store, name));
        let tags: Vec<&str> =
            img["tags"].as_array().unwrap().iter().map(|t| t["tag"].as_str().unwrap()).collect();
        assert_eq!(tags, expected[name].1.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(img["tags"].as_array().unwrap().iter().all(|t| t["action"] == "create"));
        let blobs = img["blobs"].as_array().unwrap();
        assert!(blobs.iter().all(|b| b["action"] == "upload" || b["action"] == "mount"), "{img}");
        let up: u64 = blobs
            .iter()
            .filter(|b| b["action"] == "upload")
            .map(|b| b["size"].as_u64().unwrap())
            .sum();
        assert_eq!(img["upload_bytes"].as_u64().unwrap(), up);
        total += up;
    }
    assert_eq!(plan["upload_bytes"].as_u64().unwrap(), total);
    for name in expected.keys() {
        assert!(skopeo_tags(&expected[name].0).is_empty());
    }

    // The real push sends exactly the bytes the plan announced.
    let report = json(dir.path(), store, &["push", "--env", "dev"], 0);
    assert_eq!(report["report"]["bytes_uploaded"].as_u64().unwrap(), total);
    proxy.take();

    // Afterwards, the plan has nothing to do, in text too.
    let out = run(dir.path(), store, &["push", "--env", "dev", "--dry-run"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("push to dev: 6 images; 0 blobs to upload (0B), 0 to mount"), "{text}");
    assert!(text.contains("(unchanged)") && !text.contains("(new)"), "{text}");
    assert!(writes(&proxy.take()).is_empty());
}

#[test]
fn pushed_images_carry_the_oci_labels_and_annotations() {
    let registry = start_registry();
    let dir = fleet(&registry.host, "");
    let store = tempfile::tempdir().unwrap();
    let store = store.path();
    let report = json(dir.path(), store, &["push", "--env", "dev"], 0);
    let digest_of = |name: &str| -> String {
        report["report"]["images"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()
            ["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let head = fixture::git_head(dir.path());
    let api = format!("{}/dev/acme/api:dev", registry.host);
    let manifest = skopeo_inspect(&api).unwrap();
    let ann = &manifest["annotations"];
    assert_eq!(ann["org.opencontainers.image.version"], "2.0.0");
    assert_eq!(ann["org.opencontainers.image.revision"], head.as_str());
    assert_eq!(ann["org.opencontainers.image.created"], "2026-01-02T03:04:05Z");
    assert_eq!(ann["org.opencontainers.image.source"], "https://example.com/acme");
    assert_eq!(ann["org.opencontainers.image.title"], "acme api", "the Dockerfile's LABEL stays");
    assert_eq!(ann["org.opencontainers.image.base.name"], "acme/runtime:1.4.2");
    assert_eq!(ann["org.opencontainers.image.base.digest"], digest_of("runtime").as_str());
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config"])
        .arg(format!("docker://{api}"))
        .output()
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let labels = &config["config"]["Labels"];
    // The config has the labels someone asked for (the Dockerfile's title, images.toml's
    // source), none of ferry's own: docker adds none either.
    for key in ["version", "revision", "created", "base.name", "base.digest"] {
        let key = format!("org.opencontainers.image.{key}");
        assert!(labels.get(&key).is_none(), "{key} is in the config: {labels}");
    }
    for key in ["source", "title"] {
        let key = format!("org.opencontainers.image.{key}");
        assert_eq!(labels[&key], ann[&key], "{key}");
    }
    assert_eq!(labels["org.opencontainers.image.vendor"], "Acme", "inherited labels stay");
    // runtime inherits nothing of base's identity: its own version and title, base = base.
    let runtime = skopeo_inspect(&format!("{}/dev/acme/runtime:dev", registry.host)).unwrap();
    assert_eq!(runtime["annotations"]["org.opencontainers.image.title"], "runtime");
    assert_eq!(
        runtime["annotations"]["org.opencontainers.image.base.digest"],
        digest_of("base").as_str()
    );
    let base = skopeo_inspect(&format!("{}/dev/acme/base:dev", registry.host)).unwrap();
    assert!(
        base["annotations"].get("org.opencontainers.image.base.name").is_none(),
        "FROM scratch"
    );
}
