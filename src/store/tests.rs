use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::oci::{media_type, Compression, ImageConfig, ImageManifest, RootFs};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, name, *content).unwrap();
    }
    b.into_inner().unwrap()
}

/// Store an image whose layers are the given tars (compressed as asked); its descriptor.
fn put_image(store: &Store, layers: &[Vec<u8>], compression: Compression) -> Descriptor {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(Digest::of(tar));
        let blob = match compression {
            Compression::None => tar.clone(),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(&tar[..], 3).unwrap(),
        };
        let d = store.put_blob_bytes(&blob, None).unwrap();
        descs.push(Descriptor::new(compression.oci_layer_media_type(), d, blob.len() as u64));
    }
    let config = ImageConfig {
        created: Some("2024-01-01T00:00:00Z".into()),
        architecture: Platform::host().architecture,
        os: "linux".into(),
        rootfs: RootFs { kind: "layers".into(), diff_ids },
        ..Default::default()
    };
    let config = store.put_json(media_type::OCI_CONFIG, &config).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.into()),
        artifact_type: None,
        config,
        layers: descs,
        subject: None,
        annotations: BTreeMap::new(),
    };
    store.put_json(media_type::OCI_MANIFEST, &manifest).unwrap()
}

use crate::oci::Platform;

#[test]
fn open_creates_an_oci_layout_and_reopens() {
    let (_d, s) = store();
    let layout: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.root().join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index = s.read_index().unwrap();
    assert_eq!(index.schema_version, 2);
    assert!(index.manifests.is_empty());
    Store::open(s.root()).unwrap();
}

#[test]
fn open_refuses_a_foreign_layout_version() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("oci-layout"), r#"{"imageLayoutVersion":"9"}"#).unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    assert!(matches!(e, StoreError::NotALayout { .. }), "{e}");
}

#[test]
fn blob_writer_commits_verified_content_only() {
    let (_d, s) = store();
    let mut w = s.blob_writer().unwrap();
    w.write_all(b"hello").unwrap();
    let (d, n) = w.commit(Some(&Digest::of(b"hello"))).unwrap();
    assert_eq!((d.clone(), n), (Digest::of(b"hello"), 5));
    assert_eq!(s.read_blob(&d).unwrap(), b"hello");

    let mut w = s.blob_writer().unwrap();
    w.write_all(b"evil").unwrap();
    let e = w.commit(Some(&Digest::of(b"good"))).unwrap_err();
    assert!(matches!(e, StoreError::DigestMismatch { .. }));
    assert!(!s.has_blob(&Digest::of(b"evil")));
    assert!(!s.has_blob(&Digest::of(b"good")));
    assert_eq!(std::fs::read_dir(s.tmp_dir()).unwrap().count(), 0, "temp file left behind");

    let mut w = s.blob_writer().unwrap();
    w.write_all(b"dropped").unwrap();
    drop(w);
    assert!(!s.has_blob(&Digest::of(b"dropped")));
    assert_eq!(std::fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn stale_temp_files_are_removed_on_open_but_live_ones_are_kept() {
    let (_d, s) = store();
    let tmp_root = s.root().join("tmp");
    // A dead process's session (nobody holds its lock), with a mode-000 directory inside as
    // an overlay work dir leaves it; and a temp blob of an earlier version, unlocked.
    let dead = tmp_root.join(format!("{}dead", tmp::SESSION_PREFIX));
    std::fs::create_dir_all(dead.join("run-1/work/work")).unwrap();
    std::fs::write(dead.join("blob-partial"), b"partial").unwrap();
    std::fs::set_permissions(dead.join("run-1/work/work"), std::fs::Permissions::from_mode(0o000))
        .unwrap();
    let legacy = tmp_root.join(format!("{}dead", blob::TMP_PREFIX));
    std::fs::write(&legacy, b"partial").unwrap();
    // Something this store's own process did not create: left alone.
    let foreign = tmp_root.join("not-ours");
    std::fs::write(&foreign, b"x").unwrap();

    let mut live = s.blob_writer().unwrap();
    live.write_all(b"in progress").unwrap();
    live.flush().unwrap();
    let other = Store::open(s.root()).unwrap();
    assert!(!dead.exists(), "a dead session is removed");
    assert!(!legacy.exists());
    assert!(foreign.exists());
    assert!(s.tmp_dir().is_dir(), "a live session is kept");
    assert_ne!(s.tmp_dir(), other.tmp_dir(), "each open has its own session");
    // The live writer's file survives the cleaning and still commits.
    let (d, _) = live.commit(None).unwrap();
    assert_eq!(s.read_blob(&d).unwrap(), b"in progress");

    // The last handle of a session removes it.
    let session = other.tmp_dir();
    let clone = other.clone();
    drop(other);
    assert!(session.is_dir());
    drop(clone);
    assert!(!session.exists());
}

#[test]
fn atomic_write_leaves_nothing_but_the_file() {
    let (_d, s) = store();
    let target = s.state_dir("cache").unwrap().join("entry.json");
    s.atomic_write(&target, b"one").unwrap();
    s.atomic_write(&target, b"two").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"two");
    let beside: Vec<_> = std::fs::read_dir(target.parent().unwrap()).unwrap().flatten().collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    assert_eq!(std::fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn refs_live_in_index_json_with_the_ref_name_annotation() {
    let (_d, s) = store();
    let desc = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    s.set_ref("docker.io/library/app:1", &desc).unwrap();
    s.set_ref("app", &desc).unwrap();
    s.set_ref("app", &desc).unwrap();
    assert_eq!(s.get_ref("app").unwrap(), Some(desc.clone()));
    let names: Vec<String> = s.list_refs().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["app", "docker.io/library/app:1"]);
    let raw = std::fs::read_to_string(s.root().join("index.json")).unwrap();
    assert!(
        raw.contains(r#""org.opencontainers.image.ref.name": "docker.io/library/app:1""#),
        "{raw}"
    );
    assert_eq!(s.remove_ref("app").unwrap(), Some(desc));
    assert_eq!(s.get_ref("app").unwrap(), None);
    assert!(s.set_ref("bad name", &put_image(&s, &[], Compression::Gzip)).is_err());
    let missing = Descriptor::new(media_type::OCI_MANIFEST, Digest::of(b"nope"), 4);
    assert!(matches!(s.set_ref("x", &missing), Err(StoreError::BlobNotFound { .. })));
}

#[test]
fn concurrent_ref_updates_are_not_lost() {
    let (_d, s) = store();
    let desc = put_image(&s, &[], Compression::Gzip);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = s.clone();
            let desc = desc.clone();
            scope.spawn(move || {
                for i in 0..10 {
                    s.set_ref(&format!("img{t}-{i}"), &desc).unwrap();
                }
            });
        }
    });
    assert_eq!(s.list_refs().unwrap().len(), 40);
}

