//! A registry that lies, served through a rewriting proxy in front of a real one: manifest
//! bytes that are not the digest asked for or announced, blobs longer or shorter than their
//! manifest says. Every pull fails with a clear error and leaves the store as it was: no
//! ref, no blob under a digest it does not hash to, no temp file.

mod common;

use common::*;

struct Served {
    reg: TestRegistry,
    img: TestImage,
    _work: tempfile::TempDir,
}

fn served() -> Served {
    let reg = TestRegistry::start(RegistryOptions::default());
    let work = tempfile::tempdir().unwrap();
    let layers = vec![
        vec![dir("etc"), file("etc/hello", b"hello\n", 0o644)],
        vec![file("data.bin", &noise(200_000, 7), 0o644)],
    ];
    let img = make_oci_image(&work.path().join("src"), "v1", &layers, Comp::Gzip);
    reg.push(&img.layout, "v1", "test/app:v1");
    Served { reg, img, _work: work }
}

fn is_manifest_get(r: &RequestInfo) -> bool {
    r.method == "GET" && r.path.contains("/manifests/")
}

fn is_blob_get(r: &RequestInfo, digest: &str) -> bool {
    r.method == "GET" && r.path.ends_with(&format!("/blobs/{digest}"))
}

/// Pull `reference` through a proxy applying `rewrite` to the requests `which` selects;
/// the pull must fail (exit 2). Its error text, with the ferry that ran it.
fn pull_through_lie(
    s: &Served,
    reference: &str,
    which: impl Fn(&RequestInfo) -> bool + Send + Sync + 'static,
    rewrite: impl Fn(Answer) -> Answer + Send + Sync + Clone + 'static,
) -> (String, String, Ferry) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = FaultProxy::start_with(listener, &s.reg.host, move |r| {
        if which(r) {
            Action::Rewrite(Box::new(rewrite.clone()))
        } else {
            Action::Forward
        }
    });
    let ferry = Ferry::new();
    let out = ferry.run(&["pull", &format!("{}/{reference}", proxy.host)]);
    assert_eq!(out.status.code(), Some(2), "the pull must fail: {}", stderr(&out));
    ferry.assert_clean_after_failure();
    (error_text(&out), proxy.host.clone(), ferry)
}

/// The same manifest with a space added: still valid JSON, other bytes, another digest.
fn reformatted(mut a: Answer) -> Answer {
    a.body.push(b' ');
    a
}

#[test]
fn a_manifest_that_is_not_the_digest_asked_for_is_refused() {
    let s = served();
    let asked = s.img.manifest_digest.clone();
    let served_digest = {
        let mut b = std::fs::read(s.img.layout.join("blobs/sha256").join(&asked[7..])).unwrap();
        b.push(b' ');
        sha256(&b)
    };
    let (err, host, _) =
        pull_through_lie(&s, &format!("test/app@{asked}"), is_manifest_get, reformatted);
    assert!(
        err.contains(&format!(
            "manifest test/app@{asked} from {host} does not match its digest: expected {asked}, got {served_digest}; it was not stored"
        )),
        "{err}"
    );
}

#[test]
fn a_manifest_whose_bytes_differ_from_its_announced_digest_is_refused() {
    let s = served();
    let real = s.img.manifest_digest.clone();
    // Bytes changed on the way, the header still the registry's own.
    let (err, host, _) = pull_through_lie(&s, "test/app:v1", is_manifest_get, reformatted);
    assert!(
        err.contains(&format!("manifest test/app:v1 from {host} does not match its digest"))
            && err.contains(&format!("expected {real}")),
        "{err}"
    );

    // The bytes intact, a header announcing another digest.
    let other = sha256(b"another manifest");
    let announced = other.clone();
    let (err, host, _) = pull_through_lie(&s, "test/app:v1", is_manifest_get, move |mut a| {
        a.set_header("Docker-Content-Digest", &announced);
        a
    });
    assert!(
        err.contains(&format!(
            "manifest test/app:v1 from {host} does not match its digest: expected {other}, got {real}"
        )),
        "{err}"
    );
}

#[test]
fn a_blob_longer_or_shorter_than_its_manifest_says_is_refused() {
    let s = served();
    let layer = s.img.layer_digests[1].clone();
    let size =
        std::fs::metadata(s.img.layout.join("blobs/sha256").join(&layer[7..])).unwrap().len();

    let l = layer.clone();
    let (err, host, ferry) = pull_through_lie(
        &s,
        "test/app:v1",
        move |r| is_blob_get(r, &l),
        |mut a| {
            a.body.extend_from_slice(b"trailing bytes");
            a
        },
    );
    assert!(
        err.contains(&format!(
            "blob {layer} of {host}/test/app:v1 from {host} is not valid: it has more than {size} bytes, the manifest says {size}"
        )),
        "{err}"
    );
    assert!(!ferry.store.join("blobs/sha256").join(&layer[7..]).exists());

    let l = layer.clone();
    let (err, host, ferry) = pull_through_lie(
        &s,
        "test/app:v1",
        move |r| is_blob_get(r, &l),
        |mut a| {
            a.body.truncate(a.body.len() / 2);
            a
        },
    );
    assert!(
        err.contains(&format!(
            "blob {layer} of {host}/test/app:v1 from {host} is not valid: it has {} bytes, the manifest says {size}",
            size / 2
        )),
        "{err}"
    );
    assert!(!ferry.store.join("blobs/sha256").join(&layer[7..]).exists());
}

#[test]
fn a_manifest_that_lies_about_a_blob_size_consistently_is_caught_by_the_blob() {
    // The registry rewrites its manifest (and the digest it announces) so that a layer is
    // said to be 10 bytes shorter: nothing about the manifest itself gives it away.
    let s = served();
    let layer = s.img.layer_digests[1].clone();
    let size =
        std::fs::metadata(s.img.layout.join("blobs/sha256").join(&layer[7..])).unwrap().len();
    let (err, host, ferry) = pull_through_lie(&s, "test/app:v1", is_manifest_get, |mut a| {
        let mut m: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        let declared = m["layers"][1]["size"].as_u64().unwrap();
        m["layers"][1]["size"] = (declared - 10).into();
        a.body = serde_json::to_vec(&m).unwrap();
        let digest = sha256(&a.body);
        a.set_header("Docker-Content-Digest", &digest);
        a
    });
    assert!(
        err.contains(&format!(
            "blob {layer} of {host}/test/app:v1 from {host} is not valid: it has more than {} bytes, the manifest says {}",
            size - 10,
            size - 10
        )),
        "{err}"
    );
    assert!(!ferry.store.join("blobs/sha256").join(&layer[7..]).exists());
}
