//! `ferry pull` against a real registry: by tag and digest, with Basic auth, over TLS with a
//! test CA; the result read by skopeo and unpacked by umoci.

mod common;

use std::process::Command;

use common::*;

fn sample_layers() -> Vec<Vec<Entry>> {
    vec![
        vec![
            dir("etc"),
            file("etc/os-release", b"NAME=test\n", 0o644),
            dir("bin"),
            file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
            file("etc/old.conf", b"old", 0o600),
            dir("usr"),
            dir("usr/lib"),
            file("usr/lib/big.bin", &noise(300_000, 7), 0o644),
        ],
        vec![
            dir("etc"),
            file("etc/new.conf", b"new", 0o640),
            whiteout("etc/old.conf"),
            symlink("bin/alias", "tool"),
        ],
    ]
}

fn source_image(dir: &std::path::Path, comp: Comp) -> TestImage {
    make_oci_image(&dir.join("src"), "v1", &sample_layers(), comp)
}

/// The store is an OCI layout skopeo reads and umoci unpacks to the source tree.
fn check_with_skopeo_and_umoci(ferry: &Ferry, name: &str, img: &TestImage) {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:{name}", ferry.store.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect: {}", stderr(&out));
    assert_eq!(sha256(&out.stdout), img.manifest_digest, "skopeo sees the exact manifest");
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:{name}", ferry.store.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), img.layer_digests.len());

    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:{name}", ferry.store.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(out.status.success(), "umoci unpack: {}", stderr(&out));
    assert_eq!(tree(&bundle.join("rootfs")), expected_tree(&sample_layers()));
}

#[test]
fn pull_by_tag_and_by_digest_from_a_plain_registry() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = source_image(work.path(), Comp::Gzip);
    reg.push(&img.layout, "v1", "test/app:v1");
    let ferry = Ferry::new();

    let by_tag = format!("{}/test/app:v1", reg.host);
    let out = ferry.ok(&["pull", &by_tag]);
    assert_eq!(out.trim(), by_tag);
    check_with_skopeo_and_umoci(&ferry, &by_tag, &img);

    let by_digest = format!("{}/test/app@{}", reg.host, img.manifest_digest);
    let other = Ferry::new();
    other.ok(&["pull", &by_digest]);
    check_with_skopeo_and_umoci(&other, &by_digest, &img);

    // A second pull into the same store fetches nothing new.
    let out = ferry.run(&["--json", "pull", &by_digest]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["blobs_fetched"], 0);
    assert_eq!(report["descriptor"]["digest"], img.manifest_digest.as_str());
    ferry.ok(&["cache", "verify"]);
}

#[test]
fn pull_zstd_and_uncompressed_layers() {
    let reg = TestRegistry::start(RegistryOptions::default());
    for (comp, tag) in [(Comp::Zstd, "zstd"), (Comp::None, "plain")] {
        let work = tempfile::tempdir().unwrap();
        let img = source_image(work.path(), comp);
        reg.push(&img.layout, "v1", &format!("test/app:{tag}"));
        let ferry = Ferry::new();
        let name = format!("{}/test/app:{tag}", reg.host);
        ferry.ok(&["pull", &name]);
        let out = ferry.ok(&["inspect", &name]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["Digest"], img.manifest_digest.as_str(), "{comp:?}");
        let layers: Vec<&str> = v[0]["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["Digest"].as_str().unwrap())
            .collect();
        assert_eq!(layers, img.layer_digests.iter().map(String::as_str).collect::<Vec<_>>());
        if comp == Comp::None {
            // umoci reads uncompressed layers too.
            check_with_skopeo_and_umoci(&ferry, &name, &img);
        }
    }
}

#[test]
fn pull_an_index_picks_the_host_platform() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = source_image(work.path(), Comp::Gzip);
    // Wrap the image in an index next to a manifest for another platform.
    let layout = &img.layout;
    let manifest_size =
        std::fs::metadata(layout.join("blobs/sha256").join(&img.manifest_digest[7..]))
            .unwrap()
            .len();
    let host_arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let other_arch = if host_arch == "s390x" { "amd64" } else { "s390x" };
    let other = make_oci_image(
        &work.path().join("other"),
        "x",
        &[vec![file("other", b"x", 0o644)]],
        Comp::Gzip,
    );
    for entry in std::fs::read_dir(other.layout.join("blobs/sha256")).unwrap() {
        let e = entry.unwrap();
        std::fs::copy(e.path(), layout.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    let other_size =
        std::fs::metadata(layout.join("blobs/sha256").join(&other.manifest_digest[7..]))
            .unwrap()
            .len();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other.manifest_digest,
             "size": other_size, "platform": {"os": "linux", "architecture": other_arch}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": img.manifest_digest,
             "size": manifest_size, "platform": {"os": "linux", "architecture": host_arch}},
        ]
    });
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = sha256(&index_bytes);
    std::fs::write(layout.join("blobs/sha256").join(&index_digest[7..]), &index_bytes).unwrap();
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index_bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"}}]});
    std::fs::write(layout.join("index.json"), top.to_string()).unwrap();
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--all",
            "--preserve-digests",
            "-q",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:multi", layout.display()))
        .arg(format!("docker://{}/test/multi:1", reg.host))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let ferry = Ferry::new();
    let name = format!("{}/test/multi:1", reg.host);
    let out = ferry.run(&["--json", "pull", &name]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["index_digest"], index_digest.as_str());
    assert_eq!(report["descriptor"]["digest"], img.manifest_digest.as_str());
    check_with_skopeo_and_umoci(&ferry, &name, &img);
    // The other platform's layers were not downloaded.
    assert!(!ferry.store.join("blobs/sha256").join(&other.layer_digests[0][7..]).exists());

    let out = ferry.run(&["pull", "--platform", "windows/amd64", &name]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("windows/amd64"), "{}", stderr(&out));
}