#[test]
fn resolve_by_name_reference_and_digest_prefix() {
    let (_d, s) = store();
    let a = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    s.set_ref("docker.io/library/alpine:3", &a).unwrap();
    s.set_ref("acme/api:latest", &a).unwrap();
    assert_eq!(s.resolve("alpine:3").unwrap().name.as_deref(), Some("docker.io/library/alpine:3"));
    assert_eq!(s.resolve("acme/api").unwrap().name.as_deref(), Some("acme/api:latest"));
    let r = s.resolve(&a.digest.hex()[..10]).unwrap();
    assert_eq!((r.name, r.descriptor.digest), (None, a.digest.clone()));
    let id = s.image(&a).unwrap().id().clone();
    assert_eq!(s.resolve(&id.to_string()).unwrap().descriptor.digest, a.digest);
    assert!(matches!(s.resolve("nothere"), Err(StoreError::ImageNotFound { .. })));
}

#[test]
fn images_lists_names_as_docker_shows_them() {
    let (_d, s) = store();
    let a = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    s.set_ref("docker.io/library/alpine:3", &a).unwrap();
    s.set_ref("127.0.0.1:5000/x/y:v1", &a).unwrap();
    s.set_ref("api", &a).unwrap();
    let rows: Vec<(String, Option<String>)> =
        s.images().unwrap().into_iter().map(|i| (i.repository, i.tag)).collect();
    assert_eq!(
        rows,
        [
            ("127.0.0.1:5000/x/y".to_string(), Some("v1".to_string())),
            ("api".to_string(), None),
            ("alpine".to_string(), Some("3".to_string())),
        ]
    );
}

#[test]
fn prune_removes_only_unreachable_blobs() {
    let (_d, s) = store();
    let kept = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    let gone = put_image(&s, &[layer_tar(&[("b", b"2")])], Compression::Zstd);
    let root = s.put_blob_bytes(b"cache layer", None).unwrap();
    s.set_ref("kept", &kept).unwrap();
    let kept_blobs = s.image(&kept).unwrap().blobs();
    let gone_blobs = s.image(&gone).unwrap().blobs();
    let report = s.prune(PruneMode::Dangling, || vec![root.clone()]).unwrap();
    for b in &kept_blobs {
        assert!(s.has_blob(b));
    }
    for b in &gone_blobs {
        assert!(!s.has_blob(b), "{b} should be pruned");
    }
    assert!(s.has_blob(&root));
    assert_eq!(report.removed_blobs.len(), gone_blobs.len());
    assert!(s.verify().unwrap().is_ok());
}

