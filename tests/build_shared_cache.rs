//! `--cache-to` / `--cache-from`: the cache index shared through a real registry. Every
//! RUN step writes random bytes, so an image digest that comes out the same in another
//! store proves its steps were served from the shared cache, not run again.

mod common;

use std::path::Path;

use common::fixture::{self, digests, project, BUSYBOX_BASE};
use common::*;

const MANIFEST: &str = "[project]\nname = \"t\"\n\n[images.bb]\ncontext = \"bb\"\n\n[images.app]\ncontext = \"app\"\n\n[images.web]\ncontext = \"web\"\n";
const RANDOM: &str = "head -c 32 /dev/urandom | od -x";

fn fleet() -> tempfile::TempDir {
    project(&[
        ("images.toml", MANIFEST),
        ("bb/Dockerfile", &format!("{BUSYBOX_BASE}RUN {RANDOM} > /bb-rand\n")),
        ("app/Dockerfile", &format!("FROM bb\nCOPY app.txt /\nRUN {RANDOM} > /app-rand\n")),
        ("app/app.txt", "one\n"),
        // A stage copied into the image: the shared index carries its alias entry too.
        (
            "web/Dockerfile",
            &format!("FROM bb AS out\nRUN {RANDOM} > /r\nFROM bb\nCOPY --from=out /r /web-rand\n"),
        ),
    ])
}

fn steps(report: &serde_json::Value, status: &str) -> usize {
    report["images"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["steps"].as_array().unwrap())
        .filter(|s| s["status"] == status)
        .count()
}

