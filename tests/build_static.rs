//! `ferry build` of the offline example fleet (no RUN): every image checked by skopeo and
//! umoci, reproducibility across stores, and what the cache rebuilds.

mod fixture;

use fixture::{build_json, digests, skopeo_config, stat, top_level_fleet, umoci_unpack};
use serde_json::json;

#[test]
fn builds_the_fleet_and_independent_readers_agree() {
    let dir = top_level_fleet();
    let store = tempfile::tempdir().unwrap();
    let report = build_json(dir.path(), store.path(), &[]);
    let images = report["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    for i in images {
        assert_eq!(i["status"], "built", "{i}");
        assert!(i["digest"].as_str().unwrap().starts_with("sha256:"));
    }

    // base: the rootfs and nothing the .dockerignore excludes.
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "acme/base:1.4.2", work.path());
    assert!(std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap().contains("app:x:10001"));
    assert!(rootfs.join("etc/os-release").is_file());
    assert!(!rootfs.join("Dockerfile").exists());
    assert!(!rootfs.join("rootfs").exists());
    let cfg = skopeo_config(store.path(), "base");
    assert_eq!(cfg["config"]["Env"], json!(["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]));
    assert_eq!(cfg["config"]["Labels"]["org.opencontainers.image.vendor"], "Acme");
    assert_eq!(
        cfg["config"]["Labels"]["org.opencontainers.image.source"],
        "https://example.com/acme"
    );
    // SOURCE_DATE_EPOCH (set by the fixture) wins over images.toml's 0, for `created` and
    // for every mtime in the layers (clamped).
    assert_eq!(cfg["created"], "2026-01-02T03:04:05Z");
    let mtime =
        std::fs::symlink_metadata(rootfs.join("etc/os-release")).unwrap().modified().unwrap();
    assert_eq!(mtime.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1767323045);

    // runtime: --chown with an ARG from images.toml, WORKDIR, USER.
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "runtime", work.path());
    assert_eq!(stat(&rootfs.join("home/app/runtime.conf")), (0o644, 10001, 10001));
    assert!(rootfs.join("etc/passwd").is_file(), "layers of the parent image are there");
    let cfg = skopeo_config(store.path(), "runtime");
    assert_eq!(cfg["config"]["User"], "10001");
    assert_eq!(cfg["config"]["WorkingDir"], "/home/app");
    assert!(cfg["config"]["Env"].as_array().unwrap().contains(&json!("HOME=/home/app")));

    // api: COPY --from a sibling image, exec-form ENTRYPOINT and CMD, EXPOSE.
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "acme/api:2.0.0", work.path());
    assert_eq!(stat(&rootfs.join("usr/local/bin/entrypoint")), (0o755, 0, 0));
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/api/api.toml")).unwrap(),
        "[server]\nport = 8080\n"
    );
    let cfg = skopeo_config(store.path(), "api");
    assert_eq!(cfg["config"]["Entrypoint"], json!(["/usr/local/bin/entrypoint"]));
    assert_eq!(
        cfg["config"]["Cmd"],
        json!(["/usr/local/bin/api", "--config", "/etc/api/api.toml"])
    );
    assert_eq!(cfg["config"]["ExposedPorts"], json!({"8080/tcp": {}}));
    assert_eq!(cfg["config"]["Labels"]["org.opencontainers.image.title"], "acme api");
    assert_eq!(cfg["config"]["User"], "10001", "inherited from runtime");

    // web: multi-stage with a target, STOPSIGNAL.
    let work = tempfile::tempdir().unwrap();
    let rootfs = umoci_unpack(store.path(), "web", work.path());
    assert!(rootfs.join("srv/www/index.html").is_file());
    assert!(rootfs.join("srv/www/style.css").is_file());
    let cfg = skopeo_config(store.path(), "web");
    assert_eq!(cfg["config"]["StopSignal"], "SIGQUIT");
    assert_eq!(cfg["config"]["ExposedPorts"], json!({"443/tcp": {}, "80/tcp": {}}));

    // worker: FROM ${BASE}, VOLUME.
    let cfg = skopeo_config(store.path(), "acme/worker:1.0.0");
    assert_eq!(cfg["config"]["Volumes"], json!({"/var/lib/worker": {}}));
    assert_eq!(cfg["config"]["Cmd"], json!(["/usr/local/bin/worker", "--config=/etc/worker.conf"]));
    let history: Vec<&str> = cfg["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["created_by"].as_str().unwrap_or_default())
        .collect();
    assert!(history.iter().any(|h| h.starts_with("VOLUME")), "{history:?}");
}

#[test]
fn two_empty_stores_give_identical_digests() {
    let dir = top_level_fleet();
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = digests(&build_json(dir.path(), a.path(), &[]));
    let second = digests(&build_json(dir.path(), b.path(), &["--jobs", "1"]));
    assert_eq!(first, second);
    assert_eq!(first.len(), 6);
}

#[test]
fn noop_rebuild_runs_no_step_and_a_one_file_change_rebuilds_only_what_reads_it() {
    let dir = top_level_fleet();
    let store = tempfile::tempdir().unwrap();
    let first = build_json(dir.path(), store.path(), &[]);
    assert!(first["steps_built"].as_u64().unwrap() > 0);

    let again = build_json(dir.path(), store.path(), &[]);
    assert_eq!(again["steps_built"], 0, "{again}");
    assert_eq!(digests(&again), digests(&first));

    std::fs::write(
        dir.path().join("examples/static/services/api/config/api.toml"),
        "[server]\nport = 9090\n",
    )
    .unwrap();
    let changed = build_json(dir.path(), store.path(), &[]);
    let before = digests(&first);
    let after = digests(&changed);
    for name in ["base", "tools", "runtime", "web", "worker"] {
        assert_eq!(before[name], after[name], "{name} must not change");
    }
    assert_ne!(before["api"], after["api"]);
    let api = changed["images"].as_array().unwrap().iter().find(|i| i["name"] == "api").unwrap();
    let built: Vec<u64> = api["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "built")
        .map(|s| s["line"].as_u64().unwrap())
        .collect();
    assert_eq!(built, vec![3], "only COPY config/api.toml (line 3) is rebuilt: {api}");
    assert_eq!(changed["steps_built"], 1);
}

#[test]
fn prune_keeps_what_the_build_cache_points_at() {
    let dir = top_level_fleet();
    let store = tempfile::tempdir().unwrap();
    build_json(dir.path(), store.path(), &[]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.path().join("index.json")).unwrap()).unwrap();
    for m in index["manifests"].as_array().unwrap() {
        let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap();
        let out = fixture::ferry(dir.path())
            .arg("--store")
            .arg(store.path())
            .args(["rmi", "--force", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "rmi {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = fixture::ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["prune", "--all"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = build_json(dir.path(), store.path(), &[]);
    assert_eq!(again["steps_built"], 0, "every layer survived prune through the cache: {again}");
    let out = fixture::ferry(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["cache", "verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
