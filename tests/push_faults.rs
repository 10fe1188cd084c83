//! `ferry push` through a fault-injecting proxy in front of a real registry: transient
//! faults on every kind of request are retried (honouring Retry-After) and the push
//! completes; persistent faults and timeouts fail the push with an error naming the image,
//! the registry and the request, and no tag ever points at an incomplete image (checked by
//! reading the registry directly afterwards).

mod push_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use push_support::*;
use serde_json::Value;

/// What a push request is, as far as faults go.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Kind {
    HeadBlob,
    HeadManifest,
    StartUpload,
    Mount,
    PutBlob,
    PutManifestByDigest,
    PutTag,
    Other,
}

fn kind(r: &RequestInfo) -> Kind {
    let p = r.path.as_str();
    match r.method.as_str() {
        "HEAD" if p.contains("/blobs/") => Kind::HeadBlob,
        "HEAD" if p.contains("/manifests/") => Kind::HeadManifest,
        "POST" if p.contains("mount=") => Kind::Mount,
        "POST" if p.contains("/blobs/uploads/") => Kind::StartUpload,
        "PUT" if p.contains("/blobs/uploads/") => Kind::PutBlob,
        "PUT" if p.contains("/manifests/sha256:") => Kind::PutManifestByDigest,
        "PUT" if p.contains("/manifests/") => Kind::PutTag,
        _ => Kind::Other,
    }
}

/// The `digest=` of an upload's closing PUT.
fn upload_digest(path: &str) -> String {
    path.split(['?', '&']).find_map(|p| p.strip_prefix("digest=")).unwrap_or_default().to_string()
}

fn images(report: &Value) -> BTreeMap<String, (String, Option<String>)> {
    report["report"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let status = i["status"].as_str().unwrap().to_string();
            (
                i["name"].as_str().unwrap().to_string(),
                (status, i["error"].as_str().map(String::from)),
            )
        })
        .collect()
}

/// `ferry --json push --env dev`, impatient: one retry, no backoff, `timeout` seconds (the
/// default when None).
fn impatient_push(
    dir: &std::path::Path,
    store: &std::path::Path,
    timeout: Option<&str>,
) -> (Option<i32>, Value, String) {
    let mut cmd = fixture::ferry(dir);
    cmd.arg("--store")
        .arg(store)
        .env("FERRY_REGISTRY_RETRIES", "1")
        .env("FERRY_REGISTRY_BACKOFF", "0");
    if let Some(t) = timeout {
        cmd.env("FERRY_REGISTRY_TIMEOUT", t);
    }
    let out = cmd.args(["--json", "push", "--env", "dev"]).output().unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), report, stderr(&out))
}

