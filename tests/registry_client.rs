//! The registry client as push/promote will use it (blob HEAD/PUT/PATCH, mount, manifest
//! PUT, tags, referrers), mirrors, and the bearer-token flow, against a real registry.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use ferry::digest::Digest;
use ferry::oci::media_type;
use ferry::reference::{Reference, Repository};
use ferry::registry::{
    pull, MountOutcome, PullOptions, Registry, RegistryClient, RegistryConfig, RegistryError,
    UploadPolicy,
};
use ferry::store::Store;

fn client(docker_config: &std::path::Path) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        docker_config_dir: Some(docker_config.to_path_buf()),
        ..Default::default()
    })
}

fn blob(layout: &std::path::Path, digest: &str) -> std::path::PathBuf {
    layout.join("blobs/sha256").join(&digest[7..])
}

#[test]
fn push_apis_round_trip() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let layers = vec![vec![dir("data"), file("data/x.bin", &noise(5_000, 3), 0o644)]];
    let img = make_oci_image(&work.path().join("src"), "v1", &layers, Comp::None);
    let c = client(work.path())
        .with_upload_policy(UploadPolicy { monolithic_max: 2_000, chunk_size: 1_500 });
    let repo = Repository { registry: reg.host.clone(), path: "push/app".into() };
    let config = img.config_digest.parse::<Digest>().unwrap();
    let layer = img.layer_digests[0].parse::<Digest>().unwrap();
    let layer_path = blob(&img.layout, &img.layer_digests[0]);
    let layer_size = std::fs::metadata(&layer_path).unwrap().len();
    assert!(layer_size > 2_000, "the layer must take the chunked path");

    assert_eq!(c.blob_exists(&repo, &layer).unwrap(), None);
    let config_path = blob(&img.layout, &img.config_digest);
    let config_size = std::fs::metadata(&config_path).unwrap().len();
    c.put_blob(&repo, &config, config_size, &config_path).unwrap();
    c.put_blob(&repo, &layer, layer_size, &layer_path).unwrap();
    assert_eq!(c.blob_exists(&repo, &layer).unwrap(), Some(layer_size));
    assert_eq!(c.blob_exists(&repo, &config).unwrap(), Some(config_size));

    let manifest_bytes = std::fs::read(blob(&img.layout, &img.manifest_digest)).unwrap();
    let d = c.put_manifest(&repo, "v1", media_type::OCI_MANIFEST, &manifest_bytes).unwrap();
    assert_eq!(d.to_string(), img.manifest_digest);
    c.put_manifest(&repo, "v2", media_type::OCI_MANIFEST, &manifest_bytes).unwrap();
    let head = c.head_manifest(&repo, "v1").unwrap().unwrap();
    assert_eq!(head.digest.to_string(), img.manifest_digest);
    assert_eq!(c.head_manifest(&repo, "nope").unwrap(), None);
    let got = c.get_manifest(&repo, &img.manifest_digest).unwrap();
    assert_eq!(got.bytes, manifest_bytes);
    let mut tags = c.list_tags(&repo).unwrap();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);
    // No referrers API in this registry, no tag-schema index: none.
    assert!(c.referrers(&repo, &d, None).unwrap().manifests.is_empty());

    // Cross-repository mount inside the registry.
    let other = Repository { registry: reg.host.clone(), path: "push/other".into() };
    let outcome = c.mount_blob(&other, &repo, &layer, layer_size, &layer_path).unwrap();
    assert_eq!(outcome, MountOutcome::Mounted);
    assert_eq!(c.blob_exists(&other, &layer).unwrap(), Some(layer_size));

    // skopeo reads what was pushed, digest for digest.
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/push/app:v1", reg.host))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sha256(&out.stdout), img.manifest_digest);

    // And it pulls back.
    let store = Store::open(work.path().join("store")).unwrap();
    let r = Reference::parse(&format!("{}/push/app:v2", reg.host)).unwrap();
    let report = pull(&store, &c, &r, &PullOptions::default()).unwrap();
    assert_eq!(report.descriptor.digest.to_string(), img.manifest_digest);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn upload_refuses_a_file_of_the_wrong_size() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("b");
    std::fs::write(&f, b"12345").unwrap();
    let c = client(work.path());
    let repo = Repository { registry: reg.host.clone(), path: "x/y".into() };
    let e = c.put_blob(&repo, &Digest::of(b"12345"), 9, &f).unwrap_err();
    assert!(matches!(e, RegistryError::Io { .. }), "{e}");
    // A wrong digest is refused by the registry, not stored.
    let e = c.put_blob(&repo, &Digest::of(b"other"), 5, &f).unwrap_err();
    assert!(e.to_string().contains("400") || e.to_string().contains("DIGEST_INVALID"), "{e}");
    assert_eq!(c.blob_exists(&repo, &Digest::of(b"12345")).unwrap(), None);
}

