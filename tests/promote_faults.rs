//! `ferry promote` through fault-injecting proxies in front of real registries: transient
//! faults on the source and the destination (5xx, 429 with Retry-After, connections cut in
//! the middle of a blob either way) are retried and the promotion completes with the same
//! digests; persistent faults, a lying source and a destination slower than the timeout
//! fail it with an error naming the image, the registry and the request, and no tag moves.
//! The destination is read directly afterwards: every tag names a complete image.

mod common;
mod promote_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use promote_support::*;

fn envs(staging: &str, prod: &str) -> String {
    format!(
        r#"
[environments.staging]
registry = "{staging}/acme-staging"
tags = ["{{version}}-rc"]

[environments.prod]
registry = "{prod}/acme-prod"
tags = ["{{version}}", "latest"]
"#
    )
}

/// The config and first layer of `repo@digest` in the registry at `host`.
fn config_and_first_layer(host: &str, repo: &str, digest: &str) -> (String, String) {
    let path = format!("/v2/{repo}/manifests/{digest}");
    let accept = Some("application/vnd.oci.image.manifest.v1+json");
    let m: serde_json::Value =
        serde_json::from_slice(&http_request(host, "GET", &path, accept).2).unwrap();
    let digest = |v: &serde_json::Value| v["digest"].as_str().unwrap().to_string();
    (digest(&m["config"]), digest(&m["layers"][0]))
}

/// The `digest=` query of the upload of `digest`, as ferry sends it.
fn upload_query(digest: &str) -> String {
    format!("digest={}", digest.replace(':', "%3A"))
}

/// api (two layers) and web (one layer) published in staging.
fn staging(reg: &TestRegistry, work: &std::path::Path) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        ("api", publish(reg, work, "api", 1, 2, 300_000, "acme-staging/acme/api:1.0.0-rc")),
        ("web", publish(reg, work, "web", 2, 1, 300_000, "acme-staging/acme/web:2.0.0-rc")),
    ])
}

const IMAGES: [(&str, &str); 2] = [("api", "1.0.0"), ("web", "2.0.0")];

fn is_blob_get(r: &RequestInfo) -> bool {
    r.method == "GET" && r.path.contains("/blobs/sha256:")
}

/// The promoted tags are in prod, with staging's digests, and complete (as is every other
/// tag of that registry).
fn assert_promoted(prod: &TestRegistry, digests: &BTreeMap<&str, String>) {
    let mut tags = assert_every_tag_complete(&prod.host);
    tags.retain(|t, _| t.starts_with("acme-prod/"));
    let expected: BTreeMap<String, String> = [
        ("acme-prod/acme/api:1.0.0", "api"),
        ("acme-prod/acme/api:latest", "api"),
        ("acme-prod/acme/web:2.0.0", "web"),
        ("acme-prod/acme/web:latest", "web"),
    ]
    .into_iter()
    .map(|(t, image)| (t.to_string(), digests[image].clone()))
    .collect();
    assert_eq!(tags, expected);
}

/// `ferry promote --from staging --to prod`, impatient: one retry, no backoff, `timeout`
/// seconds (the default when None).
fn impatient_promote(project: &Project, timeout: Option<&str>) -> std::process::Output {
    let mut cmd = project.ferry.command();
    cmd.arg("-C")
        .arg(project.path())
        .env("FERRY_REGISTRY_RETRIES", "1")
        .env("FERRY_REGISTRY_BACKOFF", "0");
    if let Some(t) = timeout {
        cmd.env("FERRY_REGISTRY_TIMEOUT", t);
    }
    cmd.args(["promote", "--from", "staging", "--to", "prod"]).output().unwrap()
}

