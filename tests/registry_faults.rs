//! Pulls through faults a real registry cannot produce on purpose: 5xx, 429, refusals,
//! corrupted bytes, wrong credentials, and a pull killed half-way.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn pushed_image(reg: &TestRegistry, work: &std::path::Path, big: bool) -> TestImage {
    let mut layers = vec![vec![dir("etc"), file("etc/hello", b"hello\n", 0o644)]];
    if big {
        layers.push(vec![dir("data"), file("data/blob.bin", &noise(4_000_000, 42), 0o644)]);
    }
    let img = make_oci_image(&work.join("src"), "v1", &layers, Comp::Gzip);
    reg.push(&img.layout, "v1", "test/app:v1");
    img
}

fn is_blob_get(method: &str, path: &str, digest: &str) -> bool {
    method == "GET" && path.ends_with(&format!("/blobs/{digest}"))
}

#[test]
fn two_500s_then_success() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), false);
    let proxy = FaultProxy::start(&reg.host, |_, _, n| {
        if n <= 2 {
            Action::Respond(500, vec![])
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    let name = format!("{}/test/app:v1", proxy.host);
    ferry.ok(&["pull", &name]);
    let seen = proxy.requests();
    assert_eq!(seen[0].status, 500);
    assert_eq!(seen[1].status, 500);
    assert!(seen[2..].iter().all(|r| r.status < 400), "{seen:?}");
    let out = ferry.ok(&["inspect", &name]);
    assert!(out.contains(&img.manifest_digest));
    ferry.ok(&["cache", "verify"]);
}

#[test]
fn too_many_requests_is_retried_after_the_announced_delay() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), false);
    let config_digest = img.config_digest.clone();
    let limited = Arc::new(AtomicBool::new(false));
    let flag = limited.clone();
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        if is_blob_get(m, p, &config_digest) && !flag.swap(true, Ordering::SeqCst) {
            Action::Respond(429, vec![("Retry-After".into(), "1".into())])
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    ferry.ok(&["pull", &format!("{}/test/app:v1", proxy.host)]);
    let config_gets: Vec<u16> = proxy
        .requests()
        .iter()
        .filter(|r| is_blob_get(&r.method, &r.path, &img.config_digest))
        .map(|r| r.status)
        .collect();
    assert_eq!(config_gets, [429, 200]);
}

#[test]
fn client_errors_are_not_retried() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), false);
    let layer = img.layer_digests[0].clone();
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        if is_blob_get(m, p, &layer) {
            Action::Respond(403, vec![])
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &format!("{}/test/app:v1", proxy.host)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("denied"), "{}", stderr(&out));
    let layer_gets = proxy
        .requests()
        .iter()
        .filter(|r| is_blob_get(&r.method, &r.path, &img.layer_digests[0]))
        .count();
    assert_eq!(layer_gets, 1, "a 403 must not be retried");
    assert!(ferry.index()["manifests"].as_array().unwrap().is_empty(), "no ref for a failed pull");
}

#[test]
fn a_blob_whose_bytes_do_not_match_its_digest_is_rejected() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), false);
    let layer = img.layer_digests[0].clone();
    let size = std::fs::metadata(img.layout.join("blobs/sha256").join(&layer[7..])).unwrap().len()
        as usize;
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        if is_blob_get(m, p, &layer) {
            Action::Body(vec![b'x'; size], vec![])
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &format!("{}/test/app:v1", proxy.host)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("does not match its digest"), "{}", stderr(&out));
    assert!(!ferry.store.join("blobs/sha256").join(&img.layer_digests[0][7..]).exists());
    assert!(ferry.index()["manifests"].as_array().unwrap().is_empty());
    assert_eq!(std::fs::read_dir(ferry.store.join("tmp")).unwrap().count(), 0);
    ferry.ok(&["cache", "verify"]);
}

