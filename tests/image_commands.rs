//! Image management as docker users know it: images, inspect, history, tag, rmi, prune,
//! save/load (checked with skopeo as an independent reader), cache verify.

mod common;

use std::process::Command;

use common::*;

struct Setup {
    _reg: TestRegistry,
    _work: tempfile::TempDir,
    ferry: Ferry,
    base: TestImage,
    child: TestImage,
    base_name: String,
    child_name: String,
}

/// A base image and a child built on it (its layers plus one), pulled into a fresh store.
fn setup() -> Setup {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let base_layers = vec![vec![dir("etc"), file("etc/base", b"base\n", 0o644)]];
    let base = make_oci_image(&work.path().join("base"), "v1", &base_layers, Comp::Gzip);
    let mut child_layers = base_layers.clone();
    child_layers.push(vec![dir("app"), file("app/run", b"#!/bin/sh\n", 0o755)]);
    let child = make_oci_image(&work.path().join("child"), "v1", &child_layers, Comp::Zstd);
    reg.push(&base.layout, "v1", "acme/base:1.0");
    reg.push(&child.layout, "v1", "acme/app:2.0");
    let ferry = Ferry::new();
    let base_name = format!("{}/acme/base:1.0", reg.host);
    let child_name = format!("{}/acme/app:2.0", reg.host);
    ferry.ok(&["pull", &base_name]);
    ferry.ok(&["pull", &child_name]);
    Setup { _reg: reg, _work: work, ferry, base, child, base_name, child_name }
}