/// `ferry build --json ARGS`, which must succeed; the report and stderr.
fn build(dir: &Path, store: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let out = fixture::ferry(dir)
        .arg("--store")
        .arg(store)
        .args(["build", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ferry build {args:?} failed:\n{}", stderr(&out));
    (serde_json::from_slice(&out.stdout).unwrap(), stderr(&out))
}

/// A registry, the fleet, and its first build in a store of its own, exported to `cache`.
struct Exported {
    reg: TestRegistry,
    cache: String,
    dir: tempfile::TempDir,
    first: tempfile::TempDir,
    /// The first build's report.
    built: serde_json::Value,
}

fn exported() -> Exported {
    let reg = TestRegistry::start(RegistryOptions::default());
    let cache = format!("{}/ci/cache:main", reg.host);
    let dir = fleet();
    let first = tempfile::tempdir().unwrap();
    let (built, _) = build(dir.path(), first.path(), &["--cache-to", &cache]);
    Exported { reg, cache, dir, first, built }
}

#[test]
fn a_fresh_store_builds_the_same_images_from_a_shared_cache_without_running_a_step() {
    let Exported { reg, cache, dir, first, built } = exported();
    let want = digests(&built);
    assert_eq!(built["cache_to"]["reference"], cache.as_str(), "{built}");
    assert!(built["cache_to"]["blobs_uploaded"].as_u64().unwrap() >= 5, "{built}");

    // skopeo reads the export as an OCI manifest whose config is ferry's index, and whose
    // layers are the layers of the images.
    let raw = skopeo_manifest(&cache).expect("skopeo reads the cache manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.ferry.cache.index.v1+json");
    let exported: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    for l in fixture::layer_digests(first.path(), "web") {
        assert!(exported.contains(&l.as_str()), "{l} not exported: {exported:?}");
    }

    let fresh = tempfile::tempdir().unwrap();
    let (again, log) =
        build(dir.path(), fresh.path(), &["--cache-from", &cache, "--cache-to", &cache]);
    assert_eq!(digests(&again), want, "{log}");
    // web's `COPY --from` hit its alias entry in this store: its export kept the
    // content key that alias stands for too, for a build whose stage changes but whose copied
    // file does not.
    let index = cache_index(&reg.host, &cache);
    let entries = index["entries"].as_object().unwrap();
    let aliases: Vec<&str> = entries.values().filter_map(|e| e["resolves_to"].as_str()).collect();
    assert!(!aliases.is_empty(), "{index}");
    for target in aliases {
        assert!(entries.contains_key(target), "alias target {target} dropped: {index}");
    }
    assert_eq!(steps(&again, "built"), 0, "every layer step came from the shared cache: {again}");
    assert!(again["cache_from"]["hits"].as_u64().unwrap() >= 5, "{again}");
    assert!(log.contains("shared cache:"), "{log}");
    // The images are whole in the new store: umoci unpacks them.
    let work = tempfile::tempdir().unwrap();
    let rootfs = fixture::umoci_unpack(fresh.path(), "web", work.path());
    assert!(rootfs.join("web-rand").is_file());
    // And the hits went into the local cache: the next build asks the registry nothing.
    let (third, _) = build(dir.path(), fresh.path(), &[]);
    assert_eq!(digests(&third), want);
    assert_eq!(steps(&third, "built"), 0);

    // Without the shared cache the steps run again and make other images.
    let alone = tempfile::tempdir().unwrap();
    let (alone, _) = build(dir.path(), alone.path(), &[]);
    assert_ne!(digests(&alone)["bb"], want["bb"]);
}

#[test]
fn an_export_of_some_images_keeps_the_entries_of_the_others() {
    let Exported { reg: _reg, cache, dir, first: _first, built } = exported();
    let before = digests(&built);

    // A change to app, built alone (with its ancestor) in another store, from and to the cache.
    std::fs::write(dir.path().join("app/app.txt"), "two\n").unwrap();
    let second = tempfile::tempdir().unwrap();
    let (app, _) =
        build(dir.path(), second.path(), &["app", "--cache-from", &cache, "--cache-to", &cache]);
    let app_digests = digests(&app);
    assert_eq!(app_digests["bb"], before["bb"], "bb came from the cache");
    assert_ne!(app_digests["app"], before["app"], "app changed");
    assert_eq!(steps(&app, "built"), 2, "app's COPY and RUN ran: {app}");
    assert!(app.get("images").unwrap().as_array().unwrap().iter().all(|i| i["name"] != "web"));

    // A third store gets web from the first export and app from the second.
    let third = tempfile::tempdir().unwrap();
    let (last, log) = build(dir.path(), third.path(), &["--cache-from", &cache]);
    let got = digests(&last);
    assert_eq!(got["web"], before["web"], "web's entries survived app's export: {log}");
    assert_eq!(got["app"], app_digests["app"]);
    assert_eq!(steps(&last, "built"), 0, "{last}");
}

#[test]
fn a_missing_unreachable_or_foreign_cache_is_a_warning_and_the_build_goes_on() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let dir = fleet();
    let store = tempfile::tempdir().unwrap();
    let nothing = format!("{}/ci/cache:none", reg.host);
    let closed = format!("127.0.0.1:{}/ci/cache:main", free_port());
    let (report, log) =
        build(dir.path(), store.path(), &["--cache-from", &nothing, "--cache-from", &closed]);
    assert_eq!(report["images"].as_array().unwrap().len(), 3);
    assert!(log.contains(&format!("--cache-from {nothing}: no cache there yet")), "{log}");
    assert!(log.contains(&format!("--cache-from {closed}: cannot reach registry")), "{log}");

    // An image where the cache should be: neither used nor overwritten.
    let image = format!("{}/ci/app:1", reg.host);
    let layout = tempfile::tempdir().unwrap();
    make_oci_image(layout.path(), "img", &[vec![file("a", b"a", 0o644)]], Comp::Gzip);
    reg.push(layout.path(), "img", "ci/app:1");
    let before = skopeo_digest(&image).unwrap();
    let other = tempfile::tempdir().unwrap();
    let (report, log) =
        build(dir.path(), other.path(), &["--cache-from", &image, "--cache-to", &image]);
    assert!(log.contains("it is not a ferry cache"), "{log}");
    assert!(log.contains("the cache was not exported"), "{log}");
    assert!(report["cache_to_error"].as_str().unwrap().contains("not a ferry cache"), "{report}");
    assert!(report.get("cache_to").is_none(), "{report}");
    assert_eq!(skopeo_digest(&image).unwrap(), before, "the image was left alone");
}

#[test]
fn an_entry_whose_layer_is_not_what_it_says_is_built_locally() {
    let Exported { reg, cache, dir, first, built } = exported();
    let want = digests(&built);

    // Rewrite the index: app's RUN entry now claims another diff_id for its layer.
    let app_run_layer = fixture::layer_digests(first.path(), "app").last().unwrap().clone();
    let raw = skopeo_manifest(&cache).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();
    let index_bytes = get(&reg.host, &format!("/v2/ci/cache/blobs/{config}"));
    let mut index: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();
    let mut poisoned = 0;
    for entry in index["entries"].as_object_mut().unwrap().values_mut() {
        if entry["blob"]["digest"] == app_run_layer.as_str() {
            entry["diff_id"] = format!("sha256:{}", "0".repeat(64)).into();
            poisoned += 1;
        }
    }
    assert_eq!(poisoned, 1, "{index}");
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = sha256(&bytes);
    put_blob(&reg.host, "ci/cache", &digest, &bytes);
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = bytes.len().into();
    put_manifest(&reg.host, "ci/cache", "main", &serde_json::to_vec(&manifest).unwrap());

    let fresh = tempfile::tempdir().unwrap();
    let (again, log) = build(dir.path(), fresh.path(), &["--cache-from", &cache]);
    let got = digests(&again);
    assert!(log.contains("not the entry's diff_id"), "{log}");
    assert_eq!(got["bb"], want["bb"]);
    assert_eq!(got["web"], want["web"]);
    assert_ne!(got["app"], want["app"], "app's RUN ran again");
    assert_eq!(steps(&again, "built"), 1, "{again}");
    // What was built is a sound image.
    let work = tempfile::tempdir().unwrap();
    let rootfs = fixture::umoci_unpack(fresh.path(), "app", work.path());
    assert!(rootfs.join("app-rand").is_file());
}

/// The index a cache reference holds, read over the distribution API.
fn cache_index(host: &str, reference: &str) -> serde_json::Value {
    let manifest = skopeo_inspect(reference).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    let path = reference.trim_start_matches(&format!("{host}/"));
    let repo = path.split(':').next().unwrap();
    serde_json::from_slice(&get(host, &format!("/v2/{repo}/blobs/{config}"))).unwrap()
}

fn http() -> reqwest::blocking::Client {
    ferry::registry::http_client_builder().build().unwrap()
}

fn get(host: &str, path: &str) -> Vec<u8> {
    let resp = http().get(format!("http://{host}{path}")).send().unwrap();
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    resp.bytes().unwrap().to_vec()
}

fn put_blob(host: &str, repo: &str, digest: &str, bytes: &[u8]) {
    let c = http();
    let resp = c.post(format!("http://{host}/v2/{repo}/blobs/uploads/")).send().unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let url =
        if location.starts_with("http") { location } else { format!("http://{host}{location}") };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = c.put(format!("{url}{sep}digest={digest}")).body(bytes.to_vec()).send().unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().unwrap_or_default());
}