#[test]
fn mirrors_are_tried_first_and_fall_back() {
    let mirror = TestRegistry::start(RegistryOptions::default());
    let upstream = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = make_oci_image(
        &work.path().join("src"),
        "v1",
        &[vec![file("f", b"mirror", 0o644)]],
        Comp::Gzip,
    );
    mirror.push(&img.layout, "v1", "test/app:v1");
    let dead = format!("127.0.0.1:{}", free_port());

    // The registry itself is down; its mirror serves the image.
    let mut cfg =
        RegistryConfig { docker_config_dir: Some(work.path().to_path_buf()), ..Default::default() };
    cfg.host_mut(&dead).mirrors = vec![format!("http://{}", mirror.host)];
    let c = RegistryClient::new(cfg);
    let store = Store::open(work.path().join("s1")).unwrap();
    let r = Reference::parse(&format!("{dead}/test/app:v1")).unwrap();
    let report = pull(&store, &c, &r, &PullOptions::default()).unwrap();
    assert_eq!(report.descriptor.digest.to_string(), img.manifest_digest);
    assert_eq!(report.name.as_deref(), Some(format!("{dead}/test/app:v1").as_str()));

    // The mirror is down; the registry serves it.
    upstream.push(&img.layout, "v1", "test/app:v1");
    let mut cfg =
        RegistryConfig { docker_config_dir: Some(work.path().to_path_buf()), ..Default::default() };
    cfg.host_mut(&upstream.host).mirrors = vec![dead.clone()];
    let c = RegistryClient::new(cfg);
    let store = Store::open(work.path().join("s2")).unwrap();
    let r = Reference::parse(&format!("{}/test/app:v1", upstream.host)).unwrap();
    pull(&store, &c, &r, &PullOptions::default()).unwrap();
}

/// A proxy that demands bearer tokens, with its own token endpoint checking Basic
/// credentials: the challenge flow of Docker Hub, GHCR and friends.
struct BearerGate {
    proxy: FaultProxy,
    token_requests: Arc<Mutex<Vec<String>>>,
}

fn bearer_gate(upstream: &str, user: &str, pass: &str) -> BearerGate {
    use base64::Engine;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = listener.local_addr().unwrap().to_string();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    let token_requests = Arc::new(Mutex::new(Vec::new()));
    let log = token_requests.clone();
    let proxy = FaultProxy::start_with(listener, upstream, move |r: &RequestInfo| {
        if r.path.starts_with("/token") {
            log.lock().unwrap().push(r.path.clone());
            if r.header("authorization") != Some(basic.as_str()) {
                return Action::Respond(401, vec![]);
            }
            let body = serde_json::json!({"token": "tok-123", "expires_in": 300}).to_string();
            return Action::Body(
                body.into_bytes(),
                vec![("Content-Type".into(), "application/json".into())],
            );
        }
        if r.header("authorization") == Some("Bearer tok-123") {
            return Action::Forward;
        }
        let repo =
            r.path.strip_prefix("/v2/").and_then(|p| p.split("/manifests/").next()).unwrap_or("");
        let challenge = format!(
            "Bearer realm=\"http://{me}/token\",service=\"test-registry\",scope=\"repository:{repo}:pull\""
        );
        Action::Respond(401, vec![("WWW-Authenticate".into(), challenge)])
    });
    BearerGate { proxy, token_requests }
}

#[test]
fn bearer_token_challenge_with_scopes() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = make_oci_image(
        &work.path().join("src"),
        "v1",
        &[vec![file("f", b"tok", 0o644)]],
        Comp::Gzip,
    );
    reg.push(&img.layout, "v1", "test/app:v1");
    let gate = bearer_gate(&reg.host, "alice", "pw-for-token");
    let name = format!("{}/test/app:v1", gate.proxy.host);

    // Without credentials the token service refuses: a login hint, exit 2.
    let anon = Ferry::new();
    let out = anon.run(&["pull", &name]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        error_text(&out).contains(&format!("ferry login {}", gate.proxy.host)),
        "{}",
        stderr(&out)
    );

    let ferry = Ferry::new();
    ferry.docker_login_file(&gate.proxy.host, "alice", "pw-for-token");
    ferry.ok(&["pull", &name]);
    let v: serde_json::Value = serde_json::from_str(&ferry.ok(&["inspect", &name])).unwrap();
    assert_eq!(v[0]["Digest"], img.manifest_digest.as_str());
    let reqs = gate.token_requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|p| p.contains("service=test-registry")
            && p.contains("scope=repository%3Atest%2Fapp%3Apull")),
        "{reqs:?}"
    );
    // Tokens are reused: not one token request per blob.
    let with_creds = reqs.len() - 1;
    assert!(with_creds <= 2, "{reqs:?}");

    // Push asks for push scope.
    let c = client(&ferry.docker_config);
    let repo = Repository { registry: gate.proxy.host.clone(), path: "test/pushed".into() };
    let layer_path = blob(&img.layout, &img.layer_digests[0]);
    let size = std::fs::metadata(&layer_path).unwrap().len();
    c.put_blob(&repo, &img.layer_digests[0].parse().unwrap(), size, &layer_path).unwrap();
    let reqs = gate.token_requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|p| p.contains("scope=repository%3Atest%2Fpushed%3Apull%2Cpush")),
        "{reqs:?}"
    );
}