#[test]
fn transient_faults_on_both_registries_are_retried_while_streaming() {
    let src = TestRegistry::start(RegistryOptions::default());
    let dst = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let digests = staging(&src, work.path());
    let (web_config, web_layer) =
        config_and_first_layer(&src.host, "acme-staging/acme/web", &digests["web"]);

    // The source: the first manifest read answers 503, the first download of each of api's
    // blobs is cut after 100 bytes.
    let src_seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let seen = src_seen.clone();
    let src_proxy = FaultProxy::in_front_of(&src, move |r| {
        let first = seen.lock().unwrap().insert(format!("{} {}", r.method, r.path));
        if r.method == "GET"
            && r.path.contains("/manifests/")
            && first
            && seen.lock().unwrap().insert("manifest fault".into())
        {
            return Action::Respond(503, vec![]);
        }
        if is_blob_get(r) && r.path.starts_with("/v2/acme-staging/acme/api/") && first {
            return Action::CutResponse(100);
        }
        Action::Forward
    });
    // The destination: one fault of each kind. The upload cut half-way is web's layer's and
    // the rate-limited one web's config's: their downloads are whole, so these faults are
    // what they meet.
    let dst_faults: Arc<Mutex<BTreeSet<&'static str>>> = Arc::default();
    let limit = Arc::new(RateLimit::default());
    let limited: Arc<Mutex<Option<String>>> = Arc::default();
    let (faults, l, chosen) = (dst_faults.clone(), limit.clone(), limited.clone());
    let (web_layer_upload, web_config_upload) =
        (upload_query(&web_layer), upload_query(&web_config));
    let dst_proxy = FaultProxy::in_front_of(&dst, move |r| {
        let p = r.path.as_str();
        let kind = match r.method.as_str() {
            "HEAD" => "head",
            "POST" => "start upload",
            "PUT" if p.contains(&web_layer_upload) => "blob",
            "PUT" if p.contains(&web_config_upload) => "limited blob",
            "PUT" if p.contains("/blobs/uploads/") => "other",
            "PUT" if p.contains("/manifests/sha256:") => "manifest",
            "PUT" => "tag",
            _ => "other",
        };
        let first = faults.lock().unwrap().insert(kind);
        match kind {
            "head" if first => Action::Respond(502, vec![]),
            "start upload" if first => Action::Respond(500, vec![]),
            "blob" if first => {
                let len: usize = r.header("content-length").unwrap().parse().unwrap();
                Action::CutRequest(len / 2)
            }
            "tag" if first => Action::Respond(503, vec![]),
            // Rate limits: a retry must wait for Retry-After.
            "limited blob" => l.check(Some(web_config_upload.clone())),
            "manifest" => {
                let key = chosen.lock().unwrap().get_or_insert_with(|| p.to_string()).clone();
                l.check((key == p).then(|| key.clone()))
            }
            _ => Action::Forward,
        }
    });

    let project = Project::new(&IMAGES, &envs(&src_proxy.host, &dst_proxy.host));
    let out = project.run(&["promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut gets: BTreeMap<String, usize> = BTreeMap::new();
    for r in src_proxy.requests().iter().filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
    {
        *gets.entry(r.path.clone()).or_default() += 1;
    }
    assert_eq!(gets.len(), 5, "3 layers and 2 configs: {gets:?}");
    for (path, n) in &gets {
        if path.starts_with("/v2/acme-staging/acme/api/") {
            assert!(*n >= 2, "the cut download of {path} started over: {gets:?}");
        }
    }
    let injected: BTreeSet<u16> = dst_proxy.requests().iter().map(|r| r.status).collect();
    for status in [0, 429, 500, 502, 503] {
        assert!(injected.contains(&status), "no {status} at the destination: {injected:?}");
    }
    let dst_faults = dst_faults.lock().unwrap().clone();
    for kind in ["head", "start upload", "blob", "manifest", "tag"] {
        assert!(dst_faults.contains(kind), "no {kind} request at the destination");
    }
    let limits = limit.report();
    assert_eq!(limits.len(), 2, "{limits:?}");
    assert!(limits.values().all(|early| *early == 0), "Retry-After not honoured: {limits:?}");
    assert_promoted(&dst, &digests);
}

#[test]
fn transient_faults_on_mounts_within_one_registry_are_retried() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let digests = staging(&reg, work.path());
    let faulted: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let f = faulted.clone();
    let proxy = FaultProxy::in_front_of(&reg, move |r| {
        let mount = r.method == "POST" && r.path.contains("mount=");
        let tag = r.method == "PUT" && !r.path.contains("/manifests/sha256:");
        if (mount || tag) && f.lock().unwrap().insert(r.path.clone()) {
            // Every mount and tag is refused once.
            return Action::Respond(if mount { 503 } else { 502 }, vec![]);
        }
        Action::Forward
    });
    let project = Project::new(&IMAGES, &envs(&proxy.host, &proxy.host));
    let out = project.run(&["--json", "promote", "--from", "staging", "--to", "prod"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["stats"]["blobs_mounted"], 5, "{report}");
    assert_eq!(report["stats"]["blobs_streamed"], 0, "{report}");
    let refused = proxy.requests().iter().filter(|r| r.status >= 500).count();
    assert_eq!(refused, 5 + 4, "five mounts and four tags, each refused once");
    assert_promoted(&reg, &digests);
}

#[test]
fn persistent_faults_a_lying_source_and_timeouts_fail_the_promotion_and_move_no_tag() {
    let src = TestRegistry::start(RegistryOptions::default());
    let dst = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let digests = staging(&src, work.path());
    let (_, web_layer) =
        config_and_first_layer(&src.host, "acme-staging/acme/web", &digests["web"]);

    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        None,
        CutEveryUploadOfWebLayer,
        CutEveryDownloadOfWebLayer,
        CorruptWebLayerAtSource,
        SlowManifests,
        SlightlySlow,
    }
    let fault = Arc::new(Mutex::new(Fault::None));
    let (f, layer) = (fault.clone(), web_layer.clone());
    let src_proxy = FaultProxy::in_front_of(&src, move |r| {
        let web_layer_get = r.method == "GET" && r.path.ends_with(&format!("/blobs/{layer}"));
        if *f.lock().unwrap() == Fault::CutEveryDownloadOfWebLayer && web_layer_get {
            return Action::CutResponse(1000);
        }
        if *f.lock().unwrap() == Fault::CorruptWebLayerAtSource
            && r.method == "GET"
            && r.path.ends_with(&format!("/blobs/{layer}"))
        {
            return Action::Rewrite(Box::new(|mut a: Answer| {
                let mid = a.body.len() / 2;
                a.body[mid] ^= 0xff;
                a
            }));
        }
        Action::Forward
    });
    let (f, layer) = (fault.clone(), web_layer.clone());
    let dst_proxy = FaultProxy::in_front_of(&dst, move |r| match *f.lock().unwrap() {
        Fault::CutEveryUploadOfWebLayer
            if r.method == "PUT" && r.path.contains(&upload_query(&layer)) =>
        {
            let len: usize = r.header("content-length").unwrap().parse().unwrap();
            Action::CutRequest(len / 2)
        }
        Fault::SlowManifests if r.method == "PUT" && r.path.contains("/manifests/sha256:") => {
            Action::Delay(Duration::from_secs(8))
        }
        Fault::SlightlySlow => Action::Delay(Duration::from_millis(200)),
        _ => Action::Forward,
    });
    let project = Project::new(&IMAGES, &envs(&src_proxy.host, &dst_proxy.host));
    let failed = |expected: &[String], timeout: Option<&str>| {
        let out = impatient_promote(&project, timeout);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = error_text(&out);
        for e in expected {
            assert!(err.contains(e.as_str()), "expected {e:?} in: {err}");
        }
        assert!(err.contains("no tag was moved"), "{err}");
        assert!(assert_every_tag_complete(&dst.host).is_empty(), "a tag moved");
    };

    let (src_host, dst_host) = (src_proxy.host.clone(), dst_proxy.host.clone());
    *fault.lock().unwrap() = Fault::CutEveryUploadOfWebLayer;
    let cut = format!(
        "image `web`: registry {dst_host} broke off PUT upload of blob {web_layer} to acme-prod/acme/web"
    );
    failed(&[cut], None);

    // The source breaks off: the error blames it, not the destination the bytes went to.
    *fault.lock().unwrap() = Fault::CutEveryDownloadOfWebLayer;
    let cut = format!(
        "image `web`: registry {src_host} broke off the download of blob {web_layer} of acme-staging/acme/web"
    );
    failed(&[cut], None);

    // The destination checks what it is sent: a corrupted blob is refused, not retried.
    *fault.lock().unwrap() = Fault::CorruptWebLayerAtSource;
    let refused = format!(
        "image `web`: registry {dst_host} answered 400 to upload of blob {web_layer} to acme-prod/acme/web (DIGEST_INVALID"
    );
    failed(&[refused], None);

    *fault.lock().unwrap() = Fault::SlowManifests;
    let slow = [
        format!("registry {dst_host} did not answer PUT manifest acme-prod/acme/"),
        "within 3s (2 tries); if it is only slow, raise FERRY_REGISTRY_TIMEOUT".to_string(),
    ];
    failed(&slow, Some("3"));

    *fault.lock().unwrap() = Fault::SlightlySlow;
    let out = impatient_promote(&project, None);
    assert!(out.status.success(), "200ms per answer is fine: {}", stderr(&out));
    assert_promoted(&dst, &digests);
}

/// A destination that takes connections and drops them unanswered (a registry stopped
/// behind a load balancer): the host is found unreachable once, after its retries, and
/// every image fails at once with that error instead of each retrying the connection
/// (with the default backoff, a fleet took minutes to fail).
#[test]
fn an_unreachable_destination_is_given_up_on_once_for_the_whole_fleet() {
    let staging_reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for (seed, name) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        let dest = format!("acme-staging/acme/{name}:1.0.0-rc");
        publish(&staging_reg, work.path(), name, seed as u64 + 1, 1, 1000, &dest);
        images.push((*name, "1.0.0"));
    }
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_host = dead.local_addr().unwrap().to_string();
    let connections = Arc::new(Mutex::new(0usize));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for conn in dead.incoming() {
            *counted.lock().unwrap() += 1;
            drop(conn);
        }
    });
    let project = Project::new(&images, &envs(&staging_reg.host, &dead_host));
    let out = project
        .ferry
        .command()
        .arg("-C")
        .arg(project.path())
        .env("FERRY_REGISTRY_RETRIES", "2")
        .env("FERRY_REGISTRY_BACKOFF", "0.05")
        .args(["promote", "--from", "staging", "--to", "prod"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = error_text(&out);
    assert!(err.contains(&format!("cannot reach registry {dead_host}")), "{err}");
    // One check of the host: an HTTPS try, then plain HTTP three times (two retries).
    let n = *connections.lock().unwrap();
    assert!((2..=4).contains(&n), "{n} connections for {} images: {err}", images.len());
}
