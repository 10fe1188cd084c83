//! External bases: pulled from a real registry (directly and through a mirror) before the
//! build and pinned by digest.

mod common;

use common::fixture;

use common::{RegistryOptions, TestRegistry};
use fixture::{build_json, ferry, project, umoci_unpack, BUSYBOX_BASE};

/// Build a busybox image with ferry and publish it in `registry` as `lib/busybox:1`;
/// returns its manifest digest.
fn publish_busybox(registry: &TestRegistry) -> String {
    let dir = project(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n"),
        ("bb/Dockerfile", BUSYBOX_BASE),
    ]);
    let store = tempfile::tempdir().unwrap();
    let report = build_json(dir.path(), store.path(), &[]);
    registry.push(store.path(), "bb", "lib/busybox:1");
    report["images"][0]["digest"].as_str().unwrap().to_string()
}

#[test]
fn an_external_base_is_pulled_and_pinned_by_digest() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let digest = publish_busybox(&registry);
    let from = format!("{}/lib/busybox:1", registry.host);
    let dir = project(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.app]\ncontext = \"app\"\n"),
        (
            "app/Dockerfile",
            &format!("ARG BASE={from}\nFROM ${{BASE}}\nRUN echo built-on-pulled-base > /proof\n"),
        ),
    ]);
    let store = tempfile::tempdir().unwrap();

    // Before the build, the plan lists the base but has no digest for it.
    let plan = ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["plan", "--json"])
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["images"][0]["external_bases"][0]["reference"], from.as_str());
    assert!(plan["images"][0]["external_bases"][0]["digest"].is_null());

    let report = build_json(dir.path(), store.path(), &[]);
    assert_eq!(report["bases"][&from]["descriptor"]["digest"], digest.as_str());
    assert_eq!(report["bases"][&from]["pulled"], true);
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "app", work.path());
    assert_eq!(std::fs::read_to_string(rootfs.join("proof")).unwrap(), "built-on-pulled-base\n");

    // Now the plan shows the pinned digest, and a rebuild does not pull again.
    let plan = ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["plan", "--json"])
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["images"][0]["external_bases"][0]["digest"], digest.as_str());
    let again = build_json(dir.path(), store.path(), &[]);
    assert_eq!(again["bases"][&from]["pulled"], false);
    assert_eq!(again["steps_built"], 0);
}

#[test]
fn bases_come_through_a_mirror_when_the_registry_is_unreachable() {
    let mirror = TestRegistry::start(RegistryOptions::default());
    let digest = publish_busybox(&mirror);
    // `registry.invalid` resolves nowhere: only the mirror can serve the pull.
    let toml = format!(
        "[project]\nname = \"t\"\n\n[images.app]\ncontext = \"app\"\n\n[registries.\"registry.invalid\"]\nmirrors = [\"http://{}\"]\n",
        mirror.host
    );
    let dir = project(&[
        ("images.toml", &toml),
        ("app/Dockerfile", "FROM registry.invalid/lib/busybox:1\nRUN true\n"),
    ]);
    let store = tempfile::tempdir().unwrap();
    let report = build_json(dir.path(), store.path(), &[]);
    assert_eq!(
        report["bases"]["registry.invalid/lib/busybox:1"]["descriptor"]["digest"],
        digest.as_str()
    );
}

#[test]
fn a_missing_base_is_a_clear_error() {
    let registry = TestRegistry::start(RegistryOptions::default());
    let dir = project(&[
        ("images.toml", "[project]\nname = \"t\"\n\n[images.app]\ncontext = \"app\"\n"),
        ("app/Dockerfile", &format!("FROM {}/lib/nothing:1\n", registry.host)),
    ]);
    let store = tempfile::tempdir().unwrap();
    let out = ferry(dir.path()).arg("--store").arg(store.path()).arg("build").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("base image `{}/lib/nothing:1` cannot be pulled", registry.host)),
        "{err}"
    );
}
