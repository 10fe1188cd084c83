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
    let registry = TestRegistry::start();
    let proxy = Proxy::start(&registry.host);
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
        assert_eq!(list_tags(repository), listed, "{repository}: exactly the planned tags");
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
