//! Test harness for push and check: the example fleet pointed at a registry, and ferry run
//! on it. The registry, the fault-injecting proxy that counts what crosses it, the skopeo
//! readers and ferry's clean environment come from the shared harness (tests/common), which
//! this module re-exports.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

#[path = "../common/mod.rs"]
pub mod common;

pub use common::*;

/// A real registry on a free loopback port (plain HTTP, no auth), killed when dropped.
pub fn start_registry() -> TestRegistry {
    TestRegistry::start(RegistryOptions::default())
}

/// The top-level fleet (images.toml + examples/static) in a fresh git repository, with its
/// environments pointing at `host` and `extra` appended to images.toml.
pub fn fleet(host: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = fixture::repo_root();
    let toml =
        std::fs::read_to_string(root.join("images.toml")).unwrap().replace("127.0.0.1:5000", host);
    std::fs::write(dir.path().join("images.toml"), format!("{toml}\n{extra}")).unwrap();
    fixture::copy_dir(&root.join("examples/static"), &dir.path().join("examples/static"));
    fixture::git_commit(dir.path(), "fleet");
    dir
}

/// `ferry --store STORE ARGS` in `dir`, in the clean environment of `fixture::ferry`.
pub fn run(dir: &Path, store: &Path, args: &[&str]) -> Output {
    fixture::ferry(dir).arg("--store").arg(store).args(args).output().unwrap()
}

/// Run `ferry ARGS --json`, requiring exit `code`; the JSON document.
pub fn json(dir: &Path, store: &Path, args: &[&str], code: i32) -> serde_json::Value {
    let out =
        fixture::ferry(dir).arg("--store").arg(store).arg("--json").args(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// Copy `docker://REF` into an OCI layout with skopeo, keeping digests; the digest of the
/// manifest the layout holds.
pub fn skopeo_copy_digest(reference: &str, layout: &Path) -> String {
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:img", layout.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy {reference}: {}", stderr(&out));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_string()
}