#[test]
fn a_transient_fault_on_every_kind_of_request_is_retried_and_the_push_completes() {
    let reg = start_registry();
    let faulted: Arc<Mutex<BTreeSet<Kind>>> = Arc::default();
    let limited_keys: Arc<Mutex<BTreeMap<Kind, String>>> = Arc::default();
    let limit = Arc::new(RateLimit::default());
    let (f, k, l) = (faulted.clone(), limited_keys.clone(), limit.clone());
    let proxy = FaultProxy::in_front_of(&reg, move |r| {
        let kind = kind(r);
        let first = f.lock().unwrap().insert(kind);
        match kind {
            Kind::HeadBlob if first => Action::Respond(503, vec![]),
            Kind::HeadManifest if first => Action::Respond(502, vec![]),
            Kind::StartUpload if first => Action::Respond(500, vec![]),
            Kind::Mount if first => Action::Respond(503, vec![]),
            // The connection drops half-way through the first blob sent.
            Kind::PutBlob if first => {
                let len: usize = r.header("content-length").unwrap().parse().unwrap();
                assert!(len > 1, "a blob to cut");
                Action::CutRequest(len / 2)
            }
            // Rate limits (429, Retry-After: 1) on one blob, one manifest and one tag; each
            // retry of these must come after the second is over.
            Kind::PutBlob | Kind::PutManifestByDigest | Kind::PutTag => {
                let key = match kind {
                    Kind::PutBlob => format!("upload {}", upload_digest(&r.path)),
                    _ => r.path.clone(),
                };
                let chosen = k.lock().unwrap().entry(kind).or_insert_with(|| key.clone()).clone();
                l.check((chosen == key).then_some(key))
            }
            _ => Action::Forward,
        }
    });
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();

    let report = json(dir.path(), store.path(), &["push", "--env", "dev"], 0);
    for (image, (status, error)) in images(&report) {
        assert_eq!(status, "published", "{image}: {error:?}");
    }
    let faulted = faulted.lock().unwrap().clone();
    for kind in [
        Kind::HeadBlob,
        Kind::HeadManifest,
        Kind::StartUpload,
        Kind::Mount,
        Kind::PutBlob,
        Kind::PutManifestByDigest,
        Kind::PutTag,
    ] {
        assert!(faulted.contains(&kind), "the push made no {kind:?} request: {faulted:?}");
    }
    let seen: Vec<u16> = proxy.requests().iter().map(|r| r.status).collect();
    for status in [500, 502, 503, 429, 0] {
        assert!(seen.contains(&status), "no {status} was injected: {seen:?}");
    }
    let limits = limit.report();
    assert_eq!(limits.len(), 3, "{limits:?}");
    assert!(limits.values().all(|early| *early == 0), "Retry-After not honoured: {limits:?}");

    let tags = assert_every_tag_complete(&reg.host);
    assert_eq!(tags.len(), 13, "6 images × 2 tags and api's own: {tags:?}");
}