#[test]
fn prune_all_removes_untagged_names() {
    let (_d, s) = store();
    let a = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    let name = format!("127.0.0.1:5000/x@{}", a.digest);
    s.set_ref(&name, &a).unwrap();
    s.prune(PruneMode::Dangling, Vec::new).unwrap();
    assert!(s.has_blob(&a.digest));
    let r = s.prune(PruneMode::All, Vec::new).unwrap();
    assert_eq!(r.removed_names, [name]);
    assert!(!s.has_blob(&a.digest));
}

#[test]
fn prune_all_keeps_every_name_of_a_tagged_image() {
    let (_d, s) = store();
    let a = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    // As a build records an image: its images.toml key (no tag) and tagged names.
    s.set_ref("api", &a).unwrap();
    s.set_ref("acme/api:2.0.0", &a).unwrap();
    let b = put_image(&s, &[layer_tar(&[("b", b"2")])], Compression::Gzip);
    s.set_ref("untagged-only", &b).unwrap();
    let r = s.prune(PruneMode::All, Vec::new).unwrap();
    assert_eq!(r.removed_names, ["untagged-only"]);
    assert_eq!(s.get_ref("api").unwrap().map(|d| d.digest), Some(a.digest.clone()));
    assert!(s.has_blob(&a.digest));
    assert!(!s.has_blob(&b.digest));
}

#[test]
fn rmi_untags_then_deletes_and_refuses_to_delete_a_base() {
    let (_d, s) = store();
    let base_layer = layer_tar(&[("base", b"b")]);
    let base = put_image(&s, std::slice::from_ref(&base_layer), Compression::Gzip);
    let child = put_image(&s, &[base_layer, layer_tar(&[("child", b"c")])], Compression::Gzip);
    s.set_ref("base:1", &base).unwrap();
    s.set_ref("base:latest", &base).unwrap();
    s.set_ref("child:1", &child).unwrap();

    let r = s.remove_image("base:latest", false, Vec::new).unwrap();
    assert_eq!(r.untagged, ["base:latest"]);
    assert!(r.deleted.is_empty());

    let e = s.remove_image("base:1", false, Vec::new).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::HasDependents { .. }), "{msg}");
    assert!(msg.contains("child:1") && msg.contains("--force"), "{msg}");
    assert!(s.get_ref("base:1").unwrap().is_some(), "refused rmi must not untag");

    let r = s.remove_image("child:1", false, Vec::new).unwrap();
    assert!(r.deleted.contains(&child.digest));
    // The shared base layer is still reached by base:1.
    let base_img = s.image(&base).unwrap();
    assert!(s.has_blob(&base_img.manifest.layers[0].digest));

    let r = s.remove_image("base:1", false, Vec::new).unwrap();
    assert!(r.deleted.contains(&base.digest));
    assert!(!s.has_blob(&base_img.manifest.layers[0].digest));
}

#[test]
fn rmi_force_deletes_a_base() {
    let (_d, s) = store();
    let l = layer_tar(&[("base", b"b")]);
    let base = put_image(&s, std::slice::from_ref(&l), Compression::Gzip);
    let child = put_image(&s, &[l, layer_tar(&[("c", b"c")])], Compression::Gzip);
    s.set_ref("base", &base).unwrap();
    s.set_ref("child", &child).unwrap();
    let r = s.remove_image("base", true, Vec::new).unwrap();
    assert!(r.deleted.contains(&base.digest));
    assert!(s.image(&child).is_ok(), "child keeps its layers");
    assert!(s.verify().unwrap().is_ok());
}

#[test]
fn verify_names_corrupt_and_missing_blobs() {
    let (_d, s) = store();
    let a = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    s.set_ref("a", &a).unwrap();
    let report = s.verify().unwrap();
    assert!(report.is_ok());
    assert_eq!(report.blobs_checked, 3);
    let img = s.image(&a).unwrap();
    let layer = &img.manifest.layers[0].digest;
    let path = s.blob_path(layer);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"bit rot").unwrap();
    std::fs::remove_file(s.blob_path(img.id())).unwrap();
    let report = s.verify().unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(&report.corrupt[0].digest, layer);
    assert_eq!(report.missing.len(), 1);
    assert_eq!(&report.missing[0].digest, img.id());
    assert_eq!(report.missing[0].image, "a");
}

#[test]
fn archives_round_trip_and_keep_the_manifest_digest() {
    for format in [ArchiveFormat::Docker, ArchiveFormat::Oci] {
        for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let (d, s) = store();
            let a =
                put_image(&s, &[layer_tar(&[("a", b"1")]), layer_tar(&[("b", b"2")])], compression);
            s.set_ref("docker.io/library/app:1", &a).unwrap();
            s.set_ref("plain", &a).unwrap();
            let out = d.path().join("x.tar");
            let images = [
                ArchiveImage {
                    name: Some("docker.io/library/app:1".into()),
                    descriptor: a.clone(),
                },
                ArchiveImage { name: Some("plain".into()), descriptor: a.clone() },
            ];
            s.save_archive(&images, format, &out).unwrap();
            let s2 = Store::open(d.path().join("other")).unwrap();
            let loaded = s2.load_archive(std::fs::File::open(&out).unwrap(), &out).unwrap();
            assert!(loaded.iter().all(|l| l.digest == a.digest), "{format:?} {compression:?}");
            assert_eq!(s2.resolve("app:1").unwrap().descriptor.digest, a.digest);
            let want_plain = if format == ArchiveFormat::Oci { "plain" } else { "plain:latest" };
            assert_eq!(s2.resolve(want_plain).unwrap().descriptor.digest, a.digest);
            assert!(s2.verify().unwrap().is_ok());
        }
    }
}