#[test]
fn images_lists_filters_and_shows_digests() {
    let s = setup();
    let out = s.ferry.ok(&["images"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header: Vec<&str> =
        lines[0].split("   ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(header, ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]);
    assert!(out.contains(&s.base.config_digest[7..19]));
    assert!(out.contains(&s.child.config_digest[7..19]));

    let out = s.ferry.ok(&["images", "--digests"]);
    assert!(out.contains("DIGEST") && out.contains(&s.child.manifest_digest), "{out}");

    let out = s.ferry.ok(&["images", "--filter", "reference=*/acme/app"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("acme/app") && !out.contains("acme/base"));
    let out = s.ferry.ok(&["images", "--filter", "reference=*/acme/*:1.0"]);
    assert!(out.contains("acme/base") && !out.contains("acme/app"), "{out}");

    let out = s.ferry.ok(&["images", "-q"]);
    let mut ids: Vec<&str> = out.lines().collect();
    ids.sort();
    let mut want = vec![&s.base.config_digest[7..19], &s.child.config_digest[7..19]];
    want.sort();
    assert_eq!(ids, want);

    let out = s.ferry.ok(&["--json", "images"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
fn inspect_and_history() {
    let s = setup();
    let out = s.ferry.ok(&["inspect", &s.child_name]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let i = &v[0];
    assert_eq!(i["Id"], s.child.config_digest.as_str());
    assert_eq!(i["Digest"], s.child.manifest_digest.as_str());
    assert_eq!(i["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    assert_eq!(i["Config"]["Labels"]["test"], "yes");
    assert_eq!(i["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(i["Layers"][1]["MediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
    assert!(i["Size"].as_u64().unwrap() > 0);
    // By image id prefix and by digest too.
    let by_id = s.ferry.ok(&["inspect", &s.child.config_digest[7..19]]);
    assert!(by_id.contains(&s.child.manifest_digest));
    let out = s.ferry.run(&["inspect", "no/such:image"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("no/such:image"), "{}", stderr(&out));

    let out = s.ferry.ok(&["history", &s.child_name]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("IMAGE"));
    assert!(lines[1].contains("CMD [\"/bin/sh\"]") && lines[1].contains("0B"));
    assert!(lines[2].contains("COPY layer1"));
    assert!(lines[3].contains("<missing>") && lines[3].contains("COPY layer0"));
}

#[test]
fn tag_and_rmi_with_the_base_guard() {
    let s = setup();
    let f = &s.ferry;
    f.ok(&["tag", &s.base_name, "mybase:latest"]);
    let out = f.ok(&["images"]);
    assert!(out.contains("mybase") && out.contains("latest"), "{out}");
    let out = f.ok(&["inspect", "mybase"]);
    assert!(out.contains(&s.base.manifest_digest));
    let out = f.run(&["tag", &s.base_name, "bad name"]);
    assert_eq!(out.status.code(), Some(2));

    // Untagging one of two names deletes nothing.
    let out = f.ok(&["rmi", "mybase"]);
    assert!(
        out.contains("Untagged: docker.io/library/mybase:latest") && !out.contains("Deleted"),
        "{out}"
    );

    // The base's last name: refused, the child is built on it.
    let out = f.run(&["rmi", &s.base_name]);
    assert_eq!(out.status.code(), Some(1));
    let err = error_text(&out);
    assert!(err.contains(&s.child_name) && err.contains("--force"), "{err}");
    f.ok(&["inspect", &s.base_name]);

    // Remove the child first; its own layer goes, the shared one stays.
    let out = f.ok(&["rmi", &s.child_name]);
    assert!(out.contains(&format!("Deleted: {}", s.child.manifest_digest)), "{out}");
    assert!(!f.store.join("blobs/sha256").join(&s.child.layer_digests[1][7..]).exists());
    // The child's first layer is zstd, the base's gzip: different blobs; the base's stays.
    assert!(f.store.join("blobs/sha256").join(&s.base.layer_digests[0][7..]).exists());
    let out = f.ok(&["rmi", &s.base_name]);
    assert!(out.contains(&format!("Deleted: {}", s.base.manifest_digest)), "{out}");
    assert_eq!(f.ok(&["images", "-q"]), "");
    f.ok(&["cache", "verify"]);
}

/// `ferry tag` resolves its source and names it under the shared gc guard, so an `rmi` of
/// the source's last name (or a prune), which deletes under the exclusive gc lock, cannot
/// land in between and leave the new name pointing at removed blobs. Shown by holding the
/// exclusive lock as prune would: the tag waits for it, then names a complete image.
#[test]
fn tag_waits_for_a_running_prune_or_rmi() {
    let s = setup();
    let f = &s.ferry;
    let store = ferry::store::Store::open(&f.store).unwrap();
    let gc = store.lock("gc").unwrap();
    let mut tag = f
        .command()
        .args(["tag", &s.base_name, "waits:1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(tag.try_wait().unwrap().is_none(), "tag named the image while gc held the store");
    drop(gc);
    assert!(tag.wait().unwrap().success());
    let out = f.ok(&["inspect", "waits:1"]);
    assert!(out.contains(&s.base.manifest_digest), "{out}");
    f.ok(&["cache", "verify"]);
}

#[test]
fn rmi_force_removes_a_base() {
    let s = setup();
    s.ferry.ok(&["rmi", "--force", &s.base_name]);
    s.ferry.ok(&["inspect", &s.child_name]);
    s.ferry.ok(&["cache", "verify"]);
}

#[test]
fn prune_removes_dangling_content() {
    let s = setup();
    let f = &s.ferry;
    // Moving a tag leaves the old image dangling.
    f.ok(&["tag", &s.base_name, &s.child_name]);
    let out = f.ok(&["prune"]);
    assert!(out.contains(&format!("Deleted: {}", s.child.manifest_digest)), "{out}");
    assert!(out.contains("Total reclaimed space"));
    assert!(!f.store.join("blobs/sha256").join(&s.child.manifest_digest[7..]).exists());
    f.ok(&["inspect", &s.base_name]);
    f.ok(&["cache", "verify"]);

    // --all also removes images only a digest names.
    let digest_name =
        format!("{}@{}", s.base_name.rsplit_once(':').unwrap().0, s.base.manifest_digest);
    f.ok(&["pull", &digest_name]);
    f.ok(&["rmi", &s.base_name]);
    f.ok(&["rmi", &s.child_name]);
    let out = f.ok(&["prune"]);
    assert!(!out.contains("Untagged"), "{out}");
    f.ok(&["inspect", &digest_name]);
    let out = f.ok(&["prune", "--all"]);
    assert!(out.contains("Untagged"), "{out}");
    assert_eq!(std::fs::read_dir(f.store.join("blobs/sha256")).unwrap().count(), 0);
}

#[test]
fn save_load_round_trips_and_skopeo_reads_the_archives() {
    let s = setup();
    let work = tempfile::tempdir().unwrap();
    let docker_tar = work.path().join("images.tar");
    s.ferry.ok(&["save", "-o", docker_tar.to_str().unwrap(), &s.base_name, &s.child_name]);

    // The docker-archive layout docker load reads.
    let mut ar = tar::Archive::new(std::fs::File::open(&docker_tar).unwrap());
    let mut files = std::collections::HashMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().to_string();
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut b).unwrap();
        files.insert(p, b);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(manifest.as_array().unwrap().len(), 2);
    let app = manifest
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["RepoTags"][0] == s.child_name.as_str())
        .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&files[app["Config"].as_str().unwrap()]).unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = app["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    for (l, d) in layers.iter().zip(diff_ids) {
        // docker load reads plain or gzip layers; the zstd ones come uncompressed.
        let bytes = &files[l.as_str().unwrap()];
        let plain = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)
                .unwrap();
            out
        } else {
            bytes.clone()
        };
        assert_eq!(sha256(&plain), d.as_str().unwrap());
    }
    let repos: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
    let (repo, tag) = s.child_name.rsplit_once(':').unwrap();
    assert!(repos[repo][tag].is_string(), "{repos}");

    // skopeo, an independent reader, accepts it.
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("docker-archive:{}:{}", docker_tar.display(), s.child_name))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 2);

    // Round trip keeps the manifest digests.
    let other = Ferry::new();
    let out = other.ok(&["load", "-i", docker_tar.to_str().unwrap()]);
    assert!(out.contains(&format!("Loaded image: {}", s.child_name)), "{out}");
    for (name, img) in [(&s.base_name, &s.base), (&s.child_name, &s.child)] {
        let v: serde_json::Value = serde_json::from_str(&other.ok(&["inspect", name])).unwrap();
        assert_eq!(v[0]["Digest"], img.manifest_digest.as_str());
    }
    other.ok(&["cache", "verify"]);

    // OCI archive: skopeo reads it by name, load keeps digests.
    let oci_tar = work.path().join("images.oci.tar");
    s.ferry.ok(&["save", "--format", "oci", "-o", oci_tar.to_str().unwrap(), &s.child_name]);
    let out = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}:{}", oci_tar.display(), s.child_name))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", stderr(&out));
    assert_eq!(sha256(&out.stdout), s.child.manifest_digest);
    let third = Ferry::new();
    third.ok(&["load", "-i", oci_tar.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&third.ok(&["inspect", &s.child_name])).unwrap();
    assert_eq!(v[0]["Digest"], s.child.manifest_digest.as_str());
}

#[test]
fn load_reads_an_archive_skopeo_wrote() {
    let s = setup();
    let work = tempfile::tempdir().unwrap();
    let tar = work.path().join("from-skopeo.tar");
    let out = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q"])
        .arg(format!("oci:{}:{}", s.ferry.store.display(), s.base_name))
        .arg(format!("docker-archive:{}:acme/app:skopeo", tar.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo: {}", stderr(&out));
    let other = Ferry::new();
    let out = other.ok(&["load", "-i", tar.to_str().unwrap()]);
    assert!(out.contains("docker.io/acme/app:skopeo"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&other.ok(&["inspect", "acme/app:skopeo"])).unwrap();
    // Same image (config), whatever manifest skopeo chose to write.
    assert_eq!(v[0]["Id"], s.base.config_digest.as_str());
    other.ok(&["cache", "verify"]);
}

#[test]
fn load_rejects_garbage() {
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("junk.tar");
    std::fs::write(&f, b"this is not a tar archive at all").unwrap();
    let ferry = Ferry::new();
    let out = ferry.run(&["load", "-i", f.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(ferry.index()["manifests"].as_array().unwrap().is_empty());
}

#[test]
fn cache_verify_names_a_corrupt_blob() {
    let s = setup();
    let f = &s.ferry;
    let victim = f.store.join("blobs/sha256").join(&s.child.layer_digests[1][7..]);
    std::fs::remove_file(&victim).unwrap();
    std::fs::write(&victim, b"flipped bits").unwrap();
    let out = f.run(&["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(&format!("corrupt: {}", s.child.layer_digests[1])),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains(&format!("corrupt: {}", s.child.layer_digests[0])));
}

#[test]
fn the_store_is_shared_by_concurrent_processes() {
    let s = setup();
    // Several ferry processes tagging into one store at once: every tag lands.
    let children: Vec<_> = (0..6)
        .map(|i| {
            s.ferry
                .command()
                .args(["tag", &s.base_name, &format!("parallel/t:{i}")])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let out = s.ferry.ok(&["images", "--filter", "reference=parallel/t"]);
    assert_eq!(out.lines().count(), 7, "{out}");
}