fn put_manifest(host: &str, repo: &str, tag: &str, bytes: &[u8]) {
    let resp = http()
        .put(format!("http://{host}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(bytes.to_vec())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().unwrap_or_default());
}

#[test]
fn a_registry_that_fails_costs_only_the_cache() {
    let Exported { reg, cache: direct, dir, first: _first, built } = exported();
    let proxy = FaultProxy::in_front_of(&reg, |_| Action::Forward);
    let exported = skopeo_digest(&direct).unwrap();
    let index = skopeo_inspect(&direct).unwrap()["config"]["digest"].as_str().unwrap().to_string();
    // The index reads, but every layer download answers 500 (ferry retries, then gives up
    // on the entry), and uploads answer 500.
    proxy.set_rule(move |r| {
        let layer = r.path.contains("/blobs/sha256:") && !r.path.contains(&index);
        match r.method.as_str() {
            "GET" if layer => Action::Respond(500, vec![]),
            "POST" | "PATCH" | "PUT" if r.path.contains("/blobs/uploads/") => {
                Action::Respond(500, vec![])
            }
            _ => Action::Forward,
        }
    });

    let through = format!("{}/ci/cache:main", proxy.host);
    let fresh = tempfile::tempdir().unwrap();
    proxy.take();
    let (again, log) = build(dir.path(), fresh.path(), &["--cache-from", &through]);
    // Once: after one layer's retries the registry is not asked again for the other steps.
    let gave_up = log.matches("not using it for the rest of this build").count();
    assert_eq!(gave_up, 1, "{log}");
    let layers_asked: std::collections::BTreeSet<String> = proxy
        .take()
        .into_iter()
        .filter(|r| r.method == "GET" && r.status == 500)
        .map(|r| r.path)
        .collect();
    assert_eq!(layers_asked.len(), 1, "{layers_asked:?}");
    assert_eq!(again["cache_from"]["hits"], 0, "{again}");
    assert_ne!(digests(&again)["bb"], digests(&built)["bb"], "the steps ran");

    // An export whose uploads fail leaves the tag on the index it had, and never sends the
    // manifest.
    std::fs::write(dir.path().join("app/app.txt"), "two\n").unwrap();
    proxy.take();
    let (report, log) = build(dir.path(), fresh.path(), &["--cache-to", &through]);
    assert!(log.contains("the cache was not exported"), "{log}");
    assert!(report["cache_to_error"].is_string(), "{report}");
    assert_eq!(skopeo_digest(&direct).unwrap(), exported);
    let manifest_puts: Vec<String> = proxy
        .take()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/manifests/"))
        .map(|r| r.path)
        .collect();
    assert!(manifest_puts.is_empty(), "{manifest_puts:?}");
}

#[test]
fn push_takes_the_cache_flags_too() {
    let reg = TestRegistry::start(RegistryOptions::default());
    let cache = format!("{}/ci/cache:main", reg.host);
    let dir = fleet();
    let toml = dir.path().join("images.toml");
    let env = format!("\n[environments.dev]\nregistry = \"{}/dev\"\ntags = [\"dev\"]\n", reg.host);
    std::fs::write(&toml, format!("{MANIFEST}{env}")).unwrap();
    let push = |store: &Path, flag: &str| {
        let out = fixture::ferry(dir.path())
            .arg("--store")
            .arg(store)
            .args(["push", "--env", "dev", flag, &cache])
            .output()
            .unwrap();
        assert!(out.status.success(), "push {flag}: {}", stderr(&out));
        stderr(&out)
    };
    let first = tempfile::tempdir().unwrap();
    let log = push(first.path(), "--cache-to");
    assert!(log.contains("exported the cache to"), "{log}");
    let pushed: Vec<String> = ["bb", "app", "web"]
        .iter()
        .map(|i| skopeo_digest(&format!("{}/dev/t/{i}:dev", reg.host)).unwrap())
        .collect();

    // Another machine pushes the same images: its steps came from the cache, so no tag moved.
    let fresh = tempfile::tempdir().unwrap();
    let log = push(fresh.path(), "--cache-from");
    assert!(log.contains("shared cache:"), "{log}");
    for (i, digest) in ["bb", "app", "web"].iter().zip(&pushed) {
        assert_eq!(&skopeo_digest(&format!("{}/dev/t/{i}:dev", reg.host)).unwrap(), digest, "{i}");
    }
}