#[test]
fn docker_archive_layout_is_what_docker_load_reads() {
    let (d, s) = store();
    let tars = [layer_tar(&[("a", b"1")]), layer_tar(&[("b", b"2")])];
    let a = put_image(&s, &tars, Compression::Zstd);
    s.set_ref("docker.io/library/app:1", &a).unwrap();
    let out = d.path().join("x.tar");
    s.save_archive(
        &[ArchiveImage { name: Some("docker.io/library/app:1".into()), descriptor: a.clone() }],
        ArchiveFormat::Docker,
        &out,
    )
    .unwrap();
    let mut files = std::collections::HashMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(&out).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().to_string();
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut b).unwrap();
        files.insert(p, b);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(manifest[0]["RepoTags"], serde_json::json!(["app:1"]));
    let config_path = manifest[0]["Config"].as_str().unwrap();
    let config: ImageConfig = serde_json::from_slice(&files[config_path]).unwrap();
    let layers = manifest[0]["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (l, diff_id) in layers.iter().zip(&config.rootfs.diff_ids) {
        // zstd layers are given to docker uncompressed.
        assert_eq!(&Digest::of(&files[l.as_str().unwrap()]), diff_id);
    }
    let repos: serde_json::Value = serde_json::from_slice(&files["repositories"]).unwrap();
    assert!(repos["app"]["1"].is_string());
}

#[test]
fn load_rejects_a_tampered_blob_and_names_nothing() {
    let (d, s) = store();
    let a = put_image(&s, &[layer_tar(&[("a", b"1")])], Compression::Gzip);
    let out = d.path().join("x.tar");
    s.save_archive(
        &[ArchiveImage { name: Some("app".into()), descriptor: a.clone() }],
        ArchiveFormat::Oci,
        &out,
    )
    .unwrap();
    // Rewrite the archive with one blob's content changed.
    let mut ar = tar::Archive::new(std::fs::File::open(&out).unwrap());
    let mut b = tar::Builder::new(Vec::new());
    let layer_hex = s.image(&a).unwrap().manifest.layers[0].digest.hex().to_string();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if p.ends_with(&layer_hex) {
            data = b"tampered".to_vec();
        }
        let mut h = e.header().clone();
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &p, &data[..]).unwrap();
    }
    let tampered = d.path().join("t.tar");
    std::fs::write(&tampered, b.into_inner().unwrap()).unwrap();
    let s2 = Store::open(d.path().join("other")).unwrap();
    let e = s2.load_archive(std::fs::File::open(&tampered).unwrap(), &tampered).unwrap_err();
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    assert!(s2.list_refs().unwrap().is_empty());
}

#[test]
fn atomic_write_replaces_content() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sub/state.json");
    atomic_write(&p, b"one").unwrap();
    atomic_write(&p, b"two").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"two");
    assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn exclusive_lock_excludes() {
    let (_d, s) = store();
    let g = s.lock("cache").unwrap();
    assert!(LockGuard::try_acquire(&s.lock_path("cache"), true).is_err());
    assert!(LockGuard::try_acquire(&s.lock_path("cache"), false).is_err());
    drop(g);
    let _a = s.lock_shared("cache").unwrap();
    assert!(LockGuard::try_acquire(&s.lock_path("cache"), false).is_ok());
}

#[test]
fn default_root_follows_the_environment_order() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| std::ffi::OsString::from(v))
    };
    const ALL: &[(&str, &str)] = &[("FERRY_STORE", "/s"), ("XDG_DATA_HOME", "/x"), ("HOME", "/h")];
    assert_eq!(root_from_env(env(ALL)).unwrap(), std::path::Path::new("/s"));
    const NO_STORE: &[(&str, &str)] =
        &[("FERRY_STORE", ""), ("XDG_DATA_HOME", "/x"), ("HOME", "/h")];
    assert_eq!(root_from_env(env(NO_STORE)).unwrap(), std::path::Path::new("/x/ferry"));
    assert_eq!(
        root_from_env(env(&[("HOME", "/h")])).unwrap(),
        std::path::Path::new("/h/.local/share/ferry")
    );
    assert!(root_from_env(env(&[])).is_err());
}