#[test]
fn wrong_credentials_exit_2_without_leaking_the_secret() {
    let reg = TestRegistry::start(RegistryOptions {
        htpasswd: Some(("alice".into(), "the-right-one".into())),
        ..Default::default()
    });
    let work = tempfile::tempdir().unwrap();
    pushed_image(&reg, work.path(), false);
    let ferry = Ferry::new();
    let wrong = "WRONG-pa55word-xyz";
    ferry.docker_login_file(&reg.host, "alice", wrong);
    let out = ferry.run(&["-vv", "pull", &format!("{}/test/app:v1", reg.host)]);
    assert_eq!(out.status.code(), Some(2));
    let err = error_text(&out);
    assert!(err.contains(&reg.host) && err.contains(&format!("ferry login {}", reg.host)), "{err}");
    let all = format!("{}{}", stdout(&out), stderr(&out));
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("alice:{wrong}"));
    assert!(!all.contains(wrong) && !all.contains(&encoded), "secret leaked: {all}");

    // login with a wrong password: refused, nothing written, nothing leaked.
    let fresh = Ferry::new();
    let mut child = fresh
        .command()
        .args(["-vv", "login", &reg.host, "-u", "alice", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(wrong.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("ferry login"), "{}", stderr(&out));
    let all = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!all.contains(wrong) && !all.contains(&encoded), "secret leaked: {all}");
    assert!(!fresh.docker_config.join("config.json").exists());
}

#[test]
fn unreachable_registry_is_exit_2() {
    let ferry = Ferry::new();
    let port = free_port();
    let out = ferry.run(&["pull", &format!("127.0.0.1:{port}/x/y:1")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        error_text(&out).contains(&format!("cannot reach registry 127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sigkill_mid_pull_leaves_no_partial_blob_or_ref() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), true);
    let big = img.layer_digests[1].clone();
    let stall = Arc::new(AtomicBool::new(true));
    let stall_rule = stall.clone();
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        if is_blob_get(m, p, &big) && stall_rule.load(Ordering::SeqCst) {
            Action::Stall(1_000_000)
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    let name = format!("{}/test/app:v1", proxy.host);
    let mut child = ferry
        .command()
        .args(["pull", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until ferry has received part of the big blob (a safety limit, not a timing).
    let stalled = proxy.stalled.recv_timeout(Duration::from_secs(120));
    assert!(stalled.is_ok(), "the pull never reached the big blob");
    // The first megabyte has been handed to ferry; it is writing it to a temp file.
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    assert!(
        ferry.index()["manifests"].as_array().unwrap().is_empty(),
        "no ref after a killed pull"
    );
    assert!(!ferry.store.join("blobs/sha256").join(&img.layer_digests[1][7..]).exists());
    for e in std::fs::read_dir(ferry.store.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        assert_eq!(
            sha256(&std::fs::read(e.path()).unwrap()),
            format!("sha256:{name}"),
            "partial blob {name}"
        );
    }
    ferry.ok(&["cache", "verify"]);

    stall.store(false, Ordering::SeqCst);
    ferry.ok(&["pull", &name]);
    ferry.ok(&["cache", "verify"]);
    let out = ferry.ok(&["inspect", &name]);
    assert!(out.contains(&img.manifest_digest));
    assert_eq!(
        std::fs::read_dir(ferry.store.join("tmp")).unwrap().count(),
        0,
        "stale temp files are cleaned"
    );
}

fn is_manifest_get(method: &str, path: &str) -> bool {
    method == "GET" && path.contains("/manifests/")
}

#[test]
fn bad_gateway_and_unavailable_are_retried_on_every_kind_of_request() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), true);
    let (config, big) = (img.config_digest.clone(), img.layer_digests[1].clone());
    let faulted = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let once = faulted.clone();
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        let fault = if is_manifest_get(m, p) {
            Some(502)
        } else if is_blob_get(m, p, &config) {
            Some(503)
        } else if is_blob_get(m, p, &big) {
            Some(500)
        } else {
            None
        };
        match fault {
            Some(status) if once.lock().unwrap().insert(p.to_string()) => {
                Action::Respond(status, vec![])
            }
            _ => Action::Forward,
        }
    });
    let ferry = Ferry::new();
    let name = format!("{}/test/app:v1", proxy.host);
    ferry.ok(&["pull", &name]);
    let statuses = |f: &dyn Fn(&SeenRequest) -> bool| -> Vec<u16> {
        proxy.requests().iter().filter(|r| f(r)).map(|r| r.status).collect()
    };
    assert_eq!(statuses(&|r| is_manifest_get(&r.method, &r.path)), [502, 200]);
    assert_eq!(statuses(&|r| is_blob_get(&r.method, &r.path, &img.config_digest)), [503, 200]);
    assert_eq!(statuses(&|r| is_blob_get(&r.method, &r.path, &img.layer_digests[1])), [500, 200]);
    assert!(ferry.ok(&["inspect", &name]).contains(&img.manifest_digest));
    ferry.ok(&["cache", "verify"]);
}

#[test]
fn retry_after_is_honoured_on_every_kind_of_request() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), true);
    let limit = Arc::new(RateLimit::default());
    let rule_limit = limit.clone();
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        let limited = m == "GET" && (p.contains("/manifests/") || p.contains("/blobs/"));
        rule_limit.check(limited.then(|| p.to_string()))
    });
    let ferry = Ferry::new();
    let name = format!("{}/test/app:v1", proxy.host);
    ferry.ok(&["pull", &name]);
    let report = limit.report();
    assert_eq!(report.len(), 4, "the manifest, the config and two layers: {report:?}");
    assert!(report.values().all(|p| *p == 0), "a retry came before Retry-After: {report:?}");
    assert!(ferry.ok(&["inspect", &name]).contains(&img.manifest_digest));
}

