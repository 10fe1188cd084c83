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