#[test]
fn a_registry_that_keeps_failing_one_request_fails_the_push_and_publishes_nothing_incomplete() {
    let reg = start_registry();
    // Which persistent fault applies to runtime's repository (the others go through).
    let fault: Arc<Mutex<Option<Kind>>> = Arc::default();
    let rule_fault = fault.clone();
    let proxy = FaultProxy::in_front_of(&reg, move |r| {
        if !r.path.starts_with("/v2/dev/acme/runtime/") {
            return Action::Forward;
        }
        let kind = kind(r);
        if *rule_fault.lock().unwrap() != Some(kind) {
            return Action::Forward;
        }
        match kind {
            Kind::PutBlob => {
                let len: usize = r.header("content-length").unwrap().parse().unwrap();
                Action::CutRequest(len / 2)
            }
            Kind::StartUpload => Action::Respond(503, vec![]),
            Kind::PutManifestByDigest => Action::Respond(502, vec![]),
            Kind::PutTag => Action::Respond(500, vec![]),
            _ => Action::Forward,
        }
    });
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();
    let host = proxy.host.clone();
    let repo = "dev/acme/runtime";

    // Every upload into runtime's repository is refused with 503.
    *fault.lock().unwrap() = Some(Kind::StartUpload);
    let (code, report, err) = impatient_push(dir.path(), store.path(), None);
    assert_eq!(code, Some(1), "{err}");
    let by_name = images(&report);
    let (status, error) = &by_name["runtime"];
    assert_eq!(status, "failed");
    let error = error.clone().unwrap();
    assert!(
        error.contains(&format!("registry {host} answered 503 to upload of blob sha256:"))
            && error.contains(&format!("to {repo}")),
        "{error}"
    );
    assert!(err.contains("image `runtime`: blob sha256:"), "{err}");
    for (image, (status, _)) in &by_name {
        if image != "runtime" {
            assert_eq!(status, "uploaded_untagged", "{image}");
        }
    }
    assert!(assert_every_tag_complete(&reg.host).is_empty(), "no tag moved");

    // Every blob sent to runtime's repository is cut half-way.
    *fault.lock().unwrap() = Some(Kind::PutBlob);
    let (code, report, err) = impatient_push(dir.path(), store.path(), None);
    assert_eq!(code, Some(1), "{err}");
    let (status, error) = &images(&report)["runtime"];
    assert_eq!(status, "failed");
    let error = error.clone().unwrap();
    assert!(
        error.contains(&format!("registry {host} broke off PUT upload of blob sha256:"))
            && error.contains(&format!("to {repo}")),
        "{error}"
    );
    assert!(assert_every_tag_complete(&reg.host).is_empty(), "no tag moved");

    // runtime's manifest is refused (502): its blobs are there, the image is not.
    *fault.lock().unwrap() = Some(Kind::PutManifestByDigest);
    let (code, report, err) = impatient_push(dir.path(), store.path(), None);
    assert_eq!(code, Some(1), "{err}");
    let (status, error) = &images(&report)["runtime"];
    assert_eq!(status, "failed");
    let error = error.clone().unwrap();
    assert!(
        error.contains(&format!("registry {host} answered 502 to manifest {repo}@sha256:")),
        "{error}"
    );
    assert!(assert_every_tag_complete(&reg.host).is_empty(), "no tag moved");

    // Tags cannot move atomically: when only runtime's tags are refused, the others' move,
    // and every tag that moved names a complete image.
    *fault.lock().unwrap() = Some(Kind::PutTag);
    let (code, report, err) = impatient_push(dir.path(), store.path(), None);
    assert_eq!(code, Some(1), "{err}");
    let by_name = images(&report);
    let (status, error) = &by_name["runtime"];
    assert_eq!(status, "failed");
    assert!(
        error.as_deref().unwrap().contains(&format!("tag {host}/{repo}:")),
        "the failed tag is named: {error:?}"
    );
    let tags = assert_every_tag_complete(&reg.host);
    assert!(!tags.keys().any(|t| t.starts_with(repo)), "{tags:?}");
    assert_eq!(tags.len(), 11, "every other image's tags: {tags:?}");

    // Once the registry behaves, the same push completes.
    *fault.lock().unwrap() = None;
    let (code, _, err) = impatient_push(dir.path(), store.path(), None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(assert_every_tag_complete(&reg.host).len(), 13);
}

#[test]
fn a_registry_slower_than_the_timeout_fails_the_push_and_a_slightly_slow_one_is_fine() {
    let reg = start_registry();
    // 0: every answer 200ms late; 1: runtime's manifest later than the timeout.
    let mode = Arc::new(Mutex::new(0));
    let rule_mode = mode.clone();
    let proxy = FaultProxy::in_front_of(&reg, move |r| match *rule_mode.lock().unwrap() {
        1 if r.path.starts_with("/v2/dev/acme/runtime/")
            && kind(r) == Kind::PutManifestByDigest =>
        {
            Action::Delay(Duration::from_secs(8))
        }
        1 => Action::Forward,
        _ => Action::Delay(Duration::from_millis(200)),
    });
    let dir = fleet(&proxy.host, "");
    let store = tempfile::tempdir().unwrap();

    *mode.lock().unwrap() = 1;
    let (code, report, err) = impatient_push(dir.path(), store.path(), Some("3"));
    assert_eq!(code, Some(1), "{err}");
    let (status, error) = &images(&report)["runtime"];
    assert_eq!(status, "failed");
    let error = error.clone().unwrap();
    assert!(
        error.contains(&format!(
            "registry {} did not answer PUT manifest dev/acme/runtime@sha256:",
            proxy.host
        )) && error
            .contains("within 3s (2 tries); if it is only slow, raise FERRY_REGISTRY_TIMEOUT"),
        "{error}"
    );
    assert!(assert_every_tag_complete(&reg.host).is_empty(), "no tag moved");

    *mode.lock().unwrap() = 0;
    let (code, report, err) = impatient_push(dir.path(), store.path(), None);
    assert_eq!(code, Some(0), "200ms per answer is fine: {err}");
    for (image, (status, _)) in images(&report) {
        assert_eq!(status, "published", "{image}");
    }
    assert_eq!(assert_every_tag_complete(&reg.host).len(), 13);
}