#[test]
fn pull_through_basic_auth() {
    let reg = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("alice".into(), "correct horse".into())),
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    let img = source_image(work.path(), Comp::Gzip);
    reg.push(&img.layout, "v1", "private/app:v1");
    let name = format!("{}/private/app:v1", reg.host);

    // Anonymous: refused, with a hint.
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &name]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(error_text(&out).contains(&format!("ferry login {}", reg.host)), "{}", stderr(&out));

    // config.json credentials, as docker writes them.
    ferry.docker_login_file(&reg.host, "alice", "correct horse");
    ferry.ok(&["pull", &name]);
    check_with_skopeo_and_umoci(&ferry, &name, &img);
}

#[test]
fn login_writes_config_json_and_pull_uses_it() {
    let reg = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("bob".into(), "s3cret-pw".into())),
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    let img = source_image(work.path(), Comp::Gzip);
    reg.push(&img.layout, "v1", "private/app:v1");
    let ferry = Ferry::new();

    let mut child = ferry
        .command()
        .args(["login", &reg.host, "-u", "bob", "--password-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"s3cret-pw\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Login Succeeded"));
    assert!(!stdout(&out).contains("s3cret-pw") && !stderr(&out).contains("s3cret-pw"));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ferry.docker_config.join("config.json")).unwrap())
            .unwrap();
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret-pw");
    assert_eq!(cfg["auths"][reg.host.as_str()]["auth"], auth.as_str());

    ferry.ok(&["pull", &format!("{}/private/app:v1", reg.host)]);
}

#[test]
fn pull_over_tls_with_a_test_ca() {
    let reg = TestRegistry::start(RegistryOptions { tls: true, ..Default::default() });
    let work = tempfile::tempdir().unwrap();
    let img = source_image(work.path(), Comp::Gzip);
    reg.push(&img.layout, "v1", "secure/app:v1");
    let name = format!("{}/secure/app:v1", reg.host);

    let mut ferry = Ferry::new();
    ferry.certs_dir = Some(reg.certs_dir());
    ferry.ok(&["pull", &name]);
    check_with_skopeo_and_umoci(&ferry, &name, &img);

    // With a CA configured the certificate is verified: another CA is refused.
    let other = tempfile::tempdir().unwrap();
    let wrong = make_certs(other.path());
    let wrong_dir = other.path().join("certs.d").join(&reg.host);
    std::fs::create_dir_all(&wrong_dir).unwrap();
    std::fs::copy(&wrong.ca_cert, wrong_dir.join("ca.crt")).unwrap();
    let mut refused = Ferry::new();
    refused.certs_dir = Some(other.path().join("certs.d"));
    let out = refused.run(&["pull", &name]);
    assert_eq!(out.status.code(), Some(2));
    let err = error_text(&out);
    assert!(err.contains(&reg.host) && err.to_lowercase().contains("certificate"), "{err}");
    assert!(refused.index()["manifests"].as_array().unwrap().is_empty());
}

#[test]
fn invalid_references_say_which_part_is_wrong() {
    let ferry = Ferry::new();
    for (input, part) in [
        ("upper/Case", "repository"),
        ("app:bad!tag", "tag"),
        ("app@sha256:123", "digest"),
        ("host:port/app", "registry"),
    ] {
        let out = ferry.run(&["pull", input]);
        assert_eq!(out.status.code(), Some(2), "{input}");
        assert!(error_text(&out).contains(part), "{input}: {}", stderr(&out));
    }
}

#[test]
fn missing_image_is_a_clear_error() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &format!("{}/nothing/here:v1", reg.host)]);
    assert_eq!(out.status.code(), Some(2));
    let err = error_text(&out);
    assert!(err.contains("not found") && err.contains("nothing/here"), "{err}");
}