#[test]
fn a_retry_after_longer_than_ferry_waits_fails_at_once() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    pushed_image(&reg, work.path(), false);
    let proxy = FaultProxy::start(&reg.host, |m, p, _| {
        if is_manifest_get(m, p) {
            Action::Respond(429, vec![("Retry-After".into(), "3600".into())])
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &format!("{}/test/app:v1", proxy.host)]);
    assert_eq!(out.status.code(), Some(2));
    let err = error_text(&out);
    assert!(
        err.contains(&format!(
            "registry {} is rate-limiting GET manifest test/app:v1 and asks to retry in 3600s, longer than ferry waits (60s, FERRY_REGISTRY_MAX_RETRY_AFTER)",
            proxy.host
        )),
        "{err}"
    );
    let gets = proxy.requests().iter().filter(|r| is_manifest_get(&r.method, &r.path)).count();
    assert_eq!(gets, 1, "no retry when the registry asks for more than the cap");

    // The cap is a setting: below it, the same answer is waited out.
    let once = Arc::new(AtomicBool::new(false));
    let flag = once.clone();
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        if is_manifest_get(m, p) && !flag.swap(true, Ordering::SeqCst) {
            Action::Respond(429, vec![("Retry-After".into(), "1".into())])
        } else {
            Action::Forward
        }
    });
    let out = ferry
        .command()
        .env("FERRY_REGISTRY_MAX_RETRY_AFTER", "0.5")
        .args(["pull", &format!("{}/test/app:v1", proxy.host)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(error_text(&out).contains("asks to retry in 1s, longer than ferry waits (0.5s"));
    ferry.ok(&["pull", &format!("{}/test/app:v1", proxy.host)]);
}

#[test]
fn a_download_cut_mid_blob_starts_over_and_one_that_always_breaks_off_fails_clearly() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), true);
    let big = img.layer_digests[1].clone();
    // 0: cut the first download only; 1: cut every download.
    let mode = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cut_once = Arc::new(AtomicBool::new(false));
    let (rule_mode, rule_once, rule_big) = (mode.clone(), cut_once.clone(), big.clone());
    let proxy = FaultProxy::start(&reg.host, move |m, p, _| {
        if !is_blob_get(m, p, &rule_big) {
            return Action::Forward;
        }
        let always = rule_mode.load(Ordering::SeqCst) == 1;
        if always || !rule_once.swap(true, Ordering::SeqCst) {
            Action::CutResponse(1_500_000)
        } else {
            Action::Forward
        }
    });
    let name = format!("{}/test/app:v1", proxy.host);
    let big_gets = |proxy: &FaultProxy| {
        proxy.requests().iter().filter(|r| is_blob_get(&r.method, &r.path, &big)).count()
    };

    let ferry = Ferry::new();
    ferry.ok(&["pull", &name]);
    assert_eq!(big_gets(&proxy), 2, "one cut download, one whole");
    assert!(ferry.ok(&["inspect", &name]).contains(&img.manifest_digest));
    ferry.ok(&["cache", "verify"]);

    mode.store(1, Ordering::SeqCst);
    let before = big_gets(&proxy);
    let fresh = Ferry::new();
    let out = fresh
        .command()
        .env("FERRY_REGISTRY_RETRIES", "2")
        .env("FERRY_REGISTRY_BACKOFF", "0")
        .args(["pull", &name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(
        err.contains(&format!(
            "registry {} broke off the download of blob {big} of test/app",
            proxy.host
        )),
        "{err}"
    );
    assert_eq!(big_gets(&proxy) - before, 3, "the first try and FERRY_REGISTRY_RETRIES=2");
    assert!(!fresh.store.join("blobs/sha256").join(&big[7..]).exists());
    fresh.assert_clean_after_failure();
}

#[test]
fn a_registry_slower_than_the_timeout_fails_naming_it_and_a_slightly_slow_one_is_fine() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let img = pushed_image(&reg, work.path(), true);
    let big = img.layer_digests[1].clone();
    // 0: every request a little late; 1: manifests later than the timeout; 2: the big
    // blob's body stops half-way.
    let mode = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rule_mode = mode.clone();
    let proxy =
        FaultProxy::start(&reg.host, move |m, p, _| match rule_mode.load(Ordering::SeqCst) {
            0 => Action::Delay(Duration::from_millis(300)),
            1 if is_manifest_get(m, p) => Action::Delay(Duration::from_secs(8)),
            2 if is_blob_get(m, p, &big) => Action::Stall(1_000_000),
            _ => Action::Forward,
        });
    let name = format!("{}/test/app:v1", proxy.host);
    let impatient = |ferry: &Ferry| {
        let mut c = ferry.command();
        c.env("FERRY_REGISTRY_TIMEOUT", "3")
            .env("FERRY_REGISTRY_RETRIES", "1")
            .env("FERRY_REGISTRY_BACKOFF", "0");
        c
    };

    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &name]);
    assert!(out.status.success(), "300ms per answer is fine: {}", stderr(&out));
    assert!(ferry.ok(&["inspect", &name]).contains(&img.manifest_digest));

    mode.store(1, Ordering::SeqCst);
    let slow = Ferry::new();
    let out = impatient(&slow).args(["pull", &name]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(
        err.contains(&format!(
            "registry {} did not answer GET manifest test/app:v1 within 3s (2 tries); if it is only slow, raise FERRY_REGISTRY_TIMEOUT (seconds)",
            proxy.host
        )),
        "{err}"
    );
    slow.assert_clean_after_failure();

    mode.store(2, Ordering::SeqCst);
    let stalled = Ferry::new();
    let out = impatient(&stalled).args(["pull", &name]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = error_text(&out);
    assert!(
        err.contains(&format!(
            "registry {} broke off the download of blob {} of test/app: the registry sent nothing for 3s (FERRY_REGISTRY_TIMEOUT)",
            proxy.host, img.layer_digests[1]
        )),
        "{err}"
    );
    stalled.assert_clean_after_failure();
}
