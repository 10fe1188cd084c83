//! Helpers of the promotion tests: a project that has only images.toml (no build contexts),
//! images published into a source environment with skopeo, signatures attached by hand
//! with plain registry calls, and reads of what the destination holds.
#![allow(dead_code)]

use std::path::Path;

use crate::common::*;
use ferry::digest::Digest;
use ferry::oci::media_type;
use ferry::reference::Repository;
use ferry::registry::{Registry, RegistryClient, RegistryConfig};

/// A project directory holding only images.toml: promotion must not need build contexts.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub ferry: Ferry,
}

impl Project {
    /// `images`: (key, version); `envs`: the `[environments.*]` tables as TOML.
    pub fn new(images: &[(&str, &str)], envs: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let mut toml = String::from("[project]\nname = \"acme\"\n\n");
        for (name, version) in images {
            toml.push_str(&format!(
                "[images.{name}]\ncontext = \"services/{name}\"\nversion = \"{version}\"\n\n"
            ));
        }
        toml.push_str(envs);
        std::fs::write(dir.path().join("images.toml"), toml).unwrap();
        Project { dir, ferry: Ferry::new() }
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.ferry.command().arg("-C").arg(self.dir.path()).args(args).output().unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A registry client with no credentials and no machine settings.
pub fn client() -> RegistryClient {
    let d = fixture::nowhere().join("docker");
    RegistryClient::new(RegistryConfig { docker_config_dir: Some(d), ..Default::default() })
}

pub fn repo(host: &str, path: &str) -> Repository {
    Repository { registry: host.to_string(), path: path.to_string() }
}

/// An image made of `layers` layers of `size` random bytes each (seeded), pushed with
/// skopeo to `host/dest`. Returns its manifest digest.
pub fn publish(
    reg: &TestRegistry,
    work: &Path,
    name: &str,
    seed: u64,
    layers: usize,
    size: usize,
    dest: &str,
) -> String {
    let layout = work.join(format!("layout-{name}-{seed}"));
    let entries: Vec<Vec<Entry>> = (0..layers)
        .map(|i| vec![file(&format!("{name}/{i}.bin"), &noise(size, seed * 100 + i as u64), 0o644)])
        .collect();
    let img = make_oci_image(&layout, "t", &entries, Comp::Gzip);
    reg.push(&layout, "t", dest);
    img.manifest_digest
}

/// An OCI image index over two single-platform images, put at `repo:tag` (and its children
/// by digest). Returns the index digest and the child digests.
pub fn publish_index(
    reg: &TestRegistry,
    work: &Path,
    path: &str,
    tag: &str,
    seed: u64,
) -> (String, Vec<String>) {
    let c = client();
    let r = repo(&reg.host, path);
    let mut children = Vec::new();
    let mut descs = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let d = publish(
            reg,
            work,
            &format!("idx{i}"),
            seed + i as u64,
            1,
            3_000,
            &format!("{path}:child-{arch}"),
        );
        let m = c.get_manifest(&r, &d).unwrap();
        descs.push(serde_json::json!({
            "mediaType": media_type::OCI_MANIFEST,
            "digest": d,
            "size": m.bytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        children.push(d);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": descs,
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let d = c.put_manifest(&r, tag, media_type::OCI_INDEX, &bytes).unwrap();
    (d.to_string(), children)
}

pub const EMPTY_CONFIG: &[u8] = b"{}";

/// Attach a signature to `subject` in `repo` the way a signer does on a registry without
/// the referrers API: an OCI artifact manifest whose `subject` is the image, listed in the
/// fallback index at tag `sha256-<hex>`; plus a cosign-style manifest at `sha256-<hex>.sig`.
/// Returns (artifact digest, .sig manifest digest).
pub fn attach_signature(host: &str, path: &str, subject: &str, work: &Path) -> (String, String) {
    let c = client();
    let r = repo(host, path);
    let subject_m = c.get_manifest(&r, subject).unwrap();
    let put_blob = |bytes: &[u8]| -> (Digest, u64) {
        let d = Digest::of(bytes);
        let p = work.join(format!("blob-{}", d.hex()));
        std::fs::write(&p, bytes).unwrap();
        c.put_blob(&r, &d, bytes.len() as u64, &p).unwrap();
        (d, bytes.len() as u64)
    };
    let (empty, empty_size) = put_blob(EMPTY_CONFIG);
    let payload = format!(r#"{{"critical":{{"image":{{"docker-manifest-digest":"{subject}"}}}}}}"#);
    let (sig, sig_size) = put_blob(payload.as_bytes());
    let artifact_type = "application/vnd.dev.cosign.artifact.sig.v1+json";
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": empty_size},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig, "size": sig_size,
                    "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ-test"}}],
        "subject": {"mediaType": subject_m.media_type, "digest": subject, "size": subject_m.bytes.len()},
    });
    let artifact_bytes = serde_json::to_vec(&artifact).unwrap();
    let artifact_digest = Digest::of(&artifact_bytes);
    c.put_manifest(&r, &artifact_digest.to_string(), media_type::OCI_MANIFEST, &artifact_bytes)
        .unwrap();
    let hex = &subject["sha256:".len()..];
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": [{"mediaType": media_type::OCI_MANIFEST, "digest": artifact_digest.to_string(),
                       "size": artifact_bytes.len(), "artifactType": artifact_type}],
    });
    c.put_manifest(
        &r,
        &format!("sha256-{hex}"),
        media_type::OCI_INDEX,
        &serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    // The cosign tag scheme: a plain manifest (no subject) named after the image digest.
    let cosign = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": empty_size},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": sig, "size": sig_size}],
    });
    let cosign_bytes = serde_json::to_vec(&cosign).unwrap();
    let cosign_digest = c
        .put_manifest(&r, &format!("sha256-{hex}.sig"), media_type::OCI_MANIFEST, &cosign_bytes)
        .unwrap();
    (artifact_digest.to_string(), cosign_digest.to_string())
}

/// The digest `repo:reference` names, if any.
pub fn digest_of(host: &str, path: &str, reference: &str) -> Option<String> {
    client().head_manifest(&repo(host, path), reference).unwrap().map(|d| d.digest.to_string())
}

pub fn tags_of(host: &str, path: &str) -> Vec<String> {
    let mut t = client().list_tags(&repo(host, path)).unwrap();
    t.sort();
    t
}

pub fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(out), stderr(out)))
}
